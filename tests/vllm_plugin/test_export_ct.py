"""`tlq export --format compressed-tensors`: exact tensors, config layout, refusals (no vLLM needed).

Loading the export in stock vLLM is checked end to end in test_plugin_vllm.py.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from tlq.errors import TLQError
from tlq.export.compressed_tensors import (
    INT_QUANTIZED,
    PACK_QUANTIZED,
    export_format,
    ignore_patterns,
    layer_tensors,
)
from tlq.quant.qparams import quantize_rtn

ct = pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed")


def qcfg(**kw):
    return {"scheme": "w4a16", "bits": 4, "group_size": 128, "sym": True, "act_bits": 16, "act_order": False, **kw}


@pytest.mark.parametrize("cfg, fmt", [
    (qcfg(), PACK_QUANTIZED), (qcfg(sym=False, group_size=32), PACK_QUANTIZED),
    (qcfg(bits=8, scheme="w8a16"), PACK_QUANTIZED), (qcfg(scheme="w4a8", act_bits=8, group_size=-1), INT_QUANTIZED),
    (qcfg(act_order=True, group_size=-1), PACK_QUANTIZED),  # act-order without groups is a no-op
])
def test_exportable_schemes(cfg, fmt):
    assert export_format(cfg) == fmt


@pytest.mark.parametrize("cfg, words", [
    (qcfg(bits=3, scheme="w3a16"), "not 3-bit"), (qcfg(bits=2, scheme="w2a16"), "not 2-bit"),
    (qcfg(bits=8, sym=False, scheme="w8a16"), "asymmetric 8-bit"), (qcfg(act_order=True), "act-order"),
])
def test_refused_schemes_say_why_and_what_to_do(cfg, words):
    with pytest.raises(TLQError, match=words) as err:
        export_format(cfg)
    assert "tlq plugin" in str(err.value)


@pytest.mark.parametrize("bits, group, sym", [(4, 128, True), (4, 32, False), (8, 64, True), (4, -1, False)])
def test_packed_tensors_decode_to_the_same_weights_with_compressed_tensors_own_unpacker(bits, group, sym):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
    qw = quantize_rtn(torch.randn(48, 256, generator=torch.Generator().manual_seed(0)), bits, group, sym,
                      torch.bfloat16)
    t = layer_tensors(qw, PACK_QUANTIZED, torch.bfloat16, pack_to_int32)
    assert t["weight_shape"].tolist() == [48, 256] and t["weight_scale"].shape == qw.scales.shape
    signed = unpack_from_int32(t["weight_packed"], bits, torch.Size([48, 256])).float()
    offset = 0.0
    if not sym:
        zp = unpack_from_int32(t["weight_zero_point"], bits, torch.Size(qw.scales.shape), packed_dim=0)
        offset = zp.float().repeat_interleave(256 // qw.scales.shape[1], dim=1)
    scale = t["weight_scale"].float().repeat_interleave(256 // qw.scales.shape[1], dim=1)
    assert torch.equal((signed - offset) * scale, qw.dequantize())


def test_w4a8_tensors_are_signed_int8_codes():
    qw = quantize_rtn(torch.randn(32, 64), 4, -1, True, torch.bfloat16)
    t = layer_tensors(qw, INT_QUANTIZED, torch.bfloat16, None)
    assert t["weight"].dtype == torch.int8 and int(t["weight"].abs().max()) <= 8
    assert torch.equal(t["weight"].float() * t["weight_scale"].float(), qw.dequantize())


def test_ignore_patterns_match_whole_name_runs():
    import re
    (pat,) = ignore_patterns(["visual"])
    rx = re.compile(pat[3:])
    assert rx.match("visual.blocks.0.attn.qkv") and rx.match("model.visual.merger.mlp.0")
    assert not rx.match("language_model.model.layers.0.mlp.visualizer")


@pytest.fixture(scope="module")
def w4a16_checkpoint(qwen2_vl_dir, tmp_path_factory):
    from tlq.cli import main
    out = tmp_path_factory.mktemp("export") / "w4a16"
    main(["calibrate", str(qwen2_vl_dir), "--method", "rtn", "--scheme", "w4a16", "--asym", "--group-size", "64",
          "--out", str(out), "--quiet"])
    return out


def cli(*args):
    import typer
    from typer.testing import CliRunner

    from tlq.commands import export
    app = typer.Typer()
    export.register(app)
    app.command("noop")(lambda: None)  # two commands: typer then dispatches by name
    return CliRunner().invoke(app, list(map(str, args)))


def test_export_cli_writes_a_compressed_tensors_model(w4a16_checkpoint, tmp_path):
    result = cli("export", w4a16_checkpoint, tmp_path / "ct", "--format", "compressed-tensors")
    assert result.exit_code == 0, result.output
    out = tmp_path / "ct"
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and q["format"] == PACK_QUANTIZED
    assert q["config_groups"]["group_0"]["weights"]["group_size"] == 64
    assert not (out / "tlq_manifest.json").exists() and (out / "tokenizer.json").is_file()
    with safe_open(str(out / "model.safetensors"), "pt") as st:
        keys = set(st.keys())
    layer = next(k for k in keys if k.endswith("layers.0.self_attn.q_proj.weight_packed")).rsplit(".", 1)[0]
    assert {f"{layer}.{s}" for s in ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")} <= keys
    assert not any(k.endswith((".qweight", ".qzeros", ".scales")) for k in keys)
    again = cli("export", w4a16_checkpoint, tmp_path / "ct")
    assert isinstance(again.exception, TLQError) and "already exists" in str(again.exception)


def test_export_cli_refuses_unknown_format(w4a16_checkpoint, tmp_path):
    result = cli("export", w4a16_checkpoint, tmp_path / "x", "--format", "gguf")
    assert isinstance(result.exception, TLQError) and "compressed-tensors" in str(result.exception)
    assert not (tmp_path / "x").exists()


def test_stock_w4a8_kernel_on_x86_is_not_symmetric_per_token_int8():
    """Why the w4a8 export is compared with the plugin at the W4A8 tolerance (test_plugin_vllm.py).

    Stock vLLM picks Dynamic4bitLinearKernel for compressed-tensors W4A8Int on CPU; on x86 it runs
    torch's `_dyn_quant_matmul_4bit`, whose activation quantization is not the symmetric per-token
    int8 the checkpoint declares (and the plugin's int8 kernel runs): on inputs with an offset it
    sits closer to an asymmetric per-row quantization than to the symmetric one.
    """
    pytest.importorskip("vllm")
    from vllm.model_executor.kernels.linear import MPLinearLayerConfig, choose_mp_linear_kernel
    from vllm.scalar_type import scalar_types

    from tlq.quant.qparams import quantize_activations_int8
    k, n = 256, 64
    config = MPLinearLayerConfig(full_weight_shape=(k, n), partition_weight_shape=(k, n),
                                 weight_type=scalar_types.int4, act_type=torch.bfloat16, group_size=k,
                                 zero_points=False)
    assert choose_mp_linear_kernel(config).__name__ == "Dynamic4bitLinearKernel"
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(-8, 8, (n, k), generator=gen)
    scale = torch.rand(n, generator=gen) * 0.01 + 0.005
    w = codes.float() * scale[:, None]
    x = (torch.randn(5, k, generator=gen) + 0.7).to(torch.bfloat16)  # offset rows: asymmetric ranges
    biased = (codes + 8).to(torch.int32)
    packed = torch.ops.aten._dyn_quant_pack_4bit_weight((biased[:, 1::2] << 4 | biased[:, ::2]).to(torch.uint8),
                                                        scale.float().view(-1, 1), None, k, k, n)
    stock = torch.ops.aten._dyn_quant_matmul_4bit(x, packed, k, k, n).float()
    xf = x.float()
    lo, hi = xf.amin(1, keepdim=True).clamp(max=0), xf.amax(1, keepdim=True).clamp(min=0)
    step = (hi - lo) / 255
    zero = (-128 - lo / step).round()
    asym = ((xf / step + zero).round().clamp(-128, 127) - zero) * step
    sym_err = (stock - quantize_activations_int8(xf) @ w.t()).abs().max().item()
    asym_err = (stock - asym @ w.t()).abs().max().item()
    assert asym_err < 0.75 * sym_err, (asym_err, sym_err)
