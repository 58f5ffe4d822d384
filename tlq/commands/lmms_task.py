"""`tlq lmms-task`: write a local lmms-eval task from a QA JSONL (nothing is downloaded)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def lmms_task(
    data: Annotated[Path, typer.Argument(help="QA JSONL in the calibration format (last assistant turn = answer)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="folder for the task (lmms-eval's --include_path)")],
    name: Annotated[str, typer.Option(help="task name (letters, digits, _)")] = "tlq_qa",
    max_samples: Annotated[int | None, typer.Option(help="use at most N questions")] = None,
) -> None:
    """Write DATA as an lmms-eval task: YAML, functions, data and images in OUT, scored with tlq's exact match."""
    from tlq.evaluate.lmms_task import write_lmms_task
    yaml_path = write_lmms_task(data, out, name, max_samples)
    typer.echo(f"wrote lmms-eval task {name!r}: {yaml_path}\n"
               f"  python -m lmms_eval --model openai_compatible --model_args model_version=<served name> "
               f"--include_path {yaml_path.parent} --tasks {name} --batch_size 1 --output_path <folder>\n"
               "  (with OPENAI_API_BASE=http://127.0.0.1:<port>/v1 and OPENAI_API_KEY set)")


def register(app: typer.Typer) -> None:
    app.command("lmms-task")(lmms_task)
