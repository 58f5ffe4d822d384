"""Packed checkpoint: writer, integrity checks, reference dequantizer, RTN error bounds."""
import json
import shutil

import pytest
import torch

from tlq import calibrate
from tlq.calib.config import CalibConfig, get_method
from tlq.errors import CheckpointError, TLQError
from tlq.format.checkpoint import (
    dequantized_state_dict,
    load_tensors,
    pack_linear,
    unpack_linear,
    verify_checkpoint,
)
from tlq.quant.qparams import quantize_rtn
from tlq.schemes import get_scheme


def rtn_checkpoint(model_dir, out, scheme="w4a16", **overrides):
    cfg = CalibConfig(model=model_dir, out=out, method=get_method("rtn"),
                      scheme=get_scheme(scheme).with_overrides(**overrides), overwrite=True)
    return calibrate(cfg, progress=False)


@pytest.mark.parametrize("bits,group,sym", [(2, 64, False), (3, 128, False), (4, 128, True), (8, 32, True),
                                            (4, -1, True), (3, 32, True)])
def test_pack_linear_roundtrip_and_half_step_error(bits, group, sym):
    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(bits))
    qw = quantize_rtn(w, bits, group, sym, torch.bfloat16)
    back = unpack_linear(pack_linear(qw, torch.bfloat16), (96, 256), bits, group)
    assert torch.equal(back.codes, qw.codes)
    assert torch.equal(back.scales, qw.scales)  # scales were rounded to bf16 before codes were chosen
    assert (back.zeros is None) == sym
    # RTN error is at most half a quantization step per weight
    step = qw.scales[:, qw.group_index()]
    assert ((qw.dequantize() - w).abs() <= step / 2 + 1e-6).all()


def test_rtn_checkpoint_verifies_and_is_self_contained(qwen2_vl_dir, tmp_path):
    out = rtn_checkpoint(qwen2_vl_dir, tmp_path / "ck")
    info = verify_checkpoint(out)
    assert info.quant_config["quant_method"] == "tlq" and info.quant_config["scheme"] == "w4a16"
    assert {"tokenizer.json", "chat_template.jinja", "tlq_manifest.json"} <= {p.name for p in out.iterdir()}
    tensors = load_tensors(info)
    assert any(k.startswith("visual.") for k in tensors), "vision tower copied unquantized"
    assert not any(k.startswith("visual.") and k.endswith("qweight") for k in tensors)
    assert all(f"{layer}.qweight" in tensors for layer in info.quantized_layers)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary folder left"


def test_verify_detects_truncation_and_alteration(qwen2_vl_dir, tmp_path):
    out = rtn_checkpoint(qwen2_vl_dir, tmp_path / "ck")
    truncated = tmp_path / "truncated"
    shutil.copytree(out, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="sha256"):
        verify_checkpoint(truncated)
    altered = tmp_path / "altered"
    shutil.copytree(out, altered)
    cfg = json.loads((altered / "config.json").read_text())
    cfg["quantization_config"]["bits"] = 3
    (altered / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="config.json"):
        verify_checkpoint(altered)
    missing = tmp_path / "missing"
    shutil.copytree(out, missing)
    (missing / "tlq_manifest.json").unlink()
    with pytest.raises(CheckpointError, match="manifest"):
        verify_checkpoint(missing)


def test_verify_detects_wrong_shape_even_with_matching_hashes(qwen2_vl_dir, tmp_path):
    out = rtn_checkpoint(qwen2_vl_dir, tmp_path / "ck")
    manifest = json.loads((out / "tlq_manifest.json").read_text())
    layer = next(iter(manifest["quantized_layers"]))
    manifest["quantized_layers"][layer]["shape"][1] *= 2
    (out / "tlq_manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=layer):
        verify_checkpoint(out)


def test_existing_output_refused_without_overwrite(qwen2_vl_dir, tmp_path):
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "keep.txt").write_text("data")
    cfg = CalibConfig(model=qwen2_vl_dir, out=tmp_path / "ck", method=get_method("rtn"), scheme=get_scheme("w4a16"))
    with pytest.raises(TLQError, match="--overwrite"):
        calibrate(cfg, progress=False)
    assert (tmp_path / "ck" / "keep.txt").read_text() == "data"


def _logits(model, processor, text="Describe the red square on the left."):
    messages = [{"role": "user", "content": [{"type": "text", "text": text}]}]
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[prompt], return_tensors="pt")
    with torch.no_grad():
        return model(**inputs).logits.float()


def test_dequantized_model_is_close_at_8_bits_and_further_at_3(tiny_model_dir, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from tlq.format.dequantize import load_dequantized
    fp = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    ref = _logits(fp, processor)
    errors = {}
    for scheme in ("w8a16", "w3a16"):
        ck = rtn_checkpoint(tiny_model_dir, tmp_path / scheme, scheme, group_size=64)
        model, proc = load_dequantized(ck)
        errors[scheme] = (_logits(model.float(), proc) - ref).abs().mean().item()
    scale = ref.abs().mean().item()
    assert errors["w8a16"] < 0.05 * scale
    assert errors["w3a16"] > 3 * errors["w8a16"]


def test_dequantize_cli_folder_loads_as_float_model(qwen2_vl_dir, tmp_path):
    from transformers import AutoModelForImageTextToText

    from tlq.format.dequantize import write_dequantized
    ck = rtn_checkpoint(qwen2_vl_dir, tmp_path / "ck")
    out = write_dequantized(ck, tmp_path / "deq")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    model = AutoModelForImageTextToText.from_pretrained(out)
    sd = dequantized_state_dict(verify_checkpoint(ck))
    name = next(k for k in sd if k.endswith("layers.0.self_attn.q_proj.weight"))
    got = dict(model.named_parameters())
    module_name = next(k for k in got if k.endswith("layers.0.self_attn.q_proj.weight"))
    assert torch.equal(got[module_name], sd[name].to(got[module_name].dtype))


def test_rtn_half_step_bound_holds_for_one_signed_groups():
    w = torch.rand(8, 64) + 0.5  # every group strictly positive
    for sym in (True, False):
        qw = quantize_rtn(w, 3, 32, sym, torch.bfloat16)
        step = qw.scales[:, qw.group_index()]
        assert ((qw.dequantize() - w).abs() <= step / 2 + 1e-6).all()
