"""The plugin's vLLM-facing parts in-process: backends on real vLLM kernels, TP-aware parameters, config.

No engine is started: layers are bare modules carrying what vLLM's loader would have put in them.
Reference for weight-only paths: F.linear with the checkpoint's dequantized weights in the
activation dtype (what the dequantized float model computes).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("vllm", reason="vllm is not importable here")
pytestmark = [pytest.mark.vllm, pytest.mark.usefixtures("single_rank")]

from tlq.errors import CheckpointError
from tlq.quant.qparams import QuantizedWeight, quantize_activations_int8, quantize_rtn
from vllm_plugin.spec import ServeSpec
from vllm_plugin.weights import LoadedWeight

DTYPE = torch.bfloat16


def spec_of(bits, group, sym, act_bits=16, act_order=False):
    return ServeSpec(f"w{bits}a{act_bits}", bits, group, sym, act_bits, act_order)


def loaded(qw: QuantizedWeight, shard_sizes=None) -> LoadedWeight:
    g_idx = None if qw.g_idx is None else qw.g_idx.long().unsqueeze(0)
    return LoadedWeight(qw.codes.t().contiguous(), qw.scales.t().contiguous().to(DTYPE),
                        None if qw.zeros is None else qw.zeros.t().contiguous(), qw.bits, qw.group_size,
                        g_idx, tuple(shard_sizes or (qw.shape[0],)))


def bare_layer() -> torch.nn.Module:
    layer = torch.nn.Module()
    layer.params_dtype = DTYPE
    layer.bias = None
    return layer


def serve(qw: QuantizedWeight, spec: ServeSpec, shard_sizes=None):
    from vllm_plugin import backends
    layer = bare_layer()
    lw = loaded(qw, shard_sizes)
    backend, served = backends.choose(layer, backends.LayerJob(lw, spec, "test.layer", lw.k, lw.n))
    return layer, backend, served


def rtn(bits, group, sym, n=96, k=256, seed=0):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05
    return quantize_rtn(w, bits, group, sym, DTYPE)


def x_in(k, tokens=5):
    return torch.randn(tokens, k, generator=torch.Generator().manual_seed(7)).to(DTYPE)


def close(out, ref, rtol=1e-2):
    err = (out.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item()
    return err <= rtol * scale, f"max abs error {err:.3g} vs output scale {scale:.3g}"


@pytest.mark.parametrize("bits", (2, 3, 4))
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("group", [32, 128, -1])
def test_weight_only_runs_on_vllm_cpu_kernel_with_dequantized_numerics(bits, sym, group, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_INT4_W4A8", "1")  # vLLM's default: must not leak into TLQ's a16 layers
    qw = rtn(bits, group, sym)
    layer, backend, served = serve(qw, spec_of(bits, group, sym))
    assert served.kernel == "CPUWNA16"
    assert layer.use_w4a8 is False and served.numerics.startswith(f"exact W{bits}A16")
    x = x_in(qw.shape[1])
    ok, msg = close(backend.apply(layer, x, None), F.linear(x, qw.dequantize(DTYPE)))
    assert ok, msg


def test_fast_int4_opt_in_is_reported(monkeypatch):
    monkeypatch.setenv("TLQ_CPU_FAST_INT4", "1")
    layer, _, served = serve(rtn(4, 128, True), spec_of(4, 128, True))
    amx = torch.cpu._is_amx_tile_supported()
    assert layer.use_w4a8 is amx
    assert ("W4A8 int4 x int8" in served.numerics) is amx
    assert ("requested but needs AMX" in served.numerics) is (not amx)


@pytest.mark.parametrize("group, sym", [(128, True), (-1, False)])
def test_8_bit_falls_back_to_exact_torch(group, sym):
    qw = rtn(8, group, sym)
    layer, backend, served = serve(qw, spec_of(8, group, sym))
    assert served.kernel == "torch" and "uint8" in served.numerics
    x = x_in(qw.shape[1])
    assert torch.equal(backend.apply(layer, x, None), F.linear(x, qw.dequantize(DTYPE)))


def test_forced_torch_backend(monkeypatch):
    monkeypatch.setenv("TLQ_LINEAR_BACKEND", "torch")
    qw = rtn(4, 64, False)
    layer, backend, served = serve(qw, spec_of(4, 64, False))
    assert served.kernel == "torch" and not hasattr(layer, "qweight")
    x = x_in(qw.shape[1])
    bias = torch.randn(qw.shape[0]).to(DTYPE)
    assert torch.equal(backend.apply(layer, x, bias), F.linear(x, qw.dequantize(DTYPE), bias))


def test_w4a8_int8_kernel_matches_the_int8_simulation():
    qw = rtn(4, -1, True)
    spec = spec_of(4, -1, True, act_bits=8)
    x = x_in(qw.shape[1], tokens=7)
    simulated = F.linear(quantize_activations_int8(x), qw.dequantize(DTYPE))
    layer, backend, served = serve(qw, spec)
    assert "Int8" in served.kernel and "int8 activations" in served.numerics
    ok, msg = close(backend.apply(layer, x, None), simulated, rtol=2e-2)
    assert ok, msg
    # the fallback simulates the same numerics exactly
    import os
    os.environ["TLQ_LINEAR_BACKEND"] = "torch"
    try:
        layer, backend, served = serve(qw, spec)
    finally:
        del os.environ["TLQ_LINEAR_BACKEND"]
    assert served.kernel == "torch" and "int8 activation simulation" in served.numerics
    assert torch.equal(backend.apply(layer, x, None), simulated)


@pytest.mark.parametrize("group,act_bits", [(-1, 8), (128, 16), (-1, 16)], ids=["w4a8", "w4a16-g128", "w4a16-pc"])
def test_symmetric_codes_serve_over_the_full_range(group, act_bits):
    """Symmetric int4 codes 0..15 (signed -8..7): GPTQ and RTN on the full grid (SymmetricGrid.FULL) use -8."""
    qw = rtn(4, group, True)
    codes = torch.randint(0, 16, qw.codes.shape, generator=torch.Generator().manual_seed(1), dtype=torch.int32)
    codes[:, :2] = torch.tensor([0, 15], dtype=torch.int32)
    qw = QuantizedWeight(codes, qw.scales, None, 4, group)
    layer, backend, _ = serve(qw, spec_of(4, group, True, act_bits=act_bits))
    x = x_in(qw.shape[1], tokens=7)
    ref = F.linear(quantize_activations_int8(x) if act_bits == 8 else x, qw.dequantize(DTYPE))
    ok, msg = close(backend.apply(layer, x, None), ref, rtol=2e-2)
    assert ok, msg


def act_order(bits, group, sym, n, k, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    perm = torch.randperm(k, generator=g)
    q = quantize_rtn(w[:, perm], bits, group, sym, DTYPE)
    codes = torch.empty_like(q.codes)
    codes[:, perm] = q.codes
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[perm] = (torch.arange(k) // group).to(torch.int32)
    return QuantizedWeight(codes, q.scales, q.zeros, bits, group, g_idx)


def test_act_order_served_by_kernel_through_input_permutation():
    qw = act_order(3, 64, False, 64, 256, seed=3)
    layer, backend, served = serve(qw, spec_of(3, 64, False, act_order=True))
    assert served.kernel == "CPUWNA16" and backend.permute
    x = x_in(256)
    ok, msg = close(backend.apply(layer, x, None), F.linear(x, qw.dequantize(DTYPE)))
    assert ok, msg


def test_act_order_with_different_shard_permutations_falls_back():
    a, b = act_order(4, 32, True, 64, 128, seed=1), act_order(4, 32, True, 32, 128, seed=2)
    fused = LoadedWeight(torch.cat([a.codes, b.codes]).t().contiguous(),
                         torch.cat([a.scales, b.scales]).t().contiguous().to(DTYPE), None, 4, 32,
                         torch.stack([a.g_idx, b.g_idx]).long(), (64, 32))
    from vllm_plugin import backends
    layer = bare_layer()
    job = backends.LayerJob(fused, spec_of(4, 32, True, act_order=True), "qkv", 128, 96)
    backend, served = backends.choose(layer, job)
    assert served.kernel == "torch" and "different act-order" in served.numerics
    x = x_in(128)
    ref = F.linear(x, torch.cat([a.dequantize(DTYPE), b.dequantize(DTYPE)]))
    assert torch.equal(backend.apply(layer, x, None), ref)


# -- tensor-parallel parameter loading ------------------------------------------------------
def test_zero_points_unpack_then_shard_like_columns():
    from tlq.format.packing import pack
    from vllm_plugin.params import ReplicatedZerosParameter, UnpackedZerosParameter
    z_q = torch.randint(0, 8, (4, 64), dtype=torch.int32)  # [groups, N_q]
    z_k = torch.randint(0, 8, (4, 32), dtype=torch.int32)
    p = UnpackedZerosParameter(data=torch.zeros(4, 32 + 16, dtype=torch.int32), input_dim=0, output_dim=1,
                               weight_loader=None)
    p.tlq_bits, p.tp_rank, p.tp_size = 3, 1, 2  # rank 1 of 2
    p.load_qkv_weight(pack(z_q, 3, dim=1), shard_id="q", shard_offset=0, shard_size=32, num_heads=1)
    p.load_qkv_weight(pack(z_k, 3, dim=1), shard_id="k", shard_offset=32, shard_size=16, num_heads=1)
    assert torch.equal(p.data[:, :32], z_q[:, 32:]) and torch.equal(p.data[:, 32:], z_k[:, 16:])
    # row-parallel: groups split along K, N whole (padding dropped)
    z = torch.randint(0, 8, (8, 40), dtype=torch.int32)
    row = UnpackedZerosParameter(data=torch.zeros(4, 40, dtype=torch.int32), input_dim=0, output_dim=1,
                                 weight_loader=None)
    row.tlq_bits, row.tp_rank, row.tp_size = 3, 1, 2
    row.load_row_parallel_weight(pack(z, 3, dim=1))
    assert torch.equal(row.data, z[4:])
    rep = ReplicatedZerosParameter(data=torch.zeros(8, 40, dtype=torch.int32), output_dim=1, weight_loader=None)
    rep.tlq_bits, rep.tp_rank, rep.tp_size = 3, 1, 2
    rep.load_row_parallel_weight(pack(z, 3, dim=1))
    assert torch.equal(rep.data, z)


def test_g_idx_keeps_one_row_per_shard_and_splits_rows():
    from vllm_plugin.params import GIdxParameter
    p = GIdxParameter(data=torch.zeros(3, 8, dtype=torch.int32), input_dim=1, weight_loader=None)
    for i, s in enumerate("qkv"):
        p.load_qkv_weight(torch.full((8,), i, dtype=torch.int32), shard_id=s, shard_offset=0, shard_size=1)
    assert p.data[:, 0].tolist() == [0, 1, 2]
    row = GIdxParameter(data=torch.zeros(1, 4, dtype=torch.int32), input_dim=1, weight_loader=None)
    row.tp_rank, row.tp_size = 1, 2
    row.load_row_parallel_weight(torch.arange(8, dtype=torch.int32))
    assert row.data[0].tolist() == [4, 5, 6, 7]


def test_create_params_shapes():
    from vllm_plugin.params import create_tlq_params
    layer = torch.nn.Module()
    create_tlq_params(layer, spec_of(3, 64, False), 256, [64, 32, 32], 256, DTYPE, None)
    assert layer.qweight.shape == (24, 128) and layer.scales.shape == (4, 128) and layer.qzeros.shape == (4, 128)
    assert str(layer.qweight.packed_factor) == "32/3"
    layer = torch.nn.Module()
    create_tlq_params(layer, spec_of(4, 128, True, act_order=True), 128, [96], 256, DTYPE, None)
    assert layer.scales.shape == (2, 96) and layer.g_idx.shape == (1, 128) and not hasattr(layer, "qzeros")


# -- config -----------------------------------------------------------------------------
def qcfg(**kw):
    return {"quant_method": "tlq", "format_version": 1, "scheme": "w4a16", "bits": 4, "group_size": 128,
            "sym": True, "act_bits": 16, "act_order": False, "ignore": ["visual", "lm_head"], **kw}


def test_config_picks_methods_by_layer_name():
    from vllm.model_executor.layers.linear import QKVParallelLinear, UnquantizedLinearMethod
    from vllm.model_executor.models.utils import WeightsMapper

    from vllm_plugin.config import TLQConfig
    from vllm_plugin.linear import TLQLinearMethod
    cfg = TLQConfig.from_config(qcfg(ignore=["model.visual", "lm_head"]))
    cfg.apply_vllm_mapper(WeightsMapper(orig_to_new_prefix={"model.visual.": "visual."}))
    assert cfg.ignore == ["model.visual", "lm_head", "visual"]
    layer = QKVParallelLinear.__new__(QKVParallelLinear)  # isinstance is all the config looks at
    assert isinstance(cfg.get_quant_method(layer, "visual.blocks.0.attn.qkv"), UnquantizedLinearMethod)
    assert isinstance(cfg.get_quant_method(layer, "model.visual.blocks.0.attn.qkv"), UnquantizedLinearMethod)
    assert isinstance(cfg.get_quant_method(layer, "language_model.model.layers.0.self_attn.qkv_proj"),
                      TLQLinearMethod)
    assert cfg.get_quant_method(torch.nn.Embedding(4, 4), "language_model.model.embed_tokens") is None
    assert cfg.get_checkpoint_weight_mapper().map_name("a.q_proj.g_idx") == "a.q_proj.g_idx"
    assert TLQConfig.override_quantization_method({"quant_method": "tlq"}, None) == "tlq"
    assert TLQConfig.override_quantization_method({"quant_method": "gptq"}, None) is None


def test_config_refuses_unservable_quantization_config():
    from vllm_plugin.config import TLQConfig
    with pytest.raises(CheckpointError, match="5-bit"):
        TLQConfig.from_config(qcfg(bits=5))


def test_summary_is_logged_once_all_layers_are_served(caplog):
    from vllm_plugin.backends import Served
    from vllm_plugin.config import TLQConfig
    cfg = TLQConfig.from_config(qcfg())
    for p in ("m.layers.0.self_attn.qkv_proj", "m.layers.0.mlp.down_proj"):
        cfg.layer_created(p)
    cfg._unquantized.append("visual.blocks.0.attn.qkv")
    cfg.layer_served("m.layers.0.self_attn.qkv_proj", Served("CPUWNA16", "exact W4A16"))
    summary = cfg.summary()
    assert "1 quantized linears" in summary and "qkv_proj x1" in summary
    cfg.layer_served("m.layers.0.mlp.down_proj", Served("torch", "exact"))
    summary = cfg.summary()
    assert "CPUWNA16 for 1" in summary and "torch for 1" in summary and "1 linears unquantized (visual)" in summary


def test_verify_refuses_a_damaged_checkpoint(qwen2_vl_dir, tmp_path):
    from tlq import calibrate
    from tlq.calib.config import CalibConfig, get_method
    from tlq.schemes import get_scheme
    from vllm_plugin.config import verify_model_folder
    ckpt = calibrate(CalibConfig(model=qwen2_vl_dir, out=tmp_path / "q", method=get_method("rtn"),
                                 scheme=get_scheme("w4a16")), progress=False)
    spec = ServeSpec.from_dict(qcfg(ignore=["visual", "lm_head"]))
    verify_model_folder(str(ckpt), spec)  # intact: passes
    with pytest.raises(CheckpointError, match="mixed settings"):
        verify_model_folder(str(ckpt), ServeSpec.from_dict(qcfg(group_size=64)))
    data = bytearray((ckpt / "model.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (ckpt / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        verify_model_folder(str(ckpt), spec)


def test_row_parallel_split_inside_a_group_gets_a_window_not_an_error(monkeypatch):
    """704 of 2816 inputs per rank (TP=4) is 5.5 groups of 128: rank 1 loads groups 5..11, padded 64/64."""
    import vllm.model_executor.parameter as p
    from vllm.model_executor.layers.linear import RowParallelLinear

    from vllm_plugin.config import TLQConfig
    monkeypatch.setattr(p, "get_tensor_model_parallel_rank", lambda: 1)
    cfg = TLQConfig.from_config(qcfg(group_size=128))
    layer = RowParallelLinear.__new__(RowParallelLinear)
    method = cfg.get_quant_method(layer, "language_model.model.layers.3.mlp.down_proj")
    module = torch.nn.Module()
    method.create_weights(module, 704, [1024], 2816, 1024, DTYPE, weight_loader=None)
    w = module.tlq_window
    assert (w.start, w.length, w.pad_front, w.pad_back) == (640, 768, 64, 0)
    assert module.qweight.shape == (96, 1024) and module.scales.shape == (6, 1024)
    assert module.qweight.tlq_rows == (80, 96) and module.scales.tlq_rows == (5, 6)
