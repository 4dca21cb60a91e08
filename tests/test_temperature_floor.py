"""Temperatures below `MIN_TEMPERATURE` decode greedily, one rule in `Sampling` for generate, chat, evaluate and serve:
`--temperature 1e-40` (valid: >= 0) divided the logits into inf, the probabilities into NaN and ended in a traceback."""

from __future__ import annotations

import pytest
import torch

from leantune.decode.generate import MIN_TEMPERATURE, Sampling, generate_tokens, sample
from leantune.evaluation.harness import sampling_from_kwargs
from leantune.models.decoder.config import Config
from leantune.models.decoder.model import GPT


@pytest.mark.parametrize("t", [1e-40, 1e-300, 5e-324, MIN_TEMPERATURE / 2])
def test_a_temperature_below_the_floor_is_greedy(t):
    s = Sampling(temperature=t, top_k=5, top_p=0.9)
    assert s.greedy and not Sampling(temperature=MIN_TEMPERATURE).greedy
    logits = torch.tensor([[30.0, 31.0, -4.0, 29.5]])
    g = torch.Generator().manual_seed(0)
    assert sample(logits, s, g).tolist() == [1]
    assert sampling_from_kwargs({"temperature": t, "do_sample": True}) is None  # evaluate's greedy batches


def test_generate_at_temperature_1e_40_equals_greedy():
    torch.manual_seed(0)
    model = GPT(Config(vocab_size=64, block_size=32, n_layer=1, n_embd=16, n_head=2, n_query_groups=1,
                       intermediate_size=32, norm_class="rmsnorm", mlp_class="swiglu")).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 3.0)  # logits in the hundreds: 1e-40 overflows float32 at once
    prompt = torch.tensor([1, 5, 9])
    greedy = list(generate_tokens(model, prompt, 8))
    cold = list(generate_tokens(model, prompt, 8, Sampling(temperature=1e-40), generator=torch.Generator()))
    assert cold == greedy
