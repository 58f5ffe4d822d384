"""This process's resident memory, measured: the leaf every runner and phase reads.

`start_of_calibration` notes the bare runtime's RSS and limits heap slack; `trim_heap` gives
freed heap back between phases, `trim_heap_every` within a pass over the samples; `rss_mark` (TLQ_RSS_TRACE=1) traces RSS per phase; and
`write_memory_record` (TLQ_DIST_RECORD) leaves each process's peak for tests and benchmarks.
The dry-run *estimate* is tlq/multirank/estimate.py.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

from tlq.atomic import write_json_atomic


def rss_mb() -> float:
    """Current resident set size of this process (MiB), from /proc/self/statm (0 where absent)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


def rss_parts_mb() -> dict[str, float]:
    """Resident memory by kind (MiB, /proc/self/status): anonymous (heap, tensors), file-backed
    (memory-mapped weights and spilled streams: pages the kernel may drop) and shared memory."""
    parts = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("RssAnon", "RssFile", "RssShmem"):
                    parts[key[3:].lower()] = int(value.split()[0]) / 1024
    except OSError:
        pass
    return parts


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (MiB, ru_maxrss)."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@functools.cache
def _malloc_trim():
    import ctypes
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


def trim_heap() -> None:
    """Give freed heap back to the OS (glibc `malloc_trim(0)`; a no-op elsewhere).

    Peak RSS counts freed-but-kept heap: without this, what one layer's solver freed stays
    resident, fragmented, under the next layer's peak (measured ~40 MiB per layer, medium fixture)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


# A pass over the samples (the gradient pass, a layer's outputs, a group's inputs) allocates each
# sample's activations below MMAP_THRESHOLD (e.g. [1, T, H] bf16) from a heap that earlier passes left
# fragmented: they come from wherever a free chunk fits, so the pages a pass leaves resident grow with
# its number of samples while the bytes in use do not (2b fixture, gradient pass: the heap grew ~18 MiB
# per 1k-token sample, in use ~3 MiB; its peak 1376 MiB with 8 samples, 1845 with 32). Trimming after
# every TRIM_TOKENS tokens of a pass bounds this to about one sample's pages: gradient pass 1267 / 1422
# MiB, layer-0 peak 2829 -> 2720 MiB (8 samples) and 3220 -> 2876 (32; 1.14x -> 1.06x the 8's). Cost,
# medium fixture, 32 short samples: gradient pass CPU time +3.5% (+13% trimming after every sample).
TRIM_TOKENS = 1024
_TRIMMED = {"tokens": 0}


def trim_heap_every(tokens: int) -> None:
    """In a pass over the samples, after each sample of `tokens` tokens: `trim_heap` once the samples
    since the last trim hold TRIM_TOKENS tokens."""
    _TRIMMED["tokens"] += tokens
    if _TRIMMED["tokens"] >= TRIM_TOKENS:
        _TRIMMED["tokens"] = 0
        trim_heap()


# glibc's mallopt(M_MMAP_THRESHOLD): blocks at least this large get their own mapping, which goes
# back to the OS the moment it is freed. Setting it also stops glibc from raising the threshold by
# itself (up to 32 MiB) after a large block is freed, which would put a layer's K x K Hessians on the
# heap, where what is freed stays resident: measured +300 MiB peak RSS on the medium fixture.
MMAP_THRESHOLD = 4 * 2**20
_M_MMAP_THRESHOLD = -3


def limit_heap_slack() -> None:
    """Large blocks straight from and back to the OS (glibc; a no-op elsewhere). Costs page faults
    on each large allocation: measured <10% more time on the medium fixture."""
    import ctypes
    try:
        ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    except (OSError, AttributeError):
        pass


# PyTorch's CPU kernels for bf16/fp16 keep two caches keyed by operation and shape: oneDNN's
# primitive cache (ONEDNN_PRIMITIVE_CACHE_CAPACITY, 1024 by default) and ideep's (LRU_CACHE_CAPACITY,
# 1024). Each calibration sample has its own sequence length, so both grow with the number of
# samples until full: ~1.3 MiB per primitive for a 2b-width bf16 linear on an AMX CPU (1.37 GiB at
# 1024), about 11 MiB per 1k-token sample; ideep's another ~6 MiB per sample. A calibration bounds
# them (CPU_KERNEL_CACHES) unless the user set the variables, so they stop growing after a few
# samples. Cost, medium fixture, 32 short samples, CPU seconds: gradient pass 7.4 at the defaults,
# 12.9 bounded (a few % of a TLQ run); peak RSS 1268 -> 1137 MiB. Off (0) it ran 4.4x slower. Bounded,
# they still fill with the first ~32 samples of the 2b fixture (~190 MiB after its gradient pass: 106
# in the heap, 81 of JIT code) and then stay there; 32 and 16 entries cost the medium fixture's gradient
# pass 26% more CPU time (its short samples share shapes).
CPU_KERNEL_CACHES = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": 256, "LRU_CACHE_CAPACITY": 64}


def bound_cpu_kernel_caches() -> None:
    """Set the CPU_KERNEL_CACHES variables (each unless set): the libraries read them when they
    create their first primitive, so this acts only before the process's first bf16/fp16 product
    (a CLI run; not a process that already ran one)."""
    for name, entries in CPU_KERNEL_CACHES.items():
        os.environ.setdefault(name, str(entries))


_START: dict = {}


def start_of_calibration() -> None:
    """Called once per process before any model work: note the RSS of the bare runtime
    (interpreter, torch, tlq; the baseline a GPU run would not have on the card), limit heap slack
    and bound the CPU kernels' shape caches."""
    _START.setdefault("rss_mb", rss_mb())
    limit_heap_slack()
    bound_cpu_kernel_caches()
    rss_mark("imports")


def write_memory_record(folder: Path, rank: int, data: dict) -> None:
    """TLQ_DIST_RECORD (tests, benchmarks/multirank.py): rank<r>.json with `data`, this process's
    peak RSS and its RSS at `start_of_calibration` (a single process writes rank0.json)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = {**data, "peak_rss_mb": round(peak_rss_mb(), 1), "start_rss_mb": round(_START.get("rss_mb", 0.0), 1)}
    write_json_atomic(folder / f"rank{rank}.json", data)


_TRACE: dict = {}


def rss_mark(phase: str) -> None:
    """TLQ_RSS_TRACE=1: print to stderr the RSS now, and the highest RSS sampled (every 10 ms)
    since the previous mark. A debugging aid; without the variable it costs one lookup."""
    if not os.environ.get("TLQ_RSS_TRACE"):
        return
    import sys
    import threading
    import time
    if not _TRACE:
        _TRACE.update(high=0.0, phase="start", t=time.time())

        def sample():
            while True:
                _TRACE["high"] = max(_TRACE["high"], rss_mb())
                time.sleep(0.01)
        threading.Thread(target=sample, daemon=True).start()
    now = rss_mb()
    parts = " ".join(f"{k} {v:.0f}" for k, v in rss_parts_mb().items())
    print(f"[rss pid {os.getpid()} rank {os.environ.get('RANK', '-')}] {_TRACE['phase']} -> {phase}: "
          f"high {max(_TRACE['high'], now):.0f} MiB, now {now:.0f} ({parts}), peak so far {peak_rss_mb():.0f}, "
          f"{time.time() - _TRACE['t']:.1f} s", file=sys.stderr, flush=True)
    _TRACE.update(high=now, phase=phase, t=time.time())
