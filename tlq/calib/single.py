"""`calibrate(cfg)`: from a float model folder to a packed checkpoint.

    load + validate everything -> capture LM inputs once -> token importance (gradient pass)
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

import torch

from tlq.calib.assemble import (
    PackedLinear,
    check_group_size,
    decoder_linear_names,
    packer,
    write_quantized_model,
)
from tlq.calib.capture import capture_samples
from tlq.calib.config import CalibConfig
from tlq.calib.importance import integrate, token_gradients, uniform_weights, weight_statistics
from tlq.calib.layer_loop import WorkFolder, run_layer_loop
from tlq.calib.rss import rss_mark, start_of_calibration, trim_heap, write_memory_record
from tlq.format.checkpoint import check_output_dir
from tlq.model_io import SourceModel, open_source_model
from tlq.quant.qparams import quantize_rtn

log = logging.getLogger("tlq.calibrate")


def calibrate(cfg: CalibConfig, progress: bool = True) -> Path:
    """Run one calibration and write its checkpoint; returns the checkpoint folder."""
    start_of_calibration()
    source = open_source_model(cfg.model)
    check_output_dir(cfg.out, cfg.overwrite)
    check_group_size(source, cfg.scheme)
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    if not cfg.method.needs_data:
        return _rtn(source, cfg, t0)
    samples = load_samples(cfg)  # every line is checked before any model work starts
    model = source.load_hf_model()
    captured = capture_samples(model, source, samples, progress)
    rss_mark("captured")
    work = WorkFolder(cfg.work_dir, cfg.run_key())
    done = work.open(cfg.resume)
    if done:
        log.info("resuming from %s: %d layer(s) already calibrated", cfg.work_dir, done)
    weights = token_weights(model, source, captured, cfg, work, progress)
    trim_heap()
    rss_mark("token weights")
    num_layers = len(source.adapter.layers(model))
    loop = run_layer_loop(model, source.adapter, captured, weights, cfg, work, done, progress=progress,
                          keep=packer(source.dtype))
    calibration = calibration_record(cfg, samples, weights, [s.modality for s in captured])
    del model, captured, weights
    loop.final_streams = None
    trim_heap()
    report = {"layers": loop.layer_stats, "total_seconds": round(time.time() - t0, 2),
              "method": cfg.method.name, "scheme": cfg.scheme.name}
    out = write_quantized_model(source, cfg.out, cfg.scheme, cfg.method.name, loop.quantized, loop.float_overrides,
                                calibration, report, cfg.act_order, cfg.overwrite)
    rss_mark("written")
    shutil.rmtree(cfg.work_dir, ignore_errors=True)
    if os.environ.get("TLQ_DIST_RECORD"):  # as each rank of tlq/multirank does (benchmarks/multirank.py)
        write_memory_record(Path(os.environ["TLQ_DIST_RECORD"]), 0, {"rank": 0, "world": 1,
                                                                    "layers": [0, num_layers - 1]})
    return out


def calibration_record(cfg: CalibConfig, samples, weights: list[dict], modalities) -> dict:
    """The manifest's provenance section (also written by the multi-rank path, tlq/multirank)."""
    return {
        "method": cfg.method.name, "scheme": cfg.scheme.name, "seed": cfg.seed,
        "source_model": str(Path(cfg.model).resolve()),
        "calibration_file": str(cfg.calib) if cfg.calib else "bundled",
        "samples": [{"id": s.id, "sha256": s.sha256} for s in samples],
        "token_stats": weight_statistics(weights, modalities),
        "importance": cfg.importance.__dict__, "exposure": cfg.method.exposure,
        "input_scaling": cfg.method.input_scaling, "act_order": cfg.act_order, "damp": cfg.damp, "exposure_strength": cfg.exposure_strength,
    }


def load_samples(cfg: CalibConfig):
    from tlq.data.calib import bundled_calibration_path, load_calibration
    return load_calibration(cfg.calib or bundled_calibration_path(), max_samples=cfg.max_samples)


def token_weights(model, source: SourceModel, captured, cfg: CalibConfig, work: WorkFolder, progress: bool):
    """Per-sample token weights for every (layer, block); the gradient pass is saved for resumption."""
    num_layers = len(source.adapter.layers(model))
    if not cfg.method.needs_gradients:
        return uniform_weights(captured, num_layers)
    raw = work.load_object("importance.pt")
    if raw is None:
        raw = token_gradients(model, source.adapter, captured, cfg.device, progress=progress)
        work.save_object("importance.pt", raw)
    return integrate(raw, [s.modality for s in captured], cfg.importance)


def rtn_packed(source: SourceModel, names: list[str], scheme, read=None) -> dict[str, PackedLinear]:
    """RTN needs no data and no model instance: quantize the linears `names` straight from the
    safetensors (`read`, default `source.load_state_dict`), packing each one at once."""
    weights = (read or source.load_state_dict)({f"{n}.weight" for n in names})
    pack, packed = packer(source.dtype), {}
    for n in names:
        w = weights.pop(f"{n}.weight").float()
        packed.update(pack({n: quantize_rtn(w, scheme.bits, scheme.group_size, scheme.symmetric, source.dtype)}))
    return packed


def _rtn(source: SourceModel, cfg: CalibConfig, t0: float) -> Path:
    quantized = rtn_packed(source, decoder_linear_names(source), cfg.scheme)
    calibration = {"method": "rtn", "scheme": cfg.scheme.name, "seed": cfg.seed, "samples": [],
                   "source_model": str(source.path.resolve())}
    report = {"layers": [], "total_seconds": round(time.time() - t0, 2), "method": "rtn", "scheme": cfg.scheme.name}
    return write_quantized_model(source, cfg.out, cfg.scheme, "rtn", quantized, {}, calibration, report,
                                 False, cfg.overwrite)
