"""`tlq serve`, `tlq bench`, `tlq eval` and `tlq demo`: serving a checkpoint and measuring it."""
from __future__ import annotations

import enum
from pathlib import Path

import typer

from serve.config import CPU_INT4_MODES
from tlq.errors import TLQError

CpuInt4 = enum.Enum("CpuInt4", {mode: mode for mode in CPU_INT4_MODES}, type=str)


def _int_list(text: str, what: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise TLQError(f"{what} must be comma-separated integers, e.g. 1,4,16; got {text!r}") from None


def serve(
    ckpt: Path = typer.Argument(..., help="checkpoint folder written by `tlq calibrate` (or a float model folder)"),
    tp: int = typer.Option(1, "--tp", help="tensor-parallel size (GPUs; on the CPU build, ranks pinned to cores)"),
    host: str = typer.Option("127.0.0.1", help="address to bind; 0.0.0.0 exposes the server to the network"),
    port: int = typer.Option(8000, help="port of the OpenAI-compatible API"),
    api_key: str | None = typer.Option(None, envvar="TLQ_API_KEY",
                                       help="require this bearer token (also read from $TLQ_API_KEY)"),
    served_model_name: str | None = typer.Option(None, help="model name clients use (default: folder name)"),
    max_model_len: int | None = typer.Option(None, help="context length (default: the config's, capped at 8192)"),
    images_per_prompt: int | None = typer.Option(None, help="images per request (default: 1 for a VLM)"),
    dtype: str | None = typer.Option(None, help="activation dtype (default: the checkpoint's)"),
    max_num_seqs: int | None = typer.Option(None, help="sequences batched per step (vLLM's default)"),
    gpu_memory_utilization: float | None = typer.Option(None, help="GPU memory fraction (GPU only)"),
    run_dir: Path | None = typer.Option(None, help="folder for the server log, temp files and caches"),
    startup_timeout: float = typer.Option(600.0, help="seconds to wait for the server to be ready"),
    no_verify: bool = typer.Option(False, "--no-verify", help="skip hashing the checkpoint (shapes still checked by vLLM)"),
    cpu_int4: CpuInt4 = typer.Option(
        CpuInt4.exact, "--cpu-int4", case_sensitive=False,
        help="CPU numerics of 4-bit weight-only layers: exact = W4A16 (16-bit activations x dequantized "
             "int4 weights); fast = int4 x int8 (activations quantized to int8 per token) on AMX CPUs with "
             "bf16 activations, faster (2.3x decode at batch 1 measured on one AMX Xeon), slightly "
             "different outputs; CPUs without AMX "
             "fall back to exact (the plugin logs which kernel each layer uses)"),
    vllm_arg: list[str] = typer.Option([], "--vllm-arg", help="extra argument for `vllm serve` (repeatable)"),
) -> None:
    """Serve CKPT behind vLLM's OpenAI-compatible API until Ctrl-C (or SIGTERM).

    If the engine dies (crash, signal, OOM kill), exits non-zero within seconds with one line
    naming the dead process, its signal and its last Python frame; the run folder and log are kept.
    """
    from serve.config import ServeConfig
    from serve.launcher import serve_forever

    cfg = ServeConfig(model=ckpt, host=host, port=port, tp=tp, api_key=api_key,
                      served_model_name=served_model_name, max_model_len=max_model_len,
                      images_per_prompt=images_per_prompt, dtype=dtype, max_num_seqs=max_num_seqs,
                      gpu_memory_utilization=gpu_memory_utilization, run_dir=run_dir,
                      startup_timeout=startup_timeout, verify=not no_verify, cpu_int4=cpu_int4.value,
                      extra_args=list(vllm_arg))
    rc = serve_forever(cfg, echo=typer.echo)
    if rc:
        raise typer.Exit(rc)


def bench(
    target: str = typer.Argument(..., help="a local URL (http://127.0.0.1:PORT/v1) or a checkpoint folder to serve for the run"),
    compare: str | None = typer.Option(None, help="second URL or folder (e.g. the float model) with the same workload"),
    concurrency: str = typer.Option("1,4,16", help="concurrency levels, comma-separated (vLLM's --max-concurrency)"),
    requests: int = typer.Option(32, help="requests per round of a level (vLLM's --num-prompts)"),
    min_seconds: float = typer.Option(0.0, help="repeat rounds until a level has been under load this long (0: one round)"),
    max_tokens: int = typer.Option(64, help="output tokens per request"),
    input_tokens: int = typer.Option(32, help="text tokens per prompt"),
    image_sizes: str = typer.Option("224,448", help="square image sides in pixels, comma-separated"),
    image_fraction: float = typer.Option(0.5, help="share of requests with an image: 0, 0.5 or 1"),
    warmup: int = typer.Option(2, help="untimed requests before each level"),
    seed: int = typer.Option(0, help="workload seed"),
    port: int = typer.Option(18400, help="port for a folder served for the run (--compare uses port + 1)"),
    api_key: str | None = typer.Option(None, envvar="TLQ_API_KEY", help="bearer token of the server"),
    model: str | None = typer.Option(None, help="served model name at TARGET (default: its first)"),
    max_num_seqs: int | None = typer.Option(None, help="--max-num-seqs of servers started here"),
    out: Path | None = typer.Option(None, "--out", "-o",
                                    help="folder for bench.json, bench.png and vLLM's result JSON"),
) -> None:
    """Load-test TARGET with vLLM's serving benchmark: latency percentiles and throughput per concurrency."""
    from tlq.bench import BenchConfig, BenchTargets
    from tlq.bench import bench as run

    cfg = BenchConfig(concurrency=_int_list(concurrency, "--concurrency"), requests=requests,
                      min_seconds=min_seconds, max_tokens=max_tokens, input_tokens=input_tokens,
                      image_sizes=_int_list(image_sizes, "--image-sizes"), image_fraction=image_fraction,
                      warmup=warmup, seed=seed)
    overrides = {"max_num_seqs": max_num_seqs} if max_num_seqs else None
    result = run(BenchTargets(target, compare, port, api_key, model, overrides), cfg, out=out, echo=typer.echo)
    if any(lv["errors"] for r in result["runs"].values() for lv in r["levels"]):
        typer.echo("some requests failed: see the error counts above", err=True)
        raise typer.Exit(1)


def eval_command(
    ckpt: str = typer.Argument(..., help="quantized checkpoint folder (or a local URL serving it)"),
    fp: str = typer.Option(..., "--fp", help="the float model folder (or a local URL serving it)"),
    data: Path | None = typer.Option(None, help="QA JSONL in the calibration format (default: the bundled set)"),
    backend: str = typer.Option("endpoint", help="endpoint (vLLM serves each model) or transformers (dequantized)"),
    max_samples: int | None = typer.Option(None, help="evaluate at most N questions"),
    max_new_tokens: int = typer.Option(32, help="tokens generated per answer (greedy)"),
    top_k: int = typer.Option(10, help="endpoint backend: logprobs per position for the KL estimate"),
    port: int = typer.Option(18400, help="port for folders served here (the float model uses port + 1)"),
    api_key: str | None = typer.Option(None, envvar="TLQ_API_KEY", help="bearer token of URL targets"),
    out: Path | None = typer.Option(None, "--out", "-o", help="write per-question results and the table as JSON"),
) -> None:
    """Accuracy of CKPT against its float model: exact match, agreement and KL, split by question type."""
    from tlq.bench.report import write_json
    from tlq.evaluate import EvalConfig, evaluate, print_table

    result = evaluate(EvalConfig(ckpt, fp, data, backend, max_samples, max_new_tokens, top_k, port, api_key),
                      echo=typer.echo)
    print_table(result)
    if out is not None:
        write_json(out, result)
        typer.echo(f"results written to {out}")


def demo(
    workdir: Path | None = typer.Option(None, help="where the demo checkpoint goes (default: $TMPDIR/tlq-demo)"),
    port: int = typer.Option(18400, help="port of the demo server"),
    method: str = typer.Option("tlq", help="calibration method"),
    scheme: str = typer.Option("w4a16", help="quantization scheme"),
) -> None:
    """Build the tiny model, calibrate it, serve it, ask it two questions, bench it, shut down."""
    from tlq.commands.demo import DemoConfig, run_demo

    cfg = DemoConfig(port=port, method=method, scheme=scheme)
    if workdir is not None:
        cfg.workdir = workdir
    run_demo(cfg, echo=typer.echo)


def register(app: typer.Typer) -> None:
    app.command()(serve)
    app.command()(bench)
    app.command("eval")(eval_command)
    app.command()(demo)
