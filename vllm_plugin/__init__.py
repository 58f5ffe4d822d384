"""vLLM plugin: registers the `tlq` quantization method (entry point `vllm.general_plugins`)."""


def register() -> None:
    """Called by vLLM in every process; importing the config module registers it (idempotent)."""
    from vllm_plugin import config  # noqa: F401
