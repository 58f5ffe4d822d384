"""AWQ / MBQ scale search and AWQ clipping against ports of the published code (tests/reference)."""
import pytest
import torch
from reference import awq as ref_awq  # tests/reference (tests/ is on sys.path through its conftest)
from reference import mbq as ref_mbq
from reference.blocks import decoder_layer

from tlq.calib.probes import BlockProbe, collect_inputs
from tlq.errors import TLQError
from tlq.quant.qparams import quantize_activations_int8, quantize_rtn
from tlq.quant.scale_search import ScaleSearchSpec, clip_weights, search_clip_ratios, search_input_scales
from tlq.schemes import QuantScheme

BF16 = torch.bfloat16
W3G32 = QuantScheme("t", bits=3, group_size=32, symmetric=False)
W4A8 = QuantScheme("t8", bits=4, group_size=-1, symmetric=True, act_bits=8)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def rtn(scheme):
    return lambda W: quantize_rtn(W.float(), scheme.bits, scheme.group_size, scheme.symmetric, BF16).dequantize()


QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
GATE_UP = ("mlp.gate_proj", "mlp.up_proj")


def ours(layer, hidden, kwargs, block, names, scheme, **kw):
    X = collect_inputs(layer, names[0], [hidden], [kwargs], "cpu")
    probe = BlockProbe(layer, block, names, [hidden], [kwargs], "cpu") if block else None
    Ws = [layer.get_submodule(n).weight for n in names]
    return search_input_scales(Ws, X, scheme, BF16, act_quant=not scheme.weight_only, block=probe, **kw)


@pytest.mark.parametrize("duo", [False, True], ids=["llm-awq", "autoawq-duo"])
@pytest.mark.parametrize("block,names", [("self_attn", QKV), ("mlp", GATE_UP)], ids=["qkv", "gate_up"])
def test_awq_scale_matches_the_reference_block_search(block, names, duo):
    layer, hidden, kwargs = decoder_layer()
    X = collect_inputs(layer, names[0], [hidden], [kwargs], "cpu").reshape(1, -1, 64)
    got = ours(layer, hidden, kwargs, block, names, W3G32, spec=ScaleSearchSpec(duo_scaling=duo))
    module = layer.get_submodule(block)
    expected = ref_awq.search_module_scale(module, [layer.get_submodule(n) for n in names], X, rtn(W3G32),
                                           kwargs=kwargs if block == "self_attn" else None, duo_scaling=duo,
                                           group_size=W3G32.group_size)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
    assert not torch.allclose(got, torch.ones(64)), "the outlier channels are scaled"


def test_awq_scale_of_a_linear_fed_by_a_linear_scores_its_own_output():
    """o_proj / down_proj: AutoAWQ's module2inspect is the linear itself."""
    layer, hidden, kwargs = decoder_layer(seed=2)
    X = collect_inputs(layer, "mlp.down_proj", [hidden], [kwargs], "cpu")
    down = layer.get_submodule("mlp.down_proj")
    got = search_input_scales([down.weight], X, W3G32, BF16)
    expected = ref_awq.search_module_scale(down, [down], X[None], rtn(W3G32))
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)


def _masks(T, seed=5):
    """MBQ's masks over T tokens: prompt, then vision, then answer tokens."""
    vis = torch.zeros(1, T, dtype=torch.bool)
    ans = torch.zeros(1, T, dtype=torch.bool)
    vis[0, 8:32] = True
    ans[0, 36:] = True
    return ans, vis


@pytest.mark.parametrize("scheme", [W3G32, W4A8], ids=["w3a16", "w4a8"])
def test_mbq_scale_matches_the_reference_weighted_mae(scheme):
    layer, hidden, kwargs = decoder_layer(seed=3)
    T, r = hidden.shape[1], 0.3
    ans, vis = _masks(T)
    w = ans[0].float() + r * vis[0].float()  # MBQ's weights: answer 1, vision r, prompt 0
    got = ours(layer, hidden, kwargs, "self_attn", QKV, scheme, w=w, spec=ScaleSearchSpec(loss="mae"))
    X = collect_inputs(layer, QKV[0], [hidden], [kwargs], "cpu").reshape(1, T, 64)
    act = quantize_activations_int8 if not scheme.weight_only else None
    expected = ref_mbq.search_module_scale(layer.self_attn, [layer.get_submodule(n) for n in QKV], X, rtn(scheme),
                                           ans, vis, r, kwargs=kwargs, act_quantize=act)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("method", ["awq", "mbq"])
def test_awq_and_mbq_search_on_llm_awqs_quantizer(method):
    """The registry's grid for AWQ/MBQ rounds as llm-awq's / AutoAWQ's / MBQ's pseudo_quantize_tensor
    (absmax / 7), so the whole block search agrees with the port run on that quantizer: AWQ weight-only
    4-bit per channel, MBQ at W4A8 (on this layer both pick other scales on the full grid)."""
    from dataclasses import replace

    from tlq.calib.config import METHODS
    act8 = method == "mbq"
    scheme = replace(W4A8, grid=METHODS[method].grid, **({} if act8 else {"act_bits": 16}))
    layer, hidden, kwargs = decoder_layer(seed=3)
    T, r = hidden.shape[1], 0.3
    ans, vis = _masks(T)
    X = collect_inputs(layer, QKV[0], [hidden], [kwargs], "cpu")
    probe = BlockProbe(layer, "self_attn", QKV, [hidden], [kwargs], "cpu")
    w = ans[0].float() + r * vis[0].float() if act8 else None
    got = search_input_scales([layer.get_submodule(n).weight for n in QKV], X, scheme, torch.float32, w=w,
                              act_quant=act8, block=probe, spec=ScaleSearchSpec(loss="mae" if act8 else "mse"))
    linears = [layer.get_submodule(n) for n in QKV]
    quantize = lambda W: ref_awq.pseudo_quantize_tensor(W, 4, zero_point=False,
                                                        group_size=scheme.group_size)
    if act8:
        expected = ref_mbq.search_module_scale(layer.self_attn, linears, X.reshape(1, T, 64), quantize, ans, vis, r,
                                               kwargs=kwargs, act_quantize=quantize_activations_int8)
    else:
        expected = ref_awq.search_module_scale(layer.self_attn, linears, X.reshape(1, T, 64), quantize,
                                               kwargs=kwargs, group_size=scheme.group_size)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)


def test_block_probe_runs_the_block_and_zero_weight_tokens_are_not_scored():
    layer, hidden, kwargs = decoder_layer(seed=4)
    T = hidden.shape[1]
    X = collect_inputs(layer, QKV[0], [hidden], [kwargs], "cpu")
    probe = BlockProbe(layer, "self_attn", QKV, [hidden], [kwargs], "cpu")
    Ws = [layer.get_submodule(n).weight.clone() for n in QKV]
    torch.testing.assert_close(probe(Ws), layer.self_attn(X.reshape(1, T, 64), **kwargs)[0][0])
    probe([torch.zeros_like(W) for W in Ws], lambda x: 2 * x)
    assert all(torch.equal(layer.get_submodule(n).weight, W) for n, W in zip(QKV, Ws)), "weights restored"
    torch.testing.assert_close(probe(Ws), layer.self_attn(X.reshape(1, T, 64), **kwargs)[0][0])
    # prompt tokens (weight 0) stay in the block as context, but their outputs are never scored
    w = torch.zeros(T)
    w[T // 2:] = 1.0
    g = gen(9)

    def corrupted(weights, transform):
        out = probe(weights, transform)
        return torch.cat([out[: T // 2] + torch.randn(T // 2, 64, generator=g), out[T // 2:]])
    got = search_input_scales(Ws, X, W3G32, BF16, w=w, block=corrupted)
    assert torch.equal(got, search_input_scales(Ws, X, W3G32, BF16, w=w, block=probe))


def _linear_cost(Ws, X, w, scale, loss):
    err = torch.cat([X @ W.T - (X / scale) @ rtn(W3G32)(W * scale).T for W in Ws], 1)
    return float((w * (err.square() if loss == "mse" else err.abs()).mean(1)).sum())


def test_never_worse_than_no_scaling_on_the_linear_loss():
    for seed in range(3):
        X = torch.randn(256, 64, generator=gen(seed))
        X[:, :4] *= 3.0
        Ws = [torch.randn(32, 64, generator=gen(seed + 2)), torch.randn(16, 64, generator=gen(seed + 3))]
        w = 0.2 + torch.rand(256, generator=gen(seed + 9))
        for loss in ("mse", "mae"):
            s = search_input_scales(Ws, X, W3G32, BF16, w=w, n_grid=10, spec=ScaleSearchSpec(loss=loss))
            assert _linear_cost(Ws, X, w, s, loss) <= _linear_cost(Ws, X, w, torch.ones(64), loss) * (1 + 1e-6)


def test_statistic_is_plain_unless_weighted_and_input_is_validated():
    X = torch.randn(200, 64, generator=gen(7))
    X[:100, :8] *= 50.0  # outliers only in tokens that get weight 0
    W = torch.randn(32, 64, generator=gen(8))
    w = torch.cat([torch.zeros(100), torch.ones(100)])
    plain = search_input_scales([W], X, W3G32, BF16, w=w, block=lambda Ws, t: (X if t is None else t(X)) @ Ws[0].T)
    weighted = search_input_scales([W], X, W3G32, BF16, w=w, spec=ScaleSearchSpec(weighted_statistic=True),
                                   block=lambda Ws, t: (X if t is None else t(X)) @ Ws[0].T)
    if not torch.equal(plain, torch.ones(64)) and not torch.equal(weighted, torch.ones(64)):
        assert plain[:8].mean() / plain[8:].mean() > weighted[:8].mean() / weighted[8:].mean()
    with pytest.raises(TLQError, match="loss"):
        ScaleSearchSpec(loss="huber")
    with pytest.raises(TLQError):
        search_input_scales([W], X, W3G32, BF16, w=torch.zeros(200))


@pytest.mark.parametrize("scheme", [W3G32, QuantScheme("s", bits=4, group_size=-1, symmetric=True)])
def test_clipping_matches_the_reference_auto_clip(scheme):
    g = gen(8)
    W = torch.randn(64, 96, generator=g) * torch.exp(torch.randn(64, 96, generator=g))
    X = torch.randn(2000, 96, generator=gen(9))
    ratio = search_clip_ratios(W, X, scheme, BF16)
    max_val = ref_awq.auto_clip_layer(W, X, rtn(scheme), scheme.group_size)
    got = clip_weights(W, ratio, scheme.group_size)
    gs = scheme.group_size if scheme.group_size > 0 else 96
    limit = max_val.repeat_interleave(gs, dim=1)
    torch.testing.assert_close(got, W.clamp(-limit, limit), rtol=1e-6, atol=1e-7)
    assert (ratio < 1).any(), "heavy tails: some group is clipped"
