"""`tlq fixture`: build a tiny random VLM checkpoint offline (for tests, demos, benchmarks)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tlq.errors import TLQError


def fixture(
    arch: Annotated[str, typer.Argument(help="architecture: qwen2-vl or llava-onevision")],
    out_dir: Annotated[Path, typer.Argument(help="folder to write the checkpoint into (must not exist)")],
    seed: Annotated[int, typer.Option(help="random seed; the same seed gives byte-identical weights")] = 0,
    size: Annotated[str, typer.Option(help="size preset: tiny (tests), medium, deep (28 layers) or 2b (Qwen2-VL-2B text widths, 2 layers) for benchmarks")] = "tiny",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace OUT_DIR if it exists")] = False,
) -> None:
    """Build a random VLM (weights, tokenizer, processor) loadable by transformers and vLLM."""
    run_fixture(arch, out_dir, seed=seed, size=size, overwrite=overwrite)


def run_fixture(arch: str, out_dir: Path, seed: int = 0, size: str = "tiny", overwrite: bool = False) -> Path:
    from tlq.fixtures import build_atomically, ensure_valid

    ensure_valid(arch, size)
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise TLQError(f"{out_dir} already exists; choose another folder or pass --overwrite")
    if out_dir.exists() and not out_dir.is_dir():
        raise TLQError(f"{out_dir} is a file, not a folder; choose another path")
    path = build_atomically(arch, out_dir, seed=seed, size=size, replace=overwrite)
    typer.echo(f"built {arch} ({size}, seed {seed}) in {path}")
    return path


def register(app: typer.Typer) -> None:
    app.command("fixture")(fixture)
