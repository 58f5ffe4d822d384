"""Token importance: the layer-by-layer gradient pass and the integration formula."""
import pytest
import torch
from captured_samples import capture_tiny

from tlq.adapters import LinearGroup, get_submodule
from tlq.calib.capture import ANSWER, PROMPT, VISION
from tlq.calib.config import ImportanceConfig
from tlq.calib.gradient_pass import BLOCKS, STATISTICS, sft_loss, token_gradients
from tlq.calib.importance import group_weights, integrate
from tlq.errors import TLQError


def test_layerwise_recompute_matches_full_backward(tiny_model_dir):
    model, adapter, captured = capture_tiny(tiny_model_dir, n=1)
    raw = token_gradients(model, adapter, captured, progress=False)[0]
    sample = captured[0]
    assert (sample.modality == VISION).any() and (sample.modality == ANSWER).any()
    # reference: one ordinary autograd graph over all layers, gradients at every block and linear output
    sources = {b: getattr(adapter, f"{b}_module") for b in BLOCKS} | {n: n for n in adapter.linear_names()}
    outputs = {}
    hooks = []
    for i, layer in enumerate(adapter.layers(model)):
        for name, path in sources.items():
            def keep(module, args, out, key=(i, name)):
                out = out[0] if isinstance(out, tuple) else out
                out.retain_grad()
                outputs[key] = out
            hooks.append(get_submodule(layer, path).register_forward_hook(keep))
    with torch.enable_grad():
        h = sample.hidden.clone().requires_grad_(True)
        for layer in adapter.layers(model):
            h = layer(h, **sample.layer_kwargs)
        sft_loss(model, adapter, h, sample.labels).backward()
    for hk in hooks:
        hk.remove()
    assert set(outputs) == set(raw)
    for key, out in outputs.items():
        g = out.grad[0]
        torch.testing.assert_close(raw[key][STATISTICS["abs"]], g.abs().mean(-1), rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(raw[key][STATISTICS["square"]], g.square().mean(-1), rtol=1e-4, atol=1e-12)
    # the last position predicts nothing: its last-layer MLP output gets no gradient
    last = len(adapter.layers(model)) - 1
    assert raw[(last, "mlp")][0, -1] == 0 and raw[(last, "mlp")][0, sample.modality == ANSWER].sum() > 0


def test_answer_tokens_outweigh_prompt_and_vision_in_every_layer(qwen2_vl_dir):
    """On the tiny Qwen2-VL, where the last layer's outputs get gradient only at positions that
    predict answer tokens (most tokens: none), answer tokens must still weigh most in every layer."""
    model, adapter, captured = capture_tiny(qwen2_vl_dir, n=2)
    raw = token_gradients(model, adapter, captured, progress=False)
    modality = torch.cat([s.modality for s in captured])
    last = len(adapter.layers(model)) - 1
    assert float((torch.cat([r[(last, "mlp")][0] for r in raw]) == 0).float().mean()) >= 0.75
    for statistic in ("abs", "square"):
        weights = integrate(raw, [s.modality for s in captured], ImportanceConfig(statistic=statistic))
        for key in weights[0]:
            w = torch.cat([x[key] for x in weights])
            answer, prompt, vision = (float(w[modality == m].mean()) for m in (ANSWER, PROMPT, VISION))
            assert answer > prompt and answer > vision, (statistic, key, answer, prompt, vision)


def _raw(*per_key):
    """One sample's raw importance from [T] |g| vectors (the g^2 row is the square, as for one channel)."""
    return {k: torch.stack([a, a.square()]) for k, a in per_key}


def _toy():
    modality = torch.tensor([PROMPT] * 4 + [VISION] * 8 + [ANSWER] * 4, dtype=torch.int8)
    a = torch.cat([torch.full((4,), 0.5), torch.tensor([0.01, 0.02, 0.03, 0.04, 0.01, 0.02, 0.05, 100.0]),
                   torch.ones(4)])
    raw = [_raw(((0, "attn"), a), ((0, "mlp"), a * 2), ((1, "attn"), a), ((1, "mlp"), a))]
    return raw, [modality]


def test_token_weights_are_mean_one_floored_and_clipped():
    raw, mods = _toy()
    w = integrate(raw, mods, ImportanceConfig(mode="token", floor=0.1))[0][(0, "attn")]
    assert abs(float(w.mean()) - 1) < 1e-5
    assert float(w.min()) >= 0.1 / 1.5, "no token weight collapses to zero"
    vision = w[mods[0] == VISION]
    answer = w[mods[0] == ANSWER]
    assert vision[-1] < answer.mean(), "the outlier vision token (100x the answer's gradient) is clipped"
    assert vision[-1] > vision[0], "token-level term still orders tokens within a modality"


def _minority_answer():
    """50 tokens: 6 prompt, 40 vision, 4 answer; answer gradients 20x the vision ones."""
    g = torch.Generator().manual_seed(0)
    modality = torch.tensor([PROMPT] * 6 + [VISION] * 40 + [ANSWER] * 4, dtype=torch.int8)
    a = torch.cat([0.3 + 0.02 * torch.rand(6, generator=g), 0.1 + 0.02 * torch.rand(40, generator=g),
                   2.0 + 0.1 * torch.rand(4, generator=g)])
    return a, modality


def test_minority_answer_tokens_keep_their_weight():
    """A fence over all tokens, set by the vision majority, cut the answer tokens to the vision level."""
    a, modality = _minority_answer()
    raw = [_raw(((0, "attn"), a))]
    prior = integrate(raw, [modality], ImportanceConfig(mode="modality_prior", floor=0.01))[0][(0, "attn")]
    raw_ratio = float(a[modality == ANSWER].mean() / a[modality == VISION].mean())
    got_ratio = float(prior[modality == ANSWER].mean() / prior[modality == VISION].mean())
    assert abs(got_ratio / raw_ratio - 1) < 1e-4, (got_ratio, raw_ratio)
    w = integrate(raw, [modality], ImportanceConfig())[0][(0, "attn")]
    assert float(w[modality == ANSWER].min()) > 3 * float(w[modality == PROMPT].max())
    assert float(w[modality == PROMPT].min()) > float(w[modality == VISION].max())


def test_mostly_zero_gradients_keep_the_signal():
    """Last layer: >= 75% of tokens get no gradient; the weights must not all collapse to 1."""
    modality = torch.tensor([PROMPT] * 10 + [VISION] * 30 + [ANSWER] * 8, dtype=torch.int8)
    a = torch.zeros(48)
    a[9] = 0.4  # the last prompt token predicts the first answer token
    a[40:47] = torch.linspace(0.5, 1.5, 7)  # the last answer token predicts nothing
    assert float((a == 0).float().mean()) >= 0.75
    for mode in ("token", "modality_prior"):
        w = integrate([_raw(((0, "mlp"), a))], [modality], ImportanceConfig(mode=mode))[0][(0, "mlp")]
        answer, prompt, vision = (float(w[modality == m].mean()) for m in (ANSWER, PROMPT, VISION))
        assert answer > 2 * prompt and answer > 2 * vision, (mode, answer, prompt, vision)
        assert float(w.min()) > 0 and abs(float(w.mean()) - 1) < 1e-5


def test_square_statistic_and_per_linear_source():
    a, modality = _minority_answer()
    b = torch.flip(a, [0])  # a linear whose output gradient favours other tokens
    raw = [_raw(((0, "attn"), a), ((0, "self_attn.q_proj"), a), ((0, "self_attn.k_proj"), b))]
    by_abs = integrate(raw, [modality], ImportanceConfig(mode="modality_prior", floor=0.01))[0][(0, "attn")]
    by_sq = integrate(raw, [modality], ImportanceConfig(mode="modality_prior", floor=0.01, statistic="square"))[0]
    ratio = lambda w: float(w[modality == ANSWER].mean() / w[modality == VISION].mean())
    assert ratio(by_sq[(0, "attn")]) > 10 * ratio(by_abs), "g^2 sharpens the answer/vision ratio"
    per_linear = integrate(raw, [modality], ImportanceConfig(source="linear"))
    assert set(per_linear[0]) == {(0, "self_attn.q_proj"), (0, "self_attn.k_proj")}
    group = LinearGroup(("self_attn.q_proj", "self_attn.k_proj"), "input_layernorm", "attn")
    one_layer = [{name: w for (_, name), w in per_linear[0].items()}]
    expected = (per_linear[0][(0, "self_attn.q_proj")] + per_linear[0][(0, "self_attn.k_proj")]) / 2
    torch.testing.assert_close(group_weights(one_layer, group), expected)
    block = [{"attn": by_abs}]
    assert torch.equal(group_weights(block, group), by_abs)
    with pytest.raises(TLQError, match="statistic"):
        ImportanceConfig(statistic="cube")


def test_modes_uniform_prior_and_mbq():
    raw, mods = _toy()
    uniform = integrate(raw, mods, ImportanceConfig(mode="uniform"))[0][(0, "mlp")]
    assert torch.equal(uniform, torch.ones(16))
    prior = integrate(raw, mods, ImportanceConfig(mode="modality_prior"))[0][(0, "mlp")]
    assert len(set(prior[mods[0] == ANSWER].tolist())) == 1, "prior-only weights are constant per modality"
    mbq = integrate(raw, mods, ImportanceConfig(mode="modality"))[0][(0, "attn")]
    assert (mbq[mods[0] == PROMPT] == 0).all() and (mbq[mods[0] == ANSWER] == 1).all()


def test_mbq_ratio_follows_the_reference():
    """thu-nics/MBQ pre_quant.py: per-sample mean |g| over vision and answer tokens, averaged over
    samples; r floored at the median over layers of the same block type (attn and mlp apart)."""
    mods = [torch.tensor([PROMPT] * 2 + [VISION] * 6 + [ANSWER] * 2, dtype=torch.int8),
            torch.tensor([PROMPT] * 2 + [VISION] * 2 + [ANSWER] * 6, dtype=torch.int8)]
    g = torch.Generator().manual_seed(3)
    raw = [{}, {}]
    for layer in range(5):
        for block, scale in (("attn", 1.0), ("mlp", 10.0)):
            for i, m in enumerate(mods):
                a = torch.rand(len(m), generator=g) + (m == ANSWER) * (layer + 1) * 0.3
                raw[i][(layer, block)] = torch.stack([scale * a, (scale * a).square()])
    got = integrate(raw, mods, ImportanceConfig(mode="modality"))
    for block in ("attn", "mlp"):
        ratios = []
        for layer in range(5):
            vis = sum(float(r[(layer, block)][0][m == VISION].mean()) for r, m in zip(raw, mods)) / 2
            ans = sum(float(r[(layer, block)][0][m == ANSWER].mean()) for r, m in zip(raw, mods)) / 2
            ratios.append(vis / ans)
        median = sorted(ratios)[2]
        for layer, r in enumerate(ratios):
            w = got[0][(layer, block)]
            assert abs(float(w[mods[0] == VISION][0]) - max(r, median)) < 1e-5, (block, layer)
