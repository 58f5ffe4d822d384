"""`calibrate_distributed(cfg)`: this rank's part of a multi-rank calibration (see tlq/multirank/__init__.py)."""
from __future__ import annotations

import dataclasses
import gc
import logging
import shutil
import time
import traceback
import uuid
from pathlib import Path

import torch.distributed as dist

from tlq.adapters import get_submodule
from tlq.calib.assemble import decoder_linear_names, packer, stored_tensors
from tlq.calib.capture import capture_samples
from tlq.calib.config import CalibConfig
from tlq.calib.importance import integrate, uniform_weights
from tlq.calib.layer_loop import WorkFolder, loop_streams
from tlq.calib.phases import (
    calibration_record,
    check_unused_calibration,
    load_samples,
    open_and_check,
    rtn_packed,
)
from tlq.calib.rss import peak_rss_mb, rss_mark, trim_heap, write_memory_record
from tlq.calib.streams import LOOP_STREAMS, should_spill, stream_bytes
from tlq.calib.timing import phase_times, reset_phase_times, timed
from tlq.errors import TLQError
from tlq.multirank.context import PeerLost, RankContext, init_rank, rank_device
from tlq.multirank.exchange import all_agree, collect, mbq_gather, merge_weights, share_samples
from tlq.multirank.gradients import pipeline_gradients
from tlq.multirank.plan import plan_stages, tensor_bytes
from tlq.multirank.stage_loop import ahead_count, fp_prefetch, run_stage
from tlq.multirank.stage_model import LoadRecord, build_skeleton, materialize, read_tensors, share
from tlq.multirank.watchdog import ABORT_EXIT
from tlq.multirank.writer import finalize, remove_own_shards, temp_folder, write_shards

log = logging.getLogger("tlq.calibrate")


def rank_work_dir(cfg: CalibConfig, rank: int, world: int) -> Path:
    """Per-rank resumable results, a sibling of the single-process work folder (never inside it)."""
    return cfg.work_dir.parent / f"{cfg.work_dir.name}-rank{rank}of{world}"


def calibrate_distributed(cfg: CalibConfig, progress: bool = True) -> Path | None:
    """Run this rank's stage; rank 0 returns the checkpoint folder, the other ranks None."""
    ctx = init_rank(cfg.device)
    cfg = dataclasses.replace(cfg, device=rank_device(cfg.device, ctx.local_rank))
    try:
        path = _calibrate(ctx, cfg, progress)
    except BaseException as exc:  # noqa: BLE001 - every failure stops all ranks the same way
        _fail(ctx, exc)
    ctx.shutdown()
    return path


def _fail(ctx: RankContext, exc: BaseException) -> None:
    """Tell the other ranks, clean up, print one line and leave at once: unwinding normally
    with a broken process group ends in C++ `terminate` noise instead of the message."""
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, PeerLost):
        message, code = str(exc), ABORT_EXIT
    elif isinstance(exc, TLQError):
        message, code = str(exc), 2
    elif isinstance(exc, KeyboardInterrupt):
        message, code = "interrupted", 130
    elif isinstance(exc, dist.DistError) or "gloo" in str(exc) or "NCCL" in str(exc):
        message, code = f"a transfer with another rank failed ({first_line}); that rank probably died or hung", 1
    else:
        traceback.print_exc()
        message, code = f"{type(exc).__name__}: {first_line}", 1
    ctx.watchdog.post_failure(message)
    ctx.watchdog.abort(message, code, resumable=code != 2)


def _calibrate(ctx: RankContext, cfg: CalibConfig, progress: bool) -> Path | None:
    t0 = time.time()
    reset_phase_times()
    source = open_and_check(cfg)
    tmp = temp_folder(cfg.out, _run_id(ctx))
    ctx.watchdog.add_cleanup((lambda: shutil.rmtree(tmp, ignore_errors=True)) if ctx.is_first
                             else (lambda: remove_own_shards(tmp, ctx.rank)))
    record = LoadRecord()
    model = build_skeleton(source)  # meta device: costs no memory
    stages = plan_stages(tensor_bytes(model), source.adapter, ctx.world)
    stage = stages[ctx.rank]
    if ctx.is_first:
        log.info("%d ranks, decoder layers per rank: %s", ctx.world,
                 ", ".join(f"{s.start}-{s.stop - 1}" for s in stages))
    mine = share(model, source, stages, ctx.rank)
    samples = weights = modalities = loop = None
    if cfg.method.needs_data:
        samples = load_samples(cfg) if ctx.is_first else None  # every line is checked before model work
        loop, weights, modalities = _calibrate_stage(ctx, cfg, source, model, mine, stage, samples, record, progress)
        stats = loop.layer_stats
    else:
        if ctx.is_first:
            check_unused_calibration(cfg)
        quantized, overrides, stats = _rtn_share(source, mine, cfg, record), {}, []
    del model
    gc.collect()
    trim_heap()
    ctx.watchdog.phase = "writing this rank's shard"
    if loop is not None:
        quantized, overrides = loop.results()  # each layer's, read back from the work folder
    tensors, layers = stored_tensors(source, set(mine.values()), quantized, overrides,
                                     read=lambda names: read_tensors(source, names, record))
    del quantized, overrides
    with timed("write"):
        files = write_shards(tmp, ctx.rank, tensors)
    del tensors
    summary = {"rank": ctx.rank, "layers": [stage.start, stage.stop - 1], "stats": stats, "files": files,
               "quantized_layers": layers, "loaded_tensors": len(record.names),
               "loaded_mb": round(record.nbytes / 2**20, 1), "peak_rss_mb": round(peak_rss_mb(), 1),
               "seconds": round(time.time() - t0, 2), "phase_seconds": phase_times(time.time() - t0),
               "weights": weights if cfg.method.needs_gradients else None}
    summaries = collect(ctx, summary)
    path = None
    if ctx.is_first:
        ctx.watchdog.phase = "assembling the checkpoint"
        path = _assemble(ctx, cfg, source, tmp, summaries, samples, weights, modalities, t0)
        ctx.post("final")
    else:
        ctx.wait_for(["final"], "waiting for rank 0 to assemble the checkpoint")
    if cfg.method.needs_data:
        shutil.rmtree(rank_work_dir(cfg, ctx.rank, ctx.world), ignore_errors=True)
    _write_record(ctx, stage, record)
    return path


def _calibrate_stage(ctx: RankContext, cfg: CalibConfig, source, model, mine: dict, stage: range, samples,
                     record: LoadRecord, progress: bool):
    """Load this rank's tensors, capture (rank 0), token weights, FP targets ahead, layer loop.
    Returns the loop's result (its layers' results are in the work folder), token weights, modalities."""
    ctx.watchdog.phase = "loading this rank's weights"
    materialize(model, source, mine, record)
    with timed("capture"):
        captured = share_samples(ctx, capture_samples(model, source, samples, progress, cfg.device, cfg.max_pixels)
                                 if ctx.is_first else None)
    key = {**cfg.run_key(), "rank": ctx.rank, "world": ctx.world, "layers": [stage.start, stage.stop]}
    work = WorkFolder(rank_work_dir(cfg, ctx.rank, ctx.world), key)
    done = max(work.open(cfg.resume), stage.start)
    if done > stage.start:
        log.info("rank %d resumes from %s: %d layer(s) done", ctx.rank, work.path, done - stage.start)
    with timed("gradients"):
        weights, entry = _token_weights(ctx, model, source.adapter, stage, captured, cfg, work, progress)
    trim_heap()
    rss_mark("token weights")
    # the stage's streams in RAM: the loop's four, or three beside k FP targets computed ahead (the
    # first target is the first layer's y_fp), as the dry-run counts them; above their
    # share of --host-memory all of them (the entry streams too) go to files in the work folder
    size = stream_bytes(sum(s.num_tokens for s in captured), get_submodule(model, source.adapter.final_norm)
                        .weight.shape[0], next(model.parameters()).dtype, streams=1)
    ahead = ahead_count(ctx.is_first, entry is None, stage, done, size, ctx.settings.fp_prefetch_mb * 2**20)
    streams = loop_streams(work, should_spill(max(LOOP_STREAMS, 3 + ahead) * size, cfg.host_memory))
    entry, targets = fp_prefetch(ctx, model, source.adapter, stage, captured, entry, cfg.device, ahead, done, streams)
    loop = run_stage(ctx, model, source.adapter, captured, weights, cfg, work, done, stage, entry, targets,
                     progress, keep=packer(source.dtype), streams=streams)
    return loop, weights, [s.modality for s in captured]


def _run_id(ctx: RankContext) -> str:
    if ctx.is_first:
        ctx.post("run_id", uuid.uuid4().hex[:12])
    ctx.wait_for(["run_id"], "start-up")
    return ctx.store.get("run_id").decode()


def _token_weights(ctx: RankContext, model, adapter, stage: range, captured, cfg: CalibConfig,
                   work: WorkFolder, progress: bool):
    """This rank's token weights (all layers' keys for uniform ones) and, when the gradient pass
    ran, the FP stream at the stage's entry (else None)."""
    if not cfg.method.needs_gradients:
        return uniform_weights(captured, len(adapter.layers(model))), None
    raw, entry = work.load_object("importance.pt"), None
    if not all_agree(ctx, "have_importance", raw is not None):  # the pipeline needs every rank
        raw, entry = pipeline_gradients(ctx, model, adapter, stage, captured, cfg.device,
                                        progress=progress and ctx.is_first)
        work.save_object("importance.pt", raw)
    gather = mbq_gather(ctx) if cfg.importance.mode == "modality" else None
    return integrate(raw, [s.modality for s in captured], cfg.importance, gather=gather), entry


def _rtn_share(source, mine: dict[str, str], cfg: CalibConfig, record: LoadRecord) -> dict:
    """RTN needs no data: quantize this rank's linears straight from the safetensors files."""
    owned = set(mine.values())
    names = [n for n in decoder_linear_names(source) if f"{n}.weight" in owned]
    return rtn_packed(source, names, cfg.scheme, read=lambda disk: read_tensors(source, disk, record))


def _assemble(ctx: RankContext, cfg: CalibConfig, source, tmp: Path, summaries: list[dict], samples, weights,
              modalities, t0: float) -> Path:
    if samples is None:
        calibration = calibration_record(cfg)
    else:
        if cfg.method.needs_gradients:
            weights = merge_weights([s["weights"] for s in summaries], ctx.world)
        calibration = calibration_record(cfg, samples, weights, modalities)
    layers = {}
    for s in summaries:
        layers.update(s["quantized_layers"])
    report = {"layers": [row for s in summaries for row in s["stats"]], "total_seconds": round(time.time() - t0, 2),
              "method": cfg.method.name, "scheme": cfg.scheme.name,
              "ranks": [{k: s[k] for k in ("rank", "layers", "loaded_tensors", "loaded_mb", "peak_rss_mb", "seconds",
                                           "phase_seconds")}
                        for s in summaries]}
    return finalize(tmp, cfg.out, source, [s["files"] for s in summaries], layers, cfg.method.name, cfg.scheme,
                    cfg.act_order, calibration, report, cfg.overwrite)


def _write_record(ctx: RankContext, stage: range, record: LoadRecord) -> None:
    """TLQ_DIST_RECORD: what this rank read and its peak memory (tests, benchmarks/multirank.py)."""
    folder = ctx.settings.record_dir
    if folder is None:
        return
    write_memory_record(folder, ctx.rank, {"rank": ctx.rank, "world": ctx.world,
                                           "layers": [stage.start, stage.stop - 1],
                                           "loaded": sorted(record.names), "loaded_bytes": record.nbytes})
