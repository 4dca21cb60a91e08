"""Shared fixtures: deterministic torch on 2 threads, and the default model converted once per session."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from leantune.checkpoint.hf import TOKENIZER_FILES
from leantune.methods import apply_method
from leantune.models.decoder.config import Config
from leantune.models.decoder.model import GPT
from leantune.peft.lora import LoRAArgs

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _torch_defaults() -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def default_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model as an HF folder: `checkpoints/` under the repo root if complete, else converted once."""
    from leantune.checkpoint.gguf import default_gguf_path, gguf_to_hf
    from leantune.download import DEFAULT_REPO_ID, is_complete

    existing = REPO_ROOT / "checkpoints" / DEFAULT_REPO_ID
    if is_complete(existing):
        return existing
    return gguf_to_hf(default_gguf_path(), tmp_path_factory.mktemp("ckpt") / "SmolLM2-135M-Instruct")


# ---- the training loop's tiny world: a 2-layer GPT on deterministic token samples (loop, resume, logging tests) --
V = 89


class TinyData:
    """Deterministic samples of unequal lengths, right-padded, labels pre-shifted with a masked prompt part."""

    def __init__(self, n: int = 48, seed: int = 0, micro_batch_size: int = 2) -> None:
        g = torch.Generator().manual_seed(seed)
        self.samples = []
        for i in range(n):
            length = int(torch.randint(6, 20, (1,), generator=g))
            ids = torch.randint(0, V, (length,), generator=g)
            labels = torch.cat([ids[1:], torch.tensor([-100])])
            labels[: length // 3] = -100  # "prompt" tokens are not supervised
            self.samples.append((i, ids, labels))
        self.mbs = micro_batch_size
        self.seed = seed

    def _collate(self, rows):
        T = max(len(r[1]) for r in rows)
        ids = torch.zeros(len(rows), T, dtype=torch.long)
        labels = torch.full((len(rows), T), -100)
        mask = torch.zeros(len(rows), T, dtype=torch.long)
        for j, (_, i, lab) in enumerate(rows):
            ids[j, : len(i)], labels[j, : len(i)], mask[j, : len(i)] = i, lab, 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask, "sample_ids": [[r[0]] for r in rows]}

    def train_dataloader(self, epoch: int = 0):
        order = torch.randperm(len(self.samples), generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        return [self._collate([self.samples[k] for k in order[s:s + self.mbs]])
                for s in range(0, len(order) - self.mbs + 1, self.mbs)]

    def val_dataloader(self):
        return [self._collate(self.samples[s:s + 4]) for s in range(0, 8, 4)]


def make_model(method: str, dropout: float = 0.1):
    torch.manual_seed(0)
    model = GPT(Config(vocab_size=V, block_size=32, n_layer=2, n_embd=32, n_head=4, n_query_groups=2))
    args = LoRAArgs(r=4, dropout=dropout, targets="all") if method == "lora" else None
    names = apply_method(model, method, args)
    return model, names


# ---- the commands' tiny world: a random 2-layer Llama with the real default tokenizer, and a small JSON task ----
@pytest.fixture(scope="session")
def tiny_checkpoint(default_checkpoint, tmp_path_factory):
    """A 2-layer random Llama with the default model's tokenizer files (so prompts are real)."""
    import transformers as tf  # heavy: only sessions that use the fixture pay for it

    path = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    for name in TOKENIZER_FILES:
        if (default_checkpoint / name).is_file() and name != "generation_config.json":
            shutil.copy(default_checkpoint / name, path / name)
    return path


@pytest.fixture(scope="session")
def json_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = [{"instruction": f"Add {i} and {i + 1}.", "input": "", "output": str(2 * i + 1)} for i in range(40)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path
