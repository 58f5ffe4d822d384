"""The benchmark workload: a seeded, reproducible list of text and image chat requests.

The same config and seed give byte-identical requests, so `--compare` runs the same workload
against both servers. Every image is distinct (seeded per request) so the server's
multimodal cache cannot serve it from a previous request.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from tlq.errors import TLQError

_WORDS = ["red", "square", "blue", "circle", "green", "triangle", "small", "large", "left", "right", "top", "bottom", "picture", "colour", "shape", "count", "describe", "between", "above", "below", "near", "far", "bright", "dark", "striped", "dotted"]


@dataclass
class BenchConfig:
    """One benchmark run.

    Attributes:
        concurrency: concurrency levels of the sweep (requests in flight at once).
        requests: requests sent per level (the count bound).
        max_seconds: wall-clock bound per level: no new request starts after it.
        request_timeout: seconds one request may take before it counts as an error.
        max_tokens: output tokens per request (generated to the end: ignore_eos).
        prompt_words: words in each text prompt.
        image_sizes: square image sides in pixels; image requests cycle through them.
        image_fraction: share of requests that carry one image (0 = text only).
        warmup: untimed requests before the sweep (first-request costs stay out of the numbers).
        seed: seed for prompts and images.
    """

    concurrency: list[int] = field(default_factory=lambda: [1, 4, 16])
    requests: int = 32
    max_seconds: float = 120.0
    request_timeout: float = 120.0
    max_tokens: int = 64
    prompt_words: int = 24
    image_sizes: list[int] = field(default_factory=lambda: [224, 448])
    image_fraction: float = 0.5
    warmup: int = 2
    seed: int = 0

    def validate(self) -> None:
        if not self.concurrency or min(self.concurrency) < 1:
            raise TLQError("--concurrency needs positive integers, e.g. 1,4,16")
        if self.requests < 1 or self.max_tokens < 1 or self.max_seconds <= 0:
            raise TLQError("--requests, --max-tokens and --max-seconds must be positive")
        if not 0.0 <= self.image_fraction <= 1.0:
            raise TLQError(f"--image-fraction must be within [0, 1], got {self.image_fraction}")
        if self.image_fraction > 0 and (not self.image_sizes or min(self.image_sizes) < 28):
            raise TLQError("--image-sizes needs sides of at least 28 px (one 2x2 patch block), e.g. 224,448")


@dataclass(frozen=True)
class BenchRequest:
    """One request: `content` is the user message content; `kind` is "text" or "image<side>"."""

    kind: str
    content: object


def synthetic_image(side: int, seed: int):
    """A deterministic test picture: colour gradients with a few filled shapes."""
    import numpy as np
    from PIL import Image, ImageDraw

    rs = np.random.RandomState(seed)
    a = np.zeros((side, side, 3), np.uint8)
    a[..., 0] = np.linspace(0, 255, side, dtype=np.float32)[None, :].astype(np.uint8)
    a[..., 1] = np.linspace(0, 255, side, dtype=np.float32)[:, None].astype(np.uint8)
    a[..., 2] = rs.randint(0, 256)
    img = Image.fromarray(a)
    draw = ImageDraw.Draw(img)
    for _ in range(3):
        x, y = rs.randint(0, side, size=2)
        r = rs.randint(side // 16, side // 4)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(c) for c in rs.randint(0, 256, size=3)))
    return img


def build_requests(cfg: BenchConfig, n: int, offset: int = 0) -> list[BenchRequest]:
    """`n` requests; `offset` shifts the seeds (warm-up requests differ from timed ones)."""
    from serve.client import png_data_url

    rng = random.Random(f"{cfg.seed}:{offset}")
    out, n_images = [], 0
    for i in range(n):
        text = " ".join(rng.choice(_WORDS) for _ in range(cfg.prompt_words))
        if rng.random() < cfg.image_fraction:
            side = cfg.image_sizes[n_images % len(cfg.image_sizes)]
            n_images += 1
            url = png_data_url(synthetic_image(side, seed=cfg.seed * 100003 + offset + i))
            content = [{"type": "image_url", "image_url": {"url": url}},
                       {"type": "text", "text": f"Describe this image. {text}"}]
            out.append(BenchRequest(f"image{side}", content))
        else:
            out.append(BenchRequest("text", f"Write about: {text}"))
    return out
