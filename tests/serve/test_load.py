"""Load (issue 12, item 6): 64 concurrent clients, text and image requests mixed, for 60 s against a
live `tlq serve` of the tiny Qwen2-VL at RTN W4A16, through `tlq bench` (vLLM's serving benchmark).

Passes when no request fails, `tlq bench` prints p50/p99 latency and throughput, and the server's
resident memory (the listening process and its children) at the end is within 10 % of its value
after a warm-up round of the same size.

The server runs with vLLM's multimodal processor cache off (`--mm-processor-cache-gb 0`). With
vLLM's default (4 GiB) every distinct image is kept, and the engine process grew by about
100 MiB per 1024 requests here (tiny Qwen2-VL, half of them with a 112 or 224 px image): by 18 %
over 3 x 1024 requests, where it stayed within 7 % without the cache. That growth is a bounded
cache filling up, not a leak, and the cache only pays off for repeated images.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from importlib.util import find_spec

import pytest

STARTUP_S = 600
LOAD_S = 60
CLIENTS = 64


def _free_port() -> int:
    from serve.process import port_in_use
    return next(p for p in range(18600, 18700) if not port_in_use("127.0.0.1", p))


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> None:
    import urllib.request
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "tlq serve exited before it was ready"
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"tlq serve not ready after {timeout} s")


def _bench(url: str, out, *extra: str, timeout: float) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "tlq", "bench", url, "--concurrency", str(CLIENTS), "--image-fraction", "0.5",
           "--image-sizes", "112,224", "--max-tokens", "32", "--input-tokens", "32", "--out", str(out), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False,
                          env={**os.environ, "COLUMNS": "200"})


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.skipif(find_spec("vllm") is None, reason="vllm is not installed")
def test_64_clients_for_60_s_no_errors_and_flat_memory(qwen2_vl_dir, tmp_path):
    from tlq import calibrate
    from tlq.bench.loadgen import server_rss_mib
    from tlq.calib.config import CalibConfig, get_method
    from tlq.schemes import get_scheme

    ckpt = tmp_path / "rtn-w4a16"
    calibrate(CalibConfig(model=qwen2_vl_dir, out=ckpt, method=get_method("rtn"), scheme=get_scheme("w4a16")),
              progress=False)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with open(tmp_path / "serve.log", "wb") as log:
        server = subprocess.Popen([sys.executable, "-m", "tlq", "serve", str(ckpt), "--port", str(port),
                                   "--vllm-arg=--mm-processor-cache-gb=0"],
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_ready(url, server, STARTUP_S)
        warm = _bench(url + "/v1", tmp_path / "warm", "--requests", str(16 * CLIENTS), timeout=600)
        assert warm.returncode == 0, warm.stdout[-3000:] + warm.stderr[-3000:]
        rss_warm = server_rss_mib(port)

        t0 = time.monotonic()
        run = _bench(url + "/v1", tmp_path / "load", "--requests", str(16 * CLIENTS), "--min-seconds", str(LOAD_S),
                     "--seed", "7", timeout=LOAD_S + 900)
        wall = time.monotonic() - t0
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        rss_end = server_rss_mib(port)
        assert server.poll() is None
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(10)

    (level,) = json.loads((tmp_path / "load" / "bench.json").read_text())["runs"][f"{url}/v1"]["levels"]
    assert level["concurrency"] == CLIENTS and level["errors"] == 0 and level["completed"] == level["sent"]
    assert level["wall_s"] >= LOAD_S and wall >= LOAD_S
    assert 0 < level["image_requests"] < level["sent"]  # text and image requests mixed
    assert level["output_tokens"] == 32 * level["sent"]
    print(f"load: {level['sent']} requests in {level['wall_s']:.0f} s ({level['rounds']} rounds), "
          f"{level['output_tok_per_s']:.0f} tok/s, e2e p50/p99 {level['e2e_ms']['p50']:.0f}/"
          f"{level['e2e_ms']['p99']:.0f} ms; server RSS {rss_warm} MiB after warm-up, {rss_end} MiB at the end")
    # what tlq bench printed: the table with p50/p99 latency and throughput, from vLLM's own benchmark
    assert "latency ms" in run.stdout and "out tok/s" in run.stdout and "p50/p90/p99" in run.stdout
    assert f"{level['output_tok_per_s']:.1f}" in run.stdout
    vllm_json = json.loads((tmp_path / "load" / "vllm" / f"http_127.0.0.1_{port}_v1" / "c64-r0.json").read_text())
    assert vllm_json["max_concurrency"] == CLIENTS and vllm_json["failed"] == 0
    assert rss_warm and rss_end and abs(rss_end - rss_warm) <= 0.10 * rss_warm, (rss_warm, rss_end)
