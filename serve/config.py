"""What `tlq serve` starts: settings, defaults read from the model folder, the vLLM command line and env.

Everything here is pure (no process is started), so the launcher's decisions are unit-tested
without vLLM: which checkpoint checks run, which vLLM flags and environment a CPU or GPU
machine gets, how tensor-parallel ranks are pinned to cores.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tlq.errors import TLQError

# vLLM would otherwise size each sequence's KV budget for the model's full context
# (32k for Qwen2-VL); longer contexts are an explicit --max-model-len away.
DEFAULT_MAX_MODEL_LEN_CAP = 8192
# Row-parallel linears: tensor parallelism splits their input dimension (K) across ranks.
ROW_PARALLEL_SUFFIXES = ("o_proj", "down_proj", "out_proj", "fc2")
# --cpu-int4: numerics of 4-bit weight-only layers on the CPU build (read by vllm_plugin/backends.py)
CPU_INT4_MODES = ("exact", "fast")


@dataclass(frozen=True)
class ModelDefaults:
    """Serving defaults read from a model folder.

    Attributes:
        path: the resolved folder.
        name: served model name (the folder's name).
        max_model_len: context length: the config's max_position_embeddings, capped.
        images_per_prompt: 1 for a vision-language model, 0 for a text-only one.
        dtype: the weights' dtype as vLLM spells it (bfloat16, float16, float32).
        quantized: True for a TLQ checkpoint (verified), False for a float model folder.
        scheme: the TLQ scheme name, or None for a float model.
        num_heads: attention heads of the language model (tensor-parallel divisibility).
    """

    path: Path
    name: str
    max_model_len: int
    images_per_prompt: int
    dtype: str
    quantized: bool
    scheme: str | None
    num_heads: int | None


def read_config(path: Path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise TLQError(f"model folder {path} does not exist; pass a checkpoint folder written by `tlq calibrate`")
    try:
        return json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise TLQError(f"{path} has no config.json; pass a checkpoint or Hugging Face model folder") from None
    except json.JSONDecodeError as exc:
        raise TLQError(f"{path / 'config.json'} is not valid JSON ({exc.msg}); re-create the checkpoint") from None


def model_defaults(path: Path, verify: bool = True) -> ModelDefaults:
    """Defaults for serving `path`; a TLQ checkpoint is verified (hashes, tensor shapes) first.

    A folder without a quantization_config (the float model, e.g. for `tlq bench --compare`)
    is served as is; a foreign quantization method is left to vLLM.
    """
    path = Path(path).resolve()
    config = read_config(path)
    qcfg = config.get("quantization_config") or {}
    scheme = None
    if qcfg.get("quant_method") == "tlq":
        from tlq.format.checkpoint import read_checkpoint_info, verify_checkpoint
        info = verify_checkpoint(path) if verify else read_checkpoint_info(path)
        scheme = info.quant_config.get("scheme")
    text = config.get("text_config") or config
    max_pos = text.get("max_position_embeddings") or config.get("max_position_embeddings") or 4096
    dtype = str(config.get("torch_dtype") or config.get("dtype") or text.get("dtype") or "bfloat16")
    return ModelDefaults(
        path=path, name=path.name, max_model_len=min(int(max_pos), DEFAULT_MAX_MODEL_LEN_CAP),
        images_per_prompt=1 if "vision_config" in config else 0, dtype=dtype.replace("torch.", ""),
        quantized=scheme is not None, scheme=scheme, num_heads=text.get("num_attention_heads"))


@dataclass
class ServeConfig:
    """Settings of one `tlq serve` run; None fields take the model folder's defaults.

    Attributes:
        model: checkpoint (or float model) folder.
        host / port: where the OpenAI-compatible API listens (127.0.0.1 unless told otherwise).
        tp: tensor-parallel size (GPUs, or CPU ranks pinned to disjoint cores on the CPU build).
        api_key: required bearer token; passed to vLLM through VLLM_API_KEY, never on the command line.
        served_model_name / max_model_len / images_per_prompt / dtype: override the folder's defaults.
        max_num_seqs: concurrent sequences per engine step (vLLM's default when None).
        gpu_memory_utilization: fraction of each GPU vLLM may take (GPU only).
        run_dir: folder for the log, TMPDIR and vLLM's cache; a fresh temp folder when None.
        startup_timeout: seconds to wait for /health before giving up.
        device: "cpu" or "cuda"; detected when None.
        verify: hash-check the checkpoint before starting.
        cpu_int4: CPU numerics of 4-bit weight-only layers: "exact" (W4A16: 16-bit activations times
            the dequantized weights) or "fast" (int4 x int8: activations quantized to int8 per token,
            on AMX CPUs with bf16 activations; exact elsewhere). Sets TLQ_CPU_FAST_INT4 and vLLM's
            VLLM_CPU_INT4_W4A8 for the server, so compressed-tensors checkpoints follow it too.
        extra_args: passed through to `vllm serve` verbatim, last (they win).
    """

    model: Path
    host: str = "127.0.0.1"
    port: int = 8000
    tp: int = 1
    api_key: str | None = None
    served_model_name: str | None = None
    max_model_len: int | None = None
    images_per_prompt: int | None = None
    dtype: str | None = None
    max_num_seqs: int | None = None
    gpu_memory_utilization: float | None = None
    run_dir: Path | None = None
    startup_timeout: float = 600.0
    device: str | None = None
    verify: bool = True
    cpu_int4: str = "exact"
    extra_args: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.cpu_int4 not in CPU_INT4_MODES:
            raise TLQError(f"--cpu-int4 must be one of {', '.join(CPU_INT4_MODES)}, got {self.cpu_int4!r}")

    @property
    def base_url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{host}:{self.port}"


def detect_device() -> str:
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_thread_binding(tp: int, cores: list[int] | None = None) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for `tp` CPU ranks: disjoint contiguous core ranges, e.g. "0|1"."""
    cores = sorted(cores if cores is not None else os.sched_getaffinity(0))
    if tp > len(cores):
        raise TLQError(f"--tp {tp} needs at least {tp} CPU cores on the CPU build, this process may use "
                       f"{len(cores)}; lower --tp")
    per = len(cores) // tp
    ranges = []
    for r in range(tp):
        chunk = cores[r * per:(r + 1) * per]
        ranges.append(str(chunk[0]) if len(chunk) == 1 else f"{chunk[0]}-{chunk[-1]}")
    return "|".join(ranges)


def check_tensor_parallel(defaults: ModelDefaults, tp: int) -> str | None:
    """Refuse a TP size the model cannot be split into, before a minute of vLLM start-up is spent.

    Returns a note when some row-parallel layer's per-rank input is not whole quantization groups:
    the plugin serves those layers exactly with padded group windows (tlq.format.tensor_parallel).
    """
    if tp < 1:
        raise TLQError(f"--tp must be at least 1, got {tp}")
    if tp == 1:
        return None
    if defaults.num_heads and defaults.num_heads % tp:
        raise TLQError(f"{defaults.name} has {defaults.num_heads} attention heads, not divisible by --tp {tp}; "
                       "choose a TP size that divides it")
    if not defaults.quantized:
        return None
    from tlq.format.checkpoint import read_checkpoint_info
    from tlq.format.tensor_parallel import tp_advice
    inputs, group = {}, -1
    for layer, linfo in read_checkpoint_info(defaults.path).quantized_layers.items():
        k, group = linfo["shape"][1], linfo["group_size"]
        if layer.rsplit(".", 1)[-1] in ROW_PARALLEL_SUFFIXES:
            if k % tp:
                raise TLQError(f"{layer} has input size {k}, not divisible by --tp {tp}; choose a TP size "
                               "that divides it")
            inputs[layer] = k
    return tp_advice(inputs, tp, group)


def resolve(cfg: ServeConfig, defaults: ModelDefaults) -> ServeConfig:
    """A copy of `cfg` with every None default filled from the model folder."""
    import dataclasses
    return dataclasses.replace(
        cfg, served_model_name=cfg.served_model_name or defaults.name,
        max_model_len=cfg.max_model_len or defaults.max_model_len,
        images_per_prompt=defaults.images_per_prompt if cfg.images_per_prompt is None else cfg.images_per_prompt,
        dtype=cfg.dtype or defaults.dtype, device=cfg.device or detect_device())


def vllm_command(cfg: ServeConfig, python: str = sys.executable) -> list[str]:
    """The `python -m serve.entry serve ...` command line for a resolved config."""
    cmd = [python, "-m", "serve.entry", "serve", str(Path(cfg.model).resolve()),
           "--host", cfg.host, "--port", str(cfg.port),
           "--served-model-name", cfg.served_model_name,
           "--max-model-len", str(cfg.max_model_len), "--dtype", cfg.dtype,
           "--limit-mm-per-prompt", json.dumps({"image": cfg.images_per_prompt, "video": 0}),
           "--tensor-parallel-size", str(cfg.tp)]
    if cfg.max_num_seqs:
        cmd += ["--max-num-seqs", str(cfg.max_num_seqs)]
    if cfg.device == "cpu":
        # eager mode: no multi-second compile at start-up or on the first request
        cmd += ["--enforce-eager"]
        if cfg.tp > 1:
            cmd += ["--distributed-executor-backend", "mp"]
    elif cfg.gpu_memory_utilization:
        cmd += ["--gpu-memory-utilization", str(cfg.gpu_memory_utilization)]
    return cmd + list(cfg.extra_args)


def vllm_env(cfg: ServeConfig, run_dir: Path, base: dict | None = None) -> dict[str, str]:
    """Environment of the server process: offline, caches and temp files inside `run_dir`."""
    env = dict(os.environ if base is None else base)
    run_dir = Path(run_dir)
    env.update(
        HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1",
        # vLLM puts ZMQ sockets and vllm_dist_* files in the temp dir: keep them ours, and short
        TMPDIR=str(run_dir / "tmp"), VLLM_CACHE_ROOT=str(run_dir / "cache" / "vllm"),
        TORCHINDUCTOR_CACHE_DIR=str(run_dir / "cache" / "inductor"),
        TRITON_CACHE_DIR=str(run_dir / "cache" / "triton"),
    )
    # a fatal signal in any vLLM process prints its Python stack to the log (serve/failure.py)
    env["PYTHONFAULTHANDLER"] = "1"
    # vLLM closes a keep-alive connection after 5 s idle; a busy client pool that reuses it at that
    # moment gets "Server disconnected" on a POST it cannot retry (18 of 2048 requests, 64 clients on
    # two saturated CPUs). Keep idle connections for a minute unless the user chose otherwise.
    env.setdefault("VLLM_HTTP_TIMEOUT_KEEP_ALIVE", "60")
    env.pop("VLLM_API_KEY", None)
    if cfg.api_key:
        env["VLLM_API_KEY"] = cfg.api_key
    if cfg.device == "cpu":
        env.setdefault("VLLM_TARGET_DEVICE", "cpu")
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        # the first request would otherwise compile C++ kernels for 12-17 s
        env.setdefault("TORCHDYNAMO_DISABLE", "1")
        env.setdefault("OMP_NUM_THREADS", "1")
        fast = "1" if cfg.cpu_int4 == "fast" else "0"
        env["TLQ_CPU_FAST_INT4"] = fast  # the tlq plugin's layers
        env["VLLM_CPU_INT4_W4A8"] = fast  # vLLM's own CPUWNA16 (compressed-tensors checkpoints)
        if cfg.tp > 1:
            env.setdefault("VLLM_CPU_OMP_THREADS_BIND", cpu_thread_binding(cfg.tp))
    return env



def cpu_flags() -> set[str]:
    """This CPU's feature flags (/proc/cpuinfo; empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def numerics_line(cfg: ServeConfig, flags: set[str] | None = None) -> str:
    """What 4-bit weight-only layers compute on this machine, for the start-up output."""
    if cfg.device != "cpu":
        return "numerics: vLLM's GPU kernels (--cpu-int4 applies to the CPU build only)"
    if cfg.cpu_int4 == "exact":
        return ("numerics: exact W4A16 on CPU (16-bit activations x dequantized int4 weights; "
                "--cpu-int4 fast trades it for int4 x int8 speed on AMX CPUs)")
    flags = cpu_flags() if flags is None else flags
    missing = [f for f in ("amx_tile", "amx_int8") if f not in flags]
    if missing:
        why = f"this CPU lacks {', '.join(missing)}"
    elif cfg.dtype != "bfloat16":
        why = f"it needs bfloat16 activations, not {cfg.dtype}"
    else:
        return ("numerics: fast int4 x int8 on CPU (AMX: activations quantized to int8 per token, "
                "outputs differ slightly from exact W4A16; the plugin logs the kernel per layer)")
    return (f"numerics: --cpu-int4 fast requested, but {why}: exact W4A16 on CPU "
            "(the plugin logs the kernel per layer)")
