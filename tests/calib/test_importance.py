"""Token importance: the layer-by-layer gradient pass and the integration formula."""
import torch

from tlq.adapters import adapter_for_model_type, get_submodule
from tlq.calib.capture import ANSWER, PROMPT, VISION, capture_inputs
from tlq.calib.config import ImportanceConfig
from tlq.calib.importance import BLOCKS, integrate, sft_loss, token_gradients


def _captured(model_dir, n=2):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from tlq.data.calib import bundled_calibration_path, load_calibration
    from tlq.data.processing import encode_sample
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval().requires_grad_(False)
    processor = AutoProcessor.from_pretrained(model_dir)
    adapter = adapter_for_model_type(model.config.model_type)
    samples = [s for s in load_calibration(bundled_calibration_path()) if s.image_paths][:n]
    captured = capture_inputs(model, adapter, [(s.id, encode_sample(processor, s)) for s in samples], progress=False)
    return model, adapter, captured


def test_layerwise_recompute_matches_full_backward(tiny_model_dir):
    model, adapter, captured = _captured(tiny_model_dir, n=1)
    raw = token_gradients(model, adapter, captured, progress=False)[0]
    sample = captured[0]
    assert (sample.modality == VISION).any() and (sample.modality == ANSWER).any()
    # reference: one ordinary autograd graph over all layers
    outputs = {}
    hooks = []
    for i, layer in enumerate(adapter.layers(model)):
        for b in BLOCKS:
            def keep(module, args, out, key=(i, b)):
                out = out[0] if isinstance(out, tuple) else out
                out.retain_grad()
                outputs[key] = out
            hooks.append(get_submodule(layer, getattr(adapter, f"{b}_module")).register_forward_hook(keep))
    with torch.enable_grad():
        h = sample.hidden.clone().requires_grad_(True)
        for layer in adapter.layers(model):
            h = layer(h, **sample.layer_kwargs)
        sft_loss(model, adapter, h, sample.labels).backward()
    for hk in hooks:
        hk.remove()
    for key, out in outputs.items():
        expected = out.grad.abs().mean(-1)[0]
        torch.testing.assert_close(raw[key], expected, rtol=1e-4, atol=1e-9)
    # the last position predicts nothing: its last-layer MLP output gets no gradient
    last = len(adapter.layers(model)) - 1
    assert raw[(last, "mlp")][-1] == 0 and raw[(last, "mlp")][sample.modality == ANSWER].sum() > 0


def _toy():
    modality = torch.tensor([PROMPT] * 4 + [VISION] * 8 + [ANSWER] * 4, dtype=torch.int8)
    a = torch.cat([torch.full((4,), 0.5), torch.tensor([0.0, 0, 0, 0, 0.01, 0.02, 0.05, 100.0]), torch.ones(4)])
    raw = [{(0, "attn"): a, (0, "mlp"): a * 2, (1, "attn"): a, (1, "mlp"): a}]
    return raw, [modality]


def test_token_weights_are_mean_one_floored_and_clipped():
    raw, mods = _toy()
    w = integrate(raw, mods, ImportanceConfig(mode="token", floor=0.1))[0][(0, "attn")]
    assert abs(float(w.mean()) - 1) < 1e-5
    assert float(w.min()) >= 0.1 / 1.5, "no token weight collapses to zero"
    vision = w[mods[0] == VISION]
    answer = w[mods[0] == ANSWER]
    assert vision[-1] < 3 * answer.mean(), "the outlier vision token (100x the answer's gradient) is clipped"
    assert vision[-1] > vision[0], "token-level term still orders tokens within a modality"


def test_modes_uniform_prior_and_mbq():
    raw, mods = _toy()
    uniform = integrate(raw, mods, ImportanceConfig(mode="uniform"))[0][(0, "mlp")]
    assert torch.equal(uniform, torch.ones(16))
    prior = integrate(raw, mods, ImportanceConfig(mode="modality_prior"))[0][(0, "mlp")]
    assert len(set(prior[mods[0] == ANSWER].tolist())) == 1, "prior-only weights are constant per modality"
    mbq = integrate(raw, mods, ImportanceConfig(mode="modality"))[0][(0, "attn")]
    assert (mbq[mods[0] == PROMPT] == 0).all() and (mbq[mods[0] == ANSWER] == 1).all()
    ratio = float(raw[0][(0, "attn")][mods[0] == VISION].mean() / raw[0][(0, "attn")][mods[0] == ANSWER].mean())
    assert torch.allclose(mbq[mods[0] == VISION], torch.tensor(ratio))
