"""The checkpoint tensors of one TLQ linear as vLLM parameters, so every tensor-parallel shard loads right.

GPTQ layout (docs/format.md): qweight int32 [K*b/32, N] packed along K, scales [n_groups, N],
qzeros int32 [n_groups, N*b/32] packed along N, g_idx int32 [K].

- qweight: `PackedvLLMParameter` (input 0, output 1, packed 0). Column splits cut N (never
  packed); row splits cut whole 32-code runs (checked by spec.check_tensor_parallel). The packed
  factor is a Fraction for 3-bit (32/3): vLLM only uses it to rescale offsets along a packed
  *output* dim, which this layout never has.
- qzeros: unpacked to one int32 per zero point while loading (`UnpackedZerosParameter`), so the
  q/k/v and gate/up offsets, kv-head replication and TP narrowing are plain column arithmetic,
  whatever the bit width and whether N is a multiple of 32. Zero points are tiny (N per group).
- scales / zeros are replicated on every rank (not split along K) for per-channel and act-order.
- g_idx: one row per fused shard (`GIdxParameter`), because q/k/v (gate/up) may carry different
  act-order permutations in one fused layer.
- Row splits that do not keep whole runs/groups (k_part not a multiple of row_unit) load the window
  of whole units covering the rank's slice (tlq.format.tensor_parallel.row_window): the `Windowed*`
  classes narrow to that window instead of to rank*k_part, and the backends pad x to match.
"""
from __future__ import annotations

from fractions import Fraction

import torch
import vllm.model_executor.parameter as vllm_parameter
from vllm.model_executor.parameter import (
    BasevLLMParameter,
    ChannelQuantScaleParameter,
    GroupQuantScaleParameter,
    PackedvLLMParameter,
)

from tlq.format.packing import packed_length
from tlq.format.tensor_parallel import RowWindow, row_unit, row_window
from vllm_plugin.spec import ServeSpec
from vllm_plugin.weights import unpack_along_n

_QKV = {"q": 0, "k": 1, "v": 2}


class _UnpackZerosMixin:
    """Unpack the on-disk packed zero points along N before vLLM's column/row slicing."""

    tlq_bits: int

    def _unpacked(self, loaded: torch.Tensor) -> torch.Tensor:
        return unpack_along_n(loaded, self.tlq_bits).to(self.data.dtype)

    def load_column_parallel_weight(self, loaded_weight: torch.Tensor):
        super().load_column_parallel_weight(self._unpacked(loaded_weight))

    def load_merged_column_weight(self, loaded_weight: torch.Tensor, **kwargs):
        super().load_merged_column_weight(self._unpacked(loaded_weight), **kwargs)

    def load_qkv_weight(self, loaded_weight: torch.Tensor, **kwargs):
        super().load_qkv_weight(self._unpacked(loaded_weight), **kwargs)

    def load_row_parallel_weight(self, loaded_weight: torch.Tensor):
        # N is whole on a row-parallel layer: drop the packing's padding codes
        super().load_row_parallel_weight(self._unpacked(loaded_weight)[:, : self.data.shape[1]])


class UnpackedZerosParameter(_UnpackZerosMixin, GroupQuantScaleParameter):
    """Zero points split along K with the scales (grouped, no act-order)."""


class ReplicatedZerosParameter(_UnpackZerosMixin, ChannelQuantScaleParameter):
    """Zero points kept whole along K on every rank (per-channel or act-order)."""

    def load_row_parallel_weight(self, loaded_weight: torch.Tensor):
        self._assert_and_load(self._unpacked(loaded_weight)[:, : self.data.shape[1]])


class _RowWindowMixin:
    """Row-parallel loading of the window [start, start+length) of the loaded tensor's input dim."""

    tlq_rows: tuple[int, int]  # (offset, length) along input_dim, in the loaded tensor's units

    def _window_source(self, loaded: torch.Tensor) -> torch.Tensor:
        return loaded

    def load_row_parallel_weight(self, loaded_weight: torch.Tensor):
        offset, length = self.tlq_rows
        self._assert_and_load(self._window_source(loaded_weight).narrow(self.input_dim, offset, length))


class WindowedPackedParameter(_RowWindowMixin, PackedvLLMParameter):
    """qweight rows of the packed runs that cover this rank's window."""


class WindowedScaleParameter(_RowWindowMixin, GroupQuantScaleParameter):
    """The scale groups of this rank's window."""


class WindowedZerosParameter(_RowWindowMixin, UnpackedZerosParameter):
    """The zero-point groups of this rank's window (unpacked along N first)."""

    def _window_source(self, loaded: torch.Tensor) -> torch.Tensor:
        return self._unpacked(loaded)[:, : self.data.shape[1]]


class GIdxParameter(BasevLLMParameter):
    """g_idx [n_shards, K_partition]: row s holds fused shard s's group index per input channel."""

    def __init__(self, input_dim: int = 1, **kwargs):
        self._input_dim = input_dim
        super().__init__(**kwargs)

    @property
    def input_dim(self):
        return self._input_dim

    tlq_start: int | None = None  # first channel of a row window (None: this rank's plain slice)

    def _store(self, row: int, loaded: torch.Tensor) -> None:
        k = self.data.shape[1]
        if loaded.shape[0] != k:  # row-parallel: this rank's slice (or window) of K
            start = self.tp_rank * k if self.tlq_start is None else self.tlq_start
            loaded = loaded.narrow(0, start, k)
        self.data[row].copy_(loaded)

    def load_column_parallel_weight(self, loaded_weight: torch.Tensor):
        self.data.copy_(loaded_weight.expand_as(self.data))

    def load_row_parallel_weight(self, loaded_weight: torch.Tensor):
        self._store(0, loaded_weight)

    def load_merged_column_weight(self, loaded_weight: torch.Tensor, **kwargs):
        shard_id = kwargs.get("shard_id")
        if shard_id is None:  # fused on disk: one g_idx for all shards
            self.data.copy_(loaded_weight.expand_as(self.data))
        else:
            self._store(self._shard_id_as_int(shard_id), loaded_weight)

    def load_qkv_weight(self, loaded_weight: torch.Tensor, **kwargs):
        self.load_merged_column_weight(loaded_weight, **kwargs)


def packed_factor(bits: int) -> int | Fraction:
    f = Fraction(32, bits)
    return int(f) if f.denominator == 1 else f


def rank_window(spec: ServeSpec, k_part: int, k_full: int) -> RowWindow | None:
    """This rank's row window when its input slice does not hold whole runs and groups, else None."""
    unit = row_unit(spec.group_size, spec.act_order)
    if k_full == k_part or k_part % unit == 0:
        return None
    return row_window(k_part, vllm_parameter.get_tensor_model_parallel_rank(), unit)


def create_tlq_params(layer: torch.nn.Module, spec: ServeSpec, k_part: int, output_partition_sizes: list[int],
                      k_full: int, params_dtype: torch.dtype, weight_loader) -> None:
    """Register qweight / scales / qzeros / g_idx on `layer` for this rank's partition (or row window)."""
    n_part = sum(output_partition_sizes)
    row_parallel = k_full != k_part
    replicated = spec.group_size == -1 or spec.act_order
    g = spec.group_size
    window = rank_window(spec, k_part, k_full)
    k_store = window.length if window else k_part
    groups = 1 if g == -1 else (k_full // g if replicated else k_store // g)

    qweight = (WindowedPackedParameter if window else PackedvLLMParameter)(
        data=torch.empty(packed_length(k_store, spec.bits), n_part, dtype=torch.int32),
        input_dim=0, output_dim=1, packed_dim=0, packed_factor=packed_factor(spec.bits),
        weight_loader=weight_loader)
    scale_data = torch.empty(groups, n_part, dtype=params_dtype)
    if replicated:
        scales = ChannelQuantScaleParameter(data=scale_data, output_dim=1, weight_loader=weight_loader)
    else:
        scales = (WindowedScaleParameter if window else GroupQuantScaleParameter)(
            data=scale_data, output_dim=1, input_dim=0, weight_loader=weight_loader)
    if window:  # window.start is a multiple of 32 codes and of the group: whole packed rows and groups
        qweight.tlq_rows = (packed_length(window.start, spec.bits), packed_length(window.length, spec.bits))
        if not replicated:
            scales.tlq_rows = window.groups(g)
    layer.register_parameter("qweight", qweight)
    layer.register_parameter("scales", scales)

    if not spec.sym:
        zero_data = torch.zeros(groups, n_part, dtype=torch.int32)
        if replicated:
            cls = ReplicatedZerosParameter
        else:
            cls = WindowedZerosParameter if window else UnpackedZerosParameter
        kwargs = {"output_dim": 1} if replicated else {"output_dim": 1, "input_dim": 0}
        qzeros = cls(data=zero_data, weight_loader=weight_loader, **kwargs)
        qzeros.tlq_bits = spec.bits
        if window and not replicated:
            qzeros.tlq_rows = window.groups(g)
        layer.register_parameter("qzeros", qzeros)
    if spec.act_order:
        g_idx = GIdxParameter(data=torch.zeros(len(output_partition_sizes), k_store, dtype=torch.int32),
                              input_dim=1, weight_loader=weight_loader)
        if window:
            g_idx.tlq_start = window.start
        layer.register_parameter("g_idx", g_idx)
    layer.tlq_row_parallel = row_parallel
    layer.tlq_window = window
