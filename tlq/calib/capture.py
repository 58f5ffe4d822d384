"""Capture once: the language model's entry inputs for every calibration sample.

The vision tower, projector and embeddings run once per sample; a pre-hook on the first
decoder layer records what the language model feeds it (inputs_embeds with the image
features merged in, M-RoPE position embeddings, the attention mask) and stops the forward.
The layer loop and the gradient pass then replay decoder layers from these inputs and
never run the vision tower again.

Device: with `--device cuda` what runs before the first decoder layer (embeddings, vision tower,
projector, rotary tables) is moved there for the capture (`pre_layers_on_device`); the decoder
layers and the LM head stay on the host, and the captured tensors come back to the host.

Batching: samples are captured one at a time (batch 1), so samples with different image
sizes and sequence lengths mix freely without padding; every solver consumes tokens, not
sequences, so nothing downstream depends on how samples were batched.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from tlq.adapters import ModelAdapter, get_submodule
from tlq.calib.rss import trim_heap

PROMPT, VISION, ANSWER = 0, 1, 2
MODALITY_NAMES = {PROMPT: "prompt", VISION: "vision", ANSWER: "answer"}


@dataclass
class CapturedSample:
    """The language model's input for one sample.

    Attributes:
        sample_id: id from the calibration file.
        hidden: [1, T, H] entry hidden states (embeddings with image features merged in).
        layer_kwargs: keyword arguments every decoder layer receives (position embeddings, mask...).
        labels: [1, T] token ids of the answer, -100 elsewhere.
        modality: [T] int8: 0 prompt text, 1 vision, 2 answer.
    """

    sample_id: str
    hidden: torch.Tensor
    layer_kwargs: dict
    labels: torch.Tensor
    modality: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.labels.shape[-1]  # also once the loop owns `hidden` (then None)


class _StopForward(Exception):
    pass


_DROPPED_KWARGS = ("past_key_values", "past_key_value", "use_cache", "cache_position", "output_attentions")


def to_device(obj, device, dtype: torch.dtype | None = None):
    """Move tensors inside nested tuples/lists/dicts; floating-point ones also to `dtype` when given."""
    if torch.is_tensor(obj):
        return obj.to(device, dtype) if dtype is not None and obj.is_floating_point() else obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(o, device, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device, dtype) for k, v in obj.items()}
    return obj


def modality_labels(input_ids: torch.Tensor, labels: torch.Tensor, adapter: ModelAdapter, config) -> torch.Tensor:
    modality = torch.full(input_ids.shape[-1:], PROMPT, dtype=torch.int8)
    modality[adapter.vision_mask(input_ids[0], config)] = VISION
    modality[labels[0] != -100] = ANSWER
    return modality


class pre_layers_on_device:
    """Context manager: every parameter and buffer of the model outside the decoder layers, the final
    norm and the lm_head (what runs before layer 0: embeddings, vision tower and projector, rotary
    tables, loose parameters such as LLaVA-OneVision's image_newline) on `device` for the duration.
    The host tensors are put back on exit (nothing is copied back: capture changes no weight); a
    weight tied to the lm_head stays tied to its host copy there. A no-op on the CPU."""

    def __init__(self, model, adapter: ModelAdapter, device: str):
        self.model, self.device = model, device
        self.stay = (adapter.decoder_layers, adapter.final_norm, adapter.lm_head)
        self.swapped: list[tuple[dict, str, torch.Tensor]] = []

    def moved_modules(self) -> list[str]:
        """Names of the modules whose own tensors move (the root is '')."""
        return [name for name, module in self.model.named_modules()
                if not any(name == p or name.startswith(p + ".") for p in self.stay)
                and any(t is not None for t in (*module._parameters.values(), *module._buffers.values()))]

    def __enter__(self):
        if self.device == "cpu":
            return self
        for name in self.moved_modules():
            module = self.model.get_submodule(name)
            for table in (module._parameters, module._buffers):
                for key, t in table.items():
                    if t is None or t.is_meta:  # not materialised here (a pipeline stage's skeleton)
                        continue
                    self.swapped.append((table, key, t))
                    moved = t.to(self.device)
                    table[key] = torch.nn.Parameter(moved, requires_grad=False) if table is module._parameters else moved
        return self

    def __exit__(self, *exc):
        for table, key, t in reversed(self.swapped):
            table[key] = t
        self.swapped = []


@torch.no_grad()
def capture_inputs(model, adapter: ModelAdapter, encoded: list[tuple[str, dict]], progress: bool = True,
                   device: str = "cpu") -> list[CapturedSample]:
    """Run the model up to its first decoder layer for each encoded sample (on `device`, see
    `pre_layers_on_device`); the captured tensors are on the CPU."""
    layer0 = adapter.layers(model)[0]
    layer_types = set(getattr(get_submodule(model, adapter.decoder_layers.rsplit(".", 1)[0]).config,
                              "layer_types", None) or ["full_attention"])
    if len(layer_types) > 1:
        raise NotImplementedError(f"mixed attention layer types {sorted(layer_types)} are not supported yet")
    captured: dict = {}

    def hook(module, args, kwargs):
        captured["hidden"] = (args[0] if args else kwargs.pop("hidden_states")).detach().cpu()
        captured["kwargs"] = {k: to_device(v, "cpu") for k, v in kwargs.items()
                              if k not in _DROPPED_KWARGS and k != "hidden_states"}
        raise _StopForward

    handle = layer0.register_forward_pre_hook(hook, with_kwargs=True)
    samples = []
    try:
        with pre_layers_on_device(model, adapter, device):
            for sample_id, inputs in tqdm(encoded, desc="capture", disable=not progress, unit="sample"):
                labels = inputs["labels"]
                model_inputs = to_device({k: v for k, v in inputs.items() if k != "labels"}, device)
                try:
                    model(**model_inputs, use_cache=False)
                except _StopForward:
                    pass
                samples.append(CapturedSample(
                    sample_id, captured["hidden"], captured["kwargs"], labels.cpu(),
                    modality_labels(inputs["input_ids"].cpu(), labels.cpu(), adapter, model.config)))
    finally:
        handle.remove()
    return samples


def release_vision(model, adapter: ModelAdapter) -> None:
    """After capture nothing runs the vision tower and projector again: swap their parameters
    for meta ones (new objects, so a tensor shared with a module still in use is untouched)."""
    for name in adapter.vision_modules:
        for module in get_submodule(model, name).modules():
            for key, p in module._parameters.items():
                if p is not None:
                    module._parameters[key] = torch.nn.Parameter(p.to("meta"), requires_grad=False)
    trim_heap()


def capture_samples(model, source, samples, progress: bool = True, device: str = "cpu",
                    max_pixels: int | None = None) -> list[CapturedSample]:
    """Encode `samples` with the model folder's processor (images bounded by `max_pixels`, see
    tlq/data/processing.py), capture the language model's inputs once on `device`, then drop the
    vision tower (one process and rank 0 of tlq/multirank alike)."""
    from tlq.data.processing import encode_sample
    processor = source.load_processor()
    encoded = [(s.id, encode_sample(processor, s, max_pixels)) for s in samples]
    captured = capture_inputs(model, source.adapter, encoded, progress=progress, device=device)
    release_vision(model, source.adapter)
    return captured
