"""`tlq export`: convert a TLQ checkpoint for tools that do not have the tlq plugin."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tlq.errors import TLQError


def export(
    ckpt: Annotated[Path, typer.Argument(help="TLQ checkpoint folder (verified before export)")],
    out: Annotated[Path, typer.Argument(help="folder to write the exported model into")],
    format: Annotated[str, typer.Option("--format", help="target format: compressed-tensors")] = "compressed-tensors",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace OUT if it exists")] = False,
) -> None:
    """Export for stock vLLM (4-bit weight-only, symmetric 8-bit, w4a8); other schemes are refused."""
    from tlq.export import FORMATS
    if format not in FORMATS:
        raise TLQError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    path = FORMATS[format](ckpt, out, overwrite=overwrite)
    typer.echo(f"exported {ckpt} to {path} ({format}); serve it with stock vLLM: vllm serve {path}")


def register(app: typer.Typer) -> None:
    app.command("export")(export)
