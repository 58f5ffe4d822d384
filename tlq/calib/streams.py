"""The hidden-state streams of the layer loop, held in RAM or spilled to files in the work folder.

The layer loop keeps, per sample, the inputs the quantized layers produce (h_q), the float path's
(h_fp) and the float targets (y_fp), each [1, T, H] in the model's dtype, beside the captured entry
stream: 4 x tokens x H values that grow with the calibration set. While that stays under the host budget (`--host-memory`,
GiB) they are plain lists in RAM. Above it every stream is a `SampleStore` on disk: one file per
sample, read back memory-mapped one batch at a time, so the process's resident memory no longer
grows with tokens (the page cache is the kernel's, not the process's). Values are bit-identical
either way, so the checkpoint does not depend on spilling.
"""
from __future__ import annotations

import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from tlq.atomic import save_torch_atomic

STREAMS_PER_RUN = 4  # the captured entry stream, h_q, h_fp and y_fp, alive at once in the layer loop


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


def stream_bytes(samples_tokens: int, hidden: int, dtype: torch.dtype) -> int:
    """Host bytes the layer loop's streams take in RAM for this many calibration tokens."""
    return STREAMS_PER_RUN * samples_tokens * hidden * torch.empty((), dtype=dtype).element_size()


def should_spill(samples_tokens: int, hidden: int, dtype: torch.dtype, host_memory_gib: float) -> bool:
    return stream_bytes(samples_tokens, hidden, dtype) > host_memory_gib * 2**30


class StreamFolder:
    """Where one run's spilled streams go (inside its work folder), or None for RAM."""

    def __init__(self, root: Path | None):
        self.root = None if root is None else Path(root)

    def new(self, name: str) -> SampleStore:
        if self.root is None:
            return SampleStore()
        folder = self.root / name
        shutil.rmtree(folder, ignore_errors=True)  # debris of an interrupted write of the same layer
        return SampleStore(folder)

    def keep_only(self, names: set[str]) -> None:
        """Delete every spilled stream but `names` (those the resumable state refers to)."""
        if self.root is None or not self.root.is_dir():
            return
        for folder in self.root.iterdir():
            if folder.name not in names:
                shutil.rmtree(folder, ignore_errors=True)
