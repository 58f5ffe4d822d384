"""Config-only stand-ins of published VLMs, for `tlq calibrate STAND_IN --dry-run --nproc N`.

A stand-in folder holds just the config.json of the published model (the dimensions below are
copied from each Hugging Face repo's config.json); `--dry-run` builds the model skeleton on the
meta device from it, so the per-rank estimate needs neither weights nor a download. Without a
processor the token counts are assumed (see tlq/multirank/estimate.py).

    python -m tlq.multirank.standins OUT_DIR      # writes OUT_DIR/<name>/config.json for each model
"""
from __future__ import annotations

import sys
from pathlib import Path

_QWEN2_VL_VISION = {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_channels": 3,
                    "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}
_SIGLIP_SO400M = {"model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304,
                  "num_hidden_layers": 26, "num_attention_heads": 16, "image_size": 384, "patch_size": 14,
                  "vision_use_head": False}
# text model: hidden, intermediate, layers, attention heads, KV heads, vocabulary
_TEXT = {
    "Qwen2-VL-7B-Instruct": (3584, 18944, 28, 28, 4, 152064),
    "Qwen2-VL-72B-Instruct": (8192, 29568, 80, 64, 8, 152064),
    "llava-onevision-qwen2-7b-ov-hf": (3584, 18944, 28, 28, 4, 152128),
    "llava-onevision-qwen2-72b-ov-hf": (8192, 29568, 80, 64, 8, 152128),
}


def _text(name: str) -> dict:
    hidden, inter, layers, heads, kv, vocab = _TEXT[name]
    return {"hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": vocab,
            "rms_norm_eps": 1e-6, "max_position_embeddings": 32768, "tie_word_embeddings": False}


def standin_config(name: str):
    """The transformers config of a published model (bfloat16)."""
    from transformers import LlavaOnevisionConfig, Qwen2VLConfig
    if name.startswith("Qwen2-VL"):
        text = {**_text(name), "rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                                                   "mrope_section": [16, 24, 24]}}
        config = Qwen2VLConfig(text_config=text, vision_config={**_QWEN2_VL_VISION, "hidden_size": text["hidden_size"]},
                               image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                               vision_end_token_id=151653, tie_word_embeddings=False)
    else:
        text = {**_text(name), "model_type": "qwen2", "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}
        config = LlavaOnevisionConfig(text_config=text, vision_config=_SIGLIP_SO400M, image_token_index=151646,
                                      video_token_index=151647, vision_feature_select_strategy="full",
                                      vision_feature_layer=-1, vision_aspect_ratio="anyres_max_9",
                                      tie_word_embeddings=False)
    config.dtype = "bfloat16"
    return config


def write_standins(out: Path) -> list[Path]:
    folders = []
    for name in _TEXT:
        folder = Path(out) / name
        standin_config(name).save_pretrained(folder)
        folders.append(folder)
    return folders


if __name__ == "__main__":
    for f in write_standins(Path(sys.argv[1])):
        print(f)
