import pytest
import torch

from tlq.data.calib import load_calibration
from tlq.data.processing import IGNORE_INDEX, encode_sample

# LLaVA-OneVision's published template: images first, "\n" before each text, no "\n" after <|im_end|>.
# With it the prompt is not a prefix of the full conversation, which exercises the fallback.
LLAVA_OV_HUB_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\\n' + content['text'] }}"
    "{% endfor %}{{'<|im_end|>'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def samples(bundled_calib):
    by_kind = {}
    for s in load_calibration(bundled_calib):
        key = ("multi-turn" if sum(m["role"] == "assistant" for m in s.messages) > 1
               else "image" if s.image_paths else "text")
        by_kind.setdefault(key, s)
    assert set(by_kind) == {"image", "text", "multi-turn"}
    return by_kind


def _processor(path):
    from transformers import AutoProcessor
    return AutoProcessor.from_pretrained(path)


def _check(proc, sample, enc):
    ids, labels = enc["input_ids"], enc["labels"]
    assert labels.shape == ids.shape and ids.shape[0] == 1
    mask = labels[0] != IGNORE_INDEX
    positions = mask.nonzero().flatten()
    assert len(positions) > 1 and positions.tolist() == list(range(positions[0], positions[-1] + 1))
    assert torch.equal(labels[0][mask], ids[0][mask])
    assert proc.tokenizer.decode(labels[0][mask]) == sample.answer + proc.tokenizer.eos_token
    n_image = int((ids == proc.tokenizer.convert_tokens_to_ids(proc.image_token)).sum())
    assert (n_image > 0) == bool(sample.image_paths) == ("pixel_values" in enc)


@pytest.mark.parametrize("kind", ["image", "text", "multi-turn"])
def test_labels_cover_only_the_final_answer(tiny_model_dir, samples, kind):
    proc = _processor(tiny_model_dir)
    sample = samples[kind]
    enc = encode_sample(proc, sample)
    _check(proc, sample, enc)
    assert ("image_grid_thw" in enc or "image_sizes" in enc) == bool(sample.image_paths)


def test_encoded_sample_runs_through_the_model_with_loss(tiny_model_dir, samples):
    from transformers import AutoModelForImageTextToText
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        loss = model(**encode_sample(_processor(tiny_model_dir), samples["image"])).loss
    assert torch.isfinite(loss) and loss > 0


def test_answer_found_when_template_is_not_chatml_prefix(llava_onevision_dir, samples):
    proc = _processor(llava_onevision_dir)
    proc.chat_template = LLAVA_OV_HUB_TEMPLATE
    for kind in ("image", "text"):
        sample = samples[kind]
        _check(proc, sample, encode_sample(proc, sample))
