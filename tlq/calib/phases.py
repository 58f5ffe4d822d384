"""The phases every runner shares: checks, samples, token weights, RTN straight from disk, provenance.

The runners are peers that compose these phases and never import one another:

    tlq/calib/single.py      one process, calibration data (capture -> weights -> layer loop -> write)
    tlq/calib/data_free.py   one process, no data (RTN from the safetensors files)
    tlq/multirank/run.py     one stage of layers per rank (`torchrun`, `tlq calibrate --nproc N`)

`tlq.api.run` picks one of them (its RUNNERS table).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from tlq.calib.assemble import PackedLinear, check_group_size, packer
from tlq.calib.config import CalibConfig
from tlq.calib.gradient_pass import token_gradients
from tlq.calib.importance import integrate, uniform_weights, weight_statistics
from tlq.calib.layer_loop import WorkFolder
from tlq.calib.rss import start_of_calibration
from tlq.errors import TLQError
from tlq.format.checkpoint import check_output_dir
from tlq.format.quant_config import QuantizationConfig
from tlq.model_io import SourceModel, open_source_model
from tlq.quant.qparams import quantize_rtn

log = logging.getLogger("tlq.calibrate")


def open_and_check(cfg: CalibConfig) -> SourceModel:
    """Everything that can be checked before model work: the model folder, OUT, the group size
    against every layer, settings the checkpoint format cannot hold, the compute device; then seed. Returns the opened source model."""
    start_of_calibration()
    source = open_source_model(cfg.model)
    check_output_dir(cfg.out, cfg.overwrite)
    check_group_size(source, cfg.scheme)
    # what the writer will store: refused now, not after the calibration
    QuantizationConfig.from_scheme(cfg.scheme, cfg.method.name, cfg.act_order, source.adapter.ignore, "")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise TLQError(f"--device {cfg.device} was given but torch sees no CUDA device; use --device cpu")
    torch.manual_seed(cfg.seed)
    return source


def load_samples(cfg: CalibConfig):
    """The calibration samples, every line checked (all bad lines reported at once)."""
    from tlq.data.calib import bundled_calibration_path, load_calibration
    return load_calibration(cfg.calib or bundled_calibration_path(), max_samples=cfg.max_samples)


def check_unused_calibration(cfg: CalibConfig) -> None:
    """A data-free method still checks a --calib file it was given (a bad file is an error), and
    says it does not read it."""
    if cfg.calib is not None:
        load_samples(cfg)
        log.warning("method %s uses no calibration data: %s is checked but not used", cfg.method.name, cfg.calib)


def token_weights(model, source: SourceModel, captured, cfg: CalibConfig, work: WorkFolder, progress: bool,
                  entry=None):
    """Per-sample token weights for every (layer, block) in one process; the gradient pass is
    saved in the work folder, so a resumed run does not repeat it. `entry`: the entry hidden
    states where the caller keeps them (default the samples' `hidden`)."""
    num_layers = len(source.adapter.layers(model))
    if not cfg.method.needs_gradients:
        return uniform_weights(captured, num_layers)
    raw = work.load_object("importance.pt")
    if raw is None:
        raw = token_gradients(model, source.adapter, captured, cfg.device, progress=progress,
                              spill_dir=work.path / "streams" / "gradient-pass", host_memory=cfg.host_memory,
                              entry=entry)
        work.save_object("importance.pt", raw)
    return integrate(raw, [s.modality for s in captured], cfg.importance)


def calibration_record(cfg: CalibConfig, samples=None, weights: list[dict] | None = None, modalities=None) -> dict:
    """The manifest's provenance section; without samples, that of a data-free run."""
    record = {"method": cfg.method.name, "scheme": cfg.scheme.name, "seed": cfg.seed,
              "source_model": str(Path(cfg.model).resolve())}
    if samples is None:
        return {**record, "samples": []}
    return {
        **record,
        "calibration_file": str(cfg.calib) if cfg.calib else "bundled",
        "samples": [{"id": s.id, "sha256": s.sha256} for s in samples],
        "token_stats": weight_statistics(weights, modalities),
        "importance": cfg.importance.__dict__, "exposure": cfg.method.exposure,
        "input_scaling": cfg.method.input_scaling, "act_order": cfg.act_order, "damp": cfg.damp,
        "damp_candidates": list(cfg.damp_candidates),
        "exposure_strength": cfg.exposure_strength, "search_tokens": cfg.search_tokens,
        "judge_rows": cfg.judge_rows, "batch_tokens": cfg.batch_tokens, "max_pixels": cfg.max_pixels,
    }


def rtn_packed(source: SourceModel, names: list[str], scheme, read=None) -> dict[str, PackedLinear]:
    """RTN needs no data and no model instance: quantize the linears `names` straight from the
    safetensors (`read`, default `source.load_state_dict`), packing each one at once."""
    weights = (read or source.load_state_dict)({f"{n}.weight" for n in names})
    pack, packed = packer(source.dtype), {}
    for n in names:
        w = weights.pop(f"{n}.weight").float()
        qw = quantize_rtn(w, scheme.bits, scheme.group_size, scheme.symmetric, source.dtype, grid=scheme.grid)
        packed.update(pack({n: qw}))
    return packed
