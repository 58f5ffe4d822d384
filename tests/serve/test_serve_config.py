"""The launcher's decisions without starting vLLM: checkpoint checks, defaults, command line, env, TP."""
from __future__ import annotations

import json
import shutil
import signal
import socket
from pathlib import Path

import pytest

from serve.config import (
    ServeConfig,
    check_tensor_parallel,
    cpu_thread_binding,
    model_defaults,
    resolve,
    vllm_command,
    vllm_env,
)
from serve.process import ServerProcess, port_in_use
from tlq.errors import CheckpointError, TLQError


@pytest.fixture(scope="module")
def rtn_ckpt(qwen2_vl_dir, tmp_path_factory) -> Path:
    from tlq import calibrate
    from tlq.calib.config import CalibConfig, get_method
    from tlq.schemes import get_scheme
    out = tmp_path_factory.mktemp("serve-cfg") / "tiny-rtn"
    return calibrate(CalibConfig(model=qwen2_vl_dir, out=out, method=get_method("rtn"),
                                 scheme=get_scheme("w4a16")), progress=False)


def test_defaults_come_from_the_checkpoint(rtn_ckpt):
    d = model_defaults(rtn_ckpt)
    assert d.name == "tiny-rtn" and d.quantized and d.scheme == "w4a16"
    assert d.dtype == "bfloat16" and d.images_per_prompt == 1 and d.num_heads == 4
    assert d.max_model_len == 8192  # the config's 32768, capped


def test_float_folder_is_served_unverified(qwen2_vl_dir):
    d = model_defaults(qwen2_vl_dir)
    assert not d.quantized and d.scheme is None and d.images_per_prompt == 1


def test_damaged_checkpoint_is_refused_before_any_process(rtn_ckpt, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(rtn_ckpt, bad)
    weights = bad / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        ServerProcess(ServeConfig(model=bad, port=18499))
    # the cheap path still refuses a folder that is not a model at all
    with pytest.raises(TLQError, match="config.json"):
        model_defaults(tmp_path)


def test_cpu_command_and_env(rtn_ckpt, tmp_path):
    cfg = resolve(ServeConfig(model=rtn_ckpt, port=18498, api_key="s3cret", device="cpu"), model_defaults(rtn_ckpt))
    cmd = vllm_command(cfg, python="py")
    assert cmd[:5] == ["py", "-m", "serve.entry", "serve", str(rtn_ckpt.resolve())]
    args = dict(zip(cmd[5::2], cmd[6::2]))
    assert args["--host"] == "127.0.0.1" and args["--served-model-name"] == "tiny-rtn"
    assert args["--max-model-len"] == "8192" and args["--dtype"] == "bfloat16"
    assert json.loads(args["--limit-mm-per-prompt"]) == {"image": 1, "video": 0}
    assert "--enforce-eager" in cmd and "--distributed-executor-backend" not in cmd
    assert "s3cret" not in " ".join(cmd)  # the key travels in the environment, not in `ps`
    env = vllm_env(cfg, tmp_path, base={"PATH": "/bin", "VLLM_API_KEY": "stale"})
    assert env["VLLM_API_KEY"] == "s3cret" and env["TORCHDYNAMO_DISABLE"] == "1"
    assert env["VLLM_TARGET_DEVICE"] == "cpu" and env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert env["HF_HUB_OFFLINE"] == "1" and env["TMPDIR"] == str(tmp_path / "tmp")
    assert env["VLLM_CACHE_ROOT"].startswith(str(tmp_path))
    assert env["VLLM_HTTP_TIMEOUT_KEEP_ALIVE"] == "60"
    assert vllm_env(cfg, tmp_path, base={"VLLM_HTTP_TIMEOUT_KEEP_ALIVE": "7"})["VLLM_HTTP_TIMEOUT_KEEP_ALIVE"] == "7"
    no_key = vllm_env(resolve(ServeConfig(model=rtn_ckpt, device="cpu"), model_defaults(rtn_ckpt)), tmp_path,
                      base={"VLLM_API_KEY": "stale"})
    assert "VLLM_API_KEY" not in no_key


def test_gpu_command_has_no_cpu_settings(rtn_ckpt, tmp_path):
    cfg = resolve(ServeConfig(model=rtn_ckpt, tp=2, gpu_memory_utilization=0.9, device="cuda",
                              extra_args=["--max-num-batched-tokens", "4096"]), model_defaults(rtn_ckpt))
    cmd = vllm_command(cfg)
    assert "--enforce-eager" not in cmd and "mp" not in cmd
    assert cmd[cmd.index("--gpu-memory-utilization") + 1] == "0.9"
    assert cmd[cmd.index("--tensor-parallel-size") + 1] == "2" and cmd[-2:] == ["--max-num-batched-tokens", "4096"]
    env = vllm_env(cfg, tmp_path, base={})
    assert "VLLM_TARGET_DEVICE" not in env and "VLLM_CPU_OMP_THREADS_BIND" not in env


def test_cpu_tensor_parallel_uses_mp_and_binds_cores(rtn_ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: {0, 1})
    cfg = resolve(ServeConfig(model=rtn_ckpt, tp=2, device="cpu"), model_defaults(rtn_ckpt))
    cmd = vllm_command(cfg)
    assert cmd[cmd.index("--distributed-executor-backend") + 1] == "mp"
    assert vllm_env(cfg, tmp_path, base={})["VLLM_CPU_OMP_THREADS_BIND"] == "0|1"


def test_thread_binding_splits_cores():
    assert cpu_thread_binding(2, [0, 1, 2, 3]) == "0-1|2-3"
    assert cpu_thread_binding(3, [4, 5, 6]) == "4|5|6"
    with pytest.raises(TLQError, match="--tp 3"):
        cpu_thread_binding(3, [0, 1])


def test_tensor_parallel_preflight(rtn_ckpt):
    d = model_defaults(rtn_ckpt)  # 4 heads; o_proj K=256, down_proj K=512, group 128
    assert check_tensor_parallel(d, 1) is None and check_tensor_parallel(d, 2) is None
    with pytest.raises(TLQError, match="attention heads"):
        check_tensor_parallel(d, 3)
    note = check_tensor_parallel(d, 4)  # o_proj: 256 / 4 = 64 columns per rank < one group of 128
    assert "o_proj (256 inputs -> 64 per rank)" in note and "down_proj" not in note  # 512 / 4 = one group
    assert "padded group windows" in note


def test_port_in_use_is_detected():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert port_in_use("127.0.0.1", port)
    assert not port_in_use("127.0.0.1", port)


def test_start_refuses_a_busy_port(rtn_ckpt):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        server = ServerProcess(ServeConfig(model=rtn_ckpt, port=s.getsockname()[1], verify=False))
        with pytest.raises(TLQError, match="already in use"):
            server.start()
    assert server.proc is None and server.stop() is None


def test_stop_kills_the_whole_group(rtn_ckpt, tmp_path, monkeypatch):
    """A stand-in server that ignores SIGINT and forks a grandchild: both are gone after stop()."""
    import sys
    import time

    import psutil
    script = ("import os, signal, subprocess, sys, time\n"
              "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
              "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
              "time.sleep(600)\n")
    monkeypatch.setattr("serve.process.vllm_command", lambda cfg: [sys.executable, "-c", script])
    server = ServerProcess(ServeConfig(model=rtn_ckpt, port=18497, run_dir=tmp_path, verify=False))
    server.start()
    deadline = time.monotonic() + 20
    while len(server.descendants()) < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    kids = server.descendants()
    assert kids
    rc = server.stop(signal.SIGINT, grace=1.0)
    assert rc == -signal.SIGKILL
    for pid in kids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert (tmp_path / "server.log").exists()


@pytest.mark.parametrize("mode, flag", [("exact", "0"), ("fast", "1")])
def test_cpu_int4_sets_the_plugin_and_vllm_switches(rtn_ckpt, tmp_path, mode, flag):
    cfg = resolve(ServeConfig(model=rtn_ckpt, device="cpu", cpu_int4=mode), model_defaults(rtn_ckpt))
    env = vllm_env(cfg, tmp_path, base={"TLQ_CPU_FAST_INT4": "stale", "VLLM_CPU_INT4_W4A8": "stale"})
    assert env["TLQ_CPU_FAST_INT4"] == flag and env["VLLM_CPU_INT4_W4A8"] == flag  # the flag wins
    assert env["PYTHONFAULTHANDLER"] == "1"  # a crashing vLLM process leaves its stack in the log
    gpu = vllm_env(resolve(ServeConfig(model=rtn_ckpt, device="cuda", cpu_int4=mode), model_defaults(rtn_ckpt)),
                   tmp_path, base={})
    assert "TLQ_CPU_FAST_INT4" not in gpu and "VLLM_CPU_INT4_W4A8" not in gpu
    with pytest.raises(TLQError, match="--cpu-int4 must be one of exact, fast"):
        ServeConfig(model=rtn_ckpt, cpu_int4="fastest")


def test_numerics_line_says_what_runs_on_this_cpu(rtn_ckpt):
    from serve.config import numerics_line
    d = model_defaults(rtn_ckpt)
    amx = {"avx512f", "amx_tile", "amx_int8", "amx_bf16"}

    def line(mode, flags, **kw):
        return numerics_line(resolve(ServeConfig(model=rtn_ckpt, device="cpu", cpu_int4=mode, **kw), d), flags)

    assert line("exact", amx).startswith("numerics: exact W4A16 on CPU")
    assert line("fast", amx).startswith("numerics: fast int4 x int8 on CPU (AMX")
    assert line("fast", {"avx512f"}) == ("numerics: --cpu-int4 fast requested, but this CPU lacks amx_tile, amx_int8: "
                                         "exact W4A16 on CPU (the plugin logs the kernel per layer)")
    assert "needs bfloat16 activations, not float16: exact W4A16" in line("fast", amx, dtype="float16")
    gpu = numerics_line(resolve(ServeConfig(model=rtn_ckpt, device="cuda", cpu_int4="fast"), d))
    assert gpu.startswith("numerics: vLLM's GPU kernels")
