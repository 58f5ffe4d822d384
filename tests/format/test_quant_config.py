"""tlq/format/quant_config.py: one quantization_config for the writer and the plugin."""
import json

import pytest

import tlq
from tlq.adapters import ADAPTERS, adapter_for_model_type
from tlq.errors import CheckpointError
from tlq.format.quant_config import DEFAULT_IGNORE, QuantizationConfig
from tlq.schemes import SCHEMES
from vllm_plugin.spec import ServeSpec


@pytest.mark.parametrize("name", list(SCHEMES))
def test_round_trip_for_every_scheme(name):
    q = QuantizationConfig.from_scheme(SCHEMES[name], "gptq", True, ("visual", "lm_head"), "9.9")
    d = q.to_dict()
    assert d["quant_method"] == "tlq" and d["sym"] == SCHEMES[name].symmetric and d["ignore"] == ["visual", "lm_head"]
    assert json.loads(json.dumps(d)) == d
    assert QuantizationConfig.from_dict(d) == q
    # act-order only exists with groups: per-channel scales have no g_idx to reorder
    assert q.act_order is (SCHEMES[name].group_size != -1)


def test_one_spelling_per_field_and_old_checkpoints_still_read():
    d = QuantizationConfig("w4a16", 4, 128, True, act_order=True).to_dict()
    assert "act_order" in d and "desc_act" not in d and "symmetric" not in d
    old = {k: v for k, v in d.items() if k != "act_order"} | {"desc_act": True}
    assert QuantizationConfig.from_dict(old).act_order


def test_default_ignore_covers_every_adapter():
    for adapter in ADAPTERS.values():
        assert set(adapter.ignore) <= set(DEFAULT_IGNORE), adapter.name
    d = QuantizationConfig("w4a16", 4, 128, True).to_dict()
    del d["ignore"]
    assert QuantizationConfig.from_dict(d).ignore == DEFAULT_IGNORE


def test_the_plugin_reads_what_the_writer_wrote(tiny_model_dir, tmp_path):
    ckpt = tlq.calibrate(tiny_model_dir, out=tmp_path / "c", method="rtn", scheme="w3a16", group_size=32)
    qcfg = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    served = ServeSpec.from_dict(qcfg)
    info = tlq.verify(ckpt)
    assert served == info.quantization
    assert (served.bits, served.group_size, served.sym, served.method) == (3, 32, False, "rtn")
    assert served.ignore == adapter_for_model_type(info.config["model_type"]).ignore


def test_a_setting_the_format_cannot_hold_is_refused_before_calibrating(qwen2_vl_dir, tmp_path):
    with pytest.raises(CheckpointError, match="group size 16 is not supported"):
        tlq.calibrate(qwen2_vl_dir, out=tmp_path / "c", method="gptq", group_size=16)
    assert not (tmp_path / "c").exists()
