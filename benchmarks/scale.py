"""Calibration at real width with a growing calibration set: flat memory, linear time, exact spilling.

    python -m benchmarks.scale [--tokens 8192,32768,131072] [--tokens-per-sample 1024] [--method tlq]
                               [--work DIR] [--host-memory 0.1] [--ram-check TOKENS] [--damp-candidates 0.01,0.1]

Builds the `2b` fixture (Qwen2-VL-2B's text widths: hidden 1536, MLP 8960, 12 heads of 128; 2
layers), writes calibration sets of N samples of about T tokens each (a generated picture plus a
long question and answer), and calibrates each size in a fresh process (OMP_NUM_THREADS=1) with the
hidden-state streams spilled to the work folder (`--host-memory`), so that nothing the host holds
should grow with tokens. One size (`--ram-check`, default the second) runs again with its streams
in RAM: the two checkpoints must be identical. Per size it prints wall time, wall per 1k tokens, peak RSS (the child's
ru_maxrss) with its ratio to the smallest size, and the `--dry-run` host estimate against the
measured peak.

Targets (issue 14): peak RSS at the largest size <= 1.15x the smallest; wall about linear in
tokens; identical checkpoints with and without spilling; dry run within +-15% of each peak.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.dry_run import host_peaks_gib

REPO = Path(__file__).resolve().parents[1]
WORDS = ("the", "circle", "square", "triangle", "blue", "red", "green", "yellow", "harbour", "boat",
         "sky", "sunset", "small", "large", "near", "far", "left", "right", "above", "below", "picture",
         "colour", "shape", "count", "two", "three", "four", "five", "one", "seven", "and", "with",
         "of", "in", "is", "a", "on", "at")


def write_calibration(folder: Path, samples: int, tokens_per_sample: int, seed: int = 0) -> Path:
    """`samples` lines of an image question with a long answer (about tokens_per_sample tokens each)."""
    from PIL import Image, ImageDraw
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    words = max(8, int((tokens_per_sample - 64) / 1.5))  # 64 image tokens; ~1.5 tokens per word here
    lines = []
    for i in range(samples):
        image = folder / f"img-{i % 16:02d}.png"
        if not image.exists():
            pic = Image.new("RGB", (224, 224), "white")
            ImageDraw.Draw(pic).ellipse((40 + i % 16 * 5, 40, 180, 180), fill=("red", "blue", "green")[i % 3])
            pic.save(image)
        question = " ".join(rng.choice(WORDS) for _ in range(words // 2))
        answer = " ".join(rng.choice(WORDS) for _ in range(words - words // 2))
        lines.append({"id": f"s{i}", "images": [image.name], "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
            {"role": "assistant", "content": answer}]})
    path = folder / f"calib-{samples}x{tokens_per_sample}.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def calibrate(model: Path, calib: Path, out: Path, method: str, host_memory: float, search_tokens: int,
              extra: tuple[str, ...] = ()) -> dict:
    """One calibration in a fresh process: wall seconds, peak RSS (GiB), tokens, phase times."""
    cmd = [sys.executable, "-m", "tlq", "calibrate", str(model), "--calib", str(calib), "--out", str(out),
           "--method", method, "--scheme", "w4a16", "--overwrite", "--quiet", "--host-memory", str(host_memory),
           "--search-tokens", str(search_tokens), *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    t0 = time.time()
    log = out.parent / f"{out.name}.log"
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.time() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"calibration failed ({os.waitstatus_to_exitcode(status)}); see {log}")
    manifest = json.loads((out / "tlq_manifest.json").read_text())
    report = json.loads((out / "tlq_report.json").read_text())
    stats = manifest["calibration"]["token_stats"]
    tokens = stats.get("tokens") or sum(stats["tokens_per_modality"].values())
    return {"wall": wall, "rss_gib": usage.ru_maxrss / 2**20, "tokens": tokens,
            "phases": report.get("phase_seconds", {})}


def dry_run_host_gib(model: Path, calib: Path, out: Path, method: str, host_memory: float,
                     search_tokens: int, extra: tuple[str, ...] = ()) -> float | None:
    """The `--dry-run` host peak of rank 0 (None when the table cannot be read)."""
    peaks = host_peaks_gib([str(model), "--calib", str(calib), "--out", str(out), "--method", method,
                            "--scheme", "w4a16", "--host-memory", str(host_memory),
                            "--search-tokens", str(search_tokens), *extra])
    return None if peaks is None else peaks[0]


def tensor_hashes(path: Path) -> dict:
    from tlq.multirank.writer import tensor_hashes as hashes
    return hashes(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="8192,32768,131072", help="calibration tokens per run, comma-separated")
    ap.add_argument("--tokens-per-sample", type=int, default=1024)
    ap.add_argument("--method", default="tlq")
    ap.add_argument("--host-memory", type=float, default=0.1,
                    help="GiB; the streams spill above half of it (at every size here)")
    ap.add_argument("--search-tokens", type=int, default=4096,
                    help="the searches' token budget (sizes below it also grow the searches' memory)")
    ap.add_argument("--ram-check", type=int, default=None,
                    help="tokens of the size rerun with its streams in RAM (default: the second size, or the only "
                         "one; 0: none); its checkpoint must equal the spilled run's")
    ap.add_argument("--damp-candidates", default=None,
                    help="passed to tlq calibrate (held-out damping choice, tlq/calib/held_out_damping.py)")
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "tlq-scale")
    args = ap.parse_args()
    extra = () if args.damp_candidates is None else ("--damp-candidates", args.damp_candidates)
    sys.path.insert(0, str(REPO))
    from tlq.fixtures import ensure_fixture
    args.work.mkdir(parents=True, exist_ok=True)
    model = ensure_fixture("qwen2-vl", args.work / "fixtures", seed=0, size="2b")
    sizes = [int(t) for t in args.tokens.split(",")]
    if args.ram_check and args.ram_check not in sizes:
        ap.error(f"--ram-check {args.ram_check} is not one of --tokens {args.tokens}")
    rows = []
    print(f"2b fixture (hidden 1536, MLP 8960, 2 layers), method {args.method} w4a16, one thread, "
          f"streams spilled above {args.host_memory} GiB" + (f", {' '.join(extra)}" if extra else ""), flush=True)
    for total in sizes:
        samples = max(1, total // args.tokens_per_sample)
        calib = write_calibration(args.work / "data", samples, args.tokens_per_sample)
        out = args.work / f"ckpt-{total}"
        row = calibrate(model, calib, out, args.method, args.host_memory, args.search_tokens, extra)
        row["dry_gib"] = dry_run_host_gib(model, calib, args.work / "dry", args.method, args.host_memory,
                                          args.search_tokens, extra)
        row["calib"], row["out"] = calib, out
        rows.append(row)
        print(f"  {row['tokens']:>7} tokens  {row['wall']:8.1f} s  peak RSS {row['rss_gib']:.2f} GiB  "
              f"dry run {row['dry_gib'] if row['dry_gib'] is not None else '?'} GiB", flush=True)
    base = rows[0]
    print(f"\n{'tokens':>8} {'wall s':>8} {'s / 1k tok':>10} {'vs first':>9} {'peak RSS GiB':>13} "
          f"{'RSS vs first':>12} {'dry run GiB':>12} {'dry / measured':>14}")
    for r in rows:
        per_k = r["wall"] / r["tokens"] * 1000
        dry = r["dry_gib"]
        dry_text = "?" if dry is None else f"{dry:.2f}"
        ratio_text = "?" if dry is None else f"{dry / r['rss_gib']:.2f}x"
        print(f"{r['tokens']:>8} {r['wall']:>8.1f} {per_k:>10.2f} {per_k / (base['wall'] / base['tokens'] * 1000):>8.2f}x "
              f"{r['rss_gib']:>13.2f} {r['rss_gib'] / base['rss_gib']:>11.2f}x {dry_text:>12} {ratio_text:>14}")
    last, same = rows[-1], None
    check = args.ram_check if args.ram_check is not None else sizes[min(1, len(sizes) - 1)]
    if check:
        spilled = rows[sizes.index(check)]
        ram = calibrate(model, spilled["calib"], args.work / "ckpt-ram", args.method, 1024.0, args.search_tokens,
                        extra)
        same = tensor_hashes(spilled["out"]) == tensor_hashes(args.work / "ckpt-ram")
        print(f"\n{spilled['tokens']} tokens with streams in RAM: {ram['wall']:.1f} s, peak RSS {ram['rss_gib']:.2f} GiB; "
              f"checkpoint {'identical' if same else 'DIFFERENT'} to the spilled run")
    print(f"targets: RSS largest/smallest {last['rss_gib'] / base['rss_gib']:.2f}x (<= 1.15x); wall per token "
          f"largest/smallest {(last['wall'] / last['tokens']) / (base['wall'] / base['tokens']):.2f}x (about 1); "
          f"spilled == in RAM: {same}")
    print("phases of the largest run (s): " + ", ".join(f"{k} {v:.1f}" for k, v in last["phases"].items()))


if __name__ == "__main__":
    main()
