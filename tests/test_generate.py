"""Sampling and KV-cache decoding on tiny random models."""

import pytest
import torch

from leantune.decode.generate import Sampling, StopStringFilter, generate_tokens, sample
from leantune.models.decoder.config import Config
from leantune.models.decoder.model import GPT

CONFIGS = {
    "llama-gqa": dict(n_layer=2, n_embd=64, n_head=4, n_query_groups=2),
    "falcon-mqa-parallel": dict(n_layer=2, n_embd=64, n_head=4, n_query_groups=1, mlp_class="gelu",
                                norm_class="layernorm", parallel_residual=True, shared_attention_norm=True),
    "neox-partial-rotary": dict(n_layer=2, n_embd=64, n_head=4, rotary_percentage=0.25, mlp_class="gelu",
                                norm_class="layernorm", bias=True, parallel_residual=True),
    "mistral-sliding-window": dict(n_layer=2, n_embd=64, n_head=4, n_query_groups=2, sliding_window=6),
    "gpt2-learned-pos": dict(n_layer=2, n_embd=64, n_head=4, mlp_class="gelu", norm_class="layernorm", bias=True,
                             learned_pos_emb=True, tie_embeddings=True),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_kv_cache_greedy_equals_full_recompute(name):
    torch.manual_seed(0)
    model = GPT(Config(vocab_size=97, block_size=64, **CONFIGS[name])).eval()
    with torch.no_grad():  # larger random weights so greedy continuations are not all one token
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.5)
    prompt = torch.randint(0, 97, (9,))
    cached = list(generate_tokens(model, prompt, 40))
    full = list(generate_tokens(model, prompt, 40, use_cache=False))
    assert cached == full
    assert len(set(cached)) > 3, "degenerate continuation would make the comparison meaningless"


def test_generation_stops_on_stop_id_and_block_size():
    torch.manual_seed(0)
    model = GPT(Config(vocab_size=50, block_size=20, n_layer=1, n_embd=32, n_head=2)).eval()
    prompt = torch.randint(0, 50, (5,))
    out = list(generate_tokens(model, prompt, 100))
    assert len(out) == 15  # capped by block_size
    first = out[0]
    assert list(generate_tokens(model, prompt, 100, stop_ids=[first])) == [first]


def test_greedy_and_top_k_top_p_sampling():
    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0]])
    assert sample(logits, Sampling()).tolist() == [1]
    g = torch.Generator().manual_seed(0)
    draws = {int(sample(logits, Sampling(temperature=1.0, top_k=2), g)) for _ in range(200)}
    assert draws == {1, 2}
    # top_p: softmax = [.09, .66, .24, .01]; p=0.5 keeps only the top token, p=0.8 the top two
    assert {int(sample(logits, Sampling(temperature=1.0, top_p=0.5), g)) for _ in range(100)} == {1}
    assert {int(sample(logits, Sampling(temperature=1.0, top_p=0.8), g)) for _ in range(300)} == {1, 2}


def test_stop_string_filter_holds_back_partial_matches():
    f = StopStringFilter(["</s>", "\nUser:"])
    shown = [f.push(p) for p in ["Hello", " wor", "ld\nUs", "er: more"]]
    assert "".join(shown) == "Hello world"
    assert f.stopped and f.flush() == ""
    g = StopStringFilter(["STOP"])
    assert g.push("ST") == "" and g.push("AR") == "STAR" and g.flush() == ""
    h = StopStringFilter(["STOP"])
    assert h.push("abcST") == "abc" and h.flush() == "ST"


def test_batched_left_padded_greedy_equals_one_by_one():
    from leantune.decode.generate import greedy_batch

    torch.manual_seed(0)
    model = GPT(Config(vocab_size=97, block_size=64, **CONFIGS["llama-gqa"])).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.5)
    prompts = [torch.randint(0, 97, (n,)).tolist() for n in (3, 11, 7)]
    stop = [5]
    batched = greedy_batch(model, prompts, 12, stop_ids=stop)
    for p, got in zip(prompts, batched):
        single = list(generate_tokens(model, torch.tensor(p), 12, stop_ids=stop))
        assert got == [t for t in single if t not in stop]


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), -0.5])
def test_sampling_refuses_a_temperature_that_is_not_a_finite_non_negative_number(bad):
    """`--temperature .inf` used to pass (inf >= 0) and divided every logit into zeros: uniform sampling."""
    with pytest.raises(ValueError, match="temperature"):
        Sampling(temperature=bad)
