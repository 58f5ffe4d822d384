"""What this CPU can run of vLLM's CPU int4 kernel (`cpu_gemm_wna16`), and the AMX permission it needs.

Two facts drive this module (docs/vllm-plugin.md, "CPU instruction sets"):
- vLLM builds `cpu_gemm_wna16` for AVX-512 only: on an AVX2-only CPU it dies with SIGILL. The plugin
  checks the flags first and serves such layers with its exact torch backend instead.
- On Linux a process must ask for the AMX tile state (`arch_prctl(ARCH_REQ_XCOMP_PERM)`, exposed as
  `torch.cpu._init_amx()`) before it runs a tile instruction; vLLM's kernel does not ask, so without
  `ensure_amx_state()` the worker dies with SIGILL at its first AMX matmul. The permission is per
  process, so every process that may run a kernel (engine core, each TP worker) calls it:
  `vllm_plugin.register()` (vLLM runs it in every process) and the kernel's load step both do.

Tests force the capability check by patching `cpu_flags` (an AVX2-only CPU is simulated that way).
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch

# What vLLM's CPU extension is compiled for on x86 (its AVX-512 build): foundation, byte/word,
# vector-length and doubleword/quadword extensions.
WNA16_REQUIRED_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq")
AMX_FLAGS = ("amx_tile", "amx_bf16")


@functools.lru_cache(maxsize=1)
def _proc_cpuinfo_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo); empty when unknown. Patched by tests."""
    return _proc_cpuinfo_flags()


def missing_wna16_flags() -> list[str]:
    """CPU flags vLLM's `cpu_gemm_wna16` needs that this CPU lacks ([] = it can run)."""
    flags = cpu_flags()
    if not flags:  # not Linux x86 or unreadable: trust torch's own dispatch level
        return [] if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else list(WNA16_REQUIRED_FLAGS)
    return [f for f in WNA16_REQUIRED_FLAGS if f not in flags]


def amx_available() -> bool:
    """The CPU has AMX tiles for bf16 and the kernel would use them (`isa_hint="amx"`)."""
    flags = cpu_flags()
    has_flags = all(f in flags for f in AMX_FLAGS) if flags else True
    return has_flags and torch.cpu._is_amx_tile_supported()


def isa_hints() -> list[str]:
    """The `cpu_gemm_wna16` ISA paths this machine can run: "amx" when present, "vec" on any AVX-512 CPU."""
    if missing_wna16_flags():
        return []
    return (["amx"] if amx_available() else []) + ["vec"]


_amx_state: bool | None = None


def ensure_amx_state() -> bool:
    """Ask Linux for AMX tile state in this process (once); True when AMX is usable here."""
    global _amx_state
    if _amx_state is None:
        _amx_state = bool(torch.cpu._is_amx_tile_supported() and torch.cpu._init_amx())
    return _amx_state
