"""The real default model (SmolLM2-135M-Instruct from the bundled GGUF): greedy text == transformers', CLI works."""

import subprocess
import sys

import pytest
import torch
import transformers as tf

from leantune.checkpoint.hf import load_hf_checkpoint
from leantune.decode.generate import encode_prompt, generate_tokens
from leantune.tokenizer import Tokenizer

pytestmark = pytest.mark.slow

PROMPTS = ["What is the capital of France?", "Write a haiku about autumn leaves.", "List three prime numbers."]


@pytest.fixture(scope="module")
def models(default_checkpoint):
    ours = load_hf_checkpoint(default_checkpoint).eval()
    hf = tf.AutoModelForCausalLM.from_pretrained(default_checkpoint, dtype=torch.float32).eval()
    return ours, hf, Tokenizer(default_checkpoint)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_continuation_equals_transformers(models, prompt):
    ours, hf, tok = models
    ids = torch.tensor(encode_prompt(tok, prompt))
    mine = list(generate_tokens(ours, ids, 32, stop_ids=tok.eos_ids))
    with torch.inference_mode():
        ref = hf.generate(ids[None], max_new_tokens=32, do_sample=False, eos_token_id=tok.eos_ids,
                          attention_mask=torch.ones(1, len(ids), dtype=torch.long), pad_token_id=tok.pad_id)
    assert mine == ref[0, len(ids):].tolist()
    assert len(set(mine)) > 5


def test_logits_match_transformers(models):
    ours, hf, tok = models
    ids = torch.tensor([tok.encode("The quick brown fox jumps over the lazy dog. " * 4)])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)


def test_generate_cli_answers_a_chat_prompt(default_checkpoint):
    out = subprocess.run(
        [sys.executable, "-m", "leantune.cli", "generate", "--prompt", "What is the capital of France?",
         "--checkpoint_dir", str(default_checkpoint), "--temperature", "0", "--max_new_tokens", "24", "--threads", "2"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout
    assert "tokens/s" in out.stderr
