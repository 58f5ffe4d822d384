"""vLLM plugin: registers the `tlq` quantization method (entry point `vllm.general_plugins`)."""


def register() -> None:
    """Called by vLLM in every process; importing the config module registers it (idempotent).

    Also asks for AMX tile state in this process, so vLLM's CPU int4 kernel (ours or stock
    compressed-tensors') does not die with SIGILL on AMX CPUs (vllm_plugin/cpu_isa.py).
    """
    from vllm_plugin import config  # noqa: F401
    from vllm_plugin.cpu_isa import ensure_amx_state
    ensure_amx_state()
