"""`tlq calibrate --nproc N`: start torchrun on the same command line, without --nproc."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

from tlq.errors import TLQError

PORTS = range(18300, 18400)  # this project's torch.distributed port range


def strip_nproc(argv: list[str]) -> list[str]:
    """The `calibrate ...` arguments of `argv`, without --nproc N / --nproc=N."""
    if "calibrate" not in argv:
        raise TLQError("--nproc is an option of `tlq calibrate`")
    args, out, skip = argv[argv.index("calibrate"):], [], False
    for a in args:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def free_port(ports=PORTS, host: str = "127.0.0.1") -> int:
    """MASTER_PORT when set, else the first port of `ports` nobody listens on."""
    if os.environ.get("MASTER_PORT"):
        return int(os.environ["MASTER_PORT"])
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise TLQError(f"no free port in {ports.start}-{ports.stop - 1}; set MASTER_PORT to a free port")


def torchrun_command(nproc: int, argv: list[str], port: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", "tlq", *strip_nproc(argv)]


def launch_torchrun(nproc: int, argv: list[str] | None = None) -> int:
    """Run `tlq calibrate ...` (this process's argv minus --nproc) under torchrun on this machine;
    returns torchrun's exit code (non-zero when any rank failed)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise TLQError("--nproc starts torchrun itself; under torchrun, leave --nproc out")
    argv = sys.argv[1:] if argv is None else argv
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # one intra-op thread per rank (see tlq/cli.py)
    return subprocess.call(torchrun_command(nproc, argv, free_port()), env=env)
