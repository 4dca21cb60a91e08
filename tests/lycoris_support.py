"""Helpers shared by the LoHa and LoKr suites (a helper module, not a test module): tiny HF bases, peft models
made from them, random non-zero factors, and one optimizer step on either side."""

import peft
import torch
from safetensors.torch import load_file
from tiny_families import V
from tiny_families import load_hf as hf_model

from leantune.train.loss import supervised_ce_sum


def randomize(params, std=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * std)




def peft_from_folder(base, adapter_dir, trainable=False):
    return peft.PeftModel.from_pretrained(hf_model(base), adapter_dir, is_trainable=trainable)


def make_peft(base, out_dir, config):
    """A real peft model of `config` with random non-zero factors, saved with save_pretrained."""
    pm = peft.get_peft_model(hf_model(base), config)
    randomize([p for n, p in pm.named_parameters() if p.requires_grad], seed=1)
    pm.eval().save_pretrained(out_dir)
    return pm, out_dir


def idx(seed=0):
    return torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(seed))


def loss_ours(model, x):
    labels = torch.cat([x[:, 1:], torch.full((x.shape[0], 1), -100)], dim=1)
    return supervised_ce_sum(model(x, return_hidden=True), model.lm_head, labels) / int((labels != -100).sum())


def loss_peft(pm, x):
    labels = torch.cat([x[:, 1:], torch.full((x.shape[0], 1), -100)], dim=1)
    logits = pm(x).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


def adamw_step(params, loss):
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
    loss.backward()
    opt.step()


def peft_tensors(folder):
    return load_file(folder / "adapter_model.safetensors")
