"""The plugin's CPU int4 kernel under every ISA path: native where this CPU has it, simulated otherwise.

- `amx` (AMX tiles) and `vec` (AVX-512) run vLLM's `cpu_gemm_wna16` for real and are compared with
  the dequantized float result; the run's summary line says which ran here.
- AMX needs the process's tile permission: a fresh process that skips `ensure_amx_state` dies
  with SIGILL, the same call after `vllm_plugin.register()` returns (only on AMX CPUs).
- AVX2-only CPUs are simulated by patching the CPU flags: the plugin must refuse the kernel, name
  the missing flags, log the fallback, and serve exactly through its torch backend.
- Row windows (TP splits inside a group): two simulated ranks load the on-disk tensors through the
  plugin's parameters, and their partial outputs add up to the full product.
"""
from __future__ import annotations

import logging
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("vllm", reason="vllm is not importable here")
pytestmark = [pytest.mark.vllm, pytest.mark.usefixtures("single_rank")]

from tlq.format.checkpoint import pack_linear
from tlq.quant.qparams import quantize_rtn
from vllm_plugin import cpu_isa
from vllm_plugin.spec import ServeSpec
from vllm_plugin.weights import LoadedWeight

DTYPE = torch.bfloat16
AVX2_ONLY = frozenset({"fpu", "sse4_2", "avx", "avx2", "fma", "f16c", "bmi2"})


def weight(bits, group, sym, n=64, k=256, seed=0):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05
    return quantize_rtn(w, bits, group, sym, DTYPE)


def serve_layer(qw, spec):
    from vllm_plugin import backends
    layer = torch.nn.Module()
    layer.params_dtype, layer.bias = DTYPE, None
    lw = LoadedWeight(qw.codes.t().contiguous(), qw.scales.t().contiguous().to(DTYPE),
                      None if qw.zeros is None else qw.zeros.t().contiguous(), qw.bits, qw.group_size)
    backend, served = backends.choose(layer, backends.LayerJob(lw, spec, "test.layer", lw.k, lw.n))
    return layer, backend, served


def x_in(k, tokens=5, seed=7):
    return torch.randn(tokens, k, generator=torch.Generator().manual_seed(seed)).to(DTYPE)


def rel_err(out, ref) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


# -- every ISA path this CPU has ------------------------------------------------------------
@pytest.mark.parametrize("isa", ["amx", "vec"])
@pytest.mark.parametrize("bits, group, sym", [(4, 128, True), (4, 64, False), (3, 128, False)])
def test_a16_kernel_under_each_isa_matches_dequantized(isa, bits, group, sym, record_isa):
    if isa not in cpu_isa.isa_hints():
        lacking = cpu_isa.missing_wna16_flags() or ["amx_tile/amx_bf16"]
        pytest.skip(f"this CPU has no {isa} path for cpu_gemm_wna16 (lacks {', '.join(lacking)}); "
                    "the AVX2-only refusal is covered by simulation below")
    qw = weight(bits, group, sym)
    layer, backend, served = serve_layer(qw, ServeSpec(f"w{bits}a16", bits, group, sym))
    assert served.kernel == "CPUWNA16", served
    layer.isa_hint = isa  # the kernel's own pick is amx where present; force each path in turn
    x = x_in(qw.shape[1])
    err = rel_err(backend.apply(layer, x, None), F.linear(x, qw.dequantize(DTYPE)))
    assert err < 1e-2, f"isa {isa}: relative error {err:.3g}"
    record_isa(f"cpu_gemm_wna16[{isa}]", "native")


def test_kernel_reports_its_isa_in_the_served_numerics():
    if not cpu_isa.isa_hints():
        pytest.skip("no AVX-512 here: the kernel is refused (see the simulated AVX2 test)")
    _, _, served = serve_layer(weight(4, 128, True), ServeSpec("w4a16", 4, 128, True))
    assert f"[isa {cpu_isa.isa_hints()[0]}]" in served.numerics


AMX_CHILD = textwrap.dedent("""
    import sys, torch
    import vllm.model_executor.parameter as p
    p.get_tensor_model_parallel_rank = lambda: 0
    p.get_tensor_model_parallel_world_size = lambda: 1
    from vllm import _custom_ops as ops
    if sys.argv[1] == "register":
        import vllm_plugin
        vllm_plugin.register()
    from vllm.model_executor.kernels.linear import MPLinearLayerConfig
    from vllm.model_executor.kernels.linear import CPUWNA16LinearKernel
    from vllm.model_executor.parameter import GroupQuantScaleParameter, PackedvLLMParameter
    from vllm.scalar_type import scalar_types
    from vllm_plugin.weights import pack_gptq
    k, n = 256, 64
    codes = torch.randint(0, 16, (k, n), dtype=torch.int32)
    layer = torch.nn.Module()
    layer.bias = None
    layer.register_parameter("qweight", PackedvLLMParameter(data=pack_gptq(codes, 4, 0), input_dim=0,
        output_dim=1, packed_dim=0, packed_factor=8, weight_loader=None))
    layer.register_parameter("scales", GroupQuantScaleParameter(data=torch.full((2, n), 0.01,
        dtype=torch.bfloat16), input_dim=0, output_dim=1, weight_loader=None))
    cfg = MPLinearLayerConfig(full_weight_shape=(k, n), partition_weight_shape=(k, n),
        weight_type=scalar_types.uint4b8, act_type=torch.bfloat16, group_size=128, zero_points=False)
    kernel = CPUWNA16LinearKernel(cfg, w_q_param_name="qweight", w_s_param_name="scales", w_zp_param_name=None)
    kernel._process_gptq_weights_w4a16(layer)   # stock vLLM's own step: no AMX request
    assert layer.isa_hint == "amx", layer.isa_hint
    out = ops.cpu_gemm_wna16(input=torch.randn(3, k, dtype=torch.bfloat16), q_weight=layer.qweight,
        scales=layer.scales, zeros=None, bias=None, pack_factor=8, isa_hint="amx")
    print("OK", tuple(out.shape))
""")


def run_child(mode: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", AMX_CHILD, mode], capture_output=True, text=True, check=False,
                          timeout=240, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
                                            "TORCHDYNAMO_DISABLE": "1", "VLLM_TARGET_DEVICE": "cpu"})


def test_amx_kernel_needs_the_tile_permission_that_register_requests(record_isa):
    if "amx" not in cpu_isa.isa_hints():
        pytest.skip("this CPU has no AMX: the SIGILL it causes cannot happen here")
    bare = run_child("bare")
    assert bare.returncode == -signal.SIGILL, (bare.returncode, bare.stderr[-2000:])  # the bug, reproduced
    fixed = run_child("register")
    assert fixed.returncode == 0 and "OK (3, 64)" in fixed.stdout, fixed.stderr[-2000:]
    record_isa("amx tile permission (vllm_plugin.register)", "native")


# -- AVX2-only CPU, simulated --------------------------------------------------------------
def test_avx2_only_cpu_falls_back_to_exact_torch_with_a_log_line(monkeypatch, caplog, record_isa):
    from vllm_plugin import backends
    monkeypatch.setattr(cpu_isa, "cpu_flags", lambda: AVX2_ONLY)
    monkeypatch.setattr(backends, "_logged_reasons", set())
    assert cpu_isa.missing_wna16_flags() == list(cpu_isa.WNA16_REQUIRED_FLAGS) and cpu_isa.isa_hints() == []
    qw = weight(4, 128, True)
    with caplog.at_level(logging.WARNING):
        layer, backend, served = serve_layer(qw, ServeSpec("w4a16", 4, 128, True))
    assert served.kernel == "torch"
    assert "lacks avx512f, avx512bw, avx512vl, avx512dq" in served.numerics
    assert any("falling back to the exact torch backend" in r.getMessage() and "avx512f" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]
    x = x_in(qw.shape[1])
    assert torch.equal(backend.apply(layer, x, None), F.linear(x, qw.dequantize(DTYPE)))
    record_isa("avx2-only fallback to torch", "simulated")


# -- row windows: a TP split inside a group ---------------------------------------------------
def load_rank(method_cls, spec, tensors, rank, tp, k, n, monkeypatch):
    """Create, load and process rank `rank`'s row-parallel layer from the on-disk tensors."""
    import vllm.model_executor.parameter as p
    monkeypatch.setattr(p, "get_tensor_model_parallel_rank", lambda: rank)
    monkeypatch.setattr(p, "get_tensor_model_parallel_world_size", lambda: tp)
    from vllm_plugin.config import TLQConfig
    method = method_cls(spec, f"model.layers.0.mlp.down_proj[rank {rank}]", TLQConfig(spec))
    layer = torch.nn.Module()
    layer.params_dtype, layer.bias = DTYPE, None
    method.create_weights(layer, k // tp, [n], k, n, DTYPE, weight_loader=None)
    for name, tensor in tensors.items():
        getattr(layer, name).load_row_parallel_weight(tensor)
    method.process_weights_after_loading(layer)
    return method, layer


@pytest.mark.parametrize("backend_env", ["auto", "torch"])
@pytest.mark.parametrize("bits, group, sym", [(4, 128, True), (3, 128, False), (4, 64, False)])
def test_row_window_ranks_add_up_to_the_full_product(bits, group, sym, backend_env, monkeypatch):
    """K=640 at TP=2 is 320 inputs per rank: 2.5 groups of 128 (the 72B TP=8 failure, in small)."""
    from vllm_plugin.linear import TLQLinearMethod
    monkeypatch.setenv("TLQ_LINEAR_BACKEND", backend_env)
    k, n, tp = (640, 64, 2) if group == 128 else (576, 64, 2)  # 576/2 = 288 = 4.5 groups of 64
    qw = weight(bits, group, sym, n=n, k=k, seed=3)
    tensors = pack_linear(qw, DTYPE)
    spec = ServeSpec(f"w{bits}a16", bits, group, sym)
    x = x_in(k, tokens=6)
    total = torch.zeros(6, n)
    kernels = set()
    for rank in range(tp):
        method, layer = load_rank(TLQLinearMethod, spec, tensors, rank, tp, k, n, monkeypatch)
        assert layer.tlq_window is not None and layer.tlq_window.padded
        kernels.add(type(method.backend).__name__)
        total += method.apply(layer, x[:, rank * k // tp:(rank + 1) * k // tp]).float()
    err = rel_err(total, F.linear(x, qw.dequantize(DTYPE)))
    assert err < 1e-2, f"relative error {err:.3g}"
    expected = {"TorchBackend"} if backend_env == "torch" else {"MixedPrecisionBackend"}
    assert kernels == expected
