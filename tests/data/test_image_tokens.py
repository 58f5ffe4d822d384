"""Vision tokens per image: --max-pixels bounds them, and the config-only count (anyres tiles,
Qwen2-VL's pixel bound) matches what the processor expands."""
import json
from types import SimpleNamespace

import pytest
from transformers import AutoProcessor

from tlq.adapters import adapter_for_model_type
from tlq.data import image_tokens as counts
from tlq.data.calib import CalibSample
from tlq.data.processing import bounded_size, encode_sample

SIZES = [(64, 48), (300, 100), (37, 211), (160, 160), (640, 480)]


def test_bounded_size_keeps_aspect_and_bound():
    assert bounded_size(640, 480, None) == (640, 480) and bounded_size(64, 48, 10_000) == (64, 48)
    w, h = bounded_size(640, 480, 10_000)
    assert w * h <= 10_000 and abs(w / h - 640 / 480) < 0.05 and w * h > 0.9 * 10_000


def _image_sample(tmp_path, width, height) -> CalibSample:
    from PIL import Image
    path = tmp_path / f"{width}x{height}.png"
    Image.new("RGB", (width, height), (120, 30, 200)).save(path)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]},
                {"role": "assistant", "content": "Purple."}]
    return CalibSample(f"{width}x{height}", messages, [path], None, "")


@pytest.mark.parametrize("max_pixels", [None, 2000])
def test_config_count_matches_the_processors_expansion(tiny_model_dir, tmp_path, monkeypatch, max_pixels):
    config = json.loads((tiny_model_dir / "config.json").read_text())
    adapter = adapter_for_model_type(config["model_type"])
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    if adapter.name == "qwen2-vl":  # the fixture's processor has its own pixel bound: count with it
        size = processor.image_processor.size
        monkeypatch.setattr(counts, "QWEN2_VL_PIXELS", (size["shortest_edge"], size["longest_edge"]))
    for width, height in SIZES:
        ids = encode_sample(processor, _image_sample(tmp_path, width, height), max_pixels)["input_ids"][0]
        expanded = int(adapter.vision_mask(ids, SimpleNamespace(**config)).sum())
        assert counts.image_tokens(adapter.name, config, width, height, max_pixels) == expanded, (width, height)


def test_max_pixels_lowers_the_vision_tokens_of_large_images(tiny_model_dir):
    config = json.loads((tiny_model_dir / "config.json").read_text())
    arch = adapter_for_model_type(config["model_type"]).name
    assert counts.image_tokens(arch, config, 640, 480, 3000) < counts.image_tokens(arch, config, 640, 480)


def test_llava_onevision_counts_anyres_tiles_of_the_published_config():
    """LLaVA-OneVision-72B: 729 base tokens plus the tiles of the best grid pinpoint (anyres_max_9)."""
    from pathlib import Path
    config = json.loads((Path(__file__).parents[1] / "multirank/configs/llava-onevision-72b/config.json").read_text())
    small, large = (counts.image_tokens("llava-onevision", config, w, h) for w, h in [(384, 384), (2304, 2304)])
    assert small == 729 + 27 * 27 + 27  # base + one tile + a newline per row
    assert large > 4 * small and large <= 729 + 9 * 729 + 3 * 27 * 3  # capped by anyres_max_9
    assert counts.image_tokens("llava-onevision", config, 2304, 2304, 384 * 384) == small

