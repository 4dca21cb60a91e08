"""Preference losses equal TRL's own computation (fp32, 1e-5): per-example chosen/rejected log-probs, rewards and the
DPO, IPO, ORPO and SimPO losses, on a tiny random model holding the same weights as a transformers model, with
padding, truncation and a chat template in the batch. TRL is the reference: its DPOTrainer's own methods, its
ORPO/CPO trainers' loss functions."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import transformers as tf
import trl
from data_support import CHATML_TEMPLATE, StubTokenizer
from trl.experimental.cpo.cpo_trainer import CPOTrainer
from trl.experimental.orpo.orpo_trainer import ORPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference

from leantune.checkpoint.hf import load_hf_checkpoint
from leantune.data.errors import Skips
from leantune.data.preference import PairSample, collate_pairs, convert_pair, tokenize_pair
from leantune.data.prompts import PromptStyle, TemplateStyle
from leantune.data.sft import Example
from leantune.methods import get_method, load_any_adapter
from leantune.peft.base import adapter_off, mark_trainable, switchable_layers
from leantune.train.preference import (
    PrecomputedReference,
    PreferenceArgs,
    PreferenceObjective,
    adapter_off_reference,
    token_logps,
)
from leantune.train.step import train_step

V = 256  # the stub tokenizer's printable ASCII (ord + 100) fits
ROWS = [
    {"prompt": "Add 2 and 3.", "chosen": "5", "rejected": "six, I think"},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color!"}],
     "chosen": [{"role": "assistant", "content": "red"}], "rejected": [{"role": "assistant", "content": "a table"}]},
    {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye?\n\nAssistant: goodbye, friend",
     "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye?\n\nAssistant: no"},
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("pref")
    cfg = tf.LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    cfg._attn_implementation = "sdpa"
    hf = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(d / "hf")
    ours = load_hf_checkpoint(d / "hf").eval()
    return hf.eval(), ours, d


@pytest.fixture(scope="module")
def trainer(models):
    """A DPOTrainer over the transformers model (its methods are the reference computation)."""
    from datasets import Dataset
    from tokenizers import Tokenizer as HFTok
    from tokenizers import models as tok_models
    from tokenizers import pre_tokenizers

    hf, _, d = models
    tk = HFTok(tok_models.WordLevel({f"t{i}": i for i in range(V)}, unk_token="t3"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="t2", pad_token="t0", bos_token="t1")
    args = trl.DPOConfig(output_dir=str(d / "trl"), report_to=[], beta=0.1, use_cpu=True, bf16=False)
    ref = tf.AutoModelForCausalLM.from_pretrained(d / "hf", dtype=torch.float32)
    t = trl.DPOTrainer(model=hf, ref_model=ref, args=args, processing_class=tok,
                       train_dataset=Dataset.from_list([{"prompt": "t5", "chosen": " t6", "rejected": " t7"}]))
    t.precompute_ref_logps = True  # the loss reads the reference log-probs from the batch
    return t


def pairs(style: PromptStyle, max_seq_length: int = 0, truncation: str = "truncate_response"):
    tok = StubTokenizer(chat_template=CHATML_TEMPLATE)
    style = style if not isinstance(style, type) else style(tok)
    skips = Skips()
    out = [tokenize_pair(Example(convert_pair(r), "pairs.jsonl", i + 1, i), style, tok, max_seq_length, skips,
                         truncation) for i, r in enumerate(ROWS)]
    for i, s in enumerate(out):
        s.index = i
    return out


STYLES = {"alpaca": lambda: PromptStyle.from_name("alpaca"), "chatml": lambda: PromptStyle.from_name("chatml"),
          "template": lambda: TemplateStyle(StubTokenizer(chat_template=CHATML_TEMPLATE))}


def trl_batch(full, max_length=None, ref=None):
    batch = DataCollatorForPreference(pad_token_id=0, max_length=max_length)(
        [{"prompt_ids": p.prompt, "chosen_ids": p.chosen, "rejected_ids": p.rejected} for p in full])
    if ref is not None:
        batch["ref_chosen_logps"], batch["ref_rejected_logps"] = ref[:, 0].clone(), ref[:, 1].clone()
    return batch


@pytest.mark.parametrize("style", sorted(STYLES))
@pytest.mark.parametrize("truncate", [False, True])
def test_log_probs_match_trl(models, trainer, style, truncate):
    """Padding (three lengths), truncation (TRL's keep_start == our truncate_response) and chat templates."""
    _, ours, _ = models
    full = pairs(STYLES[style]())
    max_length = max(len(p.prompt) for p in full) + 2 if truncate else None
    cut = pairs(STYLES[style](), max_length or 0)
    if max_length:
        assert any(len(p) > max_length for p in full) and all(len(p) <= max_length for p in cut)
    batch = collate_pairs(cut, pad_id=0)
    with torch.no_grad():
        logps, _ = token_logps(ours(batch["input_ids"], return_hidden=True), ours.lm_head, batch["labels"])
        ref_c, ref_r = trainer.compute_ref_log_probs(trainer.model, trl_batch(full, max_length))
    # sums of fp32 token log-probs (|sum| ~90): the two tools' summation orders differ by an ulp or two (1.5e-5
    # seen); a wrong token, mask or shift moves a sum by far more than 1e-6 of it
    torch.testing.assert_close(logps[:3], ref_c, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(logps[3:], ref_r, atol=1e-5, rtol=1e-6)


def _ours(models, objective, args, ref=None, style="chatml"):
    _, ours, _ = models
    cut = pairs(STYLES[style]())
    batch = collate_pairs(cut, pad_id=0)
    obj = PreferenceObjective(objective, args, PrecomputedReference({"train": ref}) if ref is not None else None)
    with torch.no_grad():
        terms, stats = obj.terms(ours, batch)
    counts = obj.counts(batch)
    loss = sum(terms[k] / counts[k] for k in terms)
    return loss, {k: v / counts["pairs"] for k, v in stats.items()}, cut


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_and_ipo_losses_and_rewards_match_trl(models, trainer, loss_type):
    ref = torch.tensor([[-40.0, -52.0], [-30.5, -33.0], [-70.0, -20.0]])
    args = PreferenceArgs(beta=0.3)
    loss, stats, cut = _ours(models, "dpo" if loss_type == "sigmoid" else "ipo", args, ref)
    trainer.beta, trainer.loss_types, trainer.loss_weights = 0.3, [loss_type], [1.0]
    trainer._metrics["eval"].clear()
    with torch.no_grad():
        expected = trainer._compute_loss(trainer.model, trl_batch(cut, ref=ref), False)
    m = {k: v[-1] for k, v in trainer._metrics["eval"].items()}
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=0)
    for ours_key, trl_key in (("rewards_chosen", "rewards/chosen"), ("rewards_rejected", "rewards/rejected"),
                              ("reward_accuracy", "rewards/accuracies"), ("reward_margin", "rewards/margins"),
                              ("logps_chosen", "logps/chosen"), ("logps_rejected", "logps/rejected")):
        assert float(stats[ours_key]) == pytest.approx(m[trl_key], abs=1e-5), ours_key


def _trl_logits_and_labels(models, cut):
    hf = models[0]
    batch = DataCollatorForPreference(pad_token_id=0)(
        [{"prompt_ids": p.prompt, "chosen_ids": p.chosen, "rejected_ids": p.rejected} for p in cut])
    with torch.no_grad():
        logits = hf(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)  # ORPO/CPO's concatenated_labels
    return logits, labels, batch


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_simpo_and_smoothed_dpo_match_trl_cpo_loss(models, label_smoothing):
    """SimPO is TRL's CPOTrainer loss_type simpo with cpo_alpha 0; DPO's label smoothing is the conservative sigmoid
    (TRL's CPO `sigmoid` form, applied to the reference-adjusted logits)."""
    beta, gamma = 2.0, 0.7
    loss, stats, cut = _ours(models, "simpo", PreferenceArgs(beta=beta, gamma=gamma, label_smoothing=label_smoothing))
    logits, labels, _ = _trl_logits_and_labels(models, cut)
    mean = CPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
    fake = SimpleNamespace(alpha=0.0, beta=beta, simpo_gamma=gamma, label_smoothing=label_smoothing,
                           loss_type="simpo", accelerator=SimpleNamespace(device="cpu"))
    losses, rc, rr = CPOTrainer.cpo_loss(fake, mean[:3], mean[3:])
    torch.testing.assert_close(loss, losses.mean(), atol=1e-5, rtol=0)
    torch.testing.assert_close(stats["rewards_chosen"], rc.mean(), atol=1e-5, rtol=0)
    torch.testing.assert_close(stats["reward_margin"], (rc - rr).mean(), atol=1e-5, rtol=0)

    ref = torch.tensor([[-40.0, -52.0], [-30.5, -33.0], [-70.0, -20.0]])
    loss, _, _ = _ours(models, "dpo", PreferenceArgs(beta=0.1, label_smoothing=label_smoothing), ref)
    total = CPOTrainer.get_batch_logps(logits, labels)
    fake = SimpleNamespace(alpha=0.0, beta=0.1, label_smoothing=label_smoothing, loss_type="sigmoid",
                           accelerator=SimpleNamespace(device="cpu"))
    losses, _, _ = CPOTrainer.cpo_loss(fake, total[:3] - ref[:, 0], total[3:] - ref[:, 1])
    torch.testing.assert_close(loss, losses.mean(), atol=1e-5, rtol=0)


def test_orpo_matches_trl(models):
    """ORPO: the chosen rows' NLL over every real token (TRL's concatenated_forward) minus beta x the mean
    log-sigmoid of the log-odds ratio (TRL's odds_ratio_loss)."""
    beta = 0.25
    loss, stats, cut = _ours(models, "orpo", PreferenceArgs(beta=beta))
    logits, labels, batch = _trl_logits_and_labels(models, cut)
    mean = ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
    fake = SimpleNamespace(beta=beta, accelerator=SimpleNamespace(device="cpu"))
    losses, rc, rr, _, _ = ORPOTrainer.odds_ratio_loss(fake, mean[:3], mean[3:])
    nll_labels = torch.where(batch["attention_mask"] == 1, batch["input_ids"], -100)[:3, 1:]
    nll = torch.nn.functional.cross_entropy(logits[:3, :-1].reshape(-1, V), nll_labels.reshape(-1))
    torch.testing.assert_close(loss, nll - losses.mean(), atol=1e-5, rtol=0)
    torch.testing.assert_close(stats["rewards_rejected"], rr.mean(), atol=1e-5, rtol=0)
    torch.testing.assert_close(stats["reward_accuracy"], (rc > rr).float().mean(), atol=1e-5, rtol=0)


def test_one_dpo_step_equals_trl_trainer_step_on_the_same_lora(models, tmp_path):
    """TRL's DPOTrainer takes one SGD step on a PEFT LoRA (reference: the adapter disabled); leantune takes one step
    on the same LoRA loaded from PEFT's folder (reference: the adapter switched off). Same logits after."""
    from datasets import Dataset
    from peft import LoraConfig
    from tokenizers import Tokenizer as HFTok
    from tokenizers import models as tok_models
    from tokenizers import pre_tokenizers

    _, _, d = models
    torch.manual_seed(1)
    hf = tf.AutoModelForCausalLM.from_pretrained(d / "hf", dtype=torch.float32)
    names = {0: "<pad>", 1: "<s>", 2: "</s>", 3: "<unk>"}  # no token's text starts with a special token's
    vocab = {names.get(i, f"w{i}"): i for i in range(V)}
    tk = HFTok(tok_models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>", pad_token="<pad>", bos_token="<s>")
    rows = [([1, 5, 6], [8, 9, 2], [10, 2]), ([1, 11], [12, 13, 14, 2], [15, 16, 17, 18, 2]),
            ([1, 20, 21, 22, 23], [30, 2], [31, 32, 2]), ([1, 40], [41, 42, 2], [43, 2])]

    def text(ids):
        return " ".join(names.get(i, f"w{i}") for i in ids)

    ds = Dataset.from_list([{"prompt": text(p), "chosen": " " + text(c), "rejected": " " + text(r)}
                            for p, c, r in rows])
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), report_to=[], beta=0.1, use_cpu=True, bf16=False,
                         per_device_train_batch_size=4, max_steps=1, learning_rate=0.5, lr_scheduler_type="constant",
                         optim="sgd", weight_decay=0.0, max_grad_norm=0.0, save_strategy="no", logging_steps=1,
                         seed=0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                      init_lora_weights=False)  # B random too: the adapter matters from the first forward
    trainer = trl.DPOTrainer(model=hf, args=args, processing_class=tok, train_dataset=ds, peft_config=lora)
    trainer.model.save_pretrained(tmp_path / "peft")  # a new adapter: TRL's reference is the adapter disabled
    trainer.train()

    ours = load_hf_checkpoint(d / "hf")
    load_any_adapter(ours, tmp_path / "peft", d / "hf")
    trained = mark_trainable(ours, get_method("lora").adapter_params(ours))
    params = [dict(ours.named_parameters())[n] for n in trained]
    objective = PreferenceObjective("dpo", PreferenceArgs(beta=0.1),
                                    adapter_off_reference(lambda m: adapter_off(switchable_layers(ours, trained))))
    pairs_ = [PairSample(p, c, r, i, index=i) for i, (p, c, r) in enumerate(rows)]
    ours.train()
    result = train_step(ours, [collate_pairs(pairs_, 0)], torch.optim.SGD(params, lr=0.5), params,
                        objective=objective)
    logged = next(h for h in trainer.state.log_history if "loss" in h)
    assert [len(r) for r in trainer.train_dataset["rejected_ids"]] == [len(r) for _, _, r in rows]  # same tokens
    assert result.loss == pytest.approx(logged["loss"], abs=1e-5)
    x = torch.randint(0, V, (2, 12))
    trainer.model.eval()
    ours.eval()
    with torch.no_grad():
        expected = trainer.model(x).logits
        torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=0)
        with trainer.model.disable_adapter():
            base = trainer.model(x).logits
    assert (expected - base).abs().max() > 1e-3  # the adapter matters and the step changed it
