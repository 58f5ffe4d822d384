"""The benchmark workload, as arguments of vLLM's own serving benchmark (`vllm bench serve`).

Requests come from vLLM's `random-mm` dataset: random prompts of `input_tokens` tokens and, for
the share `image_fraction` of requests, one random-pixel image whose side is drawn from
`image_sizes`. Its generator draws each request's image count uniformly from an integer range,
so the shares it can produce are 0 (text only), 0.5 (0 or 1 image) and 1 (one image each).
Every output runs to `max_tokens` (ignore_eos), greedy. The same config and seed give the same
requests, so `--compare` runs one workload against both servers.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from tlq.errors import TLQError

IMAGE_FRACTIONS = {0.0: (0, 0.0), 0.5: (1, 1.0), 1.0: (1, 0.0)}  # share -> random-mm (base items, range ratio)


@dataclass
class BenchConfig:
    """One benchmark run.

    Attributes:
        concurrency: concurrency levels of the sweep (requests in flight at once; vLLM's --max-concurrency).
        requests: requests per round of a level (vLLM's --num-prompts).
        min_seconds: a level repeats rounds (new seeds) until vLLM's measured durations of its rounds
            add up to this (the time under load); 0 = one round.
        max_tokens: output tokens per request (vLLM's --random-output-len, with --ignore-eos).
        input_tokens: text tokens of each prompt (vLLM's --random-input-len).
        image_sizes: square image sides in pixels, drawn uniformly (vLLM's --random-mm-bucket-config).
        image_fraction: share of requests with one image: 0, 0.5 or 1 (see the module docstring).
        warmup: untimed requests before each level's first round (vLLM's --num-warmups).
        seed: seed of the first round (round r of level i uses seed + 1000 * i + r).
    """

    concurrency: list[int] = field(default_factory=lambda: [1, 4, 16])
    requests: int = 32
    min_seconds: float = 0.0
    max_tokens: int = 64
    input_tokens: int = 32
    image_sizes: list[int] = field(default_factory=lambda: [224, 448])
    image_fraction: float = 0.5
    warmup: int = 2
    seed: int = 0

    def validate(self) -> None:
        if not self.concurrency or min(self.concurrency) < 1:
            raise TLQError("--concurrency needs positive integers, e.g. 1,4,16")
        if self.requests < 1 or self.max_tokens < 1 or self.input_tokens < 1:
            raise TLQError("--requests, --max-tokens and --input-tokens must be positive")
        if self.min_seconds < 0 or self.warmup < 0:
            raise TLQError("--min-seconds and --warmup must be 0 or more")
        if self.image_fraction not in IMAGE_FRACTIONS:
            raise TLQError(f"--image-fraction must be 0, 0.5 or 1 (what vLLM's random-mm dataset draws), "
                           f"got {self.image_fraction}")
        if self.image_fraction > 0 and (not self.image_sizes or min(self.image_sizes) < 28):
            raise TLQError("--image-sizes needs sides of at least 28 px (one 2x2 patch block), e.g. 224,448")


def vllm_argv(cfg: BenchConfig, base_url: str, model: str, tokenizer: str, concurrency: int, seed: int,
              warmup: int, result_dir: str, result_file: str) -> list[str]:
    """`vllm bench serve` arguments of one round: chat endpoint, random-mm dataset, detailed results.

    `base_url` is the server root (no /v1), `model` the served name, `tokenizer` the model's folder
    (the `root` the server lists in /v1/models).
    """
    base_items, range_ratio = IMAGE_FRACTIONS[cfg.image_fraction]
    sizes = cfg.image_sizes or [224]
    buckets = {(s, s, 1): 1.0 / len(sizes) for s in sizes}
    argv = ["--backend", "openai-chat", "--endpoint", "/v1/chat/completions", "--base-url", base_url,
            "--dataset-name", "random-mm", "--num-prompts", str(cfg.requests),
            "--max-concurrency", str(concurrency), "--request-rate", "inf",
            "--random-input-len", str(cfg.input_tokens), "--random-output-len", str(cfg.max_tokens),
            "--random-range-ratio", "0",
            "--random-mm-base-items-per-request", str(base_items),
            "--random-mm-num-mm-items-range-ratio", str(range_ratio),
            "--random-mm-limit-mm-per-prompt", '{"image": 1, "video": 0}',
            "--random-mm-bucket-config", repr(buckets),
            "--ignore-eos", "--temperature", "0", "--seed", str(seed), "--num-warmups", str(warmup),
            "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
            "--save-result", "--save-detailed", "--result-dir", result_dir, "--result-filename", result_file,
            "--disable-tqdm"]
    return argv + ["--model", tokenizer, "--served-model-name", model, "--tokenizer", tokenizer]
