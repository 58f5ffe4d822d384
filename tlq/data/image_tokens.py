"""Vision tokens of one image from a model's config.json alone, for `--dry-run` on a folder without
a processor (a config-only stand-in for a model not downloaded yet).

The counts are transformers' own (the functions its processors use to expand image placeholders),
fed from the config instead of a processor: Qwen2-VL patches the image, resized to a multiple of
28 px within [min_pixels, max_pixels], into 28 x 28 cells (14 px patches merged 2 x 2), one token
each; LLaVA-OneVision's anyres counts the base image ((image_size / patch_size)^2 tokens) plus the
tiles of the grid pinpoint that fits the image best (config image_grid_pinpoints), unpadded to the
image's aspect, downscaled to at most anyres_max_9 (9 tiles' worth), plus one newline token per row.
Images are first bounded by `--max-pixels` as tlq/data/processing.py does.
"""
from __future__ import annotations

from functools import partial
from types import SimpleNamespace

from tlq.data.processing import bounded_size

# min and max pixels of Qwen2-VL-7B/72B-Instruct's preprocessor_config.json (transformers' class
# default max is lower, 28 * 28 * 1280): a config-only folder has no processor config of its own
QWEN2_VL_PIXELS = (56 * 56, 12845056)


def qwen2_vl_tokens(config: dict, width: int, height: int) -> int:
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    vision = config["vision_config"]
    merge = vision.get("spatial_merge_size", 2)
    processor = Qwen2VLImageProcessor(patch_size=vision.get("patch_size", 14), merge_size=merge,
                                      temporal_patch_size=vision.get("temporal_patch_size", 2),
                                      size={"shortest_edge": QWEN2_VL_PIXELS[0], "longest_edge": QWEN2_VL_PIXELS[1]})
    return processor.get_number_of_image_patches(height, width, {}) // merge**2


def llava_onevision_tokens(config: dict, width: int, height: int) -> int:
    from transformers import LlavaOnevisionConfig
    from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor as P
    vision = config["vision_config"]
    side = vision["image_size"]
    # a config.json without pinpoints gets transformers' default ones, as the model itself does
    pinpoints = config.get("image_grid_pinpoints") or LlavaOnevisionConfig().image_grid_pinpoints
    counter = SimpleNamespace(image_processor=SimpleNamespace(image_grid_pinpoints=pinpoints),
                              num_image_tokens=(side // vision["patch_size"]) ** 2,
                              vision_aspect_ratio=config.get("vision_aspect_ratio", "anyres_max_9"))
    counter._get_unpadded_features = partial(P._get_unpadded_features, counter)
    tokens = P._get_number_of_features(counter, height, width, side, side)
    return tokens - 1 if config.get("vision_feature_select_strategy") == "default" else tokens


COUNTERS = {"qwen2-vl": qwen2_vl_tokens, "llava-onevision": llava_onevision_tokens}  # adapter name -> counter


def image_tokens(arch: str, config: dict, width: int, height: int, max_pixels: int | None = None) -> int:
    """Vision tokens of a width x height image for the adapter `arch`, after the --max-pixels bound."""
    return COUNTERS[arch](config, *bounded_size(width, height, max_pixels))
