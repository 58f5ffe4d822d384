"""Aggregate cell results over seeds and render them: JSON, Markdown (paper-table layout), PNG chart.

Avg is the macro average of exact-match accuracy over question types (as the MBQ/TLQ tables
average over benchmarks); recovery is Avg / FP Avg; KL is the mean KL(FP || quantized) per
answer token. Every number is mean ± sample standard deviation over calibration seeds.
Peer rows (lc-*, benchmarks/quality_lib/peers.py) are llm-compressor's methods on the same samples;
`peer_rows` sets each of our baselines against its peer by the ratio of their KLs.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

from benchmarks.fixtures.tasks import IMAGE_TYPES, TEXT_TYPES
from benchmarks.quality_lib import peers
from benchmarks.quality_lib.grid import BASELINES, LABELS, SENSITIVITY, SETTINGS
from tlq.atomic import write_atomic, write_file_atomic

TYPES = IMAGE_TYPES + TEXT_TYPES
ROW_LABELS = {**LABELS, **peers.LABELS}
PEER_TOLERANCE = 0.15  # issue 15: our GPTQ/AWQ/SmoothQuant within +-15 % of llm-compressor's KL


def mean_std(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def macro_accuracy(summary: dict) -> float:
    present = [t for t in TYPES if t in summary]
    return sum(summary[t]["accuracy"] for t in present) / len(present)


def cell_metrics(summary: dict, fp_avg: float) -> dict:
    avg = macro_accuracy(summary)
    out = {"avg": avg, "recovery": 100.0 * avg / fp_avg if fp_avg else float("nan"),
           "needs_image": summary["needs_image"]["accuracy"], "text_only": summary["text_only"]["accuracy"],
           "kl": summary["all"].get("kl", 0.0), "kl_image": summary.get("needs_image", {}).get("kl", 0.0),
           "kl_text": summary.get("text_only", {}).get("kl", 0.0)}
    out.update({t: summary[t]["accuracy"] for t in TYPES if t in summary})
    return out


def aggregate(records: list[dict], fp: dict[str, dict]) -> dict:
    """{model: {setting: {method: {metric: [mean, std], "seeds": n}}}} plus the FP rows."""
    cells = defaultdict(list)
    for r in records:
        cells[(r["model"], r["setting"], r["method"])].append(cell_metrics(r["summary"], macro_accuracy(fp[r["model"]])))
    table: dict = {m: {"FP": {"fp": {k: [v, 0.0] for k, v in cell_metrics(s, macro_accuracy(s)).items()}}}
                   for m, s in fp.items()}
    for (model, setting, method), runs in cells.items():
        entry = {k: list(mean_std([run[k] for run in runs])) for k in runs[0]}
        entry["seeds"] = len(runs)
        table.setdefault(model, {}).setdefault(setting, {})[method] = entry
    order = ["FP"] + [s.label for s in SETTINGS.values()]  # the papers' column order, not finishing order
    return {m: dict(sorted(t.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))
            for m, t in table.items()}


def verdicts(table: dict) -> list[dict]:
    """TLQ against the best baseline of each (model, setting), by Avg and by KL."""
    rows = []
    for model, settings in table.items():
        for setting, methods in settings.items():
            if "tlq" not in methods:
                continue
            base = {m: v for m, v in methods.items() if m in BASELINES}
            if not base:
                continue
            best_acc = max(base, key=lambda m: base[m]["avg"][0])
            best_kl = min(base, key=lambda m: base[m]["kl"][0])
            t = methods["tlq"]
            rows.append({"model": model, "setting": setting,
                         "tlq_avg": t["avg"], "best_baseline_avg": [best_acc, *base[best_acc]["avg"]],
                         "avg_margin": t["avg"][0] - base[best_acc]["avg"][0],
                         "tlq_kl": t["kl"], "best_baseline_kl": [best_kl, *base[best_kl]["kl"]],
                         "kl_ratio": t["kl"][0] / base[best_kl]["kl"][0] if base[best_kl]["kl"][0] else float("nan"),
                         # where the KL is: questions that need the image, and text-only ones (means over seeds)
                         "tlq_kl_split": [t["kl_image"][0], t["kl_text"][0]],
                         "best_baseline_kl_split": [base[best_kl]["kl_image"][0], base[best_kl]["kl_text"][0]],
                         "wins_avg": t["avg"][0] >= base[best_acc]["avg"][0],
                         "wins_kl": t["kl"][0] <= base[best_kl]["kl"][0]})
    return rows


def peer_rows(table: dict) -> list[dict]:
    """Each of our baselines against llm-compressor's same method: KL ratio ours / peer and a verdict."""
    rows = []
    for model, settings in table.items():
        for setting, methods in settings.items():
            for peer in [*peers.PEERS, *peers.VARIANTS]:
                ours = peers.our_method(peer)
                if peer not in methods or ours not in methods:
                    continue
                o, p = methods[ours], methods[peer]
                ratio = o["kl"][0] / p["kl"][0] if p["kl"][0] else float("nan")
                verdict = ("within" if abs(ratio - 1) <= PEER_TOLERANCE else
                           "ours better" if ratio < 1 else "peer better")
                rows.append({"model": model, "setting": setting, "method": ours, "peer": peer, "ours_kl": o["kl"],
                             "peer_kl": p["kl"], "kl_ratio": ratio, "ours_avg": o["avg"], "peer_avg": p["avg"],
                             "seeds": [o["seeds"], p["seeds"]], "verdict": verdict})
    return rows


def sensitivity_rows(sens: dict[str, dict], fp: dict[str, dict]) -> list[dict]:
    """The fixture check: RTN g64 accuracy drop per bit width against the issue's thresholds."""
    rows = []
    for model, by_scheme in sens.items():
        fp_acc = fp[model]["all"]["accuracy"]
        drops = {name: fp_acc - by_scheme[name]["all"]["accuracy"] for name in SENSITIVITY if name in by_scheme}
        kls = {name: by_scheme[name]["all"].get("kl", 0.0) for name in drops}
        ok = drops.get("w4a16", 0) <= 1.0 and drops.get("w3a16", 0) >= 3.0 and drops.get("w2a16", 0) >= 10.0
        rows.append({"model": model, "fp_accuracy": fp_acc, "drop": drops, "kl": kls, "meets_targets": ok})
    return rows


def _pm(pair, digits=1, scale=1.0) -> str:
    m, s = pair[0] * scale, pair[1] * scale
    return f"{m:.{digits}f} ± {s:.{digits}f}" if s else f"{m:.{digits}f}"


def _split(pair) -> str:
    return "-" if not pair else f"{1e3 * pair[0]:.3f} / {1e3 * pair[1]:.3f}"


def markdown(table: dict, sens: list[dict], wins: list[dict], meta: dict, peer: list[dict] = ()) -> str:
    intro = (f"Calibration: {meta['calib_samples']} samples drawn per seed from a pool of {meta['pool_size']}; "
             f"seeds {meta['seeds']}; test questions: {meta['test_size']} "
             f"({meta['test_image']} need the image, {meta['test_text']} text only). "
             "Accuracy = greedy exact match (%); Avg = macro average over question types; "
             "Rec. = Avg / FP Avg; KL = mean KL(FP || quantized) per answer token (teacher-forced), x1e-3. "
             "mean ± std over seeds (RTN uses no data: one run). "
             f"Grid cells took {meta.get('cell_minutes', '?')} min of calibration + evaluation in all "
             f"(this invocation: {meta.get('minutes', '?')} min wall, {meta.get('jobs', 1)} process(es), 1 thread each; "
             "cells finished earlier are reused from results-*.jsonl). "
             + (f"Models: the trained fixtures with outlier channels {meta['outliers']} "
                "(benchmarks/fixtures/outliers.py)." if meta.get("outliers") else
                "Models: the plain trained fixtures (--outliers none)."))
    lines = [f"# TLQ quality benchmark ({meta.get('mode', 'full')} run, {meta.get('split', 'test')} split)", "", intro, ""]
    if sens:
        lines += ["## Fixture sensitivity (RTN, group size 64, asymmetric)", "",
                  "| model | FP acc | W4 g64 drop | W3 g64 drop | W2 g64 drop | KL W4 / W3 / W2 (x1e-3) | "
                  "targets (<=1 / >=3 / >=10) | W4 g64 symmetric: drop, KL (not judged) |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        nan = float("nan")
        for r in sens:
            d, k = r["drop"], r["kl"]
            lines.append(f"| {r['model']} | {r['fp_accuracy']:.1f} | {d.get('w4a16', nan):.1f} | "
                         f"{d.get('w3a16', nan):.1f} | {d.get('w2a16', nan):.1f} | "
                         f"{' / '.join(f'{1e3 * k[n]:.1f}' for n in ('w4a16', 'w3a16', 'w2a16') if n in k)} | "
                         f"{'met' if r['meets_targets'] else 'NOT met'} | "
                         f"{d.get('w4a16-sym', nan):.1f}, {1e3 * k.get('w4a16-sym', nan):.1f} |")
        lines.append("")
    types = [t for t in TYPES if any(t in m for s in table.values() for ms in s.values() for m in ms.values())]
    head = "| Setting | Method | " + " | ".join(types) + " | Image | Text | Avg | Rec. % | KL |"
    for model, settings in table.items():
        lines += [f"## {model}", "", head, "|" + " --- |" * (len(types) + 7)]
        for setting, methods in settings.items():
            order = [m for m in ROW_LABELS if m in methods] + [m for m in methods if m not in ROW_LABELS]
            for method in order:
                v = methods[method]
                lines.append(f"| {setting} | {ROW_LABELS.get(method, method)} | " +
                             " | ".join(f"{v[t][0]:.1f}" if t in v else "-" for t in types) +
                             f" | {v['needs_image'][0]:.1f} | {v['text_only'][0]:.1f} | {_pm(v['avg'])} | "
                             f"{v['recovery'][0]:.1f} | {_pm(v['kl'], 2, 1e3)} |")
        lines.append("")
    if wins:
        lines += ["## TLQ against the best baseline per setting", "",
                  ("KL split: mean KL on the questions that need the image / on the text-only ones, TLQ then the "
                   "best baseline by KL (x1e-3)."), "",
                  ("| model | setting | TLQ Avg | best baseline Avg | margin | TLQ KL | best baseline KL | KL ratio | "
                   "KL split image / text |"),
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for w in wins:
            ba, bk = w["best_baseline_avg"], w["best_baseline_kl"]
            lines.append(f"| {w['model']} | {w['setting']} | {_pm(w['tlq_avg'])} | {ba[0]} {_pm(ba[1:])} | "
                         f"{w['avg_margin']:+.1f} | {_pm(w['tlq_kl'], 2, 1e3)} | {bk[0]} {_pm(bk[1:], 2, 1e3)} | "
                         f"{w['kl_ratio']:.2f} | {_split(w.get('tlq_kl_split'))} vs {_split(w.get('best_baseline_kl_split'))} |")
        lines.append("")
    if peer:
        lines += ["## Our baselines against llm-compressor (same samples, same scorer)", "",
                  f"KL x1e-3; ratio = ours / llm-compressor; within = ratio in [{1 - PEER_TOLERANCE:.2f}, "
                  f"{1 + PEER_TOLERANCE:.2f}].", "",
                  "| model | setting | ours | peer | ours KL | peer KL | ratio | verdict | ours Avg | peer Avg |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in peer:
            lines.append(f"| {r['model']} | {r['setting']} | {ROW_LABELS[r['method']]} | {ROW_LABELS[r['peer']]} | "
                         f"{_pm(r['ours_kl'], 2, 1e3)} | "
                         f"{_pm(r['peer_kl'], 2, 1e3)} | {r['kl_ratio']:.2f} | {r['verdict']} | {_pm(r['ours_avg'])} | "
                         f"{_pm(r['peer_avg'])} |")
        lines.append("")
    return "\n".join(lines)


def chart(table: dict, path: Path) -> Path | None:
    """KL (log scale) and Avg accuracy per setting and method, one column per model."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    models = list(table)
    fig, axes = plt.subplots(2, len(models), figsize=(7 * len(models), 8), squeeze=False)
    for col, model in enumerate(models):
        settings = [s for s in table[model] if s != "FP"]
        methods = [m for m in ROW_LABELS if any(m in table[model][s] for s in settings)]
        width = 0.8 / max(1, len(methods))
        colours = plt.get_cmap("tab20")
        for row, metric in enumerate(("kl", "avg")):
            ax = axes[row][col]
            for j, method in enumerate(methods):
                offset = (j - (len(methods) - 1) / 2) * width
                xs = [i + offset for i, s in enumerate(settings) if method in table[model][s]]
                vals = [table[model][s][method][metric] for s in settings if method in table[model][s]]
                ax.bar(xs, [v[0] for v in vals], width, yerr=[v[1] for v in vals], label=ROW_LABELS[method].strip(" -"),
                       color=colours(j % colours.N))  # tab10 would repeat a colour past 10 methods
            if metric == "avg":
                ax.axhline(table[model]["FP"]["fp"]["avg"][0], color="k", ls="--", lw=1, label="FP")
            ax.set_xticks(range(len(settings)), settings)
            ax.set_yscale("log" if metric == "kl" else "linear")
            ax.set_title(f"{model}: {'KL to FP per answer token' if metric == 'kl' else 'Avg exact match (%)'}")
        axes[0][col].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return path


def write_reports(out: Path, table: dict, sens: list[dict], wins: list[dict], meta: dict,
                  peer: list[dict] = ()) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "quality.json", "md": out / "quality.md", "png": out / "quality.png"}
    for key, text in (("json", json.dumps({"meta": meta, "table": table, "sensitivity": sens, "tlq_vs_best": wins,
                                           "ours_vs_peer": list(peer)}, indent=1)),
                      ("md", markdown(table, sens, wins, meta, peer))):
        write_file_atomic(paths[key], text + "\n")
    if chart(table, paths["png"]) is None:
        del paths["png"]
    return paths
