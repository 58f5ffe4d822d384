"""Turn one calibration sample into model inputs with SFT labels on the answer only.

The processor renders the chat template and expands image placeholders, so this works
unchanged for Qwen2-VL (pixel_values + image_grid_thw) and LLaVA-OneVision
(pixel_values + image_sizes). Labels are -100 except on the final assistant answer and
the end-of-turn token after it, so the SFT loss (and the token importance derived from its
gradient) measures how well the model produces the answer and stops.

Image size (`--max-pixels`): images above the bound are downscaled before the processor sees them,
which works alike for every processor (Qwen2-VL then patches fewer 28 x 28 cells; LLaVA-OneVision's
anyres picks a smaller grid pinpoint, so fewer 384 x 384 tiles). Without it the processor's own
bound is the only one (Qwen2-VL: its `max_pixels`, 12,845,056 in Qwen2-VL-7B-Instruct's
preprocessor config; LLaVA-OneVision: anyres_max_9, the base image plus at most 9 tiles' worth).
"""
from __future__ import annotations

import math

import torch

from tlq.data.calib import CalibSample, answer_text
from tlq.errors import TLQError

IGNORE_INDEX = -100


def normalize_messages(messages: list) -> list:
    """String contents become one text part: real VLM chat templates iterate over parts."""
    return [{**m, "content": [{"type": "text", "text": m["content"]}]} if isinstance(m["content"], str) else m
            for m in messages]


def bounded_size(width: int, height: int, max_pixels: int | None) -> tuple[int, int]:
    """(width, height) scaled down, aspect kept, to at most `max_pixels` pixels (None: unchanged)."""
    if max_pixels is None or width * height <= max_pixels:
        return width, height
    scale = math.sqrt(max_pixels / (width * height))
    w, h = max(1, math.floor(width * scale)), max(1, math.floor(height * scale))
    return w, h


def load_images(sample: CalibSample, max_pixels: int | None = None) -> list:
    """The sample's images in RGB, each downscaled (bicubic) to at most `max_pixels` pixels: the
    processor then tiles or patches the smaller image (fewer vision tokens), its own bound still applying."""
    from PIL import Image

    images = []
    for path in sample.image_paths:
        with Image.open(path) as img:
            rgb = img.convert("RGB")
        size = bounded_size(*rgb.size, max_pixels)
        images.append(rgb if size == rgb.size else rgb.resize(size, Image.Resampling.BICUBIC))
    return images


def answer_suffix(processor, messages: list) -> tuple[str, str]:
    """(labelled, tail): the rendered text from the answer through the end-of-turn token, and what follows.

    The prompt is the conversation without its answer, with the generation prompt; when the
    template renders it as a prefix of the full text (ChatML templates do), the rest is the
    answer turn. Otherwise the answer is found as the last occurrence of its text.
    """
    full = processor.apply_chat_template(messages, tokenize=False)
    prompt = processor.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    answer = answer_text(messages[-1])
    start = len(prompt) if full.startswith(prompt) and answer in full[len(prompt):] else full.rfind(answer)
    if start < 0:
        raise TLQError("the chat template does not render the answer text verbatim; "
                       "use a processor whose template keeps assistant text as is")
    suffix = full[start:]
    eos = processor.tokenizer.eos_token
    end = suffix.find(eos, suffix.find(answer) + len(answer)) if eos else -1
    end = len(suffix) if end < 0 else end + len(eos)
    return suffix[:end], suffix[end:]


def encode_sample(processor, sample: CalibSample, max_pixels: int | None = None) -> dict:
    """Model inputs for one sample (batch of 1) plus `labels` [1, T] on the answer tokens only;
    images bounded by `max_pixels` (load_images)."""
    messages = normalize_messages(sample.messages)
    text = processor.apply_chat_template(messages, tokenize=False)
    images = load_images(sample, max_pixels)
    inputs = processor(text=[text], images=images or None, return_tensors="pt")
    labelled, tail = answer_suffix(processor, messages)
    tokenizer = processor.tokenizer
    n_tail = len(tokenizer(tail, add_special_tokens=False)["input_ids"]) if tail else 0
    suffix_ids = tokenizer(labelled + tail, add_special_tokens=False)["input_ids"]
    ids = inputs["input_ids"][0]
    n = len(suffix_ids)
    if n == 0 or n > len(ids) or ids[-n:].tolist() != suffix_ids:
        # the answer merged with the tokens before it: labels would be misaligned
        raise TLQError(f"sample {sample.id}: the answer does not tokenize the same alone and in context; "
                       "this tokenizer/template pair is not supported for calibration")
    labels = torch.full_like(inputs["input_ids"], IGNORE_INDEX)
    labels[0, len(ids) - n: len(ids) - n_tail] = ids[len(ids) - n: len(ids) - n_tail]
    return {**inputs, "labels": labels}
