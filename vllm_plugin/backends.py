"""Which code computes a TLQ linear, chosen once per layer at load time.

Order of preference:
1. w4a8 (int8 activations): vLLM's int8 scaled-mm kernel (`init_int8_linear_kernel`: oneDNN/SGL
   on CPU, CUTLASS on CUDA) with the int4 codes upcast to int8 and per-token dynamic symmetric
   activation quantization.
2. weight-only: vLLM's mixed-precision kernels (`choose_mp_linear_kernel`: Marlin on CUDA,
   CPUWNA16 on CPU). 2- and 3-bit codes are lifted exactly to 4-bit (weights.lift_to_uint4);
   act-order is served by gathering the input channels (x[..., perm]) when groups stay whole.
3. the torch fallback: the dequantized weight (computed once at load, exactly the reference
   weights) and F.linear, plus the exact int8 activation simulation for w4a8.

CPU numerics: CPUWNA16 on an AMX CPU quantizes activations to int8 by default
(VLLM_CPU_INT4_W4A8=1). TLQ serves exact W4A16 unless TLQ_CPU_FAST_INT4=1 opts in.
`apply` functions stay traceable by torch.compile: no logging, no data-dependent Python branches.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
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

from tlq.quant.qparams import quantize_activations_int8
from vllm_plugin.spec import ServeSpec
from vllm_plugin.weights import LoadedWeight, act_order_permutation, lift_to_uint4, pack_gptq

FAST_INT4_ENV = "TLQ_CPU_FAST_INT4"
BACKEND_ENV = "TLQ_LINEAR_BACKEND"  # "auto" (default) or "torch" (force the fallback; for checks)


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


class TLQCPUWNA16Kernel(CPUWNA16LinearKernel):
    """vLLM's CPUWNA16 with the int4 x int8 shortcut decided by TLQ, not by VLLM_CPU_INT4_W4A8.

    Takes qweight [K/8, N] and scales [groups, N] (GPTQ layout), zero points [N/8, groups]
    (compressed-tensors layout, transposed here as vLLM's own process step does).
    """

    fast = False

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if not self.config.zero_points and self.w_zp_name is not None:
            setattr(layer, self.w_zp_name, None)
        elif self.config.zero_points:
            zp = getattr(layer, self.w_zp_name)
            if zp.output_dim == 0:
                zp.data = zp.data.t().contiguous()
        layer.use_w4a8 = bool(self.fast and self.config.act_type == torch.bfloat16
                              and torch.cpu._is_amx_tile_supported())
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


# -- 1. w4a8 through the int8 scaled-mm kernel -------------------------------------------
class Int8Backend:
    def __init__(self):
        self.kernel = None

    def prepare(self, layer, lw: LoadedWeight, spec: ServeSpec, prefix: str) -> Served:
        self.kernel = init_int8_linear_kernel(is_channelwise=True, is_static_input_scheme=False,
                                              input_symmetric=True, module_name="TLQLinearMethod")
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
        return self.kernel.apply_weights(layer, x, bias)


# -- 2. weight-only mixed-precision kernels ----------------------------------------------
class MixedPrecisionBackend:
    def __init__(self):
        self.kernel = None
        self.permute = False

    def plan(self, lw: LoadedWeight, spec: ServeSpec, k_full: int, n_full: int, act_dtype: torch.dtype):
        """(kernel class, config, act-order permutation or None); raises ValueError when none fits."""
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
            full_weight_shape=(k_full, n_full), partition_weight_shape=(lw.k, lw.n),
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

    def prepare(self, layer, lw: LoadedWeight, spec: ServeSpec, prefix: str, plan) -> Served:
        kernel_cls, config, perm = plan
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
        if self.permute:
            x = x.index_select(-1, layer.tlq_perm)
        return self.kernel.apply_weights(layer, x, bias)


def _kernel_label(kernel_cls) -> str:
    return "CPUWNA16" if issubclass(kernel_cls, CPUWNA16LinearKernel) else kernel_cls.__name__


def _mp_numerics(layer, kernel_cls, spec: ServeSpec) -> str:
    lifted = f", {spec.bits}-bit lifted to 4-bit" if spec.bits < 4 else ""
    if issubclass(kernel_cls, CPUWNA16LinearKernel):
        if getattr(layer, "use_w4a8", False):
            return f"W4A8 int4 x int8 (activations quantized per token; {FAST_INT4_ENV}=1){lifted}"
        note = " (fast int4 x int8 path requested but needs AMX and bf16)" if fast_int4_requested() else ""
        return f"exact W{spec.bits}A16{lifted}{note}"
    return f"W{spec.bits}A16{lifted}"


# -- 3. torch fallback --------------------------------------------------------------------
class TorchBackend:
    def __init__(self):
        self.act8 = False

    def prepare(self, layer, lw: LoadedWeight, spec: ServeSpec, prefix: str, reason: str) -> Served:
        self.act8 = spec.act_bits == 8
        weight = lw.dequantize(layer.params_dtype)
        _drop(layer, "qweight", "scales", "qzeros", "g_idx")
        layer.register_parameter("tlq_weight", torch.nn.Parameter(weight, requires_grad=False))
        acts = "exact per-token int8 activation simulation" if self.act8 else "exact"
        return Served("torch", f"{acts}, dequantized {spec.bits}-bit weights + F.linear ({reason})")

    def apply(self, layer, x, bias):
        if self.act8:
            x = quantize_activations_int8(x)
        return F.linear(x, layer.tlq_weight, bias)


def choose(layer, lw: LoadedWeight, spec: ServeSpec, prefix: str, k_full: int, n_full: int):
    """Prepare `layer` for the best backend that takes it; returns (backend, Served)."""
    reason = f"{BACKEND_ENV}=torch"
    if forced_backend() != "torch":
        if spec.act_bits == 8:
            try:
                backend = Int8Backend()
                return backend, backend.prepare(layer, lw, spec, prefix)
            except (ValueError, NotImplementedError) as exc:
                reason = f"no int8 kernel: {str(exc).splitlines()[0]}"
        else:
            backend = MixedPrecisionBackend()
            try:
                plan = backend.plan(lw, spec, k_full, n_full, layer.params_dtype)
            except ValueError as exc:
                reason = f"no kernel: {str(exc).splitlines()[0]}"
            else:
                return backend, backend.prepare(layer, lw, spec, prefix, plan)
    backend = TorchBackend()
    return backend, backend.prepare(layer, lw, spec, prefix, reason)
