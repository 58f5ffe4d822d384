"""A rank's share of the model: skeleton on meta, only its own tensors read, same numerics."""
from __future__ import annotations

import torch

from tlq.calib.capture import capture_inputs
from tlq.data.calib import bundled_calibration_path, load_calibration
from tlq.data.processing import encode_sample
from tlq.model_io import open_source_model
from tlq.multirank.plan import plan_stages, tensor_bytes
from tlq.multirank.stage_model import LoadRecord, build_skeleton, materialize, share


def _stage_model(source, world, rank):
    model = build_skeleton(source)
    stages = plan_stages(tensor_bytes(model), source.adapter, world)
    record = LoadRecord()
    materialize(model, source, share(model, source, stages, rank), record)
    return model, stages, record


def test_shares_partition_the_checkpoint(tiny_model_dir):
    source = open_source_model(tiny_model_dir)
    model = build_skeleton(source)
    assert all(p.is_meta for p in model.parameters())  # the skeleton holds no weights
    stages = plan_stages(tensor_bytes(model), source.adapter, 2)
    shares = [set(share(model, source, stages, r).values()) for r in range(2)]
    assert shares[0] | shares[1] == set(source.tensor_shapes())
    assert not shares[0] & shares[1]
    prefix = source.disk_layers_prefix()
    assert all(not n.startswith(f"{prefix}.1.") for n in shares[0])
    assert any(n.endswith("lm_head.weight") for n in shares[1])
    assert any(n.endswith("embed_tokens.weight") for n in shares[0])


def test_rank0_share_captures_exactly_like_the_full_model(tiny_model_dir):
    """Same capture (hidden states, rotary embeddings) as from_pretrained, bit for bit, while
    the rank's model holds no decoder layer but its own and no lm_head."""
    source = open_source_model(tiny_model_dir)
    model, _, _ = _stage_model(source, 2, 0)
    full = source.load_hf_model()
    processor = source.load_processor()
    samples = load_calibration(bundled_calibration_path(), max_samples=2)
    encoded = [(s.id, encode_sample(processor, s)) for s in samples]
    ours, ref = (capture_inputs(m, source.adapter, encoded, progress=False) for m in (model, full))
    for a, b in zip(ours, ref):
        assert torch.equal(a.hidden, b.hidden)
        assert torch.equal(a.modality, b.modality)
        for x, y in zip(a.layer_kwargs["position_embeddings"], b.layer_kwargs["position_embeddings"]):
            assert torch.equal(x, y)
    layers = source.adapter.layers(model)
    assert not any(p.is_meta for p in layers[0].parameters())
    assert all(p.is_meta for p in layers[1].parameters())
    assert model.lm_head.weight.is_meta
    full_sd = full.state_dict()
    for name, p in model.state_dict().items():
        if not p.is_meta:
            assert p.dtype == full_sd[name].dtype and torch.equal(p, full_sd[name]), name


def test_last_rank_reads_only_its_layers_and_the_head(qwen2_vl_dir):
    source = open_source_model(qwen2_vl_dir)
    model, _, record = _stage_model(source, 2, 1)
    assert record.names and all(".layers.1." in n or n in ("lm_head.weight", "model.norm.weight")
                                for n in record.names)
    assert record.nbytes == sum(p.numel() * p.element_size() for p in model.state_dict().values() if not p.is_meta)
    assert torch.equal(model.lm_head.weight, source.load_state_dict({"lm_head.weight"})["lm_head.weight"])
