"""The method table: every method is one record, and a new one is one definition away from every command.

`HEAD_ONLY` below is the whole of a test-only method (it trains just the output head's bias-free weight). Registered,
it trains through the one loop, saves and reloads through the generic adapter I/O, is counted by estimate and shows
up as `leantune finetune head_only` with its own --help, without a line changed elsewhere.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
from method_cases import EVERY_METHOD, tiny_args

from leantune.checkpoint.io import load_safetensors
from leantune.cli import main
from leantune.data import JSON
from leantune.estimate import estimate
from leantune.finetune import finetune
from leantune.inference import load_for_inference
from leantune.methods import METHODS, apply_method, load_any_adapter, register
from leantune.models.decoder.config import Config
from leantune.models.decoder.model import GPT
from leantune.peft.base import Method
from leantune.train.args import EvalArgs, TrainArgs
from leantune.train.optim import OptimizerArgs


@dataclass
class HeadOnlyArgs:
    scale: float = 1.0
    """A test-only flag: multiplies the head's initial weight."""


def _scale_head(model: nn.Module, args: HeadOnlyArgs) -> None:
    with torch.no_grad():
        model.lm_head.weight.mul_(args.scale)


HEAD_ONLY = Method(name="head_only", summary="Test-only: train the output head", args_class=HeadOnlyArgs,
                   apply=_scale_head, adapter_params=lambda model: [model.lm_head.weight], default_lr=1e-3)


@pytest.fixture
def head_only():
    register(HEAD_ONLY)
    yield HEAD_ONLY
    del METHODS[HEAD_ONLY.name]


def test_every_method_is_one_record_with_its_own_args_and_help():
    assert {"lora", "qlora", "adapter", "adapter_v2", "full"} <= set(METHODS)
    for name, m in METHODS.items():
        assert m.name == name and m.summary and m.default_lr > 0
        assert m.variant_of is None or m.variant_of in METHODS
    assert METHODS["adapter_v2"].args_class is not METHODS["adapter"].args_class  # own --help text
    assert METHODS["qlora"].default_quantize == "bnb.nf4-dq" and METHODS["qlora"].kind == "lora"
    assert METHODS["full"].saves_full_model and not METHODS["full"].accepts_quantized_base


def test_trainable_tensors_come_from_the_method_not_from_names():
    cfg = Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, block_size=32)
    for name in EVERY_METHOD:
        model = GPT(cfg)
        trainable = apply_method(model, name, tiny_args(name))
        chosen = {id(p) for p in METHODS[name].adapter_params(model)}
        assert trainable and {n for n, p in model.named_parameters() if id(p) in chosen} == set(trainable)
        assert all(p.requires_grad == (n in trainable) for n, p in model.named_parameters())


def test_a_registered_method_runs_through_every_command(head_only, tiny_checkpoint, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": f"Add {i} and 1.", "output": str(i + 1)}) for i in range(24)))
    report = finetune("head_only", checkpoint_dir=tiny_checkpoint, out_dir=tmp_path / "run", data=JSON(json_path=data),
                      train=TrainArgs(micro_batch_size=2, global_batch_size=4, max_steps=2, max_seq_length=64),
                      eval=EvalArgs(max_batches=1, sample_new_tokens=0, exact_match=False),
                      optimizer=OptimizerArgs(), method_args=HeadOnlyArgs(scale=0.5), threads=2)
    assert report["steps"] == 2 and report["trainable_params"] == 49152 * 32
    final = tmp_path / "run" / "final"
    manifest = json.loads((final / "leantune.json").read_text())
    assert manifest["method"] == "head_only" and manifest["method_args"] == {"scale": 0.5}

    model, _, _, _ = load_for_inference(tiny_checkpoint, adapter=final)
    saved = load_safetensors(final / "adapter.safetensors")
    (name, head), = saved.items()  # only the head's weight (under its first name when tied to the embedding)
    assert name in ("lm_head.weight", "transformer.wte.weight")
    torch.testing.assert_close(model.lm_head.weight, head)
    model2, _, _, _ = load_for_inference(tiny_checkpoint)
    assert not torch.equal(model2.lm_head.weight, head)  # training changed it
    load_any_adapter(model2, final)
    torch.testing.assert_close(model2.lm_head.weight, head)

    counts = estimate(Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64), "head_only", None, "32-true")
    assert counts["trainable_params"] == 64 * 32

    with pytest.raises(SystemExit) as e:
        main(["finetune", "head_only", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "Test-only: train the output head" in out and "--head_only.scale" in out


@pytest.mark.parametrize("method", EVERY_METHOD)
def test_every_method_trains_only_its_tensors(method):
    """After a no-grad eval pass, three training steps: every trainable tensor gets finite gradients, non-zero by the
    last step (zero-initialised factors such as LoRA's B or the adapters' gates unlock the others after one step),
    and changes; every frozen tensor stays bit-identical."""
    torch.manual_seed(0)
    model = GPT(Config(n_layer=2, n_embd=32, n_head=4, n_query_groups=2, vocab_size=64, block_size=32))
    trainable = set(apply_method(model, method, tiny_args(method)))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    idx = torch.randint(0, 64, (2, 12))
    model.eval()
    with torch.no_grad():
        model(idx)
    model.train()
    params = [p for n, p in model.named_parameters() if n in trainable]
    opt = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(3):
        logits = model(idx[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten())
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if n in trainable}
        assert all(torch.isfinite(g).all() for g in grads.values())
        opt.step()
        opt.zero_grad(set_to_none=False)
    assert all(g.abs().sum() > 0 for g in grads.values()), [n for n, g in grads.items() if g.abs().sum() == 0]
    for n, p in model.named_parameters():
        changed = not torch.equal(p.detach(), before[n])
        assert changed == (n in trainable), f"{method}: {n} {'changed' if changed else 'did not change'}"
