"""lm-eval tasks on an encoder-decoder (T5): leantune's seq2seq LM gives the loglikelihoods, rolling loglikelihoods
and accuracies of lm-eval's own `hf` backend with backend="seq2seq" over the same folder; generate_until equals
`t5_generate` (and transformers' generate) and stops at stop strings; `evaluate --tasks` runs end to end."""

from __future__ import annotations

import json

import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from t5_support import random_t5_hf, samsum_rows, tiny_t5_folder

from leantune.decode.seq2seq import pad_inputs, t5_generate
from leantune.evaluation.harness import harness_lm, score_seq2seq
from leantune.evaluation.harness_tasks import MMLU_EXEMPLARS, offline, resolve_tasks, run_tasks
from leantune.inference import load_for_inference
from leantune.methods import apply_method, method_args_class

SUBJECTS = ["anatomy", "astronomy"]


def task_requests(names: list[str], limit: int | None = None) -> list[Instance]:
    """lm-eval's own request instances for the tasks (their documents, prompts and choices), zero-shot."""
    specs, manager, local = resolve_tasks(names)
    with offline(local):
        loaded = manager.load(specs)
    out: list[Instance] = []
    for task in loaded["tasks"].values():
        task.set_config(key="num_fewshot", value=0)
        task.build_all_requests(limit=limit)
        out += task.instances
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny T5 (random weights spread wide, so greedy choices have clear margins) with a real T5 tokenizer. v1.0
    (tied head): transformers 5 writes a v1.1 folder's config with tie_word_embeddings true beside its own head, and
    lm-eval's loader then ties it (a fixture artefact that would make the reference wrong, not leantune)."""
    root = tmp_path_factory.mktemp("t5h")
    out = tiny_t5_folder(root / "t5", samsum_rows(), variant="v1.0")
    ref, _ = random_t5_hf("v1.0", root / "weights", noise=0.5, seed=3, num_decoder_layers=2)  # transformers 5 generate
    ref.save_pretrained(out)  # the random weights over the folder with the tokenizer
    return out


@pytest.fixture(scope="module")
def lms(folder):
    model, tok, _, _ = load_for_inference(folder, "32-true")
    ours = harness_lm(model, tok, batch_size=3)
    hf = HFLM(pretrained=str(folder), backend="seq2seq", device="cpu", dtype="float32", batch_size=3)
    return ours, hf


def test_the_seq2seq_lm_reads_what_the_hf_backend_reads(lms):
    ours, hf = lms
    assert ours.backend == hf.backend == "seq2seq"
    assert ours.max_length == hf.max_length  # config.json's n_positions
    for text in ["Tom baked bread.", "</s>Tom", ""]:
        assert ours.tok_encode(text) == hf.tok_encode(text)  # the context: </s> appended (unless already there)
        assert ours.tok_encode(text, add_special_tokens=False) == hf.tok_encode(text, add_special_tokens=False)
    assert ours.tok_encode("Tom baked bread.")[-1] == 1
    assert ours._encode_pair("Amanda: I baked ", "a cake") == hf._encode_pair("Amanda: I baked ", "a cake")


def test_loglikelihoods_and_accuracy_equal_lm_evals_hf_seq2seq_backend(lms):
    ours, hf = lms
    reqs = task_requests([f"{MMLU_EXEMPLARS}_{s}" for s in SUBJECTS], limit=4)
    extra = [("Amanda baked", " a cake for Tom."), ("", "Bob baked bread."), ("Tom: Nice", " bring some")]
    reqs += [Instance("loglikelihood", {}, args, len(reqs) + i) for i, args in enumerate(extra)]
    mine, theirs = ours.loglikelihood(reqs), hf.loglikelihood(reqs)
    assert len(mine) == len(theirs) == len(reqs)
    for (a, ga), (b, gb) in zip(mine, theirs):
        assert a == pytest.approx(b, abs=1e-4)
        assert ga == gb
    assert len({round(a, 3) for a, _ in mine}) > len(reqs) // 2  # the scores differ: nothing is a constant
    names = [f"{MMLU_EXEMPLARS}_{s}" for s in SUBJECTS]
    ra, rb = (run_tasks(lm, *resolve_tasks(names), limit=4) for lm in (ours, hf))
    for task in names:
        assert ra["tasks"][task]["acc"] == rb["tasks"][task]["acc"]
        assert ra["tasks"][task]["acc_norm"] == rb["tasks"][task]["acc_norm"]


def test_scores_equal_one_request_at_a_time_from_the_full_logits(folder):
    """Sharing a decoder row (same context, a decoder input that starts another's), batching and padding change
    nothing: each score equals the request run alone through the model."""
    model, _, _, _ = load_for_inference(folder, "32-true")
    g = torch.Generator().manual_seed(0)
    ctx = torch.randint(3, 90, (12,), generator=g).tolist()
    reqs = [(ctx, [5]), (ctx, [6]), (ctx, [5, 7, 9]), (ctx, [5, 7]), (ctx[:4], [1, 2]), ([8], [9, 10, 11])]
    batched = score_seq2seq(model, reqs, max_length=512, batch_size=4)
    for (c, cont), (logp, greedy) in zip(reqs, batched):
        with torch.no_grad():
            logits = model(torch.tensor([c]), torch.tensor([[0, *cont[:-1]]]))[0].log_softmax(-1)
        assert logp == pytest.approx(float(logits.gather(-1, torch.tensor(cont)[:, None]).sum()), abs=1e-4)
        assert greedy == bool((logits.argmax(-1) == torch.tensor(cont)).all())
    (cut, _), = score_seq2seq(model, [(ctx, [5])], max_length=5)  # the encoder reads the context's last 5 tokens
    (last5, _), = score_seq2seq(model, [(ctx[-5:], [5])], max_length=512)
    assert cut == pytest.approx(last5, abs=1e-6) and cut != pytest.approx(batched[0][0], abs=1e-3)
    with pytest.raises(ValueError, match="empty context"):
        score_seq2seq(model, [([], [5])], max_length=8)


def test_loglikelihood_rolling_equals_lm_evals_hf_seq2seq_backend(folder):
    model, tok, _, _ = load_for_inference(folder, "32-true")
    ours = harness_lm(model, tok, batch_size=3, max_length=16)  # short windows: several per text
    hf = HFLM(pretrained=str(folder), backend="seq2seq", device="cpu", dtype="float32", batch_size=3, max_length=16)
    texts = ["Amanda baked cookies for Tom.", "Hi", " ".join(["Jerry: I baked a cake."] * 6)]
    reqs = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    mine = ours.loglikelihood_rolling(reqs)
    for a, b in zip(mine, hf.loglikelihood_rolling(reqs)):
        assert a == pytest.approx(b, abs=1e-3, rel=1e-5)
    assert mine[2] < mine[0] < 0


PROMPTS = ["Summarize: Amanda: I baked cookies.", "Tom: Nice, bring some tomorrow!", "Bob baked a cake for Anna."]


def _gen_requests(prompts, **kwargs):
    return [Instance("generate_until", {}, (p, {"until": [], "max_gen_toks": 10, "do_sample": False, **kwargs}), i)
            for i, p in enumerate(prompts)]


def test_generate_until_equals_t5_generate_and_transformers(lms, folder):
    ours, _ = lms
    batched = ours.generate_until(_gen_requests(PROMPTS))
    ours.batch_size = 1
    try:
        assert ours.generate_until(_gen_requests(PROMPTS)) == batched  # padding in the encoder batch changes nothing
    finally:
        ours.batch_size = 3
    import transformers as tf

    hf_model = tf.T5ForConditionalGeneration.from_pretrained(folder).eval()
    for prompt, text in zip(PROMPTS, batched):
        ids = ours.tok_encode(prompt)
        out = t5_generate(ours.model, *pad_inputs([ids], 0), max_new_tokens=10, eos_ids=[1], pad_id=0)
        assert text == ours.tok.decode(out[0, 1:].tolist(), skip_special_tokens=True)
        ref = hf_model.generate(input_ids=torch.tensor([ids]), max_new_tokens=10, do_sample=False)
        assert ref[0].tolist() == out[0].tolist()[:ref.shape[1]]
    assert any(batched)


def test_generate_until_stops_at_the_first_stop_string(lms):
    ours, _ = lms
    full = ours.generate_until(_gen_requests(PROMPTS))
    text = max(full, key=len)
    stop = text[len(text) // 2: len(text) // 2 + 2]
    assert stop.strip(), full
    cut = ours.generate_until(_gen_requests(PROMPTS, until=[stop]))
    for a, b in zip(full, cut):
        assert b == a.split(stop)[0]
    assert cut != full


def test_evaluate_tasks_runs_on_t5_end_to_end(folder, tmp_path, capsys):
    from leantune.cli import main  # the whole CLI: imported here so the other tests do not depend on every command

    out = tmp_path / "eval.json"
    main(["evaluate", "--checkpoint_dir", str(folder), "--tasks", f"{MMLU_EXEMPLARS}_anatomy", "--limit", "3",
          "--precision", "32-true", "--out_file", str(out)])
    result = json.loads(out.read_text())
    task = result["tasks"][f"{MMLU_EXEMPLARS}_anatomy"]
    assert 0.0 <= task["acc"] <= 1.0
    assert "lm-eval:" in capsys.readouterr().out


@pytest.mark.parametrize("method,args", [("prompt_tuning", dict(num_virtual_tokens=3, init="random")),
                                         ("lora", dict(r=2, alpha=4))])
def test_adapters_on_t5_score_the_same_batched_or_alone(folder, method, args):
    """An adapter applied unmerged (virtual tokens before every encoder input, or LoRA layers): right-padded
    encoder batches give each request what it gets alone, and the adapter changes the scores."""
    model, tok, _, _ = load_for_inference(folder, "32-true")
    base = harness_lm(model, tok, batch_size=4).loglikelihood(task_requests([f"{MMLU_EXEMPLARS}_anatomy"], limit=2))
    trainable = apply_method(model, method, method_args_class(method)(**args))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in trainable:
                p.add_(torch.randn_like(p) * 0.3)
    model.eval()
    reqs = task_requests([f"{MMLU_EXEMPLARS}_anatomy"], limit=2)
    reqs += [Instance("loglikelihood", {}, ("Amanda baked", " a cake for Tom."), len(reqs))]
    batched = harness_lm(model, tok, batch_size=4).loglikelihood(reqs)
    alone = harness_lm(model, tok, batch_size=1).loglikelihood(reqs)
    assert [a for a, _ in batched] == pytest.approx([a for a, _ in alone], abs=1e-4)
    assert [a for a, _ in batched[:len(base)]] != pytest.approx([a for a, _ in base], abs=1e-3)
