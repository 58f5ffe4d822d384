"""What a TLQ checkpoint asks the plugin to serve, parsed and checked without importing vLLM.

The plugin serves exactly what the writer stored: `ServeSpec` is tlq.format's QuantizationConfig,
and `ServeSpec.from_dict` reads config.json's `quantization_config` (docs/format.md), refusing
anything that cannot be served with a `CheckpointError` naming the field and the fix.
Row splits that cut a packed run or a scale group are served with row windows (vllm_plugin/params.py).
"""
from __future__ import annotations

from tlq.errors import CheckpointError
from tlq.format.quant_config import QuantizationConfig

ServeSpec = QuantizationConfig  # one definition shared by the writer and the plugin


def check_group_divides(prefix: str, k: int, spec: ServeSpec) -> None:
    if spec.group_size != -1 and k % spec.group_size:
        raise CheckpointError(f"layer {prefix}: group size {spec.group_size} does not divide its {k} input "
                              "channels (docs/format.md requires it); re-quantize with a group size that does")
