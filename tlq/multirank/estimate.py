"""`tlq calibrate --dry-run`: per-rank peak memory, estimated without loading any weight.

Tensor sizes come from the safetensors headers (names mapped to the model's modules by the
skeleton built on the meta device, tlq/multirank/stage_model.py); a folder with only a config.json
(a stand-in for a model not downloaded yet) uses the skeleton's shapes. Token counts come from
encoding the calibration set with the folder's processor (images bounded by --max-pixels); without
one, the images' vision tokens are counted from config.json (Qwen2-VL's pixel bound, LLaVA-OneVision's
anyres tiles: tlq/data/image_tokens.py) and the text is assumed (`assumed_tokens`);
`--tokens-per-sample T` (with `--max-samples N`: N samples of T tokens) states them instead.
Stages are the ones a run would use (tlq/multirank/plan.py).

Notation: S = calibration tokens x hidden x dtype bytes (one hidden-state stream); bt = the largest
batch of whole samples under --batch-tokens; st = the tokens of the search subset (--search-tokens);
per linear group K inputs, N outputs; Q = K x K fp32. Per rank:

  weights      the stage's decoder layers (counted once: pages of the memory-mapped files)
  extras       rank 0: vision tower + projector + embeddings (the tower only until capture ends);
               last rank: final norm + lm_head
  streams      the layer loop's hidden states in RAM: h_q, h_fp, y_fp and the next h_q (4 S; the loop
               owns the entry streams, so no captured or received copy stays beside them); on a
               pipeline stage with k FP targets computed ahead (tlq/multirank/stage_loop.ahead_count)
               max(4, 3 + k) S. Above half of --host-memory (tlq/calib/streams.should_spill) all of them
               live in files in the work folder and one sample of each is mapped at a time; + per-sample
               layer kwargs (position embeddings) and the token weights of the stage's layers
  layer work   calibrating one layer (tlq/calib/layer_solve.py), the largest of its phases over the
               linear groups: the input-scale search and its solver judge (TLQ weight-only: from the
               statistics, beside the solve; else on the st tokens: inputs,
               their scaled copies, M, C and the judge's solve); the streamed statistics (one batch
               of bt x K fp32 inputs, x2-3 while gathered, + M, C); the solve (exposure factor and
               GPTQ factor: up to 5 Q for corrected exposure, 3 without, see solve_bytes; + N x K
               fp32 copies of the weight, target, codes and GPTQ's working matrices); + the layer and, for
               corrected/fp exposure, its float copy. Where it lives: the device with --device cuda
               (the host then holds only the gathered batch), the host on CPU.
  results      the layer just calibrated: its int32 codes and their packed copy, which then goes to
               the work folder (the write reads every layer's back once the weights are freed)
  gradients    the gradient pass: one layer and its autograd graph, the final norm + lm_head and the
               fp32 logits of the longest sample on the last rank, the raw importance of the stage's
               layers (9 sources x 2 statistics fp32 per token and layer), and the stored layer inputs:
               one process, layer-major, every layer's inputs and two gradient streams ((L + 2) x tokens
               x hidden, one sample of each mapped when they spill above half of --host-memory); a
               pipeline stage, those of the samples in flight
  host peak    the largest of the phases capture (rank 0), gradient pass, layer loop and write (the
               runtime, the float tensors read again from disk and the stage's packed layers), each
               with what that phase holds
  device peak  (CUDA) max(layer work, the gradient pass's device part): one layer at a time is there
Not modelled: allocator slack and fragmentation (the CUDA caching allocator's reserve beyond
max_memory_allocated), the kernels' own workspaces, and spill files (disk, not RAM).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from tlq.adapters import adapter_for_model_type, get_submodule
from tlq.calib.config import CalibConfig
from tlq.calib.gradient_pass import GRADIENT_STREAMS
from tlq.calib.group_inputs import token_batches
from tlq.calib.rss import MMAP_THRESHOLD
from tlq.calib.streams import LOOP_STREAMS, should_spill
from tlq.errors import TLQError
from tlq.quant.statistics import projects_cross

# without a processor: byte-level BPE averages about 4 bytes of English per token, so 3 leans high;
# each chat turn adds its role markers
ASSUMED_TEXT_BYTES = 3
TEMPLATE_TOKENS = 8
# a calibrating process without its tensors, measured on CPU as the RSS between two layers minus the
# model file's pages: 780-840 MiB on the medium and 2b fixtures (anon about 500 MiB: interpreter, torch,
# transformers' model code; file about 250 MiB: the library code that has run)
RUNTIME_BYTES = 800 * 2**20
CAPTURE_BYTES = 100 * 2**20  # rank 0: processor, encoded samples, capture (measured ~110 MiB, 32 samples)
DEFAULT_HOST_MEMORY_GIB = 16.0
F32 = 4
GIB = 2**30
RAW_IMPORTANCE_BYTES = 2 * F32  # per token, layer and gradient source: mean |g| and mean g^2


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
    spilled: bool = False  # the streams exceed --host-memory: the run keeps them in files


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
    host_memory_gib: float = DEFAULT_HOST_MEMORY_GIB
    ranks: list[RankEstimate] = field(default_factory=list)


@dataclass(frozen=True)
class GroupShape:
    """One linear group of a decoder layer: K inputs, each linear's outputs, whether input scaling
    can fold a scale into its previous op (tlq/calib/input_scaling.can_fold)."""

    K: int
    outs: tuple[int, ...]
    foldable: bool
    prev_is_linear: bool


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


def assumed_tokens(sample, source, max_pixels: int | None) -> int:
    """Tokens of a sample without the folder's processor (a config-only folder): its images' vision
    tokens counted from config.json (tlq/data/image_tokens.py: Qwen2-VL's pixel bound, LLaVA-OneVision's
    anyres tiles), its text assumed at one token per ASSUMED_TEXT_BYTES bytes plus the chat template's."""
    from PIL import Image

    from tlq.data.calib import answer_text
    from tlq.data.image_tokens import image_tokens
    vision = 0
    for path in sample.image_paths:
        with Image.open(path) as img:
            vision += image_tokens(source.adapter.name, source.config, *img.size, max_pixels)
    text = sum(len(answer_text(m).encode()) for m in sample.messages)
    return vision + math.ceil(text / ASSUMED_TEXT_BYTES) + TEMPLATE_TOKENS * len(sample.messages)


def calibration_lengths(cfg: CalibConfig, source, tokens_per_sample: int | None) -> tuple[list[int], bool]:
    """Tokens per calibration sample, and whether they were counted (True) or stated/assumed (False).

    With `tokens_per_sample` the calibration set is `cfg.max_samples` samples of that length (the
    bundled set's size without --max-samples), whatever the folder holds. Images are bounded by
    `cfg.max_pixels` as the run bounds them."""
    from tlq.calib.phases import load_samples
    if tokens_per_sample is not None:
        if tokens_per_sample < 1:
            raise TLQError(f"--tokens-per-sample must be at least 1, not {tokens_per_sample}")
        count = cfg.max_samples if cfg.max_samples is not None else len(load_samples(cfg))
        return [tokens_per_sample] * count, False
    samples = load_samples(cfg)
    try:
        processor = source.load_processor()
    except Exception:  # noqa: BLE001 - no processor in a config-only folder: assume
        processor = None
    if processor is not None:
        from tlq.data.processing import encode_sample
        return [int(encode_sample(processor, s, cfg.max_pixels)["input_ids"].shape[-1]) for s in samples], True
    return [assumed_tokens(s, source, cfg.max_pixels) for s in samples], False


def search_tokens(lengths: list[int], budget: int) -> int:
    """Tokens of the search subset (tlq/calib/group_inputs.search_samples) at most: every token when
    they fit the budget, else whole samples up to it (the first drawn sample always)."""
    total = sum(lengths)
    return total if total <= budget else max(budget, max(lengths))


def _groups(adapter, layer) -> list[GroupShape]:
    from torch import nn
    out = []
    for g in adapter.linear_groups:
        shapes = [get_submodule(layer, n).weight.shape for n in g.names]
        prev = get_submodule(layer, g.prev_op) if g.prev_op else None
        out.append(GroupShape(int(shapes[0][1]), tuple(int(s[0]) for s in shapes),
                              prev is not None and prev.weight.shape[0] == shapes[0][1],
                              isinstance(prev, nn.Linear)))
    return out


def cross_bytes(K: int, n_sum: int, b: int) -> int:
    """A group's float-path moment: C (K x K fp32), or the projected P_i with the weights they are
    matched by (n_sum x K, fp32 and b bytes; tlq/quant/statistics.projects_cross)."""
    return n_sum * K * (F32 + b) if projects_cross(K, n_sum) else K * K * F32


def solve_bytes(K: int, N: int, corrected: bool, act_order: bool, cuda: bool = False, n_sum: int | None = None,
                b: int = 2) -> int:
    """Peak of solving one linear [N, K] from its group's statistics (tlq/quant/weighted_gptq.py,
    statistics.py, gptq.py; Q = one K x K fp32 matrix). Factorisations run in place without
    temporaries (the exposure factor is built in column-major storage; the GPTQ factor's Cholesky
    factor is LAPACK's own column-major result, inverted and re-factored in place).
    Corrected exposure: M, C and the exposure factor (3 Q) with the target's N x K temporaries; on
    a GPU C then waits in host memory and is copied back per linear, so building the GPTQ factor
    from M holds H, its factor and the exposure factor (3 Q; on the CPU C stays: 4 Q; act-order
    keeps a permuted copy of H, +1); then GPTQ with U, the exposure factor and C (3 Q) and the
    weight, its target, the working copy, codes, Q and the lazy update (6 N x K). Without
    correction: H and its factor (2 Q), then U beside the N x K matrices. A group whose float-path
    moment is kept projected (`n_sum` outputs in all, tlq/quant/statistics.projects_cross) holds the
    P_i and the weights they are matched by (n_sum x K, fp32 and b bytes) where C is counted, and a
    GPU copies one linear's P back instead of C."""
    q, nk = K * K * F32, N * K * F32
    permute = q if act_order else 0
    if corrected:
        projected = n_sum is not None and projects_cross(K, n_sum)
        held = q if n_sum is None else cross_bytes(K, n_sum, b)
        copy = nk if projected else q
        factor = 3 * q + (0 if cuda else held) + permute + 2 * nk
        return max(2 * q + held + 4 * nk, factor, 2 * q + (copy if cuda else held) + 6 * nk)
    return max(2 * q + permute + nk, q + 5 * nk)


def layer_work_bytes(groups: list[GroupShape], cfg: CalibConfig, bt: int, st: int, longest: int, hidden: int,
                     intermediate: int, layer: int, b: int) -> tuple[int, int]:
    """(where the layer is calibrated, host's gathered batches) of calibrating one decoder layer.

    On CPU both are the same memory: the first value is then host memory beyond the weights."""
    from tlq.calib.input_scaling import resolve_scaling, scales_in_loop
    method, scheme = cfg.method, cfg.scheme
    cuda = cfg.device.startswith("cuda")
    corrected, aq = method.exposure == "corrected", not scheme.weight_only
    weighted = method.importance != "uniform"
    scaling = resolve_scaling(method.input_scaling, scheme.weight_only)
    in_loop = scales_in_loop(cfg)
    gptq = method.solver == "gptq"
    float_copy = layer if method.exposure in ("corrected", "fp") else 0  # the deep copy of the float layer
    own = layer if cuda else 0  # on CPU the layer is the weights already counted
    forward = longest * (4 * hidden + 3 * intermediate) * b  # one sample through the layer, up to a linear
    work = host = 0
    for g in groups:
        K, N, n_sum = g.K, max(g.outs), sum(g.outs)
        q, rows = K * K * F32, st * K * F32
        solve = solve_bytes(K, N, corrected, cfg.act_order, cuda, n_sum, b) if gptq else 3 * N * K * F32
        # TLQ weight-only: scales judged in the loop from the statistics (tlq/calib/solved_scaling.py):
        # beside the solve (which counts one float weight), the group's other float weights, each
        # linear's error pull with the float path (N x K each), the unscaled solution's codes while the
        # scaled one is solved (host memory on a GPU), and without the float path the Gram factor (+1 K x K)
        if in_loop and g.foldable:
            judge = ((n_sum - N) + corrected * n_sum) * K * F32 + (0 if cuda else n_sum * K * 4) + (0 if corrected else q)
            work = max(work, own + float_copy + solve + judge)
            # a linear judged on rows (more than 2 judge_rows outputs): the unscaled GPTQ factor waits on the host
            parked = q if max(g.outs) > 2 * cfg.judge_rows else 0
            host = max(host, n_sum * K * 4 + parked if cuda else 0)
        # input-scale search, then (judge "solver") the solve it is judged by, on the st tokens
        elif scaling == "awq" and g.foldable:
            Ws = n_sum * K * F32
            if method.scale_search.block_loss:
                search = rows + 3 * N * K * F32 + st * hidden * (b + 3 * F32) + forward
            elif scheme.weight_only and method.scale_search.loss == "mse" and K < st:
                # the kept rows' copy and the weighted copy that builds the loss's Hessian (measured)
                search = 2 * rows + q + 4 * N * K * F32
            else:  # the kept rows' copy, every linear's outputs, the scaled inputs, the rounded weight
                search = 2 * rows + st * n_sum * F32 + 3 * N * K * F32 + 3 * st * N * F32
            judge = 0
            if method.scale_search.judge == "solver":
                inputs = (1 + corrected) * rows * 2  # X (and X_fp) and their scaled copies
                accumulate = (2 if corrected else 1) * q + weighted * rows
                judge = inputs - rows + max(accumulate, solve, 3 * q + 2 * N * K * F32 + 4 * st * N * F32)
            work = max(work, own + rows + Ws + max(search, judge))
            host = max(host, 2 * rows * (1 + corrected))  # gathered on the CPU (list + concatenation)
        if scaling == "smoothquant" and g.foldable and not g.prev_is_linear:
            work = max(work, own + rows + n_sum * K * F32)
        # streamed statistics: one batch gathered (and its float-path twin), weighted copy; M and C
        batch = bt * K * F32
        clip_rows = rows if method.clip_search else 0
        stats = q + (cross_bytes(K, n_sum, b) if corrected else 0)
        gathered = (2 + corrected + aq) * batch  # list + concatenation of X, then X_fp beside X
        on_device = (1 + corrected + weighted) * batch  # X, X_fp and the weighted X in `add`
        if corrected and projects_cross(K, n_sum):  # a projected moment: W in fp32 and W x_fp of the batch
            on_device += N * K * F32 + bt * N * F32
        if gptq and len(cfg.damp_candidates) > 1:
            # held-out damping (tlq/calib/held_out_damping.py): the two folds' statistics stream side by side;
            # while it chooses, both folds, the held-out error's Gram factor and pulls (n_sum x K), and the
            # fitting fold's copy solved as any group is (its C, or the P_i, are the copy's)
            stats *= 2
            work = max(work, own + float_copy + stats + q + n_sum * K * F32 + solve)
        streaming = stats + (on_device + forward if cuda else max(gathered, on_device)) + clip_rows
        work = max(work, own + float_copy + streaming, own + float_copy + clip_rows + solve)
        host = max(host, gathered + 2 * clip_rows)
    # Inputs are gathered per sample: blocks under glibc's mmap threshold (tlq/calib/rss.py) come from
    # the heap, which keeps about one gather (st x K fp32) resident until the layer's trim (measured).
    widest = max(g.K for g in groups)
    slack = st * widest * F32 if longest * widest * F32 < MMAP_THRESHOLD else 0
    return work + (0 if cuda else slack), (host + slack if cuda else 0)


def estimate_memory(cfg: CalibConfig, nproc: int = 1, tokens_per_sample: int | None = None,
                    host_memory_gib: float | None = None) -> MemoryEstimate:
    """Per-rank peak memory of `tlq calibrate` with `nproc` ranks (no weights are read)."""
    from tlq.multirank.context import DistConfig
    from tlq.multirank.plan import is_head, layer_index, plan_stages
    from tlq.multirank.stage_loop import ahead_count
    from tlq.multirank.stage_model import build_skeleton

    if host_memory_gib is None:
        host_memory_gib = getattr(cfg, "host_memory", DEFAULT_HOST_MEMORY_GIB)
    source = _source(cfg)
    adapter, method, scheme = source.adapter, cfg.method, cfg.scheme
    model = build_skeleton(source)
    sizes = _sizes(model, source)
    stages = plan_stages({k: nb for k, (_, nb) in sizes.items()}, adapter, nproc)
    lengths, exact = calibration_lengths(cfg, source, tokens_per_sample) if method.needs_data else ([], True)
    tokens, longest = sum(lengths), max(lengths, default=0)
    layer0 = adapter.layers(model)[0]
    groups = _groups(adapter, layer0)
    linears = {n: get_submodule(layer0, n).weight.shape for n in adapter.linear_names()}
    hidden = groups[0].K
    intermediate = max(g.K for g in groups)
    head_dim = getattr(get_submodule(layer0, adapter.attn_module), "head_dim", hidden // 8)
    vocab = get_submodule(model, adapter.lm_head).weight.shape[0]
    b = get_submodule(model, adapter.lm_head).weight.element_size()
    # the gradient pass of an fp16 model computes in fp32 (importance.gradient_dtype): twice the bytes
    gb = 4 if str(get_submodule(model, adapter.lm_head).weight.dtype) == "torch.float16" else b
    stream = tokens * hidden * b
    kwargs = tokens * 2 * head_dim * b  # cos and sin of the rotary embedding, per sample
    bt = max((sum(lengths[i] for i in batch) for batch in token_batches(lengths, cfg.batch_tokens)), default=0)
    st = search_tokens(lengths, cfg.search_tokens) if lengths else 0
    per_layer, codes, packed, linear_bytes = {}, {}, {}, {}
    for name, (numel, nbytes) in sizes.items():
        i = layer_index(name, adapter)
        if i is None:
            continue
        per_layer[i] = per_layer.get(i, 0) + nbytes
        linear = _linear_of(name, adapter)
        if linear is not None:
            rows, cols = linears[linear]
            ngroups = rows * math.ceil(cols / (cols if scheme.group_size == -1 else scheme.group_size))
            zeros = 0 if scheme.symmetric else 1
            # a layer just calibrated: int32 codes, fp32 scales, int32 zeros; then packed
            codes[i] = codes.get(i, 0) + numel * 4 + ngroups * 4 * (1 + zeros)
            linear_bytes[i] = linear_bytes.get(i, 0) + nbytes
            packed[i] = packed.get(i, 0) + (numel + ngroups * zeros) * scheme.bits // 8 + ngroups * b
    vision = sum(nb for k, (_, nb) in sizes.items()
                 if any(k == v or k.startswith(v + ".") for v in adapter.vision_modules))
    extras_first = sum(nb for k, (_, nb) in sizes.items() if layer_index(k, adapter) is None and not is_head(k, adapter))
    extras_last = sum(nb for k, (_, nb) in sizes.items() if is_head(k, adapter))
    prefetch = DistConfig.from_env().fp_prefetch_mb * 2**20
    cuda = cfg.device.startswith("cuda")
    est = MemoryEstimate(str(cfg.model), adapter.name, str(source.dtype).replace("torch.", ""), method.name,
                         scheme.name, cfg.device, len(lengths), tokens, longest, exact, host_memory_gib)
    for r, stage in enumerate(stages):
        first, last = r == 0, r == nproc - 1
        weights = sum(per_layer[i] for i in stage)
        extras = (extras_first if first else 0) + (extras_last if last else 0)
        layer = max(per_layer[i] for i in stage)
        all_packed = sum(packed.get(i, 0) for i in stage)
        # the write: the float tensors read again from disk and every packed layer, the model freed
        write = RUNTIME_BYTES + extras + sum(per_layer[i] - linear_bytes.get(i, 0) for i in stage) + all_packed
        base = RUNTIME_BYTES + weights + extras - (vision if first else 0)  # the tower is dropped after capture
        if not method.needs_data:  # RTN: each linear read, rounded and packed, all held until the write
            results = all_packed + max(codes.get(i, 0) for i in stage)
            work = 3 * max(n * k for n, k in linears.values()) * F32
            host = base + results + (0 if cuda else work)
            est.ranks.append(RankEstimate(r, stage, weights, extras, 0, work, results, 0, int(host),
                                          int(work) if cuda else None))
            continue
        stage_layers = len(stage) if method.needs_gradients else len(per_layer)  # uniform: every layer's keys
        token_weights = tokens * 2 * F32 * stage_layers  # (layer, attn/mlp) -> [T] fp32
        results = max(codes.get(i, 0) + packed.get(i, 0) for i in stage)  # the layer just calibrated
        # FP targets computed ahead on a pipeline stage; the FP entry comes from the gradient pass
        # unless there is none or it computed in another dtype (fp16: gradient_dtype)
        chain = not method.needs_gradients or gb != b
        ahead = ahead_count(first, chain, stage, stage.start, stream, prefetch) if nproc > 1 else 0
        in_ram = max(LOOP_STREAMS, 3 + ahead) * stream
        spilled = should_spill(in_ram, host_memory_gib)
        streams = 3 * longest * hidden * b if spilled else in_ram  # one sample of h_q, h_fp, y_fp mapped
        work, gathered = layer_work_bytes(groups, cfg, bt, st, longest, hidden, intermediate, layer, b)
        loop = base + kwargs + token_weights + streams + results + (gathered if cuda else work)
        capture = base + (vision if first else 0) + CAPTURE_BYTES + stream + kwargs if first else 0
        grad_device = grad_host = 0
        if method.needs_gradients:
            if nproc == 1:  # layer-major (tlq/calib/gradient_pass.py): every layer's inputs + 2 gradient streams
                held_pass = (len(stage) + GRADIENT_STREAMS) * hidden * gb
                in_flight = held_pass * (longest if should_spill(held_pass * tokens, host_memory_gib) else tokens)
            else:  # the pipeline's per-sample stages: the stored inputs of the samples in flight
                in_flight = (nproc - r) * len(stage) * longest * hidden * gb
            graph = longest * (8 * hidden + 4 * intermediate) * gb * 2  # activations and their gradients
            logits = longest * vocab * (3 * F32 + 2 * gb) if last else 0
            upcast = (layer + (extras_last if last else 0)) * (gb // b - 1)  # fp16 -> fp32 copies
            grad_device = layer * gb // b + graph + logits + ((extras_last * gb // b) if last else 0)
            raw = tokens * RAW_IMPORTANCE_BYTES * 9 * len(stage)
            grad_host = (base + kwargs + stream + raw + in_flight  # + rank 0's capture, the others' FP entry
                         + (0 if cuda else graph + logits + upcast))
        gradients = grad_device if cuda else grad_host - base
        host_peak = max(loop, capture, grad_host, write)
        device_peak = max(work, grad_device) if cuda else None
        est.ranks.append(RankEstimate(r, stage, weights, extras, streams + kwargs + token_weights, work, results,
                                      int(gradients), int(host_peak), None if device_peak is None else int(device_peak),
                                      spilled=spilled))
    return est


def _linear_of(tensor_name: str, adapter) -> str | None:
    """`...layers.3.mlp.down_proj.weight` -> `mlp.down_proj` (None for other tensors)."""
    return next((n for n in adapter.linear_names() if tensor_name.endswith(f".{n}.weight")), None)


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / GIB:.2f}"


def format_estimate(est: MemoryEstimate) -> str:
    tokens = (f"{est.samples} samples x {est.longest} tokens" if est.tokens == est.samples * est.longest else
              f"{est.samples} samples, {est.tokens} tokens (longest {est.longest})")
    if not est.tokens_exact:
        tokens += " ASSUMED (stated, or no processor in the model folder: images counted from config.json)"
    lines = [(f"peak memory estimate (GiB): {est.model} ({est.arch}, {est.dtype}), {est.method} {est.scheme}, "
              f"device {est.device}, {len(est.ranks)} rank(s)"),
             f"calibration: {tokens}" if est.samples else "calibration: none (RTN)"]
    cols = ("rank", "layers", "weights", "extras", "streams", "layer work", "results", "gradients",
            "host peak", "device peak")
    rows = [[str(r.rank), f"{r.layers.start}-{r.layers.stop - 1}", _gib(r.weights), _gib(r.extras),
             _gib(r.streams) + ("*" if r.spilled else ""), _gib(r.layer_work), _gib(r.results), _gib(r.gradients),
             _gib(r.host_peak), _gib(r.device_peak)]
            for r in est.ranks]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    fmt = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))
    lines += [fmt(cols)] + [fmt(row) for row in rows]
    lines.append("extras: rank 0 vision tower + projector + embeddings, last rank final norm + lm_head; "
                 "device peak only for --device cuda (one layer at a time is on the GPU)")
    if any(r.spilled for r in est.ranks):
        lines.append(f"* streams above half of --host-memory {est.host_memory_gib:g} GiB are kept in files in the "
                     "work folder (disk, not RAM)")
    return "\n".join(lines)
