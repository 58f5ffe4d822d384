"""Quantize one model with llm-compressor (the peer rows of the quality benchmark).

Runs under llm-compressor's own virtual environment (it pins a transformers version that
cannot share the project's venv), so it imports nothing from tlq or benchmarks:

    LC_PYTHON lc_run.py JOB.json

JOB.json (written by benchmarks/quality_lib/peers.py):
    model: float model folder;  out: folder to write;  samples: torch file with a list of
    encoded calibration samples (dicts of tensors, batch 1, exactly what tlq.calibrate encodes);
    method: rtn | gptq | awq | smoothquant;  bits, group_size (-1 = per channel), symmetric, act_bits
    (8 = dynamic per-token symmetric int8 inputs, 16 = none);  modifier_kwargs: optional overrides
    of the method's modifier (diagnostic rows, e.g. {"actorder": null}).

Each method is llm-compressor's own recipe with its defaults (GPTQModifier; AWQModifier then
QuantizationModifier; SmoothQuantModifier at strength 0.5 then QuantizationModifier), the
vision tower and lm_head ignored, one decoder layer per sequential stage (as its Qwen2-VL
example), fed each sample's language-model inputs (`language_model_inputs`). AWQ and SmoothQuant
get the mappings of llm-compressor's Qwen2.5-VL / default entries scoped to the language model,
since its registries have no entry for Qwen2-VL or LLaVA-OneVision.

The result is written as a float folder: every quantized linear's weight is replaced by
compressed-tensors' own fake_quantize of it with the scales and zero points llm-compressor
chose (float32: the values its compressed checkpoint decodes to), every other tensor (norms
that SmoothQuant/AWQ rescaled included) as llm-compressor left it. Prints "RESULT {json}".
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time

import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme, fake_quantize
from llmcompressor import oneshot
from llmcompressor.modifiers.gptq import GPTQModifier
from llmcompressor.modifiers.quantization import QuantizationModifier
from llmcompressor.modifiers.transform.awq import AWQMapping, AWQModifier
from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier
from safetensors.torch import save_file
from transformers import AutoModelForImageTextToText, AutoProcessor

QPARAM_PREFIXES = ("weight_", "input_", "output_")
LM_INPUTS = ("inputs_embeds", "position_ids", "attention_mask")
IGNORE = ["lm_head", "re:.*visual.*", "re:.*vision_tower.*", "re:.*multi_modal_projector.*"]
LM = r"re:.*language_model\.layers\.\d+\."
AWQ_MAPPINGS = [
    AWQMapping(LM + "input_layernorm$", [LM + "self_attn.q_proj$", LM + "self_attn.k_proj$", LM + "self_attn.v_proj$"]),
    AWQMapping(LM + "self_attn.v_proj$", [LM + "self_attn.o_proj$"]),
    AWQMapping(LM + "post_attention_layernorm$", [LM + "mlp.gate_proj$", LM + "mlp.up_proj$"]),
    AWQMapping(LM + "mlp.up_proj$", [LM + "mlp.down_proj$"]),
]
# llm-compressor's DEFAULT_SMOOTHQUANT_MAPPINGS (q/k/v from input_layernorm, gate/up from
# post_attention_layernorm), scoped to the language model: [balance layers, smooth layer]
SQ_MAPPINGS = [
    [[LM + "self_attn.q_proj$", LM + "self_attn.k_proj$", LM + "self_attn.v_proj$"], LM + "input_layernorm$"],
    [[LM + "mlp.gate_proj$", LM + "mlp.up_proj$"], LM + "post_attention_layernorm$"],
]


def scheme(job: dict) -> QuantizationScheme:
    per_channel = job["group_size"] == -1
    weights = QuantizationArgs(num_bits=job["bits"], type="int", symmetric=job["symmetric"],
                               strategy="channel" if per_channel else "group",
                               group_size=None if per_channel else job["group_size"])
    inputs = None
    if job["act_bits"] < 16:
        inputs = QuantizationArgs(num_bits=job["act_bits"], type="int", symmetric=True, strategy="token",
                                  dynamic=True)
    return QuantizationScheme(targets=["Linear"], weights=weights, input_activations=inputs)


def recipe(job: dict) -> list:
    """The method's modifiers; job["modifier_kwargs"] overrides defaults of its first modifier."""
    quant = dict(config_groups={"group_0": scheme(job)}, ignore=IGNORE)
    extra = job.get("modifier_kwargs") or {}
    if job["method"] == "rtn":  # its round-to-nearest alone: the quantizer grid every recipe ends in
        return [QuantizationModifier(**quant, **extra)]
    if job["method"] == "gptq":
        return [GPTQModifier(**quant, **extra)]
    if job["method"] == "awq":
        return [AWQModifier(mappings=AWQ_MAPPINGS, **extra), QuantizationModifier(**quant)]
    if job["method"] == "smoothquant":
        return [SmoothQuantModifier(smoothing_strength=0.5, mappings=SQ_MAPPINGS, **extra),
                QuantizationModifier(**quant)]
    sys.exit(f"lc_run.py: unknown method {job['method']!r} (rtn, gptq, awq, smoothquant)")


@torch.no_grad()
def dequantized_state(model) -> dict[str, torch.Tensor]:
    """Float32 fake-quantized weights of the quantized linears (compressed-tensors' own rounding)."""
    out = {}
    for name, module in model.named_modules():
        args = getattr(getattr(module, "quantization_scheme", None), "weights", None)
        if args is None or not hasattr(module, "weight_scale"):
            continue
        if getattr(module, "weight_g_idx", None) is not None:  # GROUP act-order, not used by these recipes
            raise SystemExit(f"lc_run.py: {name} has a g_idx; this script dequantizes contiguous groups only")
        zero = getattr(module, "weight_zero_point", None)
        out[name + ".weight"] = fake_quantize(module.weight.float(), module.weight_scale.float(), zero,
                                              args).contiguous()
    return out


def write_float_folder(model, source: str, out: str) -> int:
    """The source folder's config and processor files, and the model's tensors under its own names
    (transformers loads those in any version) without the quantization parameters."""
    deq = dequantized_state(model)
    tensors = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if name.rsplit(".", 1)[-1].startswith(QPARAM_PREFIXES):
            continue  # weight_scale, weight_zero_point, input_scale, ...: folded into `deq`
        tensors[name] = (deq[name] if name in deq else param.detach()).contiguous().clone()
    missing = set(deq) - set(tensors)
    if missing:
        raise SystemExit(f"lc_run.py: quantized weights without a parameter: {sorted(missing)[:3]}")
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(source):
        if not name.endswith(".safetensors"):
            shutil.copy(os.path.join(source, name), os.path.join(out, name))
    save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    return len(deq)


def cpu_only_fixes() -> None:
    """AWQ pins its cached layer inputs for faster host-to-device copies; pinning needs an accelerator
    (llm-compressor 0.14 raises on CPU-only torch). With no device there is nothing to copy to."""
    if torch.accelerator.current_accelerator() is None:
        from llmcompressor.pipelines.cache import IntermediatesCache
        IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None


class _Captured(Exception):
    pass


@torch.no_grad()
def language_model_inputs(model, samples: list[dict]) -> list[dict]:
    """What the language model receives for each sample: the embeddings with the image features merged
    in, its position ids (Qwen2-VL's 3-D rope) and mask. llm-compressor's sequential pipeline traces the
    model once, on the first sample, so every sample must carry the same inputs: raw text-only and image
    samples do not (an image-free first sample traces the vision branch away and later image samples
    are calibrated without their image; an image first sample rejects text-only ones). The vision tower
    is not quantized, so it runs here once and calibration starts at the language model, which then
    sees exactly what it sees in the full model."""
    captured = []

    def grab(_module, _args, kwargs):
        captured.append({k: kwargs[k] for k in LM_INPUTS if kwargs.get(k) is not None})
        raise _Captured

    handle = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for sample in samples:
            try:
                model(**sample)
            except _Captured:
                pass
    finally:
        handle.remove()
    return with_positions(captured)


def with_positions(captured: list[dict]) -> list[dict]:
    """Explicit position ids where the model left them to the language model's default (Qwen2-VL: text-only
    samples get none, image samples 3-D ones): 0..T-1 in the layout of the others, which is that default."""
    layout = next((c["position_ids"] for c in captured if "position_ids" in c), None)
    if layout is None:
        return captured
    for c in captured:
        if "position_ids" not in c:
            n = c["inputs_embeds"].shape[1]
            c["position_ids"] = torch.arange(n).expand(*layout.shape[:-1], n).clone()
    return captured


def main(path: str) -> None:
    t0 = time.time()
    cpu_only_fixes()
    job = json.loads(open(path).read())
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(job["model"], dtype="auto")
    processor = AutoProcessor.from_pretrained(job["model"])
    samples = language_model_inputs(model, torch.load(job["samples"]))
    loader = torch.utils.data.DataLoader(samples, batch_size=1, collate_fn=lambda batch: batch[0])
    layer = type(model.model.language_model.layers[0]).__name__
    t1 = time.time()
    oneshot(model=model, processor=processor, recipe=recipe(job), dataset=loader,
            num_calibration_samples=len(samples), sequential_targets=[layer],
            log_dir=os.path.join(job["out"] + ".logs"))
    t2 = time.time()
    n = write_float_folder(model, job["model"], job["out"])
    print("RESULT " + json.dumps({"quantized_linears": n, "sequential_target": layer, "samples": len(samples),
                                  "load_s": round(t1 - t0, 2), "oneshot_s": round(t2 - t1, 2),
                                  "save_s": round(time.time() - t2, 2)}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
