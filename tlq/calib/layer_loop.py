"""The quantization-exposed layer loop: the one place where layers are calibrated in order.

For decoder layer i the loop holds two streams of hidden states per sample:
  h_fp : what the float model feeds layer i       -> FP targets y_fp = layer_i^FP(h_fp)
  h_q  : what the already quantized layers 0..i-1 feed it (the inputs it will see at inference)
The method's exposure decides which stream the solver calibrates on (`fp`, `quantized`,
`corrected` = quantized inputs with the FP outputs as target). After calibration
h_q <- layer_i^Q(h_q) and h_fp <- y_fp. One decoder layer sits on the compute device at a
time. After each layer its result (packed by `keep`) and both streams are saved to the work
folder, so a killed run resumes from the last finished layer and ends with an identical
checkpoint; the result then leaves RAM, and `LoopResult.results()` reads every layer's back for
the write. Streams above their share of the host budget (`--host-memory`) live in files
(tlq/calib/streams.py).
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import time
from collections.abc import Sequence
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
from tlq.calib.streams import SampleStore, StreamFolder, should_spill, stream_bytes, stream_name

_STATE = "state.pt"


@dataclass
class LoopResult:
    work: WorkFolder
    layers: range
    layer_stats: list[dict] = field(default_factory=list)
    final_streams: tuple | None = None  # (h_q, h_fp) after the last layer, for the next pipeline stage

    def results(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """Every layer's kept quantized linears (packed: `keep`) and float overrides, read back from
        the work folder, where each went when its layer finished (RAM held only that layer's)."""
        quantized, overrides = {}, {}
        for i in self.layers:
            saved = self.work.load_layer(i)
            quantized.update(saved["quantized"])
            overrides.update(saved["float_overrides"])
        return quantized, overrides


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
        if self.path.exists():  # another run's results, and its spilled streams (folders)
            for f in self.path.iterdir():
                shutil.rmtree(f) if f.is_dir() and not f.is_symlink() else f.unlink()
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


def spill_entry_streams(h_q, h_fp, streams: StreamFolder) -> tuple:
    """The loop's entry streams as `streams` keeps them (tlq/calib/streams.StreamFolder.take): one
    store when both hold the same tensors (the first layer), two when a pipeline stage starts from
    different quantized and float streams."""
    same = h_fp is h_q or (len(h_fp) == len(h_q) and all(a is b for a, b in zip(h_fp, h_q)))
    q = streams.take(h_q, "entry-q")
    return q, q if same else streams.take(h_fp, "entry-fp")


def loop_streams(work: WorkFolder, spill: bool) -> StreamFolder:
    """Where a run's streams live: files under the work folder when spilling, else RAM."""
    return StreamFolder(work.path / "streams" if spill else None)


def single_process_streams(work: WorkFolder, entry: Sequence[torch.Tensor], dtype: torch.dtype,
                           host_memory: float) -> StreamFolder:
    """Where one process's streams live: in files when the loop's four streams of `entry`'s size
    would exceed their share of --host-memory, else in RAM."""
    tokens = sum(h.shape[-2] for h in entry)
    return loop_streams(work, should_spill(stream_bytes(tokens, entry[0].shape[-1], dtype), host_memory))


def take_entry_stream(samples: list[CapturedSample], work: WorkFolder, host_memory: float, dtype: torch.dtype
                      ) -> tuple[StreamFolder, Sequence[torch.Tensor]]:
    """Where the loop's streams will live, and the captured hidden states taken from the samples
    (`hidden` None) into it, so that the gradient pass and the loop read them from there and the
    entry stream does not stay in RAM beside them."""
    hidden = [s.hidden for s in samples]
    streams = single_process_streams(work, hidden, dtype, host_memory)
    entry = streams.take(hidden, "entry-q")
    for s in samples:
        s.hidden = None
    return streams, entry


def run_layer_loop(model, adapter: ModelAdapter, samples: list[CapturedSample], weights: list[dict],
                   cfg: CalibConfig, work: WorkFolder, done: int, layer_range: range | None = None,
                   start_streams: tuple | None = None, progress: bool = True,
                   fp_targets: dict[int, list[torch.Tensor]] | None = None, keep=None,
                   streams: StreamFolder | None = None) -> LoopResult:
    """Calibrate layers in `layer_range` (default: all); their results go to the work folder.

    `done` layers (from `WorkFolder.open`) are skipped (their results are in the work folder);
    `start_streams` = (h_q, h_fp) lets a pipeline stage start from another rank's outputs;
    `fp_targets` (layer -> y_fp per sample, consumed) are FP outputs a pipeline stage computed
    ahead while earlier stages were still calibrating (tlq/multirank); `keep` maps each layer's
    quantized weights to what the work folder stores (`tlq.calib.assemble.packer`: 8x less than
    int32 codes); `streams` says where streams live (default: spilled when the loop's four exceed
    their share of --host-memory). The loop owns its entry streams: the samples' captured hidden
    states are dropped (`hidden` None) and `start_streams` lists emptied once read, so that nothing
    the callers still reference keeps them in RAM.
    """
    keep = keep or (lambda quantized: quantized)
    layers = adapter.layers(model)
    layer_range = layer_range or range(len(layers))
    dtype = next(model.parameters()).dtype
    result = LoopResult(work, layer_range)
    kwargs = [s.layer_kwargs for s in samples]
    modalities = [s.modality for s in samples]
    entry = start_streams or ([s.hidden for s in samples],) * 2
    start_streams = None
    for s in samples:
        s.hidden = None
    if done > layer_range.start:
        state = work.load_state()
        h_q, h_fp = state["h_q"], state["h_fp"]
        result.layer_stats = [work.load_layer(i)["stats"] for i in range(layer_range.start, done)]
    else:
        done = layer_range.start
        h_q, h_fp = entry
    if streams is None:
        streams = single_process_streams(work, h_q, dtype, cfg.host_memory)
    h_q, h_fp = spill_entry_streams(h_q, h_fp, streams)  # no-ops in RAM or when spilled already
    _release(entry, unless=(h_q, h_fp))
    bar = tqdm(range(done, layer_range.stop), desc="layers", disable=not progress, unit="layer",
               initial=done - layer_range.start, total=len(layer_range))
    for i in bar:
        t0 = time.time()
        if cfg.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        layer = layers[i]
        layer.to(cfg.device)
        y_fp = (fp_targets.pop(i) if fp_targets and i in fp_targets
                else run_layer(layer, h_fp, kwargs, cfg.device, into=streams.new(stream_name(i, "fp"))))
        calib_stream = h_fp if cfg.method.exposure == "fp" else h_q
        inputs = LayerInputs(calib_stream, h_fp, kwargs,
                             [{b: w[(i, b)] for (li, b) in w if li == i} for w in weights])
        chosen = {}
        quantized, overrides, hooks = calibrate_layer(layer, adapter.layer_prefix(i), inputs, adapter, cfg, dtype,
                                                      layer_seed=cfg.seed * 100003 + i, record=chosen)
        rss_mark(f"layer {i} calibrated")
        h_q = run_layer(layer, h_q, kwargs, cfg.device, into=streams.new(stream_name(i, "q")))
        for h in hooks:
            h.remove()
        layer.to("cpu")
        stats = {"layer": i, **modality_errors(h_q, y_fp, modalities),
                 "seconds": round(time.time() - t0, 3), "peak_mem_mb": round(_peak_memory_mb(cfg.device), 1), **chosen}
        h_fp = y_fp
        work.save_layer(i, {"quantized": keep(quantized), "float_overrides": overrides, "stats": stats}, h_q, h_fp)
        # what the saved state refers to, and the FP targets computed ahead for later layers
        streams.keep_only({stream_name(i, "q"), stream_name(i, "fp")}
                          | {stream_name(j, "fp") for j in (fp_targets or {})})
        _release(entry, unless=())
        result.layer_stats.append(stats)
        del quantized, overrides, inputs, calib_stream, y_fp
        trim_heap()  # what the solver freed, else it stays resident under the next layer's peak
        bar.set_postfix(rel_vision=_fmt(stats["rel_vision"]), rel_text=_fmt(stats["rel_text"]))
        rss_mark(f"layer {i} done")
        _maybe_die_for_test(i)
    result.final_streams = (h_q, h_fp)
    return result


def _release(entry: tuple, unless: tuple) -> None:
    """Empty the entry lists (callers may still reference them) once the loop no longer reads them."""
    for stream in entry:
        if isinstance(stream, list) and not any(stream is u for u in unless):
            stream.clear()


def _fmt(x):
    return "-" if x is None else f"{x:.2e}"


def _maybe_die_for_test(index: int) -> None:
    """Tests of resumption kill the run after a given layer (TLQ_TEST_DIE_AFTER_LAYER)."""
    target = os.environ.get("TLQ_TEST_DIE_AFTER_LAYER")
    if target is not None and int(target) == index:
        os._exit(17)
