"""The hidden-state streams of the layer loop, held in RAM or spilled to files in the work folder.

The layer loop keeps, per sample, the inputs the quantized layers produce (h_q), the float path's
(h_fp), the float targets (y_fp) and the next h_q while it is computed, each [1, T, H] in the
model's dtype: 4 x tokens x H values that grow with the calibration set (the captured entry stream
is consumed by the loop, not kept beside them; a pipeline stage adds the FP targets it computes
ahead). `--host-memory` (GiB) is the host RAM a process may use beyond the weights it holds; the
streams get at most half of it (STREAM_SHARE), the rest being what never spills (the runtime, the
layer being calibrated and its results, gathered inputs, position embeddings: Qwen2-VL's bf16 cos and
sin take 0.5 MiB per 1k-token sample, 64 MiB at 128k tokens). Within that share
they are plain lists in RAM. Above it every stream is a `SampleStore` on disk: one file per sample,
read back memory-mapped one sample at a time, so the process's resident memory no longer grows with
tokens. Values are bit-identical either way, so the checkpoint does not depend on spilling.
"""
from __future__ import annotations

import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from tlq.atomic import save_torch_atomic

LOOP_STREAMS = 4  # h_q, h_fp, y_fp and the next h_q: alive at once in the layer loop
STREAM_SHARE = 0.5  # of --host-memory: the most the streams may take in RAM


class SampleStore(Sequence):
    """Per-sample tensors written once, read many times; `folder` None keeps them in RAM."""

    def __init__(self, folder: Path | None = None):
        self.folder = None if folder is None else Path(folder)
        self._items: list = []
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)

    @classmethod
    def from_tensors(cls, tensors: Iterable[torch.Tensor], folder: Path | None = None) -> SampleStore:
        store = cls(folder)
        for t in tensors:
            store.append(t)
        return store

    @classmethod
    def reopen(cls, folder: Path, count: int) -> SampleStore:
        """A spilled store written earlier (resume): `count` sample files in `folder`."""
        store = cls(folder)
        store._items = [store._path(i) for i in range(count)]
        if not all(p.is_file() for p in store._items):
            raise FileNotFoundError(f"{folder} lacks some of its {count} sample files")
        return store

    def _path(self, index: int) -> Path:
        return self.folder / f"{index:06d}.pt"

    def append(self, tensor: torch.Tensor) -> None:
        if self.folder is None:
            self._items.append(tensor)
            return
        path = self._path(len(self._items))
        save_torch_atomic(path, tensor.detach().cpu().contiguous())
        self._items.append(path)

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        item = self._items[index]
        if self.folder is None:
            return item
        return torch.load(item, mmap=True, weights_only=True)

    @property
    def spilled(self) -> bool:
        return self.folder is not None

    def delete(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
        self._items = []


def stream_bytes(tokens: int, hidden: int, dtype: torch.dtype, streams: int = LOOP_STREAMS) -> int:
    """Host bytes `streams` hidden-state streams take in RAM for this many calibration tokens."""
    return streams * tokens * hidden * torch.empty((), dtype=dtype).element_size()


def should_spill(ram_bytes: int, host_memory_gib: float) -> bool:
    """Spill when the streams would take more than their share of --host-memory in RAM."""
    return ram_bytes > STREAM_SHARE * host_memory_gib * 2**30


def stream_name(layer: int, path: str) -> str:
    """Folder of a spilled stream: the outputs of `layer` on the quantized ("q") or float ("fp") path."""
    return f"L{layer:04d}-{path}"


class StreamFolder:
    """Where one run's spilled streams go (inside its work folder), or None for RAM."""

    def __init__(self, root: Path | None):
        self.root = None if root is None else Path(root)

    def new(self, name: str) -> SampleStore | list:
        """An empty stream to append to: a store on disk, or a plain list in RAM."""
        if self.root is None:
            return []
        folder = self.root / name
        shutil.rmtree(folder, ignore_errors=True)  # debris of an interrupted write of the same layer
        return SampleStore(folder)

    @property
    def spilling(self) -> bool:
        return self.root is not None

    def take(self, stream, name: str):
        """`stream` as this folder keeps streams: unchanged in RAM or when it is a spilled store
        already; else written to the store `name`, and a list emptied, so that no caller's
        reference keeps its tensors in RAM."""
        if self.root is None or getattr(stream, "spilled", False):
            return stream
        store = self.new(name)
        for t in stream:
            store.append(t)
        if isinstance(stream, list):
            stream.clear()
        return store

    def keep_only(self, names: set[str]) -> None:
        """Delete every spilled stream but `names` (those the resumable state refers to)."""
        if self.root is None or not self.root.is_dir():
            return
        for folder in self.root.iterdir():
            if folder.name not in names:
                shutil.rmtree(folder, ignore_errors=True)
