"""Peer rows: llm-compressor's GPTQ, AWQ and SmoothQuant on the same fixtures, samples and scorer.

llm-compressor pins a transformers version the project's venv cannot hold, so it runs in its own
venv (`--lc-python`, set up by shared/reference/peer-anchors/setup_lc_venv.sh) as a subprocess
of lc_run.py. It calibrates on exactly the inputs tlq.calibrate gets for the same seed: the
same drawn calibration file, encoded here with tlq's encode_sample (chat template, images)
and handed over as tensors. lc_run.py writes the quantized model as a float folder (the
values its compressed-tensors checkpoint decodes to); it is evaluated in float32 like our
rows, with the same per-token int8 input quantization for W4A8 (tlq.calib.layer_solve), so
a peer row differs from ours only in how the weights (and smoothing scales) were chosen.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import torch

from benchmarks.quality_lib.evaluate import EvalSet, run_eval, summarize
from benchmarks.quality_lib.grid import Setting, methods_for
from benchmarks.quality_lib.runner import RunLog, RunOptions, calibration_file, options_key
from tlq.atomic import save_torch_atomic, write_file_atomic
from tlq.errors import TLQError

LC_RUN = Path(__file__).resolve().with_name("lc_run.py")
PREFIX = "lc-"
# peer row -> our row it judges (also the recipe lc_run.py runs), with llm-compressor's defaults
PEERS = {"lc-gptq": "gptq", "lc-awq": "awq", "lc-smoothquant": "smoothquant"}
# diagnostic rows: one default of llm-compressor changed to ours, to say where a gap comes from
# (name -> (recipe, modifier keyword overrides)); run only when named (--peers)
VARIANTS = {"lc-rtn": ("rtn", {}),  # its quantizer grid alone, against our RTN
            "lc-gptq-no-actorder": ("gptq", {"actorder": None}),
            "lc-awq-no-duo": ("awq", {"duo_scaling": False})}
LABELS = {"lc-rtn": "llm-compressor RTN", "lc-gptq": "llm-compressor GPTQ", "lc-awq": "llm-compressor AWQ",
          "lc-smoothquant": "llm-compressor SmoothQuant",
          "lc-gptq-no-actorder": "llm-compressor GPTQ, no act-order", "lc-awq-no-duo": "llm-compressor AWQ, no duo"}
TIMEOUT_S = 3600


def our_method(peer: str) -> str:
    """The row of ours that a peer row is compared with (lc-gptq -> gptq)."""
    return recipe_of(peer)[0]


def recipe_of(peer: str) -> tuple[str, dict]:
    """(lc_run.py recipe, modifier keyword overrides) of a peer row."""
    return VARIANTS[peer] if peer in VARIANTS else (PEERS[peer], {})


def peers_for(setting: Setting, methods: list[str], names: list[str] | None = None) -> list[str]:
    """Peer rows (default: one per method of ours) whose recipe applies at `setting`: SmoothQuant only
    where activations are quantized, and only for methods of ours in `methods`."""
    ours = set(methods_for(setting, methods))
    return [p for p in (names or list(PEERS)) if recipe_of(p)[0] in ours]


def check_python(python: Path) -> Path:
    """The llm-compressor interpreter, or a clear error naming the fix."""
    python = Path(python)
    probe = subprocess.run([str(python), "-c", "import llmcompressor, compressed_tensors"], capture_output=True,
                           text=True) if python.is_file() else None
    if probe is None or probe.returncode != 0:
        why = "does not exist" if probe is None else "cannot import llmcompressor: " + probe.stderr.strip()[-300:]
        raise TLQError(f"--lc-python {python} {why}; create llm-compressor's venv with "
                       "shared/reference/peer-anchors/setup_lc_venv.sh and pass its bin/python")
    return python


def write_samples(model_dir: Path, calib_jsonl: Path, path: Path) -> Path:
    """The calibration file encoded as tlq.calibrate encodes it (labels dropped), as a torch list."""
    if path.is_file():
        return path
    from transformers import AutoProcessor

    from tlq.data.calib import load_calibration
    from tlq.data.processing import encode_sample
    processor = AutoProcessor.from_pretrained(model_dir)
    encoded = []
    for sample in load_calibration(calib_jsonl):
        enc = encode_sample(processor, sample)
        enc.pop("labels")
        encoded.append({k: v.contiguous() for k, v in enc.items()})
    save_torch_atomic(path, encoded)
    return path


def job_for(model_dir: Path, setting: Setting, peer: str, samples: Path, out: Path) -> dict:
    """lc_run.py's job: the setting's numerics in llm-compressor's terms."""
    s = setting.scheme
    method, overrides = recipe_of(peer)
    return {"model": str(Path(model_dir).resolve()), "out": str(Path(out).resolve()),
            "samples": str(Path(samples).resolve()), "method": method, "modifier_kwargs": overrides,
            "bits": s.bits, "group_size": s.group_size, "symmetric": s.symmetric, "act_bits": s.act_bits}


def quantize_with_peer(python: Path, job: dict, work: Path, timeout: float = TIMEOUT_S) -> dict:
    """Run lc_run.py on `job` (one thread); its RESULT line, or an error with the output's tail."""
    job_file = (work / (Path(job["out"]).name + ".job.json")).resolve()  # lc_run.py runs with cwd=work
    write_file_atomic(job_file, json.dumps(job, indent=1))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTHONPATH", None)  # the project's packages must not shadow the peer venv's
    proc = subprocess.run([str(python), str(LC_RUN), str(job_file)], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=str(work))
    results = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not results:
        tail = (proc.stdout + proc.stderr).strip()[-2000:]
        raise TLQError(f"llm-compressor ({job['method']}) failed with exit code {proc.returncode}:\n{tail}")
    return json.loads(results[-1][len("RESULT "):])


def load_peer(folder: Path, setting: Setting):
    """The peer's float folder in float32, with W4A8's per-token int8 inputs as our rows get them."""
    from transformers import AutoModelForImageTextToText

    from tlq.adapters import adapter_for_model_type
    from tlq.calib.layer_solve import add_activation_quant
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    if not setting.weight_only:
        adapter = adapter_for_model_type(model.config.model_type)
        for layer in adapter.layers(model):
            add_activation_quant(layer, adapter.linear_names())
    return model


def run_peer_cell(cell: dict, model_dir: Path, setting: Setting, calib_jsonl: Path, work: Path,
                  evalset: EvalSet, reference: list, python: Path) -> dict:
    """Quantize with llm-compressor, evaluate with our scorer; the record for RunLog (`cell` = its key)."""
    stem = f"{cell['model']}-{setting.scheme.name}-g{setting.scheme.group_size}-{cell['method']}-s{cell['seed']}"
    samples = write_samples(model_dir, calib_jsonl, work / f"{calib_jsonl.stem}.encoded.pt")
    out = work / f"peer-{stem}"
    t0 = time.time()
    info = quantize_with_peer(python, job_for(model_dir, setting, cell["method"], samples, out), work)
    t1 = time.time()
    results, _ = run_eval(load_peer(out, setting), evalset, reference)
    shutil.rmtree(out, ignore_errors=True)
    return {**cell, "summary": summarize(results), "calib_seconds": round(t1 - t0, 2),
            "eval_seconds": round(time.time() - t1, 2), "peer": info,
            "wrong": [[r["id"], r["prediction"]] for r in results if not r["correct"]][:20]}


def run_peer(model_name: str, model_dir: Path, setting: Setting, peer: str, seed: int, opts: RunOptions,
             pool: Path, work: Path, evalset: EvalSet, reference: list, log: RunLog, python: Path) -> dict:
    """One peer cell of the grid (or its earlier record): same calibration draw as our rows' `seed`."""
    cell = {"model": model_name, "setting": setting.label, "method": peer, "seed": seed,
            "options": options_key(opts)}
    earlier = log.done(RunLog.key(cell))
    if earlier is not None:
        return earlier
    calib = calibration_file(pool, work, opts.calib_samples, seed)
    record = run_peer_cell(cell, model_dir, setting, calib, work, evalset, reference, python)
    log.add(record)
    return record
