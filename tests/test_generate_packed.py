"""Eager decoding in `generate` and `chat` runs the block linears oneDNN-packed (`inference.pack_for_eager_decoding`):
the logits are the plain model's up to rounding for the base and every method's adapter, the default model's greedy
tokens are the same, the generate command packs only when it decodes eagerly, and an encoder-decoder is left as is."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from method_cases import EVERY_METHOD, tiny_args

import leantune.commands.generate as generate_command
from leantune.cli import main
from leantune.decode.generate import encode_prompt, generate_tokens
from leantune.decode.packed import PackedLinear, packable
from leantune.inference import load_for_inference, pack_for_eager_decoding
from leantune.methods import apply_method
from leantune.models.decoder.config import Config
from leantune.models.decoder.model import GPT

pytestmark = pytest.mark.skipif(not packable(nn.Linear(2, 2)), reason="no oneDNN on this build")


NOTHING_PLAIN = {"adapter_v2"}
"""Methods that replace every block linear with their own layer type: nothing is packed, decoding runs as before."""


def tiny_model(method: str | None) -> GPT:
    torch.manual_seed(0)
    model = GPT(Config(vocab_size=96, block_size=64, n_layer=2, n_embd=64, n_head=4, n_query_groups=2))
    if method is not None:
        names = set(apply_method(model, method, tiny_args(method)))
        with torch.no_grad():  # a trained adapter changes the output (LoRA's B, IA3's scales start at no change)
            for name, p in model.named_parameters():
                if name in names:
                    p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("method", [None, *EVERY_METHOD])
def test_packed_linears_give_the_plain_models_logits(method):
    model = tiny_model(method)
    idx = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = model(idx)
        packed = pack_for_eager_decoding(model)
        assert sum(isinstance(m, PackedLinear) for m in model.modules()) == packed
        assert packed > 0 or method in NOTHING_PLAIN, "no plain linear was packed"
        torch.testing.assert_close(model(idx), plain, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_default_model_decodes_the_same_tokens_packed(default_checkpoint):
    model, tokenizer, _, _ = load_for_inference(default_checkpoint, "32-true")
    ids = torch.tensor(encode_prompt(tokenizer, "Write a short story about a robot who learns to paint."))
    plain = list(generate_tokens(model, ids, 32, stop_ids=[]))
    assert pack_for_eager_decoding(model) == 5 * model.config.n_layer  # qkv (fused), attention proj, 3 MLP linears
    assert list(generate_tokens(model, ids, 32, stop_ids=[])) == plain


def test_generate_packs_when_it_decodes_eagerly(tiny_checkpoint, monkeypatch, capsys):
    swapped = []
    monkeypatch.setattr(generate_command, "pack_for_eager_decoding",
                        lambda m: swapped.append(pack_for_eager_decoding(m)) or swapped[-1])
    main(["generate", "--checkpoint_dir", str(tiny_checkpoint), "--prompt", "Hello", "--max_new_tokens", "3",
          "--compile", "false", "--precision", "32-true"])
    assert swapped and swapped[0] > 0
    capsys.readouterr()


def test_an_encoder_decoder_is_not_packed():
    from leantune.models.t5.model import T5, T5Config

    model = T5(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4))
    assert pack_for_eager_decoding(model) == 0
    assert not any(isinstance(m, PackedLinear) for m in model.modules())
