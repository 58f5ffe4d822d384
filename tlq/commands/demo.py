"""`tlq demo`: the whole main job on the built-in tiny model, with each phase's wall time.

    fixture (built or reused) -> calibrate (method tlq, w4a16) -> serve -> one text and one image
    question through the openai client -> a short bench -> shutdown
"""
from __future__ import annotations

import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tlq.errors import TLQError


@dataclass
class DemoConfig:
    """Settings of `tlq demo`.

    Attributes:
        workdir: where the checkpoint is written (replaced on each run).
        port: port of the demo server (127.0.0.1).
        method / scheme: calibration method and quantization scheme.
        max_samples: calibration samples (the bundled set has 32).
        bench_requests: requests per concurrency level of the short bench.
        bench_concurrency: concurrency levels of the short bench.
    """

    workdir: Path = Path(tempfile.gettempdir()) / "tlq-demo"
    port: int = 18400
    method: str = "tlq"
    scheme: str = "w4a16"
    max_samples: int | None = None
    bench_requests: int = 8
    bench_concurrency: tuple[int, ...] = (1, 4)


class PhaseClock:
    """Times named phases and prints each as it ends."""

    def __init__(self, echo):
        self.echo = echo
        self.times: dict[str, float] = {}
        self.t0 = time.monotonic()

    @contextmanager
    def phase(self, name: str):
        self.echo(f"== {name}")
        t = time.monotonic()
        try:
            yield
        finally:
            self.times[name] = time.monotonic() - t
            self.echo(f"   {name}: {self.times[name]:.1f} s")

    def summary(self) -> str:
        parts = ", ".join(f"{k} {v:.1f} s" for k, v in self.times.items())
        return f"demo finished in {time.monotonic() - self.t0:.1f} s ({parts})"


def _ask(endpoint, content, max_tokens: int = 24) -> str:
    r = endpoint.client(timeout=120).chat.completions.create(
        model=endpoint.model, messages=[{"role": "user", "content": content}], max_tokens=max_tokens,
        temperature=0.0)
    return r.choices[0].message.content


def run_demo(cfg: DemoConfig, echo=print) -> dict:
    """Run every phase; returns {"phases": {name: seconds}, "answers": {...}, "bench": {...}}."""
    from serve.client import Endpoint, file_data_url
    from serve.config import ServeConfig
    from serve.process import ServerDied, ServerProcess
    from tlq import calibrate
    from tlq.bench import BenchConfig
    from tlq.bench.loadgen import run_bench
    from tlq.calib.config import CalibConfig, get_method
    from tlq.data.calib import bundled_calibration_path
    from tlq.fixtures import ensure_fixture
    from tlq.schemes import get_scheme

    clock = PhaseClock(echo)
    out: dict = {}
    with clock.phase("fixture"):
        model = ensure_fixture("qwen2-vl")
        echo(f"   tiny random Qwen2-VL at {model}")
    ckpt = Path(cfg.workdir) / f"qwen2-vl-tiny-{cfg.method}-{cfg.scheme}"
    with clock.phase("calibrate"):
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()  # one "Loading weights" bar per load: noise in a demo
        Path(cfg.workdir).mkdir(parents=True, exist_ok=True)
        calibrate(CalibConfig(model=model, out=ckpt, method=get_method(cfg.method), scheme=get_scheme(cfg.scheme),
                              max_samples=cfg.max_samples, overwrite=True, resume=False), progress=False)
        echo(f"   checkpoint {ckpt}")
    server = ServerProcess(ServeConfig(model=ckpt, port=cfg.port))
    failed = True
    try:
        with clock.phase("serve (start-up)"):
            server.start()
            server.wait_ready()
            echo(f"   {server.url} serving {server.model_name!r}")
        endpoint = Endpoint(server.url, server.model_name)
        image = min((bundled_calibration_path().parent / "images").glob("*.png"))
        with clock.phase("questions"):
            question = "Describe a red square on a white background."
            out["text_answer"] = _ask(endpoint, question)
            echo(f"   Q (text): {question}\n   A: {out['text_answer']!r}")
            content = [{"type": "image_url", "image_url": {"url": file_data_url(image)}},
                       {"type": "text", "text": "What is in this image?"}]
            out["image_answer"] = _ask(endpoint, content)
            echo(f"   Q (image {image.name}): What is in this image?\n   A: {out['image_answer']!r}")
            echo("   (the tiny model has random weights: its answers are noise; the point is the pipeline)")
        with clock.phase("bench"):
            bcfg = BenchConfig(concurrency=list(cfg.bench_concurrency), requests=cfg.bench_requests,
                               max_tokens=32, image_sizes=[224], warmup=1)
            out["bench"] = run_bench(endpoint, bcfg, echo=lambda m: echo("   " + m.strip()))
        failed = server.failed()
    except Exception as exc:  # an HTTP 500, a timeout, a reset: say why the server failed, keep its log
        if isinstance(exc, ServerDied) or server.proc is None:
            raise  # already says why (with the log), or no server ran
        first = (str(exc).splitlines() or [""])[0][:200]
        what = first if isinstance(exc, TLQError) else f"{type(exc).__name__}: {first}"
        raise TLQError(f"the demo failed ({what}); {server.status_line()}") from exc
    finally:
        with clock.phase("shutdown"):
            server.stop(keep_log=failed)
    if failed:
        raise TLQError(f"the demo's server died during the bench: {server.failure_reason()}")
    out["phases"] = {k: round(v, 2) for k, v in clock.times.items()}
    echo(clock.summary())
    return out
