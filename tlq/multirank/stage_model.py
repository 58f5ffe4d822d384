"""A rank's share of the model: the full skeleton on the meta device, only its own tensors real.

The skeleton comes from the same transformers class and config as `SourceModel.load_hf_model`,
built under accelerate's `init_empty_weights(include_buffers=False)`: parameters live on the meta
device (no memory), buffers such as rotary frequencies are computed as usual. The rank's tensors
are then read one by one from the safetensors files (`safe_open`, nothing else is touched) and
put in place; the names read are recorded (tests assert each rank read only its share).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from tlq.adapters import get_submodule
from tlq.errors import TLQError
from tlq.model_io import SourceModel
from tlq.multirank.plan import owner


@dataclass
class LoadRecord:
    """Tensors one rank read from the safetensors files (disk spelling) and their bytes."""

    names: set[str] = field(default_factory=set)
    nbytes: int = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self.names:
            self.names.add(name)
            self.nbytes += tensor.numel() * tensor.element_size()


def build_skeleton(source: SourceModel) -> nn.Module:
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(source.path)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForImageTextToText.from_config(config, dtype=source.dtype)
    return model.eval().requires_grad_(False)


def disk_names(model: nn.Module, source: SourceModel) -> dict[str, str]:
    """Module tensor name -> safetensors name, by transformers' own loading rules (legacy layouts too)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    wanted = model.state_dict(keep_vars=True)
    mapping = {}
    for key in source.tensor_shapes():
        name, converted = rename_source_key(key, renamings, converters, model.base_model_prefix, wanted)
        if converted is not None:
            raise TLQError(f"{key} needs a tensor conversion on load ({converted}); multi-rank loading supports "
                           "checkpoints whose tensors map one to one; calibrate this model with --nproc 1")
        mapping[name] = key
    return mapping


def _tied_sources(model: nn.Module) -> dict[str, str]:
    """Tensor name -> the name of the first parameter it is the same object as (tied embeddings)."""
    first, tied = {}, {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            tied[name] = first[id(p)]
        else:
            first[id(p)] = name
    return tied


def share(model: nn.Module, source: SourceModel, stages: list[range], rank: int) -> dict[str, str]:
    """The tensors this rank owns: module name -> safetensors name."""
    mapping, tied = disk_names(model, source), _tied_sources(model)
    mine = {}
    for name in model.state_dict(keep_vars=True):
        if owner(name, source.adapter, stages) != rank:
            continue
        disk = mapping.get(name) or mapping.get(tied.get(name, ""))
        if disk is None:
            raise TLQError(f"{source.path}: tensor {name} is in the model but not in its safetensors files; "
                           "the checkpoint is incomplete")
        mine[name] = disk
    return mine


def _put(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    path, leaf = name.rsplit(".", 1)
    module = get_submodule(model, path)
    if leaf in module._parameters:
        old = module._parameters[leaf]
        module._parameters[leaf] = nn.Parameter(tensor.to(old.dtype), requires_grad=False)
    else:
        module._buffers[leaf] = tensor.to(module._buffers[leaf].dtype)


def read_tensors(source: SourceModel, disk: set[str], record: LoadRecord) -> dict[str, torch.Tensor]:
    """Only the named tensors (headers of the others are read, no data), recorded in `record`."""
    out = source.load_state_dict(disk)
    for key, tensor in out.items():
        record.add(key, tensor)
    return out


def materialize(model: nn.Module, source: SourceModel, mine: dict[str, str], record: LoadRecord) -> None:
    """Put this rank's tensors (`share`) in place; the rest of the skeleton stays on the meta device."""
    tensors = read_tensors(source, set(mine.values()), record)
    for name, disk in mine.items():
        _put(model, name, tensors[disk])
