"""One process, no calibration data (RTN): quantize each decoder linear straight from the
safetensors files and write the checkpoint; no model instance is built."""
from __future__ import annotations

import time
from pathlib import Path

from tlq.calib.assemble import decoder_linear_names, write_quantized_model
from tlq.calib.config import CalibConfig
from tlq.calib.phases import calibration_record, check_unused_calibration, open_and_check, rtn_packed
from tlq.calib.timing import phase_times, reset_phase_times, timed
from tlq.format.checkpoint import write_report


def calibrate_data_free(cfg: CalibConfig, progress: bool = True) -> Path:
    """Quantize without data and write the checkpoint; returns the checkpoint folder."""
    source = open_and_check(cfg)
    check_unused_calibration(cfg)
    t0 = time.time()
    reset_phase_times()
    with timed("solve"):
        quantized = rtn_packed(source, decoder_linear_names(source), cfg.scheme)
    with timed("write"):
        out = write_quantized_model(source, cfg.out, cfg.scheme, cfg.method.name, quantized, {},
                                    calibration_record(cfg), None, False, cfg.overwrite)
    total = time.time() - t0
    write_report(out, {"layers": [], "total_seconds": round(total, 2), "method": cfg.method.name,
                       "scheme": cfg.scheme.name, "phase_seconds": phase_times(total)})
    return out
