"""Stop a rank, within a bounded time and with one clear line, when the run cannot finish.

A background thread beats a counter in the rendezvous store every `heartbeat_s` and looks at
the other ranks: a posted failure (`post_failure`, from the failing rank's exception handler)
is noticed within one beat; a rank whose counter has not moved for `dead_after_s` (killed, OOM,
hung machine) is taken as dead; a store that stops answering means its host (torchrun, or
rank 0 when launched by hand) is gone. SIGTERM / SIGINT (torchrun sends SIGTERM to every rank
once one fails) reach the same thread through a wakeup pipe, so they act even while the main
thread is blocked inside a transfer, where a Python signal handler would never run.

Stopping runs the registered cleanups (rank 0 removes the unfinished checkpoint folder) and
exits the process: work folders are untouched, so rerunning the same command resumes.
"""
from __future__ import annotations

import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable

ABORT_EXIT = 3


class Watchdog:
    def __init__(self, rank: int, world: int, heartbeat_s: float, dead_after_s: float):
        self.rank, self.world = rank, world
        self.heartbeat_s, self.dead_after_s = heartbeat_s, dead_after_s
        self.phase = "start-up"  # named in the error line
        self._cleanups: list[Callable[[], None]] = []
        self._stop = threading.Event()
        self._wake_r: int | None = None
        self._store = None
        self._thread: threading.Thread | None = None

    def add_cleanup(self, fn: Callable[[], None]) -> None:
        self._cleanups.append(fn)

    def catch_signals(self) -> None:
        """Route SIGTERM / SIGINT to the watchdog thread (call from the main thread)."""
        r, w = os.pipe()
        os.set_blocking(w, False)
        self._wake_r = r
        signal.set_wakeup_fd(w)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: None)  # the watchdog acts; the main thread carries on meanwhile

    def start(self, store) -> None:
        self._store = store
        self._thread = threading.Thread(target=self._run, name="tlq-watchdog", daemon=True)
        self._thread.start()

    def post_failure(self, message: str) -> None:
        """Tell the other ranks why this one stops (best effort: the store may be gone too)."""
        try:
            self._store.set(f"failed/{self.rank}", message[:2000])
        except Exception:  # noqa: BLE001, S110 - the store may be unreachable: nothing more to do
            pass

    def stop(self) -> None:
        """This rank finished: stop beating and tell the others it left on purpose."""
        self._stop.set()
        try:
            self._store.set(f"left/{self.rank}", "1")
        except Exception:  # noqa: BLE001, S110 - the store may be unreachable: nothing more to do
            pass

    def run_cleanups(self) -> None:
        for fn in self._cleanups:
            try:
                fn()
            except Exception:  # noqa: BLE001, S110 - best effort, we are stopping anyway
                pass

    def abort(self, message: str, code: int = ABORT_EXIT, resumable: bool = True) -> None:
        hint = " Finished layers are kept in the work folders; rerun the same command to resume." if resumable else ""
        print(f"error: rank {self.rank}/{self.world} stopped during {self.phase}: {message}.{hint}",
              file=sys.stderr, flush=True)
        self.run_cleanups()
        os._exit(code)

    # -- the thread -------------------------------------------------------------
    def _run(self) -> None:
        beat = 0
        seen = {p: (None, time.monotonic()) for p in range(self.world) if p != self.rank}
        while not self._stop.is_set():
            if self._wake_r is not None:
                ready, _, _ = select.select([self._wake_r], [], [], self.heartbeat_s)
                if ready:
                    signum = os.read(self._wake_r, 1)[0]
                    if signum in (signal.SIGTERM, signal.SIGINT):
                        name = signal.Signals(signum).name
                        self.abort(f"received {name} (torchrun sends SIGTERM to every rank once one fails)",
                                   128 + signum)
            else:
                time.sleep(self.heartbeat_s)
            if self._stop.is_set():
                return
            try:
                self._store.set(f"hb/{self.rank}", str(beat))
                beat += 1
                self._check_peers(seen)
            except Exception as exc:  # noqa: BLE001 - whatever the error, the store's host is gone
                if not self._stop.is_set():
                    self.abort(f"lost the rendezvous store ({type(exc).__name__}): torchrun or rank 0 died")

    def _check_peers(self, seen: dict) -> None:
        store, now = self._store, time.monotonic()
        for p, (value, since) in list(seen.items()):
            if store.check([f"failed/{p}"]):
                self.abort(f"rank {p} failed: {store.get(f'failed/{p}').decode()}")
            if store.check([f"left/{p}"]):
                continue
            current = store.get(f"hb/{p}") if store.check([f"hb/{p}"]) else None
            if current != value:
                seen[p] = (current, now)
            elif now - since > self.dead_after_s:
                self.abort(f"rank {p} has not answered for {self.dead_after_s:.0f} s (killed, out of memory or hung)")
