"""The quantization-exposed layer loop: the one place where layers are calibrated in order.

For decoder layer i the loop holds two streams of hidden states per sample:
  h_fp : what the float model feeds layer i       -> FP targets y_fp = layer_i^FP(h_fp)
  h_q  : what the already quantized layers 0..i-1 feed it (the inputs it will see at inference)
The method's exposure decides which stream the solver calibrates on (`fp`, `quantized`,
`corrected` = quantized inputs with the FP outputs as target). After calibration
h_q <- layer_i^Q(h_q) and h_fp <- y_fp. One decoder layer sits on the compute device at a
time. After each layer its result and both streams are saved to the work folder, so a
killed run resumes from the last finished layer and ends with an identical checkpoint.
Streams larger than the host budget (`--host-memory`) live in files (tlq/calib/streams.py).
"""
from __future__ import annotations

import json
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tlq.adapters import ModelAdapter
from tlq.atomic import save_torch_atomic, write_json_atomic
from tlq.calib.capture import ANSWER, PROMPT, VISION, CapturedSample
from tlq.calib.config import CalibConfig
from tlq.calib.layer_solve import LayerInputs, calibrate_layer, run_layer
from tlq.calib.rss import rss_mark, trim_heap
from tlq.calib.streams import SampleStore, StreamFolder, should_spill
from tlq.quant.qparams import QuantizedWeight

_STATE = "state.pt"


@dataclass
class LoopResult:
    quantized: dict[str, QuantizedWeight] = field(default_factory=dict)
    float_overrides: dict[str, torch.Tensor] = field(default_factory=dict)
    layer_stats: list[dict] = field(default_factory=list)
    final_streams: tuple | None = None  # (h_q, h_fp) after the last layer, for the next pipeline stage


def modality_errors(out: list[torch.Tensor], target: list[torch.Tensor], modalities: list[torch.Tensor]) -> dict:
    """Mean squared output error of a layer, split by vision and text tokens, relative to the target's power."""
    err = torch.cat([(o - t).float().pow(2).mean(-1)[0] for o, t in zip(out, target)])
    power = torch.cat([t.float().pow(2).mean(-1)[0] for t in target])
    modality = torch.cat(modalities)
    stats = {}
    for name, mask in (("vision", modality == VISION), ("text", (modality == PROMPT) | (modality == ANSWER))):
        stats[f"mse_{name}"] = float(err[mask].mean()) if mask.any() else None
        stats[f"rel_{name}"] = float(err[mask].sum() / power[mask].sum()) if mask.any() else None
    return stats


def _peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class WorkFolder:
    """Per-layer results of one run; `key` guards against resuming a different run."""

    def __init__(self, path: Path, key: dict):
        self.path = Path(path)
        self.key = json.loads(json.dumps(key, default=str))

    def open(self, resume: bool) -> int:
        """Prepare the folder; returns the number of finished layers to skip."""
        key_file = self.path / "run.json"
        if resume and key_file.is_file() and json.loads(key_file.read_text()) == self.key and (self.path / _STATE).is_file():
            return int(torch.load(self.path / _STATE, weights_only=False)["next_layer"])
        if self.path.exists():
            for f in self.path.iterdir():
                f.unlink()
        self.path.mkdir(parents=True, exist_ok=True)
        write_json_atomic(key_file, self.key)
        return 0

    def save_layer(self, index: int, result: dict, h_q, h_fp) -> None:
        save_torch_atomic(self.path / f"layer_{index:04d}.pt", result)
        save_torch_atomic(self.path / _STATE, {"next_layer": index + 1, "h_q": _stream_ref(h_q),
                                               "h_fp": _stream_ref(h_fp)})

    def load_layer(self, index: int) -> dict:
        return torch.load(self.path / f"layer_{index:04d}.pt", weights_only=False)

    def load_state(self) -> dict:
        state = torch.load(self.path / _STATE, weights_only=False)
        return {**state, "h_q": _stream_from_ref(state["h_q"]), "h_fp": _stream_from_ref(state["h_fp"])}

    def save_object(self, name: str, obj) -> None:
        save_torch_atomic(self.path / name, obj)

    def load_object(self, name: str):
        p = self.path / name
        return torch.load(p, weights_only=False) if p.is_file() else None


def _stream_ref(stream):
    """What the state file holds for a stream: the tensors, or where a spilled one lives."""
    if isinstance(stream, SampleStore) and stream.spilled:
        return {"spilled": str(stream.folder), "count": len(stream)}
    return stream


def _stream_from_ref(ref):
    if isinstance(ref, dict) and "spilled" in ref:
        return SampleStore.reopen(Path(ref["spilled"]), ref["count"])
    return ref


def spill_entry_streams(h_q, h_fp, streams: StreamFolder) -> tuple[SampleStore, SampleStore]:
    """The loop's entry streams as spilled stores: one store when both are the same list (the
    first layer), two when a pipeline stage starts from different quantized and float streams."""
    q = SampleStore.from_tensors(h_q, streams.root / "entry-q")
    return q, q if h_fp is h_q else SampleStore.from_tensors(h_fp, streams.root / "entry-fp")


def run_layer_loop(model, adapter: ModelAdapter, samples: list[CapturedSample], weights: list[dict],
                   cfg: CalibConfig, work: WorkFolder, done: int, layer_range: range | None = None,
                   start_streams: tuple | None = None, progress: bool = True,
                   fp_targets: dict[int, list[torch.Tensor]] | None = None, keep=None) -> LoopResult:
    """Calibrate layers in `layer_range` (default: all) and return their results.

    `done` layers (from `WorkFolder.open`) are reloaded instead of recomputed;
    `start_streams` = (h_q, h_fp) lets a pipeline stage start from another rank's outputs;
    `fp_targets` (layer -> y_fp per sample, consumed) are FP outputs a pipeline stage computed
    ahead while earlier stages were still calibrating (tlq/multirank); `keep` maps each layer's
    quantized weights to what the result holds (`tlq.calib.assemble.packer`: 8x less memory than int32 codes).
    """
    keep = keep or (lambda quantized: quantized)
    layers = adapter.layers(model)
    layer_range = layer_range or range(len(layers))
    dtype = next(model.parameters()).dtype
    result = LoopResult()
    kwargs = [s.layer_kwargs for s in samples]
    modalities = [s.modality for s in samples]
    if done > layer_range.start:
        state = work.load_state()
        h_q, h_fp = state["h_q"], state["h_fp"]
        for i in range(layer_range.start, done):
            saved = work.load_layer(i)
            result.quantized.update(keep(saved["quantized"]))
            result.float_overrides.update(saved["float_overrides"])
            result.layer_stats.append(saved["stats"])
    else:
        done = layer_range.start
        h_q, h_fp = start_streams or ([s.hidden for s in samples], [s.hidden for s in samples])
    tokens = sum(h.shape[-2] for h in h_q)
    streams = StreamFolder(work.path / "streams" if should_spill(tokens, h_q[0].shape[-1], dtype, cfg.host_memory)
                           else None)
    if streams.root is not None and not isinstance(h_q, SampleStore):  # the entry streams move to disk too
        h_q, h_fp = spill_entry_streams(h_q, h_fp, streams)
        if start_streams is None:
            for s in samples:  # the captured copies are no longer read: free them
                s.hidden = None
    bar = tqdm(range(done, layer_range.stop), desc="layers", disable=not progress, unit="layer",
               initial=done - layer_range.start, total=len(layer_range))
    for i in bar:
        t0 = time.time()
        if cfg.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        layer = layers[i]
        layer.to(cfg.device)
        y_fp = (fp_targets.pop(i) if fp_targets and i in fp_targets
                else run_layer(layer, h_fp, kwargs, cfg.device, into=streams.new(f"L{i:04d}-fp")))
        calib_stream = h_fp if cfg.method.exposure == "fp" else h_q
        inputs = LayerInputs(calib_stream, h_fp, kwargs,
                             [{b: w[(i, b)] for (li, b) in w if li == i} for w in weights])
        quantized, overrides, hooks = calibrate_layer(layer, adapter.layer_prefix(i), inputs, adapter, cfg, dtype,
                                                      layer_seed=cfg.seed * 100003 + i)
        rss_mark(f"layer {i} calibrated")
        h_q = run_layer(layer, h_q, kwargs, cfg.device, into=streams.new(f"L{i:04d}-q"))
        for h in hooks:
            h.remove()
        layer.to("cpu")
        stats = {"layer": i, **modality_errors(h_q, y_fp, modalities),
                 "seconds": round(time.time() - t0, 3), "peak_mem_mb": round(_peak_memory_mb(cfg.device), 1)}
        h_fp = y_fp
        work.save_layer(i, {"quantized": quantized, "float_overrides": overrides, "stats": stats}, h_q, h_fp)
        streams.keep_only({f"L{i:04d}-q", f"L{i:04d}-fp"})  # what the saved state refers to
        result.quantized.update(keep(quantized))
        result.float_overrides.update(overrides)
        result.layer_stats.append(stats)
        del quantized, overrides, inputs, y_fp
        trim_heap()  # what the solver freed, else it stays resident under the next layer's peak
        bar.set_postfix(rel_vision=_fmt(stats["rel_vision"]), rel_text=_fmt(stats["rel_text"]))
        rss_mark(f"layer {i} done")
        _maybe_die_for_test(i)
    result.final_streams = (list(h_q), list(h_fp)) if streams.root is not None else (h_q, h_fp)
    return result


def _fmt(x):
    return "-" if x is None else f"{x:.2e}"


def _maybe_die_for_test(index: int) -> None:
    """Tests of resumption kill the run after a given layer (TLQ_TEST_DIE_AFTER_LAYER)."""
    target = os.environ.get("TLQ_TEST_DIE_AFTER_LAYER")
    if target is not None and int(target) == index:
        os._exit(17)
