"""Multi-rank calibration under torchrun (gloo, CPU) on the tiny Qwen2-VL: same checkpoint as one
process, each rank reads only its share, and a rank that dies stops the others and resumes.

"Same checkpoint" means the same tensors: the multi-rank folder is sharded per rank
(model-0000k-of-0000K.safetensors + index) where one process writes model.safetensors, so the
test compares tensor-by-tensor hashes (dtype, shape, bytes) and the manifest's calibration record.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

from tlq.format.checkpoint import verify_checkpoint
from tlq.multirank.launch import free_port
from tlq.multirank.writer import tensor_hashes

TIMEOUT = 300
ARGS = ["--max-samples", "4", "--quiet"]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", MASTER_PORT=str(free_port(range(18320, 18400))))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _run(cmd: list[str], env: dict, timeout: int = TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def _tlq(*args: str, env: dict) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "tlq", "calibrate", *args], env)


def _torchrun(*args: str, env: dict) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                 "127.0.0.1", "--master-port", env["MASTER_PORT"], "-m", "tlq", "calibrate", *args], env)


@pytest.fixture(scope="module")
def reference(qwen2_vl_dir, tmp_path_factory):
    """Single-process checkpoints, built once per method."""
    built = {}

    def get(method: str):
        if method not in built:
            out = tmp_path_factory.mktemp("ref") / method
            done = _tlq(str(qwen2_vl_dir), "--out", str(out), "--method", method, *ARGS,
                        env=_env(TLQ_DIST_RECORD=out.parent / "record"))
            assert done.returncode == 0, done.stderr[-3000:]
            built[method] = out
        return built[method]
    return get


def _calibration(path) -> dict:
    return json.loads((path / "tlq_manifest.json").read_text())["calibration"]


def test_two_ranks_write_the_single_process_checkpoint(qwen2_vl_dir, reference, tmp_path):
    ref = reference("tlq")
    out, record = tmp_path / "two", tmp_path / "record"
    done = _tlq(str(qwen2_vl_dir), "--out", str(out), "--nproc", "2", *ARGS, env=_env(TLQ_DIST_RECORD=record))
    assert done.returncode == 0, done.stderr[-3000:]
    assert tensor_hashes(out) == tensor_hashes(ref), done.stderr[-3000:]
    assert _calibration(out) == _calibration(ref)
    info = verify_checkpoint(out)
    assert sorted(info.manifest["files"])[:2] == ["config.json", "model-00001-of-00002.safetensors"]
    report = json.loads((out / "tlq_report.json").read_text())
    assert [r["layers"] for r in report["ranks"]] == [[0, 0], [1, 1]]
    assert [row["layer"] for row in report["layers"]] == [0, 1]
    # each rank read only its share of the float model, and together they read all of it
    from safetensors import safe_open
    with safe_open(str(qwen2_vl_dir / "model.safetensors"), framework="pt") as st:
        every = set(st.keys())
    records = [json.loads((record / f"rank{r}.json").read_text()) for r in range(2)]
    single = json.loads((ref.parent / "record" / "rank0.json").read_text())  # one process records too
    assert single["world"] == 1 and single["layers"] == [0, 1]
    assert all(0 < r["start_rss_mb"] < r["peak_rss_mb"] for r in records + [single])
    loaded = [set(r["loaded"]) for r in records]
    assert loaded[0] | loaded[1] == every and not loaded[0] & loaded[1]
    assert all(n.startswith(("visual.", "model.embed_tokens.", "model.layers.0.")) for n in loaded[0])
    assert all(n.startswith(("lm_head.", "model.norm.", "model.layers.1.")) for n in loaded[1])
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []  # no temporary folder, no work folders


def test_a_dying_rank_stops_the_other_and_the_rerun_resumes(qwen2_vl_dir, reference, tmp_path):
    ref = reference("gptq")  # no gradient pass: the FP path is the pipelined forward
    out = tmp_path / "ckpt"
    args = (str(qwen2_vl_dir), "--out", str(out), "--method", "gptq", *ARGS)
    died = _torchrun(*args, env=_env(TLQ_TEST_DIE_AFTER_LAYER=1))  # rank 1 dies after its layer
    assert died.returncode != 0, died.stderr[-3000:]
    # rank 0 is told in whatever it does after handing its stream to rank 1: still handing it over,
    # writing its shard, or waiting for the others (timing; the first and the last were both seen here)
    phases = r"(the layer loop \(layers 0-0\)|writing this rank's shard|waiting for the other ranks to finish)"
    assert re.search(rf"error: rank 0/2 stopped during {phases}: ", died.stderr), died.stderr[-3000:]
    assert not out.exists()
    assert not list(tmp_path.glob(".ckpt.tmp-*"))  # rank 0 had written its shard there: removed
    work = {p.name: sorted(f.name for f in p.iterdir()) for p in tmp_path.glob(".ckpt.work-rank*")}
    assert "layer_0000.pt" in work[".ckpt.work-rank0of2"] and "layer_0001.pt" in work[".ckpt.work-rank1of2"]
    resumed = _torchrun(*args, env=_env())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "rank 0 resumes" in resumed.stderr and "rank 1 resumes" in resumed.stderr
    assert tensor_hashes(out) == tensor_hashes(ref), resumed.stderr[-3000:]
    assert not list(tmp_path.glob(".ckpt.work-rank*"))


@pytest.mark.parametrize("method", ["tlq", "gptq"])
def test_spilled_stages_write_the_single_process_checkpoint(qwen2_vl_dir, reference, tmp_path, method):
    """--host-memory 0: each stage keeps every stream in files (the entry streams, the FP targets
    computed ahead, the streams it receives and sends) where the single process kept them in RAM;
    tlq takes its FP entry from the gradient pass, gptq from the pipelined FP forward. tlq also dies
    after rank 1's layer and resumes from the spilled state."""
    out = tmp_path / "ckpt"
    args = (str(qwen2_vl_dir), "--out", str(out), "--method", method, "--host-memory", "0", *ARGS)
    if method == "tlq":
        died = _torchrun(*args, env=_env(TLQ_TEST_DIE_AFTER_LAYER=1))
        assert died.returncode != 0 and not out.exists(), died.stderr[-3000:]
        spilled = tmp_path / ".ckpt.work-rank1of2" / "streams"
        assert sorted(p.name for p in spilled.iterdir()) == ["L0001-fp", "L0001-q"]
    done = _torchrun(*args, env=_env())
    assert done.returncode == 0, done.stderr[-3000:]
    assert tensor_hashes(out) == tensor_hashes(reference(method)), done.stderr[-3000:]
    assert not list(tmp_path.glob(".ckpt.work-rank*"))


def test_watchdog_stops_a_rank_whose_peer_vanished(qwen2_vl_dir, tmp_path):
    """Launched by hand (no torchrun to stop the survivor): rank 0's heartbeat check notices."""
    env = _env(WORLD_SIZE=2, MASTER_ADDR="127.0.0.1", TLQ_DIST_HEARTBEAT_S=0.5, TLQ_DIST_DEAD_AFTER_S=3)
    cmd = [sys.executable, "-m", "tlq", "calibrate", str(qwen2_vl_dir), "--out", str(tmp_path / "o"),
           "--method", "gptq", *ARGS]
    rank0 = subprocess.Popen(cmd, env={**env, "RANK": "0", "LOCAL_RANK": "0"}, stderr=subprocess.PIPE, text=True)
    rank1 = subprocess.Popen(cmd, env={**env, "RANK": "1", "LOCAL_RANK": "1", "TLQ_TEST_DIE_AFTER_LAYER": "1"},
                             stderr=subprocess.DEVNULL)
    try:
        assert rank1.wait(timeout=TIMEOUT) == 17  # died after its layer, while rank 0 waits for it
        died = time.time()
        _, err = rank0.communicate(timeout=60)
    finally:
        for p in (rank0, rank1):
            if p.poll() is None:
                p.kill()
    assert rank0.returncode == 3, err[-3000:]
    assert "rank 1 has not answered for 3 s" in err
    assert time.time() - died < 20
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.tmp-*"))
