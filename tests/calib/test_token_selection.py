"""--max-tokens and --drop-below: honoured where they mean something, refused where they do not."""
import pytest
import torch

import tlq
from tlq.calib.layer_solve import select_tokens
from tlq.errors import TLQError
from tlq.multirank.writer import tensor_hashes


def test_select_tokens_drops_and_subsamples_with_a_seed():
    w = torch.tensor([0.0, 0.5, 1.0, 2.0, 0.05, 3.0])
    assert select_tokens(w, 0.1, None, 0).tolist() == [1, 2, 3, 5]
    a, b = select_tokens(torch.ones(100), 0.0, 10, 7), select_tokens(torch.ones(100), 0.0, 10, 7)
    assert torch.equal(a, b) and len(a) == 10 and torch.equal(a, a.sort().values)
    assert select_tokens(torch.ones(5), 0.0, 10, 0) is None  # nothing to drop


def test_max_tokens_is_honoured_by_a_uniform_weight_method(qwen2_vl_dir, tmp_path):
    run = lambda name, **kw: tensor_hashes(tlq.calibrate(qwen2_vl_dir, out=tmp_path / name, method="gptq",
                                                         max_samples=2, progress=False, **kw))
    full, few, many = run("full"), run("few", max_tokens=16), run("many", max_tokens=10**9)
    assert full == many  # a cap above the token count keeps every token
    assert full != few


@pytest.mark.parametrize("method,kw,phrase", [("gptq", {"drop_below": 0.5}, "--drop-below needs token weights"),
                                              ("awq", {"drop_below": 0.5}, "--drop-below needs token weights"),
                                              ("rtn", {"max_tokens": 100}, "--max-tokens has nothing to select")])
def test_meaningless_selection_is_refused(qwen2_vl_dir, tmp_path, method, kw, phrase):
    with pytest.raises(TLQError, match=phrase):
        tlq.calibrate(qwen2_vl_dir, out=tmp_path / "o", method=method, **kw)


def test_drop_below_still_works_with_token_weights(qwen2_vl_dir, tmp_path):
    cfg = tlq.api.make_config(qwen2_vl_dir, tmp_path / "o", method="tlq", drop_below=0.5)
    assert cfg.importance.drop_below == 0.5
