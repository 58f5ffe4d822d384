"""`tlq calibrate`: quantize a model folder into a packed checkpoint."""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Optional

import typer

from tlq.calib.config import METHODS, CalibConfig, ImportanceConfig, get_method
from tlq.errors import TLQError
from tlq.schemes import SCHEMES, get_scheme


def calibrate(
    model: Path = typer.Argument(..., help="local folder of the float model (Hugging Face layout)"),
    out: Path = typer.Option(..., "--out", "-o", help="checkpoint folder to write"),
    method: str = typer.Option("tlq", help=f"one of: {', '.join(METHODS)}"),
    scheme: str = typer.Option("w4a16", help=f"one of: {', '.join(SCHEMES)}"),
    group_size: Optional[int] = typer.Option(None, help="override the scheme's group size (-1 = per channel)"),
    sym: Optional[bool] = typer.Option(None, "--sym/--asym", help="override the scheme's symmetry"),
    calib: Optional[Path] = typer.Option(None, help="calibration JSONL (default: the bundled set)"),
    max_samples: Optional[int] = typer.Option(None, help="use at most this many samples"),
    seed: int = typer.Option(0, help="seed for every random choice"),
    device: str = typer.Option("cpu", help="compute device for the layer being calibrated: cpu or cuda"),
    act_order: bool = typer.Option(False, help="GPTQ act-order (writes g_idx)"),
    damp: Optional[float] = typer.Option(None, help="GPTQ damping, fraction of the mean Hessian diagonal "
                                         "(default: the method's, 0.01; tlq 0.1)"),
    exposure_strength: Optional[float] = typer.Option(None, help="share of the corrected-exposure shift applied, "
                                                      "0..1 (default: the method's; tlq 0.5)"),
    importance: Optional[str] = typer.Option(None, help="override token weighting: uniform|modality|modality_prior|token"),
    exposure: Optional[str] = typer.Option(None, help="override exposure: fp|quantized|corrected"),
    input_scaling: Optional[str] = typer.Option(None, help="override input scaling: none|awq|smoothquant|auto "
                                                "(auto: awq where activations are quantized)"),
    max_tokens: Optional[int] = typer.Option(None, help="token-level calibration set: keep at most N tokens per layer"),
    drop_below: float = typer.Option(0.0, help="token-level calibration set: drop tokens with weight below this"),
    overwrite: bool = typer.Option(False, help="replace OUT if it exists"),
    resume: bool = typer.Option(True, help="continue an interrupted run from its last finished layer"),
    dry_run: bool = typer.Option(False, help="print the peak memory estimate and exit"),
    nproc: int = typer.Option(1, help="layer-sharded calibration over N processes (starts torchrun)"),
    quiet: bool = typer.Option(False, help="no progress bars"),
) -> None:
    """Quantize MODEL with METHOD under SCHEME and write a packed checkpoint to OUT."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    spec = get_method(method)
    overrides = {}
    if importance is not None:
        overrides["importance"] = importance
    if exposure is not None:
        overrides["exposure"] = exposure
    if input_scaling is not None:
        overrides["input_scaling"] = input_scaling
    if overrides:
        spec = dataclasses.replace(spec, **overrides)
    if device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            raise TLQError("--device cuda was given but torch sees no CUDA device; use --device cpu")
    cfg = CalibConfig(
        model=model, out=out, method=spec, scheme=get_scheme(scheme).with_overrides(group_size, sym),
        calib=calib, max_samples=max_samples, seed=seed, device=device, act_order=act_order, damp=damp,
        exposure_strength=exposure_strength,
        importance=ImportanceConfig(mode=spec.importance, max_tokens=max_tokens, drop_below=drop_below),
        overwrite=overwrite, resume=resume)
    if dry_run:
        from tlq.multirank.estimate import estimate_memory, format_estimate
        typer.echo(format_estimate(estimate_memory(cfg, nproc)))
        return
    if nproc > 1:
        from tlq.multirank.launch import launch_torchrun
        code = launch_torchrun(nproc)
        if code:
            raise SystemExit(code)  # typer.Exit's code is lost under standalone_mode=False (tlq/cli.py)
        return
    from tlq.multirank.context import env_world_size
    if env_world_size() > 1:  # started by torchrun: this process calibrates one stage
        from tlq.multirank.run import calibrate_distributed
        path = calibrate_distributed(cfg, progress=not quiet)
        if path is not None:  # rank 0
            _print_summary(path)
        return
    from tlq.calib.pipeline import calibrate as run
    path = run(cfg, progress=not quiet)
    _print_summary(path)


def _print_summary(path: Path) -> None:
    report = json.loads((path / "tlq_report.json").read_text())
    if report["layers"]:
        from rich.console import Console
        from rich.table import Table
        table = Table(title=f"{report['method']} {report['scheme']}: per-layer output error (relative MSE)")
        for col in ("layer", "vision", "text", "seconds", "peak MB"):
            table.add_column(col, justify="right")
        for row in report["layers"]:
            fmt = lambda v: "-" if v is None else f"{v:.3e}"  # noqa: E731
            table.add_row(str(row["layer"]), fmt(row["rel_vision"]), fmt(row["rel_text"]),
                          f"{row['seconds']:.2f}", f"{row['peak_mem_mb']:.0f}")
        Console(stderr=True).print(table)
    typer.echo(f"checkpoint written to {path} ({report['total_seconds']:.1f} s)")


def register(app: typer.Typer) -> None:
    app.command()(calibrate)
