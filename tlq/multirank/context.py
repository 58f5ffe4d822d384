"""One rank's view of a multi-rank run: process group, store, watchdog, settings."""
from __future__ import annotations

import datetime
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from tlq.errors import TLQError
from tlq.multirank.comm import Comm
from tlq.multirank.watchdog import Watchdog


class PeerLost(TLQError):
    """Another rank (or the store's host) is gone: this rank stops, the run can be resumed."""


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    try:
        return default if value in (None, "") else float(value)
    except ValueError:
        raise TLQError(f"{name}={value!r} is not a number; unset it or give seconds/MiB as a number") from None


@dataclass(frozen=True)
class DistConfig:
    """Settings of a multi-rank run, read from TLQ_DIST_* variables (torchrun's argv stays the CLI's).

    Attributes:
        timeout_s: limit of each collective and point-to-point transfer (TLQ_DIST_TIMEOUT_S). Waits
            that may legitimately last long (a stage waiting for the previous stage's layers) poll
            the store instead, guarded by the watchdog, so they are not bounded by this.
        heartbeat_s: how often each rank's watchdog beats and looks at the others (TLQ_DIST_HEARTBEAT_S).
        dead_after_s: a rank whose heartbeat has not moved for this long is taken as dead
            (TLQ_DIST_DEAD_AFTER_S); a failing rank that can still talk is noticed within heartbeat_s.
        fp_prefetch_mb: host memory a stage may spend on FP targets computed ahead (TLQ_FP_PREFETCH_MB; 0 = off).
        backend: gloo | nccl | auto: nccl when calibrating on CUDA, else gloo (TLQ_DIST_BACKEND).
        record_dir: if set (TLQ_DIST_RECORD), each rank writes rank<r>.json there at the end: the
            tensor names it read from the safetensors files, its peak RSS and its RSS at start
            (tests, benchmarks; a single process writes rank0.json, calib/single.py).
    """

    timeout_s: float = 1800.0
    heartbeat_s: float = 2.0
    dead_after_s: float = 60.0
    fp_prefetch_mb: float = 4096.0
    backend: str = "auto"
    record_dir: Path | None = None

    @classmethod
    def from_env(cls) -> DistConfig:
        record = os.environ.get("TLQ_DIST_RECORD")
        return cls(timeout_s=_env_float("TLQ_DIST_TIMEOUT_S", cls.timeout_s),
                   heartbeat_s=_env_float("TLQ_DIST_HEARTBEAT_S", cls.heartbeat_s),
                   dead_after_s=_env_float("TLQ_DIST_DEAD_AFTER_S", cls.dead_after_s),
                   fp_prefetch_mb=_env_float("TLQ_FP_PREFETCH_MB", cls.fp_prefetch_mb),
                   backend=os.environ.get("TLQ_DIST_BACKEND", cls.backend),
                   record_dir=Path(record) if record else None)


def env_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass
class RankContext:
    """This rank within the run.

    Attributes:
        rank / world / local_rank: from torchrun's environment.
        backend: the process group's backend.
        comm: point-to-point transfers (comm.py).
        store: the rendezvous key-value store (readiness flags, heartbeats, failures).
        watchdog: stops this rank when another fails or dies (watchdog.py).
        settings: DistConfig.
    """

    rank: int
    world: int
    local_rank: int
    backend: str
    comm: Comm
    store: object
    watchdog: Watchdog
    settings: DistConfig = field(default_factory=DistConfig)

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.world - 1

    def post(self, key: str, value: str = "1") -> None:
        """Publish a readiness flag (see `wait_for`)."""
        self.store.set(key, value)

    def wait_for(self, keys: list[str], phase: str) -> None:
        """Wait until every flag is posted, however long the earlier stages take.

        Polling the store instead of a blocking receive keeps the transfer timeout short while
        the watchdog (not a timeout) decides whether the ranks we wait for are still alive."""
        self.watchdog.phase = phase
        pending = list(keys)
        delay = 0.005
        while pending:
            try:
                pending = [k for k in pending if not self.store.check([k])]
            except dist.DistError as exc:
                raise PeerLost(f"lost the rendezvous store ({type(exc).__name__}): torchrun or rank 0 died") from None
            if pending:
                time.sleep(delay)
                delay = min(delay * 2, 0.2)

    def shutdown(self) -> None:
        """Leave together: a rank that exits early would look dead to the others' watchdogs."""
        self.watchdog.phase = "shutdown"
        self.comm.flush()
        dist.barrier()
        self.watchdog.stop()
        dist.destroy_process_group()


def rank_device(device: str, local_rank: int) -> str:
    """Rank r computes on its local GPU: `cuda` (or any `cuda:i`: one index cannot suit every rank)
    becomes cuda:LOCAL_RANK; cpu stays cpu."""
    return f"cuda:{local_rank}" if device.startswith("cuda") else device


def _backend(device: str, settings: DistConfig) -> str:
    if settings.backend != "auto":
        if settings.backend not in ("gloo", "nccl"):
            raise TLQError(f"TLQ_DIST_BACKEND={settings.backend!r}: choose gloo, nccl or auto")
        return settings.backend
    return "nccl" if device.startswith("cuda") else "gloo"


def init_rank(device: str, settings: DistConfig | None = None) -> RankContext:
    """Join the process group torchrun set up; start the watchdog."""
    settings = settings or DistConfig.from_env()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    backend = _backend(device, settings)
    comm_device = "cpu"
    if device.startswith("cuda"):
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        if torch.cuda.device_count() < local_world:
            raise TLQError(f"{local_world} ranks on this machine but torch sees {torch.cuda.device_count()} "
                           "GPU(s); start at most one rank per GPU (--nproc)")
        torch.cuda.set_device(local_rank)  # also for libraries that use the current device
        if backend == "nccl":
            comm_device = rank_device(device, local_rank)
    watchdog = Watchdog(rank, world, settings.heartbeat_s, settings.dead_after_s)
    watchdog.catch_signals()  # before the process group starts its threads
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=settings.timeout_s))
    # keys of this attempt only: torchrun keeps its store across --max-restarts attempts
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.PrefixStore(f"tlq-{attempt}/", dist.distributed_c10d._get_default_store())
    watchdog.start(store)
    return RankContext(rank, world, local_rank, backend, Comm(comm_device), store, watchdog, settings)
