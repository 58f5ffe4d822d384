"""`tlq calibrate`: quantize a model folder into a packed checkpoint."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import typer

from tlq.calib.config import METHODS
from tlq.schemes import SCHEMES


def calibrate(
    model: Path = typer.Argument(..., help="local folder of the float model (Hugging Face layout)"),
    out: Path = typer.Option(..., "--out", "-o", help="checkpoint folder to write"),
    method: str = typer.Option("tlq", help=f"one of: {', '.join(METHODS)}"),
    scheme: str = typer.Option("w4a16", help=f"one of: {', '.join(SCHEMES)}"),
    group_size: int | None = typer.Option(None, help="override the scheme's group size (-1 = per channel)"),
    sym: bool | None = typer.Option(None, "--sym/--asym", help="override the scheme's symmetry"),
    calib: Path | None = typer.Option(None, help="calibration JSONL (default: the bundled set)"),
    max_samples: int | None = typer.Option(None, help="use at most this many samples"),
    seed: int = typer.Option(0, help="seed for every random choice"),
    device: str = typer.Option("cpu", help="compute device for the layer being calibrated: cpu or cuda"),
    act_order: bool = typer.Option(False, help="GPTQ act-order (writes g_idx)"),
    damp: float | None = typer.Option(None, help="GPTQ damping, fraction of the mean Hessian diagonal "
                                         "(default: the method's, 0.01; tlq 0.1)"),
    damp_candidates: str | None = typer.Option(None, help="comma-separated dampings each linear group chooses "
                                                "among on held-out calibration samples, e.g. 0.01,0.1 "
                                                "(two-fold; 'none': --damp everywhere; default: the method's)"),
    exposure_strength: float | None = typer.Option(None, help="share of the corrected-exposure shift applied, "
                                                      "0..1 (default: the method's; tlq 0.5)"),
    importance: str | None = typer.Option(None, help="override token weighting: uniform|modality|modality_prior|token"),
    exposure: str | None = typer.Option(None, help="override exposure: fp|quantized|corrected"),
    input_scaling: str | None = typer.Option(None, help="override input scaling: none|awq|smoothquant|auto "
                                                "(auto: awq where activations are quantized)"),
    max_tokens: int | None = typer.Option(None, help="token-level calibration set: keep at most N tokens per layer"),
    drop_below: float = typer.Option(0.0, help="token-level calibration set: drop tokens with weight below this"),
    batch_tokens: int = typer.Option(8192, help="tokens per batch when a linear group's inputs are streamed into "
                                     "its statistics (memory: batch x K fp32; nothing grows with calibration tokens)"),
    search_tokens: int = typer.Option(4096, help="tokens (whole samples, drawn by importance) that the input-scale "
                                      "and clipping searches see; recorded in the manifest"),
    judge_rows: int = typer.Option(512, help="tlq weight-only: a linear with more than 2x this many output rows "
                                   "has its input scale judged on this many seeded rows, then only the winner "
                                   "is solved in full; recorded in the manifest"),
    host_memory: float = typer.Option(16.0, help="GiB of host RAM a process may use beyond its weights; the "
                                      "hidden-state streams are spilled to files in the work folder when they "
                                      "would take more than half of it (same checkpoint)"),
    max_pixels: int | None = typer.Option(None, help="downscale calibration images above this many pixels "
                                             "(aspect kept) before the processor; default: the processor's own "
                                             "bound (Qwen2-VL-7B-Instruct: max_pixels 12845056; LLaVA-OneVision: "
                                             "anyres_max_9, base image + at most 9 tiles)"),
    overwrite: bool = typer.Option(False, help="replace OUT if it exists"),
    resume: bool = typer.Option(True, help="continue an interrupted run from its last finished layer"),
    dry_run: bool = typer.Option(False, help="print the peak memory estimate and exit"),
    tokens_per_sample: int | None = typer.Option(None, help="--dry-run only: assume --max-samples samples of "
                                                    "this many tokens (a folder without processor or weights)"),
    nproc: int = typer.Option(1, help="layer-sharded calibration over N processes (starts torchrun)"),
    tp: int | None = typer.Option(None, help="tensor-parallel size you will serve with: warns when a row-parallel "
                                     "layer's inputs per rank are not whole groups, and offers a group size that is"),
    quiet: bool = typer.Option(False, help="no progress bars"),
) -> None:
    """Quantize MODEL with METHOD under SCHEME and write a packed checkpoint to OUT."""
    import tlq.api
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = tlq.api.make_config(
        model, out, method=method, scheme=scheme, calib=calib, group_size=group_size, sym=sym,
        importance=importance, exposure=exposure, input_scaling=input_scaling, max_tokens=max_tokens,
        drop_below=drop_below, max_samples=max_samples, seed=seed, device=device, act_order=act_order, damp=damp,
        damp_candidates=_damp_candidates(damp_candidates), exposure_strength=exposure_strength,
        overwrite=overwrite, resume=resume, batch_tokens=batch_tokens,
        search_tokens=search_tokens, judge_rows=judge_rows, host_memory=host_memory, max_pixels=max_pixels)
    if tp is not None:
        _warn_tensor_parallel(cfg, tp)
    if dry_run:  # plans only: needs no GPU, even for --device cuda
        from tlq.multirank.estimate import estimate_memory, format_estimate
        typer.echo(format_estimate(estimate_memory(cfg, nproc, tokens_per_sample)))
        return
    if tokens_per_sample is not None:
        from tlq.errors import TLQError
        raise TLQError("--tokens-per-sample only states the calibration size for --dry-run; a run counts the "
                       "tokens of its calibration set: drop the flag or add --dry-run")
    if nproc > 1:
        from tlq.multirank.launch import launch_torchrun
        code = launch_torchrun(nproc)
        if code:
            raise SystemExit(code)  # typer.Exit's code is lost under standalone_mode=False (tlq/cli.py)
        return
    path = tlq.api.run(cfg, progress=not quiet)
    if path is not None:  # None on the ranks other than 0 of a torchrun
        _print_summary(path)


def _warn_tensor_parallel(cfg, tp: int) -> None:
    from tlq.calib.assemble import decoder_linear_names
    from tlq.errors import TLQError
    from tlq.format.tensor_parallel import tp_advice
    from tlq.model_io import open_source_model
    if tp < 1:
        raise TLQError(f"--tp must be at least 1, got {tp}")
    source = open_source_model(cfg.model)
    shapes = source.tensor_shapes()
    inputs = {name: shapes[f"{name}.weight"][1] for name in decoder_linear_names(source)}
    advice = tp_advice(inputs, tp, cfg.scheme.group_size)
    if advice:
        typer.secho(f"warning: {advice}", fg=typer.colors.YELLOW, err=True)


def _print_summary(path: Path) -> None:
    report = json.loads((path / "tlq_report.json").read_text())
    if report["layers"]:
        from rich.console import Console
        from rich.table import Table
        table = Table(title=f"{report['method']} {report['scheme']}: per-layer output error (relative MSE)")
        for col in ("layer", "vision", "text", "seconds", "peak MB"):
            table.add_column(col, justify="right")
        for row in report["layers"]:
            fmt = lambda v: "-" if v is None else f"{v:.3e}"
            table.add_row(str(row["layer"]), fmt(row["rel_vision"]), fmt(row["rel_text"]),
                          f"{row['seconds']:.2f}", f"{row['peak_mem_mb']:.0f}")
        Console(stderr=True).print(table)
    from tlq.calib.timing import format_phase_times
    if "phase_seconds" in report:
        typer.echo(format_phase_times(report["phase_seconds"]), err=True)
    for rank in report.get("ranks", []):
        typer.echo(f"rank {rank['rank']}: {format_phase_times(rank['phase_seconds'])}", err=True)
    typer.echo(f"checkpoint written to {path} ({report['total_seconds']:.1f} s)")


def register(app: typer.Typer) -> None:
    app.command()(calibrate)


def _damp_candidates(text: str | None) -> tuple[float, ...] | None:
    """--damp-candidates: None (the method's), () for 'none', else the listed numbers."""
    if text is None:
        return None
    if text.strip().lower() == "none":
        return ()
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        from tlq.errors import TLQError
        raise TLQError(f"--damp-candidates takes numbers separated by commas (e.g. 0.01,0.1) or 'none', "
                       f"not {text!r}") from None
