"""The layer-major gradient pass gives bit for bit the raw importance of the per-sample pass."""
import torch
from captured_samples import capture_tiny

from tlq.calib import gradient_pass
from tlq.calib.capture import to_device
from tlq.calib.gradient_pass import (
    backward_stage,
    forward_stage,
    gradient_dtype,
    on_device,
    sft_loss,
    token_gradients,
)
from tlq.calib.streams import STREAM_SHARE


def per_sample_reference(model, adapter, samples):
    """The pass as it ran before it was layer-major: every layer forward then backward, one sample at a time."""
    layers, dtype = adapter.layers(model), gradient_dtype(model)
    every = range(len(layers))
    raw = []
    with on_device(model.get_submodule(adapter.final_norm), "cpu", dtype), \
            on_device(model.get_submodule(adapter.lm_head), "cpu", dtype):
        for sample in samples:
            kwargs = to_device(sample.layer_kwargs, "cpu", dtype)
            inputs, h = forward_stage(layers, every, sample.hidden.to(dtype), kwargs, "cpu", dtype)
            h = h.detach().requires_grad_(True)
            sft_loss(model, adapter, h, sample.labels).backward()
            per_layer = {}
            backward_stage(adapter, layers, every, inputs, h.grad, kwargs, "cpu", per_layer, dtype)
            raw.append(per_layer)
    return raw


def _assert_identical(raw, ref):
    assert len(raw) == len(ref)
    for a, b in zip(raw, ref):
        assert list(a) == list(b)  # same keys in the same order (the manifest's statistics stack them)
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_layer_major_pass_is_bit_identical_to_per_sample(tiny_model_dir, tmp_path, monkeypatch):
    model, adapter, captured = capture_tiny(tiny_model_dir, n=3)
    before = [s.hidden.clone() for s in captured]
    ref = per_sample_reference(model, adapter, captured)
    _assert_identical(token_gradients(model, adapter, captured, progress=False), ref)
    # spilled: every activation in memory-mapped files, deleted after the pass
    spilled = []
    new = gradient_pass.StreamFolder.new
    monkeypatch.setattr(gradient_pass.StreamFolder, "new",
                        lambda self, name: spilled.append(new(self, name)) or spilled[-1])
    raw = token_gradients(model, adapter, captured, progress=False, spill_dir=tmp_path / "g", host_memory=0)
    assert spilled and all(s.spilled for s in spilled)
    assert not (tmp_path / "g").exists()
    _assert_identical(raw, ref)
    for s, h in zip(captured, before):  # the captured entry stream is read, never written
        assert torch.equal(s.hidden, h) and s.hidden.grad is None and not s.hidden.requires_grad


def test_each_layer_moves_once_per_direction(qwen2_vl_dir, monkeypatch):
    """Layer-major: a layer enters the device twice per pass (forward, backward), whatever the sample count."""
    model, adapter, captured = capture_tiny(qwen2_vl_dir, n=3)
    entered = []
    enter = on_device.__enter__
    monkeypatch.setattr(on_device, "__enter__", lambda self: entered.append(self.module) or enter(self))
    token_gradients(model, adapter, captured, progress=False)
    for layer in adapter.layers(model):
        assert sum(m is layer for m in entered) == 2
    head = model.get_submodule(adapter.lm_head)
    assert sum(m is head for m in entered) == 1


def test_spills_only_above_the_host_budget(qwen2_vl_dir, tmp_path, monkeypatch):
    model, adapter, captured = capture_tiny(qwen2_vl_dir, n=1)
    tokens, hidden = captured[0].num_tokens, captured[0].hidden.shape[-1]
    need = gradient_pass.pass_bytes(tokens, hidden, len(adapter.layers(model)), gradient_dtype(model))
    assert need == (len(adapter.layers(model)) + 2) * tokens * hidden * 4
    seen = []
    init = gradient_pass.StreamFolder.__init__
    monkeypatch.setattr(gradient_pass.StreamFolder, "__init__", lambda self, root: seen.append(root) or init(self, root))
    share = need / STREAM_SHARE / 2**30  # GiB of --host-memory whose streams' share the pass just fits
    token_gradients(model, adapter, captured, progress=False, spill_dir=tmp_path, host_memory=share)
    token_gradients(model, adapter, captured, progress=False, spill_dir=tmp_path, host_memory=share * 0.999)
    assert seen == [None, tmp_path]


def test_sft_loss_at_answer_positions_equals_full_logits(tiny_model_dir):
    """Logits only where a label is give the loss and dL/dh of the full [T, vocab] logits."""
    import torch.nn.functional as F
    model, adapter, captured = capture_tiny(tiny_model_dir, n=2)
    norm, head = model.get_submodule(adapter.final_norm), model.get_submodule(adapter.lm_head)
    for sample in captured:
        answer = int((sample.labels != -100).sum())
        assert 0 < answer < sample.labels.shape[1]  # a minority of the positions carries the loss
        h = torch.randn(1, sample.labels.shape[1], norm.weight.shape[0], dtype=torch.float64)
        ours = h.clone().requires_grad_(True)
        full = h.clone().requires_grad_(True)
        with on_device(norm, "cpu", torch.float64), on_device(head, "cpu", torch.float64):
            loss = sft_loss(model, adapter, ours, sample.labels)
            loss.backward()
            logits = head(norm(full)).float().double()
            ref = F.cross_entropy(logits[0, :-1], sample.labels[0, 1:], ignore_index=-100)
            ref.backward()
        torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(ours.grad, full.grad, rtol=1e-5, atol=1e-9)
        assert full.grad[0, :-1][sample.labels[0, 1:] == -100].abs().max() == 0
