"""Declarative description of a VLM architecture: where things are, what to quantize.

An adapter is data, not code paths: the calibrator, the writer and the plugin read
these fields instead of branching on `model_type`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class LinearGroup:
    """Linears of one decoder layer that read the same input (a fusion group in vLLM).

    Attributes:
        names: module paths relative to the decoder layer, e.g. ("self_attn.q_proj", ...).
        prev_op: module (relative to the layer) whose output is this group's input; an
            input-channel scale s can be folded into it (norm weight, or the rows of a
            previous linear). None when nothing can absorb a scale.
        block: which sub-module's output gradient weights this group's tokens ("attn" or "mlp").
    """

    names: tuple[str, ...]
    prev_op: str | None
    block: str


@dataclass(frozen=True)
class ModelAdapter:
    """Where a VLM keeps its parts (attribute paths from the `*ForConditionalGeneration` model).

    Attributes:
        name: the CLI name (`qwen2-vl`).
        model_types: `config.model_type` values this adapter serves.
        decoder_layers: path to the language model's ModuleList of decoder layers.
        final_norm / lm_head / embed_tokens: paths of the LM head side.
        vision_modules: vision tower and projector paths (run once, never quantized).
        ignore: name fragments left unquantized (docs/format.md, "ignore").
        image_token_attrs: config attributes that may hold the image token id, first found wins.
        linear_groups: the quantized linears of a decoder layer, in forward order.
        checkpoint_layer_prefixes: spellings of `decoder_layers` in safetensors files (transformers 5
            saves the legacy layout, e.g. `model.layers` for Qwen2-VL); the first found is used.
        attn_module / mlp_module: sub-modules whose outputs give token importance.
        qk_linears: linears whose outputs meet in Q K^T; AWQ's clipping skips them (AutoAWQ,
            llm-awq: the error there passes the softmax and is hard to measure per linear).
    """

    name: str
    model_types: tuple[str, ...]
    decoder_layers: str
    final_norm: str
    lm_head: str
    embed_tokens: str
    vision_modules: tuple[str, ...]
    ignore: tuple[str, ...]
    image_token_attrs: tuple[str, ...]
    linear_groups: tuple[LinearGroup, ...]
    checkpoint_layer_prefixes: tuple[str, ...] = ()
    attn_module: str = "self_attn"
    mlp_module: str = "mlp"
    qk_linears: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj")
    extra: dict = field(default_factory=dict)

    # -- lookups -------------------------------------------------------------
    def layers(self, model: nn.Module) -> nn.ModuleList:
        return get_submodule(model, self.decoder_layers)

    def layer_prefix(self, index: int) -> str:
        """State-dict name prefix of decoder layer `index` (transformers spelling)."""
        return f"{self.decoder_layers}.{index}"

    def linear_names(self) -> list[str]:
        return [n for g in self.linear_groups for n in g.names]

    def image_token_id(self, config) -> int:
        for attr in self.image_token_attrs:
            value = getattr(config, attr, None)
            if value is not None:
                return int(value)
        raise ValueError(f"{self.name}: config has none of {self.image_token_attrs}")

    def vision_mask(self, input_ids: torch.Tensor, config) -> torch.Tensor:
        """Boolean mask of image-token positions (the tokens the projector fills)."""
        return input_ids == self.image_token_id(config)

    def is_ignored(self, module_name: str) -> bool:
        return is_ignored(module_name, self.ignore)


def is_ignored(module_name: str, fragments) -> bool:
    """True when a fragment matches a whole dot-separated run of `module_name`."""
    padded = f".{module_name}."
    return any(f".{frag}." in padded for frag in fragments)


# get_submodule(root, "model.layers.0.mlp") is torch's own `root.get_submodule(...)`, kept as a function
# so adapters' paths read the same everywhere.
get_submodule = nn.Module.get_submodule


# The Qwen2 decoder layer, shared by Qwen2-VL, Qwen2.5-VL and LLaVA-OneVision's language model.
QWEN2_DECODER_GROUPS = (
    LinearGroup(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm", "attn"),
    LinearGroup(("self_attn.o_proj",), "self_attn.v_proj", "attn"),
    LinearGroup(("mlp.gate_proj", "mlp.up_proj"), "post_attention_layernorm", "mlp"),
    LinearGroup(("mlp.down_proj",), "mlp.up_proj", "mlp"),
)
