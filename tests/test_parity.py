"""Every family: a tiny random transformers model gives the same logits in GPT, and HF -> ours -> HF is exact."""

import pytest
import torch
import transformers as tf
from tiny_families import TINY, V
from tiny_families import random_hf as make_hf

from leantune.checkpoint.hf import hf_to_ours, iter_hf_tensors, load_hf_checkpoint, ours_to_hf, save_hf_checkpoint
from leantune.models.decoder.config import Config
from leantune.models.decoder.families import FAMILIES, config_from_checkpoint


def test_every_family_has_a_tiny_config():
    """The suite runs over the family table: a newly registered family fails here until it has a tiny config."""
    assert set(FAMILIES) <= {make().model_type for make in TINY.values()}




@pytest.fixture(params=sorted(TINY))
def family(request, tmp_path):
    model, path = make_hf(request.param, tmp_path)
    return request.param, model, path


def test_logits_match_transformers(family):
    name, hf, path = family
    ours = load_hf_checkpoint(path).eval()
    idx = torch.randint(0, V, (2, 24))
    with torch.no_grad():
        expected = hf(idx).logits
        actual = ours(idx)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0, msg=name)


def test_left_padded_batch_matches_transformers(family):
    name, hf, path = family
    ours = load_hf_checkpoint(path).eval()
    idx = torch.randint(0, V, (2, 12))
    attn = torch.ones(2, 12, dtype=torch.long)
    attn[1, :5] = 0  # row 1 is left-padded by 5
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = hf(idx, attention_mask=attn, position_ids=pos).logits
        actual = ours(idx, attention_mask=attn, position_ids=pos)
    real = attn.bool()
    torch.testing.assert_close(actual[real], expected[real], atol=1e-5, rtol=0, msg=name)


def test_round_trip_is_bit_identical(family, tmp_path):
    name, hf, path = family
    config = config_from_checkpoint(path)
    hf_sd = dict(iter_hf_tensors(path))  # the file layout is the HF format (in-memory names may differ)
    back = ours_to_hf(hf_to_ours(hf_sd, config), config)
    assert back.keys() == hf_sd.keys(), name
    for k in hf_sd:
        assert torch.equal(back[k], hf_sd[k]), f"{name}: {k}"
    # and through the folder writer: transformers loads our folder and gives identical tensors
    ours = load_hf_checkpoint(path)
    save_hf_checkpoint(ours, tmp_path / "out", source_dir=path)
    reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    for k, v in reloaded.state_dict().items():
        assert torch.equal(v, hf.state_dict()[k]), f"{name}: {k}"


def test_config_written_from_scratch_loads_in_transformers(family, tmp_path):
    """A model built from a Config alone (no source config.json) still saves a folder transformers reads."""
    name, hf, path = family
    ours = load_hf_checkpoint(path).eval()
    save_hf_checkpoint(ours, tmp_path / "fresh")
    reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "fresh", dtype=torch.float32).eval()
    idx = torch.randint(0, V, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(idx).logits, ours(idx), atol=1e-5, rtol=0, msg=name)


def test_packed_segments_equal_separate_runs():
    """Packing: segment ids + reset positions give each sample exactly its standalone logits."""
    torch.manual_seed(0)
    from leantune.models.decoder.model import GPT

    model = GPT(Config(vocab_size=V, n_layer=2, n_embd=64, n_head=4, n_query_groups=2, block_size=64)).eval()
    a, b = torch.randint(0, V, (1, 7)), torch.randint(0, V, (1, 9))
    packed = torch.cat([a, b, torch.zeros(1, 4, dtype=torch.long)], dim=1)  # (1, 20) with 4 pad tokens
    seg = torch.tensor([[1] * 7 + [2] * 9 + [0] * 4])
    pos = torch.tensor([list(range(7)) + list(range(9)) + [0] * 4])
    with torch.no_grad():
        out = model(packed, segment_ids=seg, position_ids=pos)
        torch.testing.assert_close(out[:, :7], model(a), atol=1e-5, rtol=0)
        torch.testing.assert_close(out[:, 7:16], model(b), atol=1e-5, rtol=0)
