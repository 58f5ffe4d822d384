"""Run several checkpoints through vLLM's offline `LLM` in one process and write greedy outputs as JSON.

Used by the end-to-end tests (one subprocess per architecture instead of one per checkpoint:
with VLLM_ENABLE_V1_MULTIPROCESSING=0 the second model loads in ~3 s instead of ~30 s) and
handy for manual parity checks:

    python tests/vllm_plugin/probe.py job.json out.json

job.json: {"models": [{"name": "q4", "path": "...", "env": {"TLQ_LINEAR_BACKEND": "torch"}}],
           "prompts": [{"text": "Describe", "image": true}], "max_tokens": 8, "logprobs": 5,
           "llm_kwargs": {"tensor_parallel_size": 2, ...}}
out.json: {"q4": {"dtype": "torch.bfloat16", "outputs": [{"tokens": [...], "top": [{"id": lp}, ...]}]},
           "bad": {"error": "CheckpointError: ..."}}
A model that fails to load is reported with its error and the run goes on. Each model that is
done prints one `tlq-probe: done <name>` line to stderr, so a caller can tell a slow machine (lines
keep coming) from a hung engine (they stop). Multiprocess tensor parallelism re-imports this module
in every worker: keep work under the __main__ guard.
"""
from __future__ import annotations

import gc
import json
import os
import sys
import time
from pathlib import Path

from tlq.atomic import write_json_atomic

PROGRESS_MARK = "tlq-probe: done "
DEFAULT_LLM_KWARGS = {"enforce_eager": True, "max_model_len": 1024, "limit_mm_per_prompt": {"image": 1},
                      "seed": 0}


def probe_image(size: int = 64):
    """A deterministic RGB test image (smooth gradients plus a square), no files needed."""
    import numpy as np
    from PIL import Image
    y, x = np.mgrid[0:size, 0:size]
    rgb = np.stack([x * 255 // size, y * 255 // size, (x + y) * 127 // size], axis=-1).astype("uint8")
    rgb[size // 4: size // 2, size // 4: size // 2] = (250, 20, 20)
    return Image.fromarray(rgb)


def conversations(prompts: list[dict]) -> list[list[dict]]:
    convs = []
    for p in prompts:
        content = [{"type": "image_pil", "image_pil": probe_image()}] if p.get("image") else []
        content.append({"type": "text", "text": p["text"]})
        convs.append([{"role": "user", "content": content}])
    return convs


def _outputs(results) -> list[dict]:
    outs = []
    for r in results:
        o = r.outputs[0]
        top = [{str(t): round(float(lp.logprob), 6) for t, lp in step.items()} for step in (o.logprobs or [])]
        outs.append({"tokens": list(o.token_ids), "top": top})
    return outs


def run_job(job: dict) -> dict:
    from vllm import LLM, SamplingParams
    params = SamplingParams(max_tokens=job.get("max_tokens", 8), temperature=0.0,
                            logprobs=job.get("logprobs", 5))
    convs = conversations(job["prompts"])
    kwargs = {**DEFAULT_LLM_KWARGS, **job.get("llm_kwargs", {})}
    report = {}
    for model in job["models"]:
        saved = {k: os.environ.get(k) for k in model.get("env", {})}
        os.environ.update(model.get("env", {}))
        t0 = time.time()
        llm = None
        try:
            llm = LLM(model=model["path"], **{**kwargs, **model.get("llm_kwargs", {})})
            results = llm.chat(convs, params, use_tqdm=False)
            report[model["name"]] = {"dtype": str(llm.llm_engine.model_config.dtype),
                                     "seconds": round(time.time() - t0, 2), "outputs": _outputs(results)}
        except Exception as exc:  # noqa: BLE001 - reported per model; the caller asserts on it
            report[model["name"]] = {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            print(f"{PROGRESS_MARK}{model['name']} ({time.time() - t0:.1f} s)", file=sys.stderr, flush=True)
            del llm
            gc.collect()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    return report


def main(argv: list[str]) -> None:
    job = json.loads(Path(argv[0]).read_text())
    report = run_job(job)
    write_json_atomic(Path(argv[1]), report)


if __name__ == "__main__":
    main(sys.argv[1:])
