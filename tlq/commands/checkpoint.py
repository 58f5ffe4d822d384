"""`tlq verify` and `tlq dequantize`."""
from __future__ import annotations

from pathlib import Path

import typer

from tlq.errors import CheckpointError


def verify(ckpt: Path = typer.Argument(..., help="checkpoint folder")) -> None:
    """Check a checkpoint's hashes and tensor shapes; print a one-line verdict."""
    from tlq.format.checkpoint import verify_checkpoint
    try:
        info = verify_checkpoint(ckpt)
    except CheckpointError as exc:
        typer.echo(f"FAIL {ckpt}: {exc}")
        raise typer.Exit(1)
    q = info.quant_config
    typer.echo(f"OK {ckpt}: {q['scheme']} ({q['bits']}-bit, group {q['group_size']}, "
               f"{'sym' if q['sym'] else 'asym'}), method {q.get('method')}, "
               f"{len(info.quantized_layers)} quantized linears, {len(info.manifest['files'])} files verified")


def dequantize(ckpt: Path = typer.Argument(..., help="checkpoint folder"),
               out: Path = typer.Argument(..., help="folder for the float model"),
               overwrite: bool = typer.Option(False, help="replace OUT if it exists")) -> None:
    """Write a float Hugging Face model with the checkpoint's dequantized weights."""
    from tlq.format.dequantize import write_dequantized
    path = write_dequantized(ckpt, out, overwrite=overwrite)
    typer.echo(f"dequantized model written to {path}")


def register(app: typer.Typer) -> None:
    app.command()(verify)
    app.command()(dequantize)
