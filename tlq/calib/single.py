"""One process with calibration data: from a float model folder to a packed checkpoint.

    checks (phases.open_and_check) -> capture LM inputs once -> token importance (gradient pass)
    -> quantization-exposed layer loop -> assemble + atomic write

Memory: each layer is packed as soon as it is calibrated (as on every rank of tlq/multirank), the
vision tower is dropped after capture, the model before the write (which reads the float
tensors again from disk), and freed heap goes back to the OS between phases (`trim_heap`).
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

from tlq.calib.assemble import packer, write_quantized_model
from tlq.calib.capture import capture_samples
from tlq.calib.config import CalibConfig
from tlq.calib.layer_loop import WorkFolder, run_layer_loop, take_entry_stream
from tlq.calib.phases import calibration_record, load_samples, open_and_check, token_weights
from tlq.calib.rss import rss_mark, trim_heap, write_memory_record
from tlq.calib.timing import phase_times, reset_phase_times, timed
from tlq.format.checkpoint import write_report

log = logging.getLogger("tlq.calibrate")


def calibrate_single(cfg: CalibConfig, progress: bool = True) -> Path:
    """Run one calibration in this process and write its checkpoint; returns the checkpoint folder."""
    source = open_and_check(cfg)
    t0 = time.time()
    reset_phase_times()
    samples = load_samples(cfg)  # every line is checked before any model work starts
    model = source.load_hf_model()
    with timed("capture"):
        captured = capture_samples(model, source, samples, progress, cfg.device, cfg.max_pixels)
    rss_mark("captured")
    work = WorkFolder(cfg.work_dir, cfg.run_key())
    done = work.open(cfg.resume)
    if done:
        log.info("resuming from %s: %d layer(s) already calibrated", cfg.work_dir, done)
    # a resumed loop starts from its saved streams: the entry stream is then not written again
    streams, entry = (None, None) if done else take_entry_stream(captured, work, cfg.host_memory,
                                                                 next(model.parameters()).dtype)
    with timed("gradients"):
        weights = token_weights(model, source, captured, cfg, work, progress, entry=entry)
    trim_heap()
    rss_mark("token weights")
    num_layers = len(source.adapter.layers(model))
    loop = run_layer_loop(model, source.adapter, captured, weights, cfg, work, done, progress=progress,
                          keep=packer(source.dtype), start_streams=None if entry is None else (entry, entry),
                          streams=streams)
    del entry
    calibration = calibration_record(cfg, samples, weights, [s.modality for s in captured])
    del model, captured, weights
    loop.final_streams = None
    trim_heap()
    with timed("write"):  # the report is written last, so its own write is not in it
        quantized, overrides = loop.results()  # read back from the work folder
        out = write_quantized_model(source, cfg.out, cfg.scheme, cfg.method.name, quantized,
                                    overrides, calibration, None, cfg.act_order, cfg.overwrite)
    total = time.time() - t0
    write_report(out, {"layers": loop.layer_stats, "total_seconds": round(total, 2), "method": cfg.method.name,
                       "scheme": cfg.scheme.name, "phase_seconds": phase_times(total)})
    rss_mark("written")
    shutil.rmtree(cfg.work_dir, ignore_errors=True)
    if os.environ.get("TLQ_DIST_RECORD"):  # as each rank of tlq/multirank does (benchmarks/multirank.py)
        write_memory_record(Path(os.environ["TLQ_DIST_RECORD"]), 0, {"rank": 0, "world": 1,
                                                                    "layers": [0, num_layers - 1]})
    return out
