"""Loading source models from local folders, with clear errors for bad paths."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from tlq.adapters import ModelAdapter, adapter_for_model_type
from tlq.errors import TLQError


@dataclass
class SourceModel:
    """A local Hugging Face model folder and the adapter that describes it."""

    path: Path
    config: dict
    adapter: ModelAdapter

    @property
    def dtype(self) -> torch.dtype:
        from tlq.format.checkpoint import dtype_of
        return dtype_of(self.config)

    def weight_files(self) -> list[Path]:
        return sorted(self.path.glob("*.safetensors"))

    def load_state_dict(self, names=None) -> dict[str, torch.Tensor]:
        """Tensors from the safetensors files; `names` (a set) restricts which are read."""
        tensors = {}
        for f in self.weight_files():
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():
                    if names is None or key in names:
                        tensors[key] = st.get_tensor(key)
        return tensors

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = {}
        for f in self.weight_files():
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():
                    shapes[key] = tuple(st.get_slice(key).get_shape())
        return shapes

    def disk_layers_prefix(self) -> str:
        """How this folder's safetensors spell the decoder layers (see ModelAdapter)."""
        shapes = self.tensor_shapes()
        for prefix in self.adapter.checkpoint_layer_prefixes or (self.adapter.decoder_layers,):
            if any(k.startswith(prefix + ".0.") for k in shapes):
                return prefix
        raise TLQError(f"{self.path}: no decoder layers found under any of "
                       f"{self.adapter.checkpoint_layer_prefixes}; is this a {self.adapter.name} model?")

    def to_disk_name(self, module_name: str) -> str:
        """Module path in the transformers model -> tensor name prefix in the safetensors files."""
        root = self.adapter.decoder_layers
        if module_name.startswith(root + "."):
            return self.disk_layers_prefix() + module_name[len(root):]
        return module_name

    def load_hf_model(self, device: str = "cpu"):
        """The float model via transformers' Auto class (eval mode, no grads on parameters)."""
        from transformers import AutoModelForImageTextToText
        model = AutoModelForImageTextToText.from_pretrained(self.path, dtype=self.dtype)
        model.eval().requires_grad_(False)
        return model.to(device)

    def load_processor(self):
        from transformers import AutoProcessor
        return AutoProcessor.from_pretrained(self.path)


def open_source_model(path: str | Path) -> SourceModel:
    path = Path(path)
    if not path.exists():
        raise TLQError(f"model path {path} does not exist; pass a local folder holding a Hugging Face "
                       "model (config.json + *.safetensors)")
    if not (path / "config.json").is_file():
        raise TLQError(f"{path} holds no model (no config.json); pass the folder that contains config.json")
    try:
        config = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise TLQError(f"{path}/config.json is not valid JSON ({exc.msg}); re-download or rebuild the model") from None
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "?")
        raise TLQError(f"{path} is already quantized ({method}); calibrate from the float model")
    adapter = adapter_for_model_type(config.get("model_type", "<none>"))
    if not list(path.glob("*.safetensors")):
        raise TLQError(f"{path} has no *.safetensors weights; convert the model to safetensors "
                       "(save_pretrained(..., safe_serialization=True))")
    return SourceModel(path, config, adapter)
