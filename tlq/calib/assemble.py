"""Turn calibration results into a checkpoint: packed linears + untouched float tensors.

One process (calib/single.py) and every rank of tlq/multirank pack each layer as soon as it is
calibrated (`packer`) and assemble the stored tensors the same way (`stored_tensors`).
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from tlq import __version__
from tlq.errors import TLQError
from tlq.format.checkpoint import (
    CheckpointContent,
    layer_entry,
    pack_linear,
    write_checkpoint,
)
from tlq.format.packing import RUN
from tlq.format.quant_config import QuantizationConfig
from tlq.model_io import SourceModel
from tlq.quant.qparams import QuantizedWeight
from tlq.schemes import QuantScheme

# Codes packed at a time: tlq.format.packing.pack holds ~64 bytes of int64 scratch per code, so a
# whole linear at once costs 64x its weight count (185 MiB for one 2816 x 1024 down_proj).
PACK_CHUNK = 1 << 20


def decoder_linear_names(source: SourceModel) -> list[str]:
    """Module names of every decoder linear to quantize, in layer order."""
    shapes = source.tensor_shapes()
    adapter = source.adapter
    prefix = source.disk_layers_prefix()
    names, i = [], 0
    while f"{prefix}.{i}.{adapter.linear_groups[0].names[0]}.weight" in shapes:
        names += [f"{prefix}.{i}.{n}" for n in adapter.linear_names()]
        i += 1
    return [n for n in names if not adapter.is_ignored(n)]


def check_group_size(source: SourceModel, scheme: QuantScheme) -> None:
    if scheme.group_size == -1:
        return
    shapes = source.tensor_shapes()
    for name in decoder_linear_names(source):
        k = shapes[f"{name}.weight"][1]
        if k % scheme.group_size:
            divisors = [g for g in (32, 64, 128) if k % g == 0]
            hint = f"use --group-size {divisors[-1]}" if divisors else "use --group-size -1 (per channel)"
            raise TLQError(f"group size {scheme.group_size} does not divide the input size {k} of {name}; {hint}")


def checkpoint_config(source: SourceModel, scheme: QuantScheme, method: str, act_order: bool) -> dict:
    """The source's config.json with the quantization_config of this checkpoint."""
    config = copy.deepcopy(source.config)
    config["quantization_config"] = QuantizationConfig.from_scheme(scheme, method, act_order, source.adapter.ignore,
                                                                   __version__).to_dict()
    return config


@dataclass
class PackedLinear:
    """One quantized linear as stored (suffix -> tensor) and its manifest entry."""

    tensors: dict[str, torch.Tensor]
    info: dict


def packer(scale_dtype: torch.dtype):
    """`run_layer_loop(keep=)`: pack each layer as soon as it is calibrated, so a process holds
    int4 codes (0.5 byte per weight) instead of int32 ones (4 bytes) until it writes."""
    def pack(quantized: dict[str, QuantizedWeight]) -> dict[str, PackedLinear]:
        return {name: PackedLinear(pack_rows(qw, scale_dtype), layer_entry(qw)) for name, qw in quantized.items()}
    return pack


def pack_rows(qw: QuantizedWeight, scale_dtype: torch.dtype, chunk: int = PACK_CHUNK) -> dict[str, torch.Tensor]:
    """`pack_linear`, a block of output rows at a time (bounded scratch), same tensors: every
    stored tensor is [*, N] with output rows as columns; blocks of a multiple of RUN rows keep
    qzeros' words (packed along N) whole."""
    n, k = qw.shape
    rows = max(RUN, chunk // max(k, 1) // RUN * RUN)
    if rows >= n:
        return pack_linear(qw, scale_dtype)
    cut = lambda t, a: None if t is None else t[a:a + rows]
    parts = [pack_linear(QuantizedWeight(qw.codes[a:a + rows], qw.scales[a:a + rows], cut(qw.zeros, a), qw.bits,
                                         qw.group_size, qw.g_idx), scale_dtype) for a in range(0, n, rows)]
    return {key: parts[0][key] if key == "g_idx" else torch.cat([p[key] for p in parts], dim=1)
            for key in parts[0]}


def stored_tensors(source: SourceModel, disk_names: set[str], packed: dict[str, PackedLinear],
                   float_overrides: dict[str, torch.Tensor],
                   read: Callable[[set[str]], dict[str, torch.Tensor]] | None = None) -> tuple[dict, dict]:
    """The tensors to store among `disk_names` (float ones read again from disk with `read`,
    default `source.load_state_dict`; linears packed) and the manifest entries of the quantized
    layers. Names in `packed` / `float_overrides` are module paths; they are written in the
    source's own safetensors spelling so the folder stays a drop-in for the original."""
    read = read or source.load_state_dict
    packed = {source.to_disk_name(m): p for m, p in packed.items()}
    tensors = read(disk_names - {f"{n}.weight" for n in packed})
    for name, value in float_overrides.items():
        disk = source.to_disk_name(name)
        tensors[disk] = value.to(tensors[disk].dtype)
    for name, p in packed.items():
        tensors.update({f"{name}.{suffix}": t for suffix, t in p.tensors.items()})
    return tensors, {name: p.info for name, p in packed.items()}


def write_quantized_model(source: SourceModel, out: Path, scheme: QuantScheme, method: str,
                          packed: dict[str, PackedLinear], float_overrides: dict[str, torch.Tensor],
                          calibration: dict, report: dict | None, act_order: bool, overwrite: bool) -> Path:
    """One process's checkpoint, written atomically from packed layers (`packer`): the float
    tensors are read again from disk, so the model need not be in memory meanwhile."""
    tensors, layers = stored_tensors(source, set(source.tensor_shapes()), packed, float_overrides)
    content = CheckpointContent(tensors, checkpoint_config(source, scheme, method, act_order), layers, calibration,
                                report)
    return write_checkpoint(out, source.path, content, overwrite=overwrite)
