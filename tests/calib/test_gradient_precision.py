"""fp16 models compute the gradient pass in fp32 (no loss scaling: small token gradients would
underflow), so their token importance is the fp32 one."""
import copy
import dataclasses

import pytest
import torch

from tlq.calib.capture import capture_samples, to_device
from tlq.calib.gradient_pass import gradient_dtype, token_gradients
from tlq.data.calib import bundled_calibration_path, load_calibration
from tlq.model_io import open_source_model


@pytest.fixture(scope="module")
def captured_model(qwen2_vl_dir):
    source = open_source_model(qwen2_vl_dir)
    model = source.load_hf_model()
    samples = load_calibration(bundled_calibration_path(), max_samples=3)
    return source, model, capture_samples(model, source, samples, progress=False)


def _raw(source, model, captured, dtype):
    m = copy.deepcopy(model).to(dtype)
    caps = [dataclasses.replace(s, hidden=s.hidden.to(dtype), layer_kwargs=to_device(s.layer_kwargs, "cpu", dtype))
            for s in captured]
    return token_gradients(m, source.adapter, caps, progress=False), m


def test_fp16_importance_matches_fp32(captured_model):
    source, model, captured = captured_model
    # the same values in both: the fp16 model's weights and inputs, held in fp32
    half = copy.deepcopy(model).half()
    half_captured = [dataclasses.replace(s, hidden=s.hidden.half(), layer_kwargs=to_device(s.layer_kwargs, "cpu",
                                                                                            torch.float16))
                     for s in captured]
    raw16, m16 = _raw(source, half, half_captured, torch.float16)
    raw32, _ = _raw(source, half, half_captured, torch.float32)
    assert gradient_dtype(m16) == torch.float32
    assert next(m16.parameters()).dtype == torch.float16  # layers went back to fp16 after the pass
    for a, b in zip(raw16, raw32):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.allclose(a[key], b[key], rtol=1e-5, atol=0), key


def test_bf16_models_keep_their_own_dtype(captured_model):
    _, model, _ = captured_model
    assert next(model.parameters()).dtype == torch.bfloat16 and gradient_dtype(model) == torch.bfloat16
