"""The `tlq` quantization method for vLLM (selected by `quant_method: "tlq"` in config.json).

Importing this module registers it (vllm_plugin.register is the `vllm.general_plugins` entry
point; vLLM runs it in every process, and a second import is a no-op). The linear method and
its kernels are imported only when a TLQ model is actually built.

Integrity: vLLM hands the model path to `maybe_update_config` while it builds its config, in
the front-end process, before any engine process starts or any weight is read. That is where
the checkpoint is verified (tlq.format.checkpoint.verify_checkpoint: hashes, tensor names and
shapes), so a damaged checkpoint is refused with one clear message. `from_config` already
refuses a quantization_config the plugin cannot serve.
"""
from __future__ import annotations

import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import torch
from vllm.logger import init_logger
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig

from tlq.adapters import is_ignored
from tlq.errors import CheckpointError
from vllm_plugin.spec import ServeSpec

NAME = "tlq"
SKIP_VERIFY_ENV = "TLQ_SKIP_VERIFY"
logger = init_logger("vllm.tlq")  # under vLLM's "vllm" logger so its handlers print it


@register_quantization_config(NAME)
class TLQConfig(QuantizationConfig):
    """Serves every scheme `tlq calibrate` writes (docs/vllm-plugin.md)."""

    def __init__(self, spec: ServeSpec):
        super().__init__()
        self.spec = spec
        self.ignore: list[str] = list(spec.ignore)
        self._created: list[str] = []
        self._served: dict[str, Any] = {}
        self._unquantized: list[str] = []

    def __repr__(self) -> str:
        return f"TLQConfig({self.spec.describe()}, ignore={self.ignore})"

    # -- QuantizationConfig interface ------------------------------------------------------
    def get_name(self) -> str:
        return NAME

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return -1  # the torch fallback runs anywhere; kernels check their own capability

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # the quantization_config lives in config.json

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> TLQConfig:
        return cls(ServeSpec.from_dict(config))

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg, user_quant, hf_config=None):
        if hf_quant_cfg.get("quant_method") == NAME and user_quant in (None, NAME):
            return NAME
        return None

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
        if not isinstance(layer, LinearBase):
            return None  # embeddings, lm_head (ParallelLMHead), attention: unquantized
        if is_ignored(prefix, self.ignore):
            self._unquantized.append(prefix)
            return UnquantizedLinearMethod()
        from vllm_plugin.linear import TLQLinearMethod
        return TLQLinearMethod(self.spec, prefix, self)

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
        """Add the vLLM spelling of every ignore entry (`model.visual` -> `visual`), keeping both."""
        mapped = []
        for frag in self.ignore:
            probe = hf_to_vllm_mapper.map_name(f"{frag}.__tlq__")
            if probe and probe.endswith(".__tlq__") and probe[: -len(".__tlq__")] not in self.ignore:
                mapped.append(probe[: -len(".__tlq__")])
        self.ignore.extend(dict.fromkeys(mapped))

    @staticmethod
    def get_checkpoint_weight_mapper():
        """Keep `g_idx` (vLLM's default mapper drops it): act-order is served here."""
        from vllm.model_executor.models.utils import WeightsMapper
        return WeightsMapper()

    def maybe_update_config(self, model_name: str, hf_config=None, revision=None) -> None:
        verify_model_folder(model_name, self.spec)

    # -- once-per-model kernel summary -------------------------------------------------------
    def layer_created(self, prefix: str) -> None:
        self._created.append(prefix)

    def layer_served(self, prefix: str, served) -> None:
        self._served[prefix] = served
        if len(self._served) == len(self._created):
            logger.info("%s", self.summary())

    def summary(self) -> str:
        groups: dict[tuple[str, str], Counter] = defaultdict(Counter)
        for prefix, served in self._served.items():
            groups[(served.kernel, served.numerics)][prefix.rsplit(".", 1)[-1]] += 1
        parts = [f"{kernel} for {sum(kinds.values())} ({', '.join(f'{k} x{n}' for k, n in kinds.items())}): "
                 f"{numerics}" for (kernel, numerics), kinds in groups.items()]
        rank = _tp_rank_note()
        skipped = sorted({p.split(".")[0] for p in self._unquantized})
        return (f"tlq: serving {self.spec.describe()}{rank}: {len(self._served)} quantized linears; "
                + "; ".join(parts)
                + f". {len(self._unquantized)} linears unquantized ({', '.join(skipped) or 'none'}).")


def _tp_rank_note() -> str:
    try:
        from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
        size = get_tensor_model_parallel_world_size()
        return f" [TP rank {get_tensor_model_parallel_rank()}/{size}]" if size > 1 else ""
    except (AssertionError, RuntimeError):
        return ""


def verify_model_folder(model_name: str, spec: ServeSpec) -> None:
    """Refuse a damaged or inconsistent checkpoint before any weight is read."""
    if os.environ.get(SKIP_VERIFY_ENV, "0") == "1":
        logger.warning("tlq: %s=1, checkpoint integrity NOT verified for %s", SKIP_VERIFY_ENV, model_name)
        return
    path = Path(model_name)
    if not path.is_dir():
        logger.warning("tlq: %s is not a local folder; integrity is verified only for local checkpoints "
                       "(run `tlq verify` on the downloaded copy)", model_name)
        return
    from tlq.format.checkpoint import verify_checkpoint
    info = verify_checkpoint(path)
    for layer, linfo in info.quantized_layers.items():
        got = (linfo["bits"], linfo["group_size"], linfo["sym"])
        if got != (spec.bits, spec.group_size, spec.sym):
            raise CheckpointError(f"{path}: layer {layer} is {got[0]}-bit group {got[1]} "
                                  f"{'sym' if got[2] else 'asym'} but quantization_config says "
                                  f"{spec.describe()}; mixed settings cannot be served, re-create the checkpoint")
        if is_ignored(layer, spec.ignore):
            raise CheckpointError(f"{path}: layer {layer} is quantized but matches the ignore list "
                                  f"{list(spec.ignore)}; re-create the checkpoint")
    logger.info("tlq: verified %s (%d files hashed, %d quantized linears)", path,
                len(info.manifest.get("files", {})), len(info.quantized_layers))
