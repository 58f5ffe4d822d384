"""Model inputs for in-memory conversations, and right-padded batches of encoded samples.

`encode_conversation` encodes a conversation whose images are held in memory (the training
stream never touches the disk) and labels every assistant answer. `collate` pads per-token tensors on the right and
concatenates the image tensors, which works for both processors as long as a batch holds
only image questions or only text questions (`homogeneous_batches`).
"""
from __future__ import annotations

import torch

from tlq.data.processing import IGNORE_INDEX, normalize_messages
from tlq.errors import TLQError

TOKEN_KEYS = ("input_ids", "attention_mask", "labels", "mm_token_type_ids")


def _assistant_header(processor) -> str:
    """What the chat template renders before an assistant turn's content (ChatML: "<|im_start|>assistant\\n")."""
    probe = [{"role": "user", "content": [{"type": "text", "text": "x"}]}]
    with_prompt = processor.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
    return with_prompt[len(processor.apply_chat_template(probe, tokenize=False)):]


def encode_conversation(processor, messages: list, images: list) -> dict:
    """Inputs of one conversation (batch of 1) with `labels` on every assistant answer.

    Each labelled span runs from after an assistant header through the end-of-turn token, so a
    single-turn conversation gets exactly tlq.data.processing.encode_sample's labels (a test
    checks this) and a multi-turn one trains on all its answers at the cost of one forward.
    """
    messages = normalize_messages(messages)
    text = processor.apply_chat_template(messages, tokenize=False)
    inputs = processor(text=[text], images=images or None, return_tensors="pt")
    tok = processor.tokenizer
    header = tok(_assistant_header(processor), add_special_tokens=False)["input_ids"]
    ids = inputs["input_ids"][0].tolist()
    labels = torch.full_like(inputs["input_ids"], IGNORE_INDEX)
    n_answers = 0
    for start in range(len(ids) - len(header) + 1):
        if ids[start:start + len(header)] != header:
            continue
        begin = start + len(header)
        end = ids.index(tok.eos_token_id, begin) + 1 if tok.eos_token_id in ids[begin:] else len(ids)
        labels[0, begin:end] = inputs["input_ids"][0, begin:end]
        n_answers += 1
    if n_answers != sum(m["role"] == "assistant" for m in messages):
        raise TLQError("the assistant header does not tokenize the same in context; "
                       "this tokenizer/template pair is not supported")
    return {**inputs, "labels": labels}


def collate(encoded: list[dict], pad_id: int) -> dict:
    """One right-padded batch from single-sample encodings (see module docstring)."""
    keys = set(encoded[0])
    if any(set(e) != keys for e in encoded):
        raise ValueError("a batch mixes samples with and without images; batch them separately")
    length = max(e["input_ids"].shape[1] for e in encoded)
    fill = {"input_ids": pad_id, "attention_mask": 0, "labels": IGNORE_INDEX, "mm_token_type_ids": 0}
    batch = {}
    for key in keys:
        if key in TOKEN_KEYS:
            rows = [torch.nn.functional.pad(e[key], (0, length - e[key].shape[1]), value=fill[key]) for e in encoded]
            batch[key] = torch.cat(rows)
        else:
            batch[key] = torch.cat([e[key] for e in encoded])
    return batch


def homogeneous_batches(flags: list[bool], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of at most `batch_size`, never mixing True and False flags."""
    batches = []
    for value in (True, False):
        idx = [i for i, f in enumerate(flags) if f == value]
        batches += [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
    return batches


def answer_span(labels: torch.Tensor) -> tuple[int, int]:
    """[start, end) of the labelled positions of one row."""
    pos = (labels != IGNORE_INDEX).nonzero().flatten()
    return int(pos[0]), int(pos[-1]) + 1
