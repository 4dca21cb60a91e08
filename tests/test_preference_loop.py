"""Preference tuning through the one loop: every objective trains a method, the reference is the adapter switched off
or precomputed, rewards are logged, resume is exact, accumulation and the flag checks."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
import torch
from method_cases import tiny_args
from safetensors.torch import load_file

from leantune.commands.evaluate import evaluate as evaluate_command
from leantune.data import JSON, Preference
from leantune.data.preference import PairSample, collate_pairs
from leantune.finetune import finetune
from leantune.methods import apply_method
from leantune.models.decoder.config import Config
from leantune.models.decoder.model import GPT
from leantune.peft.base import adapter_off, switchable_layers
from leantune.peft.lora import LoRAArgs
from leantune.train.args import EvalArgs, TrainArgs
from leantune.train.optim import OptimizerArgs
from leantune.train.preference import (
    PrecomputedReference,
    PreferenceArgs,
    PreferenceObjective,
    adapter_off_reference,
    compute_reference_table,
    shard_pairs,
)
from leantune.train.step import train_step


@pytest.fixture(scope="module")
def pair_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    rows = [{"prompt": f"Add {i} and {i + 1}.", "chosen": str(2 * i + 1), "rejected": str(2 * i + 3)}
            for i in range(24)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def run(tmp, ckpt, pair_file, objective="dpo", method="lora", max_steps=4, resume=None, save_interval=None,
        preference=None, micro=2, global_batch=4, precision=None):
    return finetune(method, checkpoint_dir=ckpt, out_dir=tmp, data=Preference(json_path=pair_file), precision=precision,
                    objective=objective, preference=preference,
                    train=TrainArgs(micro_batch_size=micro, global_batch_size=global_batch, max_steps=max_steps,
                                    max_seq_length=64, warmup_steps=1, save_interval=save_interval),
                    eval=EvalArgs(max_batches=2, sample_new_tokens=0, exact_match=False),
                    optimizer=OptimizerArgs(lr=1e-2), method_args=tiny_args(method), resume=resume, threads=2)


def rows(out_dir):
    with open(out_dir / "metrics.csv") as f:
        return [r for r in csv.DictReader(f) if r["loss"]]


@pytest.mark.parametrize("objective", ["dpo", "ipo", "orpo", "simpo"])
def test_every_objective_trains_and_logs_rewards(objective, tiny_checkpoint, pair_file, tmp_path):
    report = run(tmp_path / "run", tiny_checkpoint, pair_file, objective)
    assert report["steps"] == 4 and "val_reward_accuracy" in report and "reward_accuracy_before" in report
    logged = rows(tmp_path / "run")
    assert len(logged) == 4
    for key in ("rewards_chosen", "rewards_rejected", "reward_accuracy", "reward_margin", "logps_chosen",
                "logps_rejected"):
        assert all(r[key] != "" for r in logged), key
    run_json = json.loads((tmp_path / "run" / "final" / "run.json").read_text())
    assert run_json["objective"] == objective
    if objective == "dpo":  # a new LoRA: the reference is the adapter switched off, nothing stored
        assert not (tmp_path / "run" / "reference_logps.safetensors").exists()
        assert float(logged[0]["rewards_chosen"]) == 0.0  # B = 0 at step 1: policy == reference


def test_full_finetuning_uses_a_stored_precomputed_reference(tiny_checkpoint, pair_file, tmp_path):
    run(tmp_path / "run", tiny_checkpoint, pair_file, "dpo", method="full", max_steps=2)
    stored = load_file(tmp_path / "run" / "reference_logps.safetensors")
    assert stored["train"].shape == (23, 2) and stored["val"].shape == (1, 2)  # 24 pairs, 5% held out
    assert torch.isfinite(stored["train"]).all() and (stored["train"] < 0).all()
    assert float(rows(tmp_path / "run")[0]["rewards_chosen"]) == pytest.approx(0.0, abs=1e-4)


def test_adapter_off_refused_where_it_would_not_give_the_base(tiny_checkpoint, pair_file, tmp_path):
    with pytest.raises(ValueError, match="adapter_off needs an adapter whose layers can be switched off"):
        run(tmp_path / "run", tiny_checkpoint, pair_file, "dpo", method="ia3",
            preference=PreferenceArgs(reference="adapter_off"))


def test_resume_is_bit_identical_under_dpo(tiny_checkpoint, pair_file, tmp_path):
    """4 steps straight == 2 + resume + 2, with a precomputed reference read back from the run folder."""
    pref = PreferenceArgs(reference="precomputed")
    run(tmp_path / "a", tiny_checkpoint, pair_file, preference=pref, save_interval=2)
    (tmp_path / "b").mkdir()
    shutil.copytree(tmp_path / "a" / "step-000002", tmp_path / "b" / "step-000002")
    shutil.copy(tmp_path / "a" / "reference_logps.safetensors", tmp_path / "b")
    report = run(tmp_path / "b", tiny_checkpoint, pair_file, preference=pref, resume="auto")
    assert report["steps"] == 4
    a, b = load_file(tmp_path / "a" / "final" / "adapter.safetensors"), load_file(
        tmp_path / "b" / "final" / "adapter.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    assert [r["loss"] for r in rows(tmp_path / "a")][2:] == [r["loss"] for r in rows(tmp_path / "b")]


def test_objective_and_data_must_agree(tiny_checkpoint, pair_file, json_data, tmp_path):
    with pytest.raises(ValueError, match="--objective dpo trains on preference pairs"):
        finetune("lora", checkpoint_dir=tiny_checkpoint, out_dir=tmp_path / "a", data=JSON(json_path=json_data),
                 objective="dpo")
    with pytest.raises(ValueError, match="holds preference pairs: pick --objective"):
        finetune("lora", checkpoint_dir=tiny_checkpoint, out_dir=tmp_path / "b", data=Preference(json_path=pair_file))
    with pytest.raises(ValueError, match="--objective must be one of"):
        finetune("lora", checkpoint_dir=tiny_checkpoint, out_dir=tmp_path / "c", objective="kto")
    with pytest.raises(ValueError, match="--preference.beta must be > 0"):
        PreferenceArgs(beta=0)


# ---- the step alone, on a tiny GPT ----------------------------------------------------------------------------------
def tiny_lora():
    torch.manual_seed(0)
    model = GPT(Config(vocab_size=61, block_size=32, n_layer=2, n_embd=32, n_head=4, n_query_groups=2))
    names = apply_method(model, "lora", LoRAArgs(r=4, dropout=0.0, targets="all"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return model, names


def pair_batch(n_pairs: int, seed: int = 0, first_index: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for i in range(n_pairs):
        p, c, r = (torch.randint(3, 61, (int(torch.randint(1, 7, (1,), generator=g)),), generator=g).tolist()
                   for _ in range(3))
        pairs.append(PairSample([1, *p], c, r, i, index=first_index + i))
    return collate_pairs(pairs, pad_id=0)


def test_adapter_off_gives_the_base_model():
    """Switched off, the LoRA model computes the base (the same model with B = 0); switched back on, the adapter."""
    model, names = tiny_lora()
    x = torch.randint(0, 61, (2, 9))
    layers = switchable_layers(model, names)
    with torch.no_grad():
        adapted = model(x)
        with adapter_off(layers):
            off = model(x)
        again = model(x)
        for m in layers:
            m.lora_B.zero_()
        base = model(x)
    assert not torch.allclose(adapted, off) and torch.equal(adapted, again)
    torch.testing.assert_close(off, base, atol=1e-6, rtol=0)


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_accumulation_and_pair_shards_give_one_update(objective):
    """1 x 4 pairs == 2 x 2 with accumulation == the two halves of `shard_pairs` (what 2 ranks train on) summed."""
    batch = pair_batch(4)
    grads = []
    for window in ([batch], [shard_pairs(batch, 0, 2), shard_pairs(batch, 1, 2)]):
        model, names = tiny_lora()
        params = [dict(model.named_parameters())[n] for n in names]
        ref = adapter_off_reference(lambda m, _layers=switchable_layers(model, names): adapter_off(_layers))
        obj = PreferenceObjective(objective, PreferenceArgs(beta=0.5), ref)
        opt = torch.optim.SGD(params, lr=1.0)
        before = [p.detach().clone() for p in params]
        result = train_step(model, window, opt, params, objective=obj)
        grads.append(([p.detach() - b for p, b in zip(params, before)], result))
    (d1, r1), (d2, r2) = grads
    for a, b in zip(d1, d2):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert r1.loss == pytest.approx(r2.loss, abs=1e-6)
    for k in r1.metrics:
        assert r1.metrics[k] == pytest.approx(r2.metrics[k], abs=1e-5), k


def test_an_empty_pair_share_contributes_nothing():
    batch = pair_batch(1)
    share = shard_pairs(batch, 0, 2)  # pairs [0, 0) of 1: empty
    assert share["pairs"] == 0 and share["pair_weight"].tolist() == [0.0]
    model, names = tiny_lora()
    obj = PreferenceObjective("simpo", PreferenceArgs())
    terms, stats = obj.terms(model, share)
    assert float(terms["pairs"].detach()) == 0.0 and all(float(v) == 0.0 for v in stats.values())


def test_a_reference_over_the_first_batches_only_refuses_other_pairs():
    """`evaluate --max_batches N` computes the reference log-probs of the first N batches' pairs only; a pair outside
    them fails in one line instead of scoring against NaN."""
    model, _ = tiny_lora()
    batches = [pair_batch(2, seed=s, first_index=2 * s) for s in range(3)]  # pairs 0-1, 2-3, 4-5
    full = compute_reference_table(model, batches, 6, torch.device("cpu"))
    first = compute_reference_table(model, batches, 6, torch.device("cpu"), max_batches=1)
    assert torch.equal(first[:2], full[:2]) and bool(first[2:].isnan().all()) and not bool(full.isnan().any())
    reference = PrecomputedReference({"train": first})
    assert torch.equal(reference(model, batches[0]), torch.cat([full[:2, 0], full[:2, 1]]))
    with pytest.raises(RuntimeError, match="no reference log-probs for some train pairs"):
        reference(model, batches[1])


def test_evaluate_preference_metric_against_the_base(tiny_checkpoint, pair_file, tmp_path):
    """The trained adapter's held-out reward accuracy equals what training logged at its end; the base against
    itself has rewards 0 (accuracy 0, margin 0); data without pairs is refused before a model loads. Trained in fp32,
    as evaluate scores: auto's bf16-mixed validation differs from an fp32 evaluation by bf16 rounding (~2e-4 here)."""
    report = run(tmp_path / "run", tiny_checkpoint, pair_file, "dpo", max_steps=3, precision="32-true")
    data = Preference(json_path=pair_file)
    out = evaluate_command(checkpoint_dir=tiny_checkpoint, adapter=tmp_path / "run" / "final", data=data,
                           metric="preference", compare_base=True, max_seq_length=64, batch_size=2)
    assert out["base"]["reward_accuracy"] == 0.0 and out["base"]["reward_margin"] == 0.0
    assert out["reward_accuracy"] == pytest.approx(report["val_reward_accuracy"], abs=1e-6)
    assert out["reward_margin"] == pytest.approx(report["val_reward_margin"], abs=1e-4)
    first = evaluate_command(checkpoint_dir=tiny_checkpoint, adapter=tmp_path / "run" / "final", data=data,
                             metric="preference", max_seq_length=64, batch_size=1, max_batches=1)
    assert first["reward_accuracy"] in (0.0, 1.0)  # one pair scored, against a reference of that pair alone
    with pytest.raises(ValueError, match="--metric preference scores chosen/rejected pairs"):
        evaluate_command(checkpoint_dir=tiny_checkpoint, data=JSON(json_path=pair_file), metric="preference")


def test_dpo_on_a_4_bit_base_switches_the_adapter_off(tiny_checkpoint, pair_file, tmp_path):
    """QLoRA: the frozen nf4 base runs alone as the reference (no dequantized copy); the run trains and resumes like
    any other."""
    report = run(tmp_path / "run", tiny_checkpoint, pair_file, "dpo", method="qlora", max_steps=2)
    assert report["steps"] == 2 and not (tmp_path / "run" / "reference_logps.safetensors").exists()
    assert float(rows(tmp_path / "run")[0]["rewards_chosen"]) == 0.0


def test_resume_auto_on_a_new_run_computes_the_reference(tiny_checkpoint, pair_file, tmp_path):
    """--resume auto with no checkpoint yet starts afresh: the precomputed reference is computed, not looked for."""
    report = run(tmp_path / "run", tiny_checkpoint, pair_file, preference=PreferenceArgs(reference="precomputed"),
                 resume="auto", max_steps=1)
    assert report["steps"] == 1 and (tmp_path / "run" / "reference_logps.safetensors").is_file()
