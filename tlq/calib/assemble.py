"""Turn calibration results into a checkpoint: packed linears + untouched float tensors."""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from tlq import __version__
from tlq.errors import TLQError
from tlq.format.checkpoint import CheckpointContent, FORMAT_VERSION, layer_entry, pack_linear, write_checkpoint
from tlq.model_io import SourceModel
from tlq.quant.qparams import QuantizedWeight
from tlq.schemes import QuantScheme


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


def quantization_config(scheme: QuantScheme, method: str, act_order: bool, ignore) -> dict:
    return {
        "quant_method": "tlq", "format_version": FORMAT_VERSION,
        "scheme": scheme.name, "bits": scheme.bits, "group_size": scheme.group_size, "sym": scheme.symmetric,
        "act_bits": scheme.act_bits, "desc_act": act_order, "method": method, "ignore": list(ignore),
        "tool_version": __version__,
    }


def write_quantized_model(source: SourceModel, out: Path, scheme: QuantScheme, method: str,
                          quantized: dict[str, QuantizedWeight], float_overrides: dict[str, torch.Tensor],
                          calibration: dict, report: dict | None, act_order: bool, overwrite: bool) -> Path:
    """Assemble the full state dict and write the checkpoint atomically."""
    """Names in `quantized` / `float_overrides` are module paths; they are written in the
    source's own safetensors spelling so the folder stays a drop-in for the original."""
    dtype = source.dtype
    tensors = source.load_state_dict()
    for k, v in float_overrides.items():
        disk = source.to_disk_name(k)
        tensors[disk] = v.to(tensors[disk].dtype)
    layers = {}
    for module_name, qw in quantized.items():
        name = source.to_disk_name(module_name)
        del tensors[f"{name}.weight"]
        tensors.update({f"{name}.{s}": t for s, t in pack_linear(qw, dtype).items()})
        layers[name] = layer_entry(qw)
    config = copy.deepcopy(source.config)
    config["quantization_config"] = quantization_config(scheme, method, act_order, source.adapter.ignore)
    content = CheckpointContent(tensors, config, layers, calibration, report)
    return write_checkpoint(out, source.path, content, overwrite=overwrite)
