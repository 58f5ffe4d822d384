"""Benchmark output: a table on the terminal, a JSON file, a PNG plot (when matplotlib is installed)."""
from __future__ import annotations

import sys
from pathlib import Path


def _fmt(v, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def console():
    """A rich console at least 160 columns wide: logs and pipes would otherwise wrap tables at 80."""
    from rich.console import Console
    c = Console()
    return c if c.is_terminal else Console(width=max(c.width, 160))


def print_levels(result: dict, title: str) -> None:
    from rich.table import Table

    table = Table(title=title)
    for col in ("conc", "ok/sent", "img", "err", "req/s", "out tok/s", "latency ms p50/p90/p99",
                "TTFT ms p50/p90/p99", "TPOT ms p50/p90/p99", "ITL ms p50/p90/p99", "server RSS MiB"):
        table.add_column(col, justify="right")
    for lv in result["levels"]:
        table.add_row(str(lv["concurrency"]), f"{lv['completed']}/{lv['sent']}", str(lv["image_requests"]),
                      str(lv["errors"]), _fmt(lv["request_per_s"], ".2f"), _fmt(lv["output_tok_per_s"]),
                      _pcts(lv["e2e_ms"], ".0f"), _pcts(lv["ttft_ms"], ".0f"), _pcts(lv["tpot_ms"]),
                      _pcts(lv["itl_ms"]), _fmt(lv.get("server_rss_mib"), ".0f"))
    console().print(table)


def _pcts(dist: dict, spec: str = ".1f") -> str:
    return "/".join(_fmt(dist[k], spec) for k in ("p50", "p90", "p99"))


def print_ratios(rows: list[dict], subject: str, reference: str) -> None:
    from rich.table import Table

    table = Table(title=f"{subject} / {reference} (throughput > 1 and latency < 1 favour {subject})")
    cols = ("concurrency", "output_tok_per_s", "request_per_s", "ttft_p50", "tpot_p50", "itl_p99")
    for col in cols:
        table.add_column(col, justify="right")
    for row in rows:
        table.add_row(*(str(row[c]) if c == "concurrency" else _fmt(row[c], ".2f") for c in cols))
    console().print(table)


def write_json(path: Path, data: dict) -> None:
    from tlq.atomic import write_json_atomic
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, data)


def plot(runs: dict[str, dict], path: Path) -> bool:
    """Throughput and p50/p99 latencies against concurrency, one line per run; False when skipped."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib, or the 'dev' extra)",
              file=sys.stderr)
        return False
    panels = (("output_tok_per_s", None, "output tokens / s"), ("e2e_ms", ("p50", "p99"), "request latency (ms)"),
              ("ttft_ms", ("p50", "p99"), "TTFT (ms)"), ("tpot_ms", ("p50", "p99"), "TPOT (ms)"))
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, pcts, label) in zip(axes.flat, panels):
        for n, (name, run) in enumerate(runs.items()):
            xs = [lv["concurrency"] for lv in run["levels"]]
            color = colors[n % len(colors)]
            if pcts is None:
                ax.plot(xs, [lv[key] for lv in run["levels"]], marker="o", color=color, label=name)
            for pct in pcts or ():
                ys = [lv[key][pct] for lv in run["levels"]]
                ax.plot(xs, [float("nan") if y is None else y for y in ys], marker="o", color=color,
                        linestyle="-" if pct == "p50" else "--", label=f"{name} {pct}")
        ax.set_xscale("log", base=2)
        ticks = sorted({lv["concurrency"] for run in runs.values() for lv in run["levels"]})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel("concurrency")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("tlq bench (vllm bench serve, random-mm)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return True
