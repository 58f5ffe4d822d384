import pytest
import torch

from tlq.errors import TLQError
from tlq.quant.smoothquant import smooth_scales


def test_smoothing_preserves_the_product_and_flattens_outliers():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 64, generator=g)
    outliers = torch.tensor([3, 17, 40])
    X[:, outliers] *= 50.0
    Ws = [torch.randn(32, 64, generator=g), 0.1 * torch.randn(16, 64, generator=g)]
    s = smooth_scales(X, Ws, alpha=0.5)
    assert s.shape == (64,) and torch.all(s > 0)
    for W in Ws:
        torch.testing.assert_close((X / s) @ (W * s).T, X @ W.T, rtol=1e-4, atol=1e-3)
    assert (X / s)[:, outliers].abs().max() < 0.2 * X[:, outliers].abs().max()
    # the activation range across channels becomes flatter
    ch = (X / s).abs().amax(0)
    assert ch.max() / ch.median() < 0.3 * (X.abs().amax(0).max() / X.abs().amax(0).median())


def test_smoothing_formula_and_limits():
    X = torch.tensor([[4.0, -1.0, 0.0], [1.0, 0.5, 0.0]])
    W1, W2 = torch.tensor([[1.0, 2.0, 0.5]]), torch.tensor([[-4.0, 1.0, 0.25]])
    s = smooth_scales(X, [W1, W2], alpha=0.5)
    torch.testing.assert_close(s[:2], torch.tensor([4.0 ** 0.5 / 4.0 ** 0.5, 1.0 / 2.0 ** 0.5]))
    assert s[2] > 0  # a dead channel is clamped, never zero
    torch.testing.assert_close(smooth_scales(X, [W1, W2], alpha=1.0)[:2], torch.tensor([4.0, 1.0]))
    with pytest.raises(TLQError, match="alpha"):
        smooth_scales(X, [W1], alpha=1.5)


def _calib_config(tmp_path, method_name, scheme_name="w4a8"):
    from tlq.calib.config import METHODS, CalibConfig
    from tlq.schemes import get_scheme
    return CalibConfig(model=tmp_path, out=tmp_path / "out", method=METHODS[method_name], scheme=get_scheme(scheme_name))


def test_layer_smoothing_matches_the_reference_and_skips_linear_fed_groups(tmp_path):
    """mit-han-lab/smoothquant smooth_lm: the norms before q/k/v and gate/up, from the float inputs;
    o_proj and down_proj (fed by linears) are left alone."""
    import copy

    from reference import smoothquant as ref
    from reference.blocks import decoder_layer

    from tlq.adapters import QWEN2_VL
    from tlq.calib.input_scaling import scale_layer_inputs
    from tlq.calib.probes import collect_inputs
    layer, hidden, kwargs = decoder_layer(seed=6)
    expected = copy.deepcopy(layer)
    acts = {n: collect_inputs(layer, n, [hidden], [kwargs], "cpu").abs().amax(0)
            for n in ("self_attn.q_proj", "mlp.gate_proj")}
    ref.smooth_ln_fcs(expected.input_layernorm, [expected.self_attn.q_proj, expected.self_attn.k_proj,
                                                 expected.self_attn.v_proj], acts["self_attn.q_proj"])
    ref.smooth_ln_fcs(expected.post_attention_layernorm, [expected.mlp.gate_proj, expected.mlp.up_proj],
                      acts["mlp.gate_proj"])
    weights = [{"attn": torch.ones(hidden.shape[1]), "mlp": torch.ones(hidden.shape[1])}]
    overrides = scale_layer_inputs(layer, "layers.0", [hidden], [kwargs], weights, QWEN2_VL,
                                   _calib_config(tmp_path, "smoothquant"), torch.float32)
    for (name, got), want in zip(layer.state_dict().items(), expected.state_dict().values()):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7, msg=name)
    assert set(overrides) == {"layers.0.input_layernorm.weight", "layers.0.post_attention_layernorm.weight"}
