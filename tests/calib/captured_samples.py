"""A tiny model's language-model inputs for a few bundled samples (shared by tests/calib)."""
import torch

from tlq.adapters import adapter_for_model_type
from tlq.calib.capture import capture_inputs


def capture_tiny(model_dir, n=2):
    """(float32 model, adapter, captured samples with images) of a tiny model folder."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from tlq.data.calib import bundled_calibration_path, load_calibration
    from tlq.data.processing import encode_sample
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval().requires_grad_(False)
    processor = AutoProcessor.from_pretrained(model_dir)
    adapter = adapter_for_model_type(model.config.model_type)
    samples = [s for s in load_calibration(bundled_calibration_path()) if s.image_paths][:n]
    return model, adapter, capture_inputs(model, adapter, [(s.id, encode_sample(processor, s)) for s in samples],
                                          progress=False)
