"""Two ways to score a model on a question: through an OpenAI endpoint, or in transformers.

Both give the greedy answer and, under teacher forcing on the reference answer, the next-token
log-probabilities at every answer position: top-k lists from the endpoint (vLLM's
`prompt_logprobs`), full log-softmax vectors from transformers (exact KL).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tlq.errors import TLQError
from tlq.evaluate.data import QAItem


@dataclass
class Scored:
    """A model's greedy `answer` and per-answer-token `positions` (top-k dicts or log-prob tensors)."""

    answer: str
    positions: list


class EndpointScorer:
    """Scores through a running vLLM server (what is actually served, kernels included).

    Teacher forcing uses the chat API with the reference as a final assistant message that the
    template continues (`continue_final_message`), and `prompt_logprobs=top_k`; the answer's
    positions are those after the prompt's length, read from the generation request's usage.
    """

    def __init__(self, endpoint, max_new_tokens: int = 32, top_k: int = 10):
        self.endpoint = endpoint
        self.client = endpoint.client(timeout=300.0)
        self.max_new_tokens = max_new_tokens
        self.top_k = top_k

    def score(self, item: QAItem) -> Scored:
        gen = self.client.chat.completions.create(
            model=self.endpoint.model, messages=item.openai_messages(), max_tokens=self.max_new_tokens,
            temperature=0.0)
        n_prompt = gen.usage.prompt_tokens
        forced = self.client.chat.completions.create(
            model=self.endpoint.model, messages=item.openai_messages(with_answer=True), max_tokens=1,
            temperature=0.0, extra_body={"add_generation_prompt": False, "continue_final_message": True,
                                         "prompt_logprobs": self.top_k})
        per_token = (forced.model_extra or {}).get("prompt_logprobs")
        if per_token is None:
            raise TLQError(f"{self.endpoint.base} returned no prompt_logprobs; tlq eval's endpoint backend "
                           "needs a vLLM server (or use --backend transformers)")
        positions = [{int(tok): float(v["logprob"]) for tok, v in d.items()}
                     for d in per_token[n_prompt:] if d]
        return Scored(gen.choices[0].message.content or "", positions)


class TransformersScorer:
    """Scores a model in transformers: the float model, or a checkpoint's dequantized weights."""

    def __init__(self, model, processor, max_new_tokens: int = 32):
        self.model = model
        self.processor = processor
        self.max_new_tokens = max_new_tokens

    @classmethod
    def from_folder(cls, path: Path, max_new_tokens: int = 32, device: str = "cpu") -> TransformersScorer:
        """A TLQ checkpoint is dequantized (never loaded as is: transformers would silently random-init
        the packed weights); any other folder is loaded as a float model."""
        from serve.config import read_config
        if (read_config(path).get("quantization_config") or {}).get("quant_method") == "tlq":
            from tlq.format.dequantize import load_dequantized
            model, processor = load_dequantized(path, device=device)
        else:
            from tlq.model_io import open_source_model
            source = open_source_model(path)
            model, processor = source.load_hf_model(device), source.load_processor()
        return cls(model, processor, max_new_tokens)

    def score(self, item: QAItem) -> Scored:
        import torch

        from tlq.data.processing import IGNORE_INDEX, encode_sample, load_images, normalize_messages

        device = next(self.model.parameters()).device
        text = self.processor.apply_chat_template(normalize_messages(item.prompt_messages), tokenize=False,
                                                  add_generation_prompt=True)
        images = load_images(item.sample)
        inputs = self.processor(text=[text], images=images or None, return_tensors="pt").to(device)
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
            answer = self.processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:],
                                                     skip_special_tokens=True)
            enc = encode_sample(self.processor, item.sample)
            labels = enc.pop("labels")[0]
            logits = self.model(**{k: v.to(device) for k, v in enc.items()}).logits[0].float()
        mask = (labels[1:] != IGNORE_INDEX).to(device)  # logits at t predict token t + 1
        logp = torch.log_softmax(logits[:-1][mask], dim=-1).cpu()
        return Scored(answer.strip(), list(logp))
