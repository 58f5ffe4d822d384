"""Which code computes a TLQ linear: one backend interface, tried in order at load time.

`choose()` walks `BACKENDS` and takes the first backend whose `refusal()` is None; every refusal
is kept as the reason the next one was tried (the torch backend never refuses):
1. `Int8Backend` (w4a8): vLLM's int8 scaled-mm kernel (`init_int8_linear_kernel`: oneDNN/SGL on
   CPU, CUTLASS on CUDA) with the int4 codes upcast to int8 and per-token dynamic symmetric
   activation quantization.
2. `MixedPrecisionBackend` (weight-only): vLLM's mixed-precision kernels (`choose_mp_linear_kernel`:
   Marlin on CUDA, CPUWNA16 on CPU). 2- and 3-bit codes are lifted exactly to 4-bit
   (weights.lift_to_uint4); act-order is served by gathering the input channels (x[..., perm])
   when groups stay whole. CPUWNA16 needs AVX-512 (vLLM builds it for nothing else): on other
   CPUs it refuses with the missing flags and the layer falls back (vllm_plugin/cpu_isa.py).
3. `TorchBackend`: the dequantized weight (computed once at load, exactly the reference weights)
   and F.linear, plus the exact int8 activation simulation for w4a8.

Row windows (tensor parallelism whose per-rank input is not whole groups, tlq.format.tensor_parallel):
the kernels run on the window and `apply` pads x with zeros to it; the torch backend slices the
dequantized window instead. Both are exact.

CPU numerics: CPUWNA16 on an AMX CPU can quantize activations to int8 (vLLM's VLLM_CPU_INT4_W4A8).
TLQ serves exact W4A16 unless TLQ_CPU_FAST_INT4=1 (`tlq serve --cpu-int4 fast`) opts in.
`apply` functions stay traceable by torch.compile: no logging, no data-dependent Python branches.
"""
from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from vllm.logger import init_logger
from vllm.model_executor.kernels.linear import (
    CPUWNA16LinearKernel,
    MPLinearLayerConfig,
    choose_mp_linear_kernel,
    init_int8_linear_kernel,
)
from vllm.model_executor.parameter import (
    ChannelQuantScaleParameter,
    GroupQuantScaleParameter,
    ModelWeightParameter,
    PackedvLLMParameter,
)
from vllm.scalar_type import scalar_types

from tlq.format.tensor_parallel import RowWindow
from tlq.quant.qparams import quantize_activations_int8
from vllm_plugin import cpu_isa
from vllm_plugin.spec import ServeSpec
from vllm_plugin.weights import LoadedWeight, act_order_permutation, lift_to_uint4, pack_gptq

FAST_INT4_ENV = "TLQ_CPU_FAST_INT4"
BACKEND_ENV = "TLQ_LINEAR_BACKEND"  # "auto" (default) or "torch" (force the fallback; for checks)
logger = init_logger("vllm.tlq")


def _no_loader(*_args, **_kwargs):
    raise RuntimeError("TLQ kernel tensors are built after loading; they are not loaded from disk")


def fast_int4_requested() -> bool:
    return os.environ.get(FAST_INT4_ENV, "0").strip().lower() in ("1", "true", "yes")


def forced_backend() -> str:
    return os.environ.get(BACKEND_ENV, "auto").strip().lower()


@dataclass
class Served:
    """What serves one layer: `kernel` (summary key) and `numerics` (what the outputs mean)."""

    kernel: str
    numerics: str


@dataclass
class LayerJob:
    """Everything a backend needs about one quantized linear.

    Attributes:
        lw: the loaded partition (or row window), unpacked.
        spec: the checkpoint's numerics.
        prefix: the layer's name, for messages.
        k_full / n_full: the unsplit weight's input and output sizes.
        window: the row window when this rank's input slice is not whole groups, else None.
    """

    lw: LoadedWeight
    spec: ServeSpec
    prefix: str
    k_full: int
    n_full: int
    window: RowWindow | None = None

    @property
    def pad(self) -> tuple[int, int] | None:
        """Zeros to put before/after x's channels so they line up with the window, or None."""
        return (self.window.pad_front, self.window.pad_back) if self.window and self.window.padded else None


class LinearBackend(ABC):
    """One way of computing a quantized linear; an instance serves one layer."""

    pad: tuple[int, int] | None = None

    def applies(self, job: LayerJob) -> bool:
        """Whether this backend is meant for the layer's scheme at all (else it is skipped silently)."""
        return True

    @abstractmethod
    def refusal(self, layer: torch.nn.Module, job: LayerJob) -> str | None:
        """Why this backend cannot serve the layer (one line), or None when it can."""

    @abstractmethod
    def prepare(self, layer: torch.nn.Module, job: LayerJob) -> Served:
        """Replace the loaded tensors with what `apply` reads; called only after refusal() is None."""

    @abstractmethod
    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """y = x W^T (+ bias), traceable (no logging, no data-dependent branches)."""

    def padded(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.pad is None else F.pad(x, self.pad)


class TLQCPUWNA16Kernel(CPUWNA16LinearKernel):
    """vLLM's CPUWNA16 with the int4 x int8 shortcut decided by TLQ, not by VLLM_CPU_INT4_W4A8.

    Takes qweight [K/8, N] and scales [groups, N] (GPTQ layout), zero points [N/8, groups]
    (compressed-tensors layout, transposed here as vLLM's own process step does). Requests the AMX
    tile state for this process first: the kernel runs tile instructions on AMX CPUs.
    """

    fast = False

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        cpu_isa.ensure_amx_state()
        if not self.config.zero_points and self.w_zp_name is not None:
            setattr(layer, self.w_zp_name, None)
        elif self.config.zero_points:
            zp = getattr(layer, self.w_zp_name)
            if zp.output_dim == 0:
                zp.data = zp.data.t().contiguous()
        layer.use_w4a8 = bool(self.fast and self.config.act_type == torch.bfloat16
                              and cpu_isa.amx_available())
        if layer.use_w4a8:
            self._process_gptq_weights_w4a8(layer)
        else:
            self._process_gptq_weights_w4a16(layer)


class TLQCPUWNA16FastKernel(TLQCPUWNA16Kernel):
    fast = True


def _weight_type(bits: int, sym: bool):
    if bits <= 4:
        return scalar_types.uint4b8 if sym else scalar_types.uint4
    return scalar_types.uint8b128 if sym else scalar_types.uint8


def _replace(layer: torch.nn.Module, name: str, value) -> None:
    if hasattr(layer, name):
        delattr(layer, name)
    layer.register_parameter(name, value)


def _drop(layer: torch.nn.Module, *names: str) -> None:
    for name in names:
        if hasattr(layer, name):
            delattr(layer, name)


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]


# -- 1. w4a8 through the int8 scaled-mm kernel -------------------------------------------
class Int8Backend(LinearBackend):
    def __init__(self):
        self.kernel = None

    def applies(self, job):
        return job.spec.act_bits == 8

    def refusal(self, layer, job):
        try:
            self.kernel = init_int8_linear_kernel(is_channelwise=True, is_static_input_scheme=False,
                                                  input_symmetric=True, module_name="TLQLinearMethod")
        except (ValueError, NotImplementedError) as exc:
            return f"no int8 kernel: {_first_line(exc)}"
        return None

    def prepare(self, layer, job):
        lw, spec = job.lw, job.spec
        self.pad = job.pad
        layer.logical_widths = list(lw.shard_sizes)
        signed = (lw.codes - 2 ** (spec.bits - 1)).t().contiguous().to(torch.int8)  # [N, K] in [-8, 7]
        _drop(layer, "qweight", "scales", "qzeros", "g_idx")
        layer.register_parameter("weight", ModelWeightParameter(
            data=signed, input_dim=1, output_dim=0, weight_loader=_no_loader))
        layer.register_parameter("weight_scale", ChannelQuantScaleParameter(
            data=lw.scales[0].float().reshape(-1, 1).contiguous(), output_dim=0, weight_loader=_no_loader))
        layer.register_parameter("input_scale", None)
        layer.register_parameter("input_zero_point", None)
        if not hasattr(layer, "azp_adj"):
            layer.register_parameter("azp_adj", None)
        # the CPU kernel fixes its output dtype from torch's default dtype at this point
        previous = torch.get_default_dtype()
        torch.set_default_dtype(layer.params_dtype)
        try:
            self.kernel.process_weights_after_loading(layer)
        finally:
            torch.set_default_dtype(previous)
        return Served(type(self.kernel).__name__, "W4A8: int4 weights upcast to int8, per-token dynamic "
                      "symmetric int8 activations")

    def apply(self, layer, x, bias):
        return self.kernel.apply_weights(layer, self.padded(x), bias)


# -- 2. weight-only mixed-precision kernels ----------------------------------------------
class MixedPrecisionBackend(LinearBackend):
    def __init__(self):
        self.kernel = None
        self.permute = False
        self.plan = None

    def applies(self, job):
        return job.spec.act_bits != 8

    def refusal(self, layer, job):
        try:
            self.plan = self._plan(job, layer.params_dtype)
        except ValueError as exc:
            return f"no kernel: {_first_line(exc)}"
        missing = cpu_isa.missing_wna16_flags() if issubclass(self.plan[0], CPUWNA16LinearKernel) else []
        if missing:
            return (f"no kernel: this CPU lacks {', '.join(missing)} (vLLM builds its CPU int4 kernel "
                    "cpu_gemm_wna16 for AVX-512 only)")
        return None

    @staticmethod
    def _plan(job: LayerJob, act_dtype: torch.dtype):
        """(kernel class, config, act-order permutation or None); raises ValueError when none fits."""
        lw, spec = job.lw, job.spec
        perm = None
        if lw.g_idx is not None:
            rows = lw.g_idx
            if not bool((rows == rows[0:1]).all()):
                raise ValueError("fused shards carry different act-order permutations")
            perm = act_order_permutation(rows[0], spec.group_size)
            if perm is None:
                raise ValueError("act-order groups are split across this partition")
        if lw.k % 32 or lw.n % 32:
            raise ValueError(f"partition {lw.k}x{lw.n} is not a multiple of 32")
        config = MPLinearLayerConfig(
            full_weight_shape=(job.k_full, job.n_full), partition_weight_shape=(lw.k, lw.n),
            weight_type=_weight_type(spec.bits, spec.sym), act_type=act_dtype,
            group_size=spec.group_size, zero_points=not spec.sym)
        try:
            kernel_cls = choose_mp_linear_kernel(config)
        except ValueError:
            raise ValueError(f"no mixed-precision kernel here takes {config.weight_type} "
                             f"group {spec.group_size}") from None
        if kernel_cls is CPUWNA16LinearKernel:
            kernel_cls = TLQCPUWNA16FastKernel if fast_int4_requested() else TLQCPUWNA16Kernel
        return kernel_cls, config, perm

    def prepare(self, layer, job):
        lw, spec = job.lw, job.spec
        kernel_cls, config, perm = self.plan
        self.pad = job.pad
        codes, zeros, scales = lw.codes, lw.zeros, lw.scales
        if spec.bits <= 4:
            codes, zeros = lift_to_uint4(codes, zeros, spec.bits)
        if perm is not None:
            order, first = perm
            codes = codes[order]
            local = slice(first, first + lw.k // spec.group_size)
            scales = scales[local]
            zeros = None if zeros is None else zeros[local]
            layer.register_buffer("tlq_perm", order.to(torch.long).contiguous(), persistent=False)
            self.permute = True
        kbits = 4 if spec.bits <= 4 else 8
        _drop(layer, "g_idx")
        _replace(layer, "qweight", PackedvLLMParameter(
            data=pack_gptq(codes, kbits, dim=0), input_dim=0, output_dim=1, packed_dim=0,
            packed_factor=32 // kbits, weight_loader=_no_loader))
        _replace(layer, "scales", GroupQuantScaleParameter(
            data=scales.to(layer.params_dtype).contiguous(), input_dim=0, output_dim=1, weight_loader=_no_loader))
        if zeros is not None:  # compressed-tensors layout [N/pf, groups], the one every vLLM kernel reads
            _replace(layer, "qzeros", PackedvLLMParameter(
                data=pack_gptq(zeros, kbits, dim=1).t().contiguous(), input_dim=1, output_dim=0, packed_dim=0,
                packed_factor=32 // kbits, weight_loader=_no_loader))
        else:
            _drop(layer, "qzeros")
        self.kernel = kernel_cls(config, w_q_param_name="qweight", w_s_param_name="scales",
                                 w_zp_param_name="qzeros")
        self.kernel.process_weights_after_loading(layer)
        return Served(_kernel_label(kernel_cls), _mp_numerics(layer, kernel_cls, spec))

    def apply(self, layer, x, bias):
        x = self.padded(x)
        if self.permute:
            x = x.index_select(-1, layer.tlq_perm)
        return self.kernel.apply_weights(layer, x, bias)


def _kernel_label(kernel_cls) -> str:
    return "CPUWNA16" if issubclass(kernel_cls, CPUWNA16LinearKernel) else kernel_cls.__name__


def _mp_numerics(layer, kernel_cls, spec: ServeSpec) -> str:
    lifted = f", {spec.bits}-bit lifted to 4-bit" if spec.bits < 4 else ""
    if issubclass(kernel_cls, CPUWNA16LinearKernel):
        isa = f" [isa {getattr(layer, 'isa_hint', '?')}]"
        if getattr(layer, "use_w4a8", False):
            return f"W4A8 int4 x int8 (activations quantized per token; --cpu-int4 fast){lifted}"
        note = " (fast int4 x int8 path requested but needs AMX and bf16)" if fast_int4_requested() else ""
        return f"exact W{spec.bits}A16{lifted}{isa}{note}"
    return f"W{spec.bits}A16{lifted}"


# -- 3. torch fallback --------------------------------------------------------------------
class TorchBackend(LinearBackend):
    def __init__(self, reason: str = ""):
        self.act8 = False
        self.reason = reason

    def refusal(self, layer, job):
        return None  # runs anything: the last resort

    def prepare(self, layer, job):
        spec = job.spec
        self.act8 = spec.act_bits == 8
        weight = job.lw.dequantize(layer.params_dtype)
        if job.window is not None and job.window.padded:  # keep this rank's columns of the window
            k_part = job.window.length - job.window.pad_front - job.window.pad_back
            weight = weight[:, job.window.pad_front: job.window.pad_front + k_part].contiguous()
        _drop(layer, "qweight", "scales", "qzeros", "g_idx")
        layer.register_parameter("tlq_weight", torch.nn.Parameter(weight, requires_grad=False))
        acts = "exact per-token int8 activation simulation" if self.act8 else "exact"
        return Served("torch", f"{acts}, dequantized {spec.bits}-bit weights + F.linear ({self.reason})")

    def apply(self, layer, x, bias):
        if self.act8:
            x = quantize_activations_int8(x)
        return F.linear(x, layer.tlq_weight, bias)


BACKENDS: tuple[type[LinearBackend], ...] = (Int8Backend, MixedPrecisionBackend)  # then TorchBackend
_logged_reasons: set[str] = set()


def choose(layer, job: LayerJob) -> tuple[LinearBackend, Served]:
    """Prepare `layer` for the first backend in BACKENDS that takes it, else the torch fallback."""
    reasons = []
    if forced_backend() == "torch":
        reasons.append(f"{BACKEND_ENV}=torch")
    else:
        for cls in BACKENDS:
            backend = cls()
            if not backend.applies(job):
                continue
            why = backend.refusal(layer, job)
            if why is None:
                return backend, backend.prepare(layer, job)
            reasons.append(why)
    reason = "; ".join(reasons) or "no backend applies"
    if reason not in _logged_reasons:  # once per distinct reason, not once per layer
        _logged_reasons.add(reason)
        logger.warning("tlq: falling back to the exact torch backend for %s and similar layers: %s",
                       job.prefix, reason)
    backend = TorchBackend(reason)
    return backend, backend.prepare(layer, job)
