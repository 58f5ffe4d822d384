"""The Python API: `tlq.calibrate(...)` and `tlq.verify(...)`. The CLI is a thin layer over them.

    import tlq
    ckpt = tlq.calibrate("/models/qwen2-vl-7b", out="/ckpt/q", method="tlq", scheme="w3a16",
                         calib="calib.jsonl")
    tlq.verify(ckpt)

`calibrate` builds a `CalibConfig` (`make_config`) and hands it to the runner the RUNNERS table
picks: several ranks (started by torchrun), a data-free method, or one process with data.
Internals are imported when called, so `import tlq` stays light.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tlq.calib.config import CalibConfig
    from tlq.format.checkpoint import CheckpointInfo


def make_config(model: str | Path, out: str | Path, *, method: str = "tlq", scheme: str = "w4a16",
                calib: str | Path | None = None, group_size: int | None = None, sym: bool | None = None,
                importance: str | None = None, exposure: str | None = None, input_scaling: str | None = None,
                max_tokens: int | None = None, drop_below: float = 0.0, **settings) -> CalibConfig:
    """A checked CalibConfig from names, as the CLI takes them.

    `method` and `scheme` are registry names; `group_size` / `sym` override the scheme's;
    `importance`, `exposure` and `input_scaling` override the method's axes (ablations);
    `max_tokens` / `drop_below` shape the token-level calibration set; every other keyword is a
    CalibConfig field (max_samples, seed, device, act_order, damp, exposure_strength, overwrite, ...).
    """
    from tlq.calib.config import CalibConfig, ImportanceConfig, get_method
    from tlq.schemes import get_scheme

    spec = get_method(method)
    axes = {"importance": importance, "exposure": exposure, "input_scaling": input_scaling}
    axes = {k: v for k, v in axes.items() if v is not None}
    if axes:
        spec = dataclasses.replace(spec, **axes)
    return CalibConfig(model=Path(model), out=Path(out), method=spec,
                       scheme=get_scheme(scheme).with_overrides(group_size, sym),
                       calib=None if calib is None else Path(calib),
                       importance=ImportanceConfig(mode=spec.importance, max_tokens=max_tokens, drop_below=drop_below),
                       **settings)


def calibrate(model: str | Path | CalibConfig, out: str | Path | None = None, *, progress: bool = True,
              **settings) -> Path | None:
    """Quantize `model` (a local Hugging Face folder) into a packed checkpoint at `out`.

    Keywords are those of `make_config` (method, scheme, calib, ...); `model` may also be a ready
    CalibConfig. Returns the checkpoint folder (None on the ranks other than 0 of a multi-rank run).
    """
    from tlq.calib.config import CalibConfig
    if isinstance(model, CalibConfig):
        if out is not None or settings:
            raise TypeError("pass either a CalibConfig or a model folder with settings, not both")
        cfg = model
    else:
        if out is None:
            raise TypeError("calibrate() needs out=, the checkpoint folder to write")
        cfg = make_config(model, out, **settings)
    return run(cfg, progress=progress)


def verify(ckpt: str | Path, check_hashes: bool = True) -> CheckpointInfo:
    """Check a checkpoint's file hashes and every quantized tensor's name, dtype and shape;
    returns its CheckpointInfo or raises CheckpointError naming the file or tensor at fault."""
    from tlq.format.checkpoint import verify_checkpoint
    return verify_checkpoint(Path(ckpt), check_hashes=check_hashes)


# -- runners: peers that share tlq/calib/phases.py and never import one another ---------------------

def _multirank(cfg: CalibConfig, progress: bool) -> Path | None:
    from tlq.multirank.run import calibrate_distributed
    return calibrate_distributed(cfg, progress=progress)


def _data_free(cfg: CalibConfig, progress: bool) -> Path:
    from tlq.calib.data_free import calibrate_data_free
    return calibrate_data_free(cfg, progress=progress)


def _single(cfg: CalibConfig, progress: bool) -> Path:
    from tlq.calib.single import calibrate_single
    return calibrate_single(cfg, progress=progress)


@dataclass(frozen=True)
class Runner:
    """One row of RUNNERS: the first whose `applies(cfg, world_size)` holds runs the calibration."""

    name: str
    applies: Callable[[CalibConfig, int], bool]
    run: Callable[[CalibConfig, bool], Path | None]


RUNNERS: tuple[Runner, ...] = (
    Runner("multirank", lambda cfg, world: world > 1, _multirank),
    Runner("data-free", lambda cfg, world: not cfg.method.needs_data, _data_free),
    Runner("single", lambda cfg, world: True, _single),
)


def choose_runner(cfg: CalibConfig, world: int | None = None) -> Runner:
    if world is None:
        from tlq.multirank.context import env_world_size
        world = env_world_size()
    return next(r for r in RUNNERS if r.applies(cfg, world))


def run(cfg: CalibConfig, progress: bool = True) -> Path | None:
    """Calibrate with a ready CalibConfig (the runner RUNNERS picks)."""
    return choose_runner(cfg).run(cfg, progress)
