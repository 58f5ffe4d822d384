"""Registry of architecture adapters, looked up by CLI name or by `config.model_type`."""
from __future__ import annotations

from tlq.adapters.base import LinearGroup, ModelAdapter, get_submodule, is_ignored
from tlq.adapters.llava_onevision import LLAVA_ONEVISION
from tlq.adapters.qwen2_vl import QWEN2_VL
from tlq.errors import TLQError

ADAPTERS: dict[str, ModelAdapter] = {a.name: a for a in (QWEN2_VL, LLAVA_ONEVISION)}


def adapter_by_name(name: str) -> ModelAdapter:
    try:
        return ADAPTERS[name]
    except KeyError:
        raise TLQError(f"unknown architecture {name!r}; choose one of {', '.join(ADAPTERS)}") from None


def adapter_for_model_type(model_type: str) -> ModelAdapter:
    for adapter in ADAPTERS.values():
        if model_type in adapter.model_types:
            return adapter
    supported = sorted(t for a in ADAPTERS.values() for t in a.model_types)
    raise TLQError(f"unsupported architecture {model_type!r}: TLQ supports {', '.join(supported)}; "
                   "add an adapter in tlq/adapters/ for other models")


__all__ = ["ADAPTERS", "LinearGroup", "ModelAdapter", "adapter_by_name", "adapter_for_model_type",
           "get_submodule", "is_ignored"]
