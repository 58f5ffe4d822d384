"""`tlq calibrate --dry-run`: per-rank peak memory, estimated without loading any weight.

Tensor sizes come from the safetensors headers (names mapped to the model's modules by the
skeleton built on the meta device, tlq/multirank/stage_model.py); a folder with only a config.json
(a stand-in for a model not downloaded yet) uses the skeleton's shapes. Token counts come from
encoding the calibration set with the folder's processor, else `tokens_per_sample` is assumed.
Stages are the ones a run would use (tlq/multirank/plan.py). Per rank, with S = tokens x hidden x dtype:

  weights      the stage's decoder layers            extras   rank 0: vision tower, projector,
  streams      4 S in the layer loop (h_q, h_fp, y_fp,         embeddings; last rank: norm, lm_head
               the next h_q), +1 S captured on rank 0, + FP targets computed ahead (tlq/multirank)
  layer work   the largest group's fp32 inputs (x2 while concatenated, + the FP inputs for
               corrected exposure) + K x K fp32 Hessian work (x6 for corrected) + fp32 weight
               copies + the layer itself (x2 for corrected: the FP copy)
  results      the stage's quantized linears, held until the write: packed as each layer finishes
               (one process and every rank alike), plus the last layer's int32 codes meanwhile
  gradients    the gradient pass: stored layer inputs of the samples in flight, one layer's
               autograd graph, fp32 logits of the longest sample on the last rank
  host peak    runtime (+ capture on rank 0) + weights + extras + streams + results + max(layer
               work, gradients) on CPU; + the stored inputs of the gradient pass with --device cuda.
               (Weights count once: the RSS that grows as each layer first runs is its weights being
               paged in from the memory-mapped safetensors file, not a kernel copy.)
  device peak  (CUDA) max(layer work, one layer + its graph + logits): one layer at a time is there
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from tlq.adapters import adapter_for_model_type, get_submodule
from tlq.calib.config import CalibConfig
from tlq.errors import TLQError

ASSUMED_TOKENS_PER_SAMPLE = 1024
RUNTIME_BYTES = 480 * 2**20  # a calibrating process without its tensors: measured 480-530 MiB RSS on CPU
CAPTURE_BYTES = 100 * 2**20  # rank 0: processor, encoded samples, capture (measured ~110 MiB, 32 samples)
GIB = 2**30


@dataclass
class RankEstimate:
    """Bytes per component for one rank (see the module docstring)."""

    rank: int
    layers: range
    weights: int
    extras: int
    streams: int
    layer_work: int
    results: int
    gradients: int
    host_peak: int
    device_peak: int | None


@dataclass
class MemoryEstimate:
    model: str
    arch: str
    dtype: str
    method: str
    scheme: str
    device: str
    samples: int
    tokens: int
    longest: int
    tokens_exact: bool
    ranks: list[RankEstimate] = field(default_factory=list)


def _source(cfg: CalibConfig):
    """SourceModel without requiring weights (config-only stand-ins are fine)."""
    import json

    from tlq.model_io import SourceModel
    path = cfg.model
    if not (path / "config.json").is_file():
        raise TLQError(f"{path} holds no config.json; pass the model folder")
    config = json.loads((path / "config.json").read_text())
    return SourceModel(path, config, adapter_for_model_type(config.get("model_type", "<none>")))


def _sizes(model, source) -> dict[str, tuple[int, int]]:
    """Module tensor name -> (numel, bytes in the model's dtype), from the headers when there are files."""
    from tlq.multirank.stage_model import disk_names
    meta = model.state_dict(keep_vars=True)
    sizes = {k: (v.numel(), v.numel() * v.element_size()) for k, v in meta.items()}
    if source.weight_files():
        shapes = source.tensor_shapes()
        for name, disk in disk_names(model, source).items():
            if name in sizes:
                numel = math.prod(shapes[disk])
                sizes[name] = (numel, numel * meta[name].element_size())
    return sizes


def calibration_lengths(cfg: CalibConfig, source, tokens_per_sample: int | None) -> tuple[list[int], bool]:
    """Tokens per calibration sample, and whether they were counted (True) or assumed."""
    from tlq.calib.phases import load_samples
    samples = load_samples(cfg)
    if tokens_per_sample is None:
        try:
            processor = source.load_processor()
        except Exception:  # noqa: BLE001 - no processor in a config-only folder: assume
            processor = None
        if processor is not None:
            from tlq.data.processing import encode_sample
            return [int(encode_sample(processor, s)["input_ids"].shape[-1]) for s in samples], True
    return [tokens_per_sample or ASSUMED_TOKENS_PER_SAMPLE] * len(samples), False


def estimate_memory(cfg: CalibConfig, nproc: int = 1, tokens_per_sample: int | None = None) -> MemoryEstimate:
    """Per-rank peak memory of `tlq calibrate` with `nproc` ranks (no weights are read)."""
    from tlq.multirank.context import DistConfig
    from tlq.multirank.plan import is_head, layer_index, plan_stages
    from tlq.multirank.stage_model import build_skeleton

    source = _source(cfg)
    adapter, method, scheme = source.adapter, cfg.method, cfg.scheme
    model = build_skeleton(source)
    sizes = _sizes(model, source)
    stages = plan_stages({k: b for k, (_, b) in sizes.items()}, adapter, nproc)
    lengths, exact = calibration_lengths(cfg, source, tokens_per_sample) if method.needs_data else ([], True)
    tokens, longest = sum(lengths), max(lengths, default=0)
    layer0 = adapter.layers(model)[0]
    linears = {n: get_submodule(layer0, n).weight.shape for n in adapter.linear_names()}
    hidden = linears[adapter.linear_groups[0].names[0]][1]
    widest = max(linears, key=lambda n: linears[n][1])
    n_out, k_max = linears[widest]
    vocab = get_submodule(model, adapter.lm_head).weight.shape[0]
    b = get_submodule(model, adapter.lm_head).weight.element_size()
    # the gradient pass of an fp16 model computes in fp32 (importance.gradient_dtype): twice the bytes
    gb = 4 if str(get_submodule(model, adapter.lm_head).weight.dtype) == "torch.float16" else b
    stream = tokens * hidden * b
    corrected = method.exposure == "corrected"
    per_layer, codes, packed = {}, {}, {}
    for name, (numel, nbytes) in sizes.items():
        i = layer_index(name, adapter)
        if i is None:
            continue
        per_layer[i] = per_layer.get(i, 0) + nbytes
        linear = _linear_of(name, adapter)
        if linear is not None:
            rows, cols = linears[linear]
            groups = rows * math.ceil(cols / (cols if scheme.group_size == -1 else scheme.group_size))
            zeros = 0 if scheme.symmetric else 1
            # a layer just calibrated: int32 codes, fp32 scales, int32 zeros; then packed
            codes[i] = codes.get(i, 0) + numel * 4 + groups * 4 * (1 + zeros)
            packed[i] = packed.get(i, 0) + (numel + groups * zeros) * scheme.bits // 8 + groups * b
    extras_first = sum(nb for k, (_, nb) in sizes.items() if layer_index(k, adapter) is None and not is_head(k, adapter))
    extras_last = sum(nb for k, (_, nb) in sizes.items() if is_head(k, adapter))
    budget = DistConfig.from_env().fp_prefetch_mb * 2**20
    est = MemoryEstimate(str(cfg.model), adapter.name, str(source.dtype).replace("torch.", ""), method.name,
                         scheme.name, cfg.device, len(lengths), tokens, longest, exact)
    for r, stage in enumerate(stages):
        weights = sum(per_layer[i] for i in stage)
        extras = (extras_first if r == 0 else 0) + (extras_last if r == nproc - 1 else 0)
        ahead = 0
        if nproc > 1 and method.needs_data and (r > 0 or not method.needs_gradients) and stream:
            ahead = min(len(stage), int(budget // stream)) * stream
        streams = (4 + (r == 0)) * stream + ahead if method.needs_data else 0
        copies = 2 + corrected + (not scheme.weight_only)  # list + concatenation, FP inputs, int8 fake-quant
        acts = tokens * k_max * 4 * copies
        hess = k_max * k_max * 4 * (6 if corrected else 3) + n_out * k_max * 4 * 3
        layer = max(per_layer[i] for i in stage)
        layer_work = acts + hess + layer * (2 if corrected else 1) if method.needs_data else n_out * k_max * 4
        # packed as each layer finishes (tlq/calib/assemble.py `packer`), one layer's int32 codes meanwhile
        results = sum(packed.get(i, 0) for i in stage) + max(codes.get(i, 0) for i in stage)
        in_flight = graph = 0
        if method.needs_gradients:
            in_flight = (nproc - r) * len(stage) * longest * hidden * gb  # stored on the host
            graph = (layer * gb // b + longest * (4 * hidden + 3 * n_out) * gb * 2
                     + (3 * longest * vocab * 4 if r == nproc - 1 else 0))
        grads = in_flight + graph
        base = (RUNTIME_BYTES + (CAPTURE_BYTES if r == 0 and method.needs_data else 0) + weights + extras
                + streams + results)
        if cfg.device.startswith("cuda"):
            device_peak, host_peak = max(layer_work, graph), base + in_flight
        else:
            device_peak, host_peak = None, base + max(layer_work, grads)
        est.ranks.append(RankEstimate(r, stage, weights, extras, streams, layer_work, results, grads,
                                      int(host_peak), None if device_peak is None else int(device_peak)))
    return est


def _linear_of(tensor_name: str, adapter) -> str | None:
    """`...layers.3.mlp.down_proj.weight` -> `mlp.down_proj` (None for other tensors)."""
    return next((n for n in adapter.linear_names() if tensor_name.endswith(f".{n}.weight")), None)


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / GIB:.2f}"


def format_estimate(est: MemoryEstimate) -> str:
    tokens = (f"{est.samples} samples, {est.tokens} tokens (longest {est.longest})" if est.tokens_exact else
              f"{est.samples} samples x {est.longest} tokens ASSUMED (no processor in the model folder)")
    lines = [(f"peak memory estimate (GiB): {est.model} ({est.arch}, {est.dtype}), {est.method} {est.scheme}, "
              f"device {est.device}, {len(est.ranks)} rank(s)"),
             f"calibration: {tokens}" if est.samples else "calibration: none (RTN)"]
    cols = ("rank", "layers", "weights", "extras", "streams", "layer work", "results", "gradients",
            "host peak", "device peak")
    rows = [[str(r.rank), f"{r.layers.start}-{r.layers.stop - 1}", _gib(r.weights), _gib(r.extras), _gib(r.streams),
             _gib(r.layer_work), _gib(r.results), _gib(r.gradients), _gib(r.host_peak), _gib(r.device_peak)]
            for r in est.ranks]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    fmt = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))
    lines += [fmt(cols)] + [fmt(row) for row in rows]
    lines.append("extras: rank 0 vision tower + projector + embeddings, last rank final norm + lm_head; "
                 "device peak only for --device cuda (one layer at a time is on the GPU)")
    return "\n".join(lines)
