"""Outlier channels for the trained fixtures (benchmarks/fixtures/outliers.py): exact, cached, and harder to quantize."""
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root holds `benchmarks`

from benchmarks.fixtures.outliers import OutlierConfig, add_outlier_channels, ensure_outlier_model
from tlq.errors import TLQError
from tlq.quant.qparams import dequantize_codes, quantize_rtn

WEIGHT_OUTLIERS = OutlierConfig(hidden_channels=2, hidden_scale=1 / 16, mlp_channels=4, mlp_scale=1 / 8)


def _logits(model_dir: Path) -> torch.Tensor:
    from transformers import AutoModelForImageTextToText
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.randint(10, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids).logits


def _rtn_error(W: torch.Tensor, column_factor: torch.Tensor, bits=3, group=64) -> float:
    """Relative RTN error of W, mapped back to the original columns' scale."""
    qw = quantize_rtn(W, bits, group, False, torch.float16)
    Q = dequantize_codes(qw.codes, qw.scales.repeat_interleave(group, 1), qw.zeros.repeat_interleave(group, 1), bits)
    return ((Q - W) * column_factor).norm().item()


@pytest.mark.parametrize("cfg", [WEIGHT_OUTLIERS, OutlierConfig(hidden_scale=16, mlp_scale=32)], ids=["weight", "act"])
def test_reparametrised_model_computes_the_same_logits(tiny_model_dir, tmp_path, cfg):
    source = tmp_path / "trained"
    shutil.copytree(tiny_model_dir, source)
    out = ensure_outlier_model(source, cfg)
    assert out != source and (out / "tlq_outliers.json").is_file()
    assert (out / "model.safetensors").read_bytes() != (source / "model.safetensors").read_bytes()
    assert torch.equal(_logits(out), _logits(source))  # powers of two: bit-identical
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert ensure_outlier_model(source, cfg) == out and (out / "model.safetensors").stat().st_mtime_ns == stamp


def test_weight_outliers_scale_the_chosen_columns_and_raise_rtn_error():
    torch.manual_seed(0)
    K, inter = 128, 256
    prefix = "model.layers.0"
    state = {f"{prefix}.input_layernorm.weight": torch.ones(K),
             f"{prefix}.post_attention_layernorm.weight": torch.ones(K),
             **{f"{prefix}.self_attn.{n}_proj.weight": torch.randn(K, K) * 0.02 for n in "qkv"},
             f"{prefix}.mlp.gate_proj.weight": torch.randn(inter, K) * 0.02,
             f"{prefix}.mlp.up_proj.weight": torch.randn(inter, K) * 0.02,
             f"{prefix}.mlp.down_proj.weight": torch.randn(K, inter) * 0.02}
    before = {k: v.clone() for k, v in state.items()}
    chosen = add_outlier_channels(state, WEIGHT_OUTLIERS)
    hidden, mlp = chosen["hidden"], chosen["mlp"][prefix]
    assert len(hidden) == 2 and len(mlp) == 4
    q = f"{prefix}.self_attn.q_proj.weight"
    assert torch.equal(state[q][:, hidden], before[q][:, hidden] * 16)
    assert torch.equal(state[f"{prefix}.input_layernorm.weight"][hidden], torch.full((2,), 1 / 16))
    others = [c for c in range(K) if c not in hidden]
    assert torch.equal(state[q][:, others], before[q][:, others])
    factor = torch.ones(K)
    factor[hidden] = 1 / 16  # the error of a column counts at its (shrunk) activation scale
    assert _rtn_error(state[q], factor) > 2 * _rtn_error(before[q], torch.ones(K))


def test_scales_must_be_powers_of_two():
    with pytest.raises(TLQError, match="power of two"):
        OutlierConfig(hidden_scale=10)
    with pytest.raises(TLQError, match="no decoder layers"):
        add_outlier_channels({"lm_head.weight": torch.zeros(2, 2)}, OutlierConfig())
