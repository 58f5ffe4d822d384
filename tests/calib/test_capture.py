"""Capture: what runs before the first decoder layer goes to --device; images bounded by --max-pixels."""
import torch

from tlq import calibrate
from tlq.adapters import adapter_for_model_type, get_submodule
from tlq.calib.capture import pre_layers_on_device
from tlq.calib.config import CalibConfig, get_method
from tlq.format.checkpoint import verify_checkpoint
from tlq.model_io import open_source_model
from tlq.schemes import get_scheme


def _tensors(module):
    return [*module.parameters(), *module.buffers()]


def test_pre_layer_modules_move_to_the_device_and_back(tiny_model_dir):
    """The meta device stands in for a GPU: every tensor before layer 0 moves, the layers and the
    LM head stay, and the host tensors themselves are back after."""
    model = open_source_model(tiny_model_dir).load_hf_model()
    adapter = adapter_for_model_type(model.config.model_type)
    before = {name: t for name, t in [*model.named_parameters(remove_duplicate=False),
                                      *model.named_buffers(remove_duplicate=False)]}
    stay = [adapter.layers(model), get_submodule(model, adapter.final_norm), get_submodule(model, adapter.lm_head)]
    moving = [get_submodule(model, n) for n in (*adapter.vision_modules, adapter.embed_tokens)]
    with pre_layers_on_device(model, adapter, "meta") as moved:
        assert all(t.device.type == "meta" for m in moving for t in _tensors(m))
        assert all(t.device.type == "cpu" for m in stay for t in _tensors(m))
        assert any(t.device.type == "meta" for t in get_submodule(model, adapter.decoder_layers.rsplit(".", 1)[0]
                                                                  ).buffers()), "rotary tables move too"
        outside = [n for n, _ in model.named_parameters() if not any(n.startswith(p + ".") for p in moved.stay)]
        assert outside and all(model.get_parameter(n).device.type == "meta" for n in outside)
    after = dict([*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)])
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)


def test_cpu_capture_moves_nothing(qwen2_vl_dir, monkeypatch):
    model = open_source_model(qwen2_vl_dir).load_hf_model()
    calls = []
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: calls.append(a) or self)
    with pre_layers_on_device(model, adapter_for_model_type(model.config.model_type), "cpu"):
        pass
    assert calls == []


def test_small_max_pixels_gives_fewer_vision_tokens(qwen2_vl_dir, tmp_path):
    def vision_tokens(max_pixels):
        cfg = CalibConfig(model=qwen2_vl_dir, out=tmp_path / str(max_pixels), method=get_method("gptq"),
                          scheme=get_scheme("w4a16"), max_samples=3, max_pixels=max_pixels)
        calibration = verify_checkpoint(calibrate(cfg, progress=False)).manifest["calibration"]
        assert calibration["max_pixels"] == max_pixels
        return calibration["token_stats"]["tokens_per_modality"]["vision"]
    full, small = vision_tokens(None), vision_tokens(28 * 28 * 4)
    assert 0 < small < full


def test_unmaterialised_tensors_stay_put(qwen2_vl_dir):
    """A pipeline stage's skeleton holds meta tensors it never runs: capture leaves them alone."""
    model = open_source_model(qwen2_vl_dir).load_hf_model()
    adapter = adapter_for_model_type(model.config.model_type)
    embed = get_submodule(model, adapter.embed_tokens)
    embed.weight = torch.nn.Parameter(embed.weight.to("meta"), requires_grad=False)
    skeleton = embed.weight
    with pre_layers_on_device(model, adapter, "meta") as moved:
        assert embed.weight is skeleton
        assert all(table[key] is not skeleton for table, key, _ in moved.swapped)
