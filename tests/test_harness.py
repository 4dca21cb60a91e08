"""lm-eval in process (`leantune.evaluation.harness`): leantune's LM gives the same loglikelihoods, rolling loglikelihoods and
greedy generations as lm-eval's own `hf` backend over the same HF folder, on the offline MMLU-exemplar task built
from the installed lm-eval package; `evaluate --tasks` with --adapter and --compare writes one JSON and a markdown
table; a missing extra is one clear line."""

from __future__ import annotations

import json
import shlex
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from adapter_support import random_lora
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from method_cases import EVERY_METHOD, tiny_args
from tiny_families import TINY, make_hf

import leantune.evaluation.harness as harness
from leantune.checkpoint.hf import load_hf_checkpoint
from leantune.cli import main
from leantune.commands.evaluate import evaluate
from leantune.evaluation.harness import LM_EVAL_REQUIREMENT, harness_lm, require_lm_eval, score_continuations
from leantune.evaluation.harness_tasks import (
    CATEGORIES,
    MMLU_EXEMPLARS,
    build_mmlu_exemplars,
    offline,
    parse_exemplar,
    read_exemplars,
    resolve_tasks,
    run_tasks,
)
from leantune.inference import load_for_inference
from leantune.methods import apply_method
from leantune.models.decoder.config import Config
from leantune.models.decoder.model import GPT
from leantune.peft.adapter import AdapterArgs
from leantune.peft.lora import LoRAArgs
from leantune.peft.prefix_tuning import PrefixTuningArgs
from leantune.peft.prompt_tuning import PromptTuningArgs

SUBJECTS = ["anatomy", "astronomy", "college_physics", "high_school_geography"]


def task_requests(names: list[str], limit: int | None = None) -> list[Instance]:
    """lm-eval's own request instances for the tasks (their documents, prompts and choices)."""
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
def lms(tiny_checkpoint):
    """leantune's LM and lm-eval's HFLM over the same tiny random Llama folder (the default model's tokenizer)."""
    model, tok, _, _ = load_for_inference(tiny_checkpoint, "32-true")
    ours = harness_lm(model, tok, batch_size=3)
    hf = HFLM(pretrained=str(tiny_checkpoint), device="cpu", dtype="float32", batch_size=3)
    return ours, hf


# ---- the offline benchmark -----------------------------------------------------------------------------------
def test_mmlu_exemplars_come_from_the_installed_package(tmp_path):
    subjects, skipped = read_exemplars()
    assert len(subjects) == 57  # every MMLU subject
    docs = [d for s in subjects.values() for d in s["docs"]]
    assert len(docs) >= 270 and skipped <= 5
    assert {s["category"] for s in subjects.values()} == set(CATEGORIES)
    assert all(len(d["choices"]) == 4 and d["answer"] in range(4) and d["question"] for d in docs)
    assert min(Counter(d["answer"] for d in docs).values()) > 30  # answers spread over A-D, not a parsing artefact
    folder = build_mmlu_exemplars(tmp_path)
    info = json.loads((folder / "info.json").read_text())
    assert info == {**info, "subjects": 57, "questions": len(docs), "skipped": skipped}
    assert build_mmlu_exemplars(tmp_path) == folder  # written once, then reused


def test_parse_exemplar_reads_choices_and_answer_and_refuses_other_shapes():
    good = {"question": "Which is a prime?\n(A) 4 (B) 6 (C) 7 (D) 9", "target": "Let's think. The answer is (C)."}
    assert parse_exemplar(good) == {"question": "Which is a prime?", "choices": ["4", "6", "7", "9"], "answer": 2}
    five = {"question": "Pick.\n(A) 1 (B) 2 (C) 3 (D) 4 (E) 5", "target": "The answer is (E)."}
    assert parse_exemplar(five) is None
    assert parse_exemplar({"question": "No choices here", "target": "The answer is (A)."}) is None


def test_the_task_prompt_is_mmlus_standard_format():
    reqs = task_requests([f"{MMLU_EXEMPLARS}_anatomy"], limit=1)
    assert [r.args[1] for r in reqs] == [" A", " B", " C", " D"]
    context = reqs[0].args[0]
    assert context.startswith("The following are multiple choice questions (with answers) about anatomy.\n\n")
    assert "\nA. " in context and "\nD. " in context and context.endswith("\nAnswer:")


# ---- parity with lm-eval's hf backend ------------------------------------------------------------------------
def test_loglikelihoods_and_accuracy_equal_lm_evals_hf_backend(lms):
    ours, hf = lms
    reqs = task_requests([f"{MMLU_EXEMPLARS}_{s}" for s in SUBJECTS])
    mine, theirs = ours.loglikelihood(reqs), hf.loglikelihood(reqs)
    assert len(mine) == len(reqs) == 4 * sum(1 for r in reqs if r.args[1] == " A")
    for (a, ga), (b, gb) in zip(mine, theirs):
        assert a == pytest.approx(b, abs=1e-4)
        assert ga == gb
    names = [f"{MMLU_EXEMPLARS}_{s}" for s in SUBJECTS[:2]]
    ra, rb = (run_tasks(lm, *resolve_tasks(names)) for lm in (ours, hf))
    for task in names:
        assert ra["tasks"][task]["acc"] == rb["tasks"][task]["acc"]
        assert ra["tasks"][task]["acc_norm"] == rb["tasks"][task]["acc_norm"]


def test_scoring_shares_prefixes_and_batches_without_changing_a_number(tiny_checkpoint):
    """Requests whose input starts another's (one context, four one-token answers) are read off one forward pass;
    batching and sorting change nothing: each score equals the request scored alone, from the full logits."""
    model = load_hf_checkpoint(tiny_checkpoint, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    ctx = torch.randint(0, 1000, (12,), generator=g).tolist()
    reqs = [(ctx, [5]), (ctx, [6]), (ctx, [5, 7, 9]), (ctx[:4], [1, 2]), (ctx + [3], [4]), ([8], [9, 10, 11])]
    batched = score_continuations(model, reqs, max_length=model.max_tokens, batch_size=4)
    for (c, cont), (logp, greedy) in zip(reqs, batched):
        ids = torch.tensor([c + cont])
        with torch.no_grad():
            logits = model(ids)[0, len(c) - 1:-1].log_softmax(-1)
        expect = logits.gather(-1, torch.tensor(cont)[:, None]).sum()
        assert logp == pytest.approx(float(expect), abs=1e-5)
        assert greedy == bool((logits.argmax(-1) == torch.tensor(cont)).all())
    alone = score_continuations(model, reqs, max_length=model.max_tokens, batch_size=1)
    assert [g for _, g in alone] == [g for _, g in batched]
    assert [lp for lp, _ in alone] == pytest.approx([lp for lp, _ in batched], abs=1e-5)


# ---- shared-prefix scoring: a batch's common first tokens run once ----------------------------------------------
def _tiny_gpt(n_query_groups: int, method: str | None = None) -> GPT:
    torch.manual_seed(0)
    model = GPT(Config(vocab_size=97, block_size=128, n_layer=3, n_embd=48, n_head=6, n_query_groups=n_query_groups))
    if method is not None:
        args = LoRAArgs(r=4, dropout=0.0, targets="all") if method == "lora" else AdapterArgs(prompt_length=5,
                                                                                               start_layer=1)
        trainable = apply_method(model, method, args)
        with torch.no_grad():  # LoRA's B and the adapter's gate start at zero: make them change the model
            for name, p in model.named_parameters():
                if name in trainable:
                    p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


def _rows_with_a_common_start(n_common: int, lengths: list[int], seed: int = 0):
    """(context, continuation) requests whose inputs all begin with the same n_common tokens."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randint(0, 97, (n_common,), generator=g).tolist()
    reqs = []
    for n in lengths:
        ctx = common + torch.randint(0, 97, (n,), generator=g).tolist()
        reqs += [(ctx, [int(t)]) for t in torch.randint(0, 97, (2,), generator=g)]  # two one-token choices
        reqs.append((ctx, torch.randint(0, 97, (3,), generator=g).tolist()))  # and a longer one
    return reqs


def _assert_same_scores(a, b, tol: float = 1e-5) -> None:
    assert [g for _, g in a] == [g for _, g in b]
    assert [x for x, _ in a] == pytest.approx([x for x, _ in b], rel=tol, abs=tol)


@pytest.mark.parametrize("n_query_groups,method", [(6, None), (2, None), (1, None), (2, "lora"), (2, "adapter")])
def test_shared_prefix_scoring_equals_the_plain_path(n_query_groups, method, monkeypatch):
    """Rows of unequal lengths beginning with the same 24 tokens: with the common start run once (batch 1, through
    the KV cache) and the rows attending to it, every score equals the plain batched forward; MHA, GQA, MQA, with a
    LoRA on every layer and with LLaMA-Adapter's gated prefix."""
    model = _tiny_gpt(n_query_groups, method)
    runs = []
    real = harness._context_kv
    monkeypatch.setattr(harness, "_context_kv", lambda m, prefix: runs.append(len(prefix)) or real(m, prefix))
    reqs = _rows_with_a_common_start(24, [1, 3, 9, 17, 30, 41, 2])
    plain = score_continuations(model, reqs, model.max_tokens, batch_size=3, plain=True)
    assert runs == []
    shared = score_continuations(model, reqs, model.max_tokens, batch_size=3)
    assert runs and all(n >= 24 for n in runs)  # the common start really ran on its own
    _assert_same_scores(shared, plain)


@pytest.mark.parametrize("method", EVERY_METHOD)
def test_scoring_equals_the_plain_path_for_every_method(method):
    """Every PEFT method (perturbed so it changes the model): the shared start and the last-block cut give the plain
    path's scores; the virtual-token methods (prompt, prefix, P-tuning) take the plain path."""
    torch.manual_seed(0)
    model = GPT(Config(vocab_size=97, block_size=128, n_layer=3, n_embd=48, n_head=6, n_query_groups=2))
    trainable = apply_method(model, method, tiny_args(method))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in trainable:
                p.add_(torch.randn_like(p) * 0.3)
    model.eval()
    assert harness._can_share_prefix(model) == (model.virtual is None)
    reqs = _rows_with_a_common_start(20, [1, 4, 9, 30, 2, 17])
    _assert_same_scores(score_continuations(model, reqs, model.max_tokens, batch_size=3),
                        score_continuations(model, reqs, model.max_tokens, batch_size=3, plain=True))


@pytest.mark.parametrize("family", [n for n in TINY if n != "mistral-sliding-window"])
def test_shared_prefix_scoring_equals_the_plain_path_for_every_family(family, tmp_path):
    """Partial rotary (Pythia, Phi), learned positions (GPT-2), parallel residuals (Falcon, NeoX), biases, MQA: the
    shared start and the rows after it give the plain path's scores (a sliding window takes the plain path)."""
    model = load_hf_checkpoint(make_hf(family, tmp_path), dtype=torch.float32).eval()
    reqs = [(ctx, [c % 160 for c in cont]) for ctx, cont in _rows_with_a_common_start(20, [1, 4, 9, 30, 2])]
    _assert_same_scores(score_continuations(model, reqs, model.max_tokens, batch_size=3),
                        score_continuations(model, reqs, model.max_tokens, batch_size=3, plain=True))
    assert harness._can_share_prefix(model) == (model.config.sliding_window is None)


def test_shared_prefix_is_cut_so_every_row_keeps_a_token_and_is_reused_across_batches(monkeypatch):
    """The shortest row fixes how much is shared (it keeps at least one token of its own); a batch whose rows
    begin with the same tokens as an earlier batch's reuses that context's keys and values; a start shorter than
    MIN_SHARED is not worth a pass of its own."""
    model = _tiny_gpt(2)
    runs = []
    real = harness._context_kv
    monkeypatch.setattr(harness, "_context_kv", lambda m, prefix: runs.append(len(prefix)) or real(m, prefix))
    g = torch.Generator().manual_seed(1)
    common = torch.randint(0, 97, (12,), generator=g).tolist()
    # inputs (context + continuation[:-1]) of 13, 8 and 6 tokens; the last one is all common tokens but its last
    reqs = [(common + [5], [7]), (common[:7] + [3], [9]), (common[:5] + [4], [9])]
    plain = score_continuations(model, reqs, model.max_tokens, batch_size=4, plain=True)
    shared = score_continuations(model, reqs, model.max_tokens, batch_size=4)
    assert runs == [5]  # 6 tokens in the shortest input: 5 shared, 1 of its own
    runs.clear()
    reqs.append((common[:5], [common[5], common[6], 8]))  # read off a longer row, scored from position 4 on
    longer = score_continuations(model, reqs, model.max_tokens, batch_size=4)
    assert runs == [4]  # the shared part stops before the first scored position
    _assert_same_scores(longer, score_continuations(model, reqs, model.max_tokens, batch_size=4, plain=True))
    _assert_same_scores(shared, plain)
    assert harness._plan_batches([(1, 2, 3, 4, 5, 6), (1, 2, 3, 4, 5, 7), (1, 2, 3, 4, 5)], [5, 5, 4], 3) == [
        (0, 3, 4)]  # the shortest row keeps its fifth token
    runs.clear()
    same_start = [(common + torch.randint(0, 97, (n,), generator=g).tolist(), [1]) for n in (9, 7, 5, 3)]
    out = score_continuations(model, same_start, model.max_tokens, batch_size=2)
    assert runs == [12]  # both batches continue the same 12 tokens: their keys/values are computed once
    _assert_same_scores(out, score_continuations(model, same_start, model.max_tokens, batch_size=2,
                                                 plain=True))
    runs.clear()
    short = [(common[:3] + [n], [1]) for n in (10, 20)]  # 3 common tokens: plain path
    # the same scores (the row-keep cut may round differently in the last bits), and no shared pass was run
    _assert_same_scores(score_continuations(model, short, model.max_tokens, batch_size=2),
                        score_continuations(model, short, model.max_tokens, batch_size=2, plain=True))
    assert runs == []


def test_batches_are_cut_around_a_long_row():
    """One long row is not padded into a batch of short ones when another batch costs less than the padding; rows
    of close lengths stay together up to batch_size."""
    long, short = tuple(range(300)), tuple(range(50, 60))
    assert harness._plan_batches([long, short, short, short], None, 4) == [(0, 1, 0), (1, 4, 0)]
    assert harness._plan_batches([long[:12], long[:11], long[:10]], None, 4) == [(0, 3, 0)]
    assert harness._plan_batches([long[:12]] * 5, None, 2) == [(0, 2, 0), (2, 4, 0), (4, 5, 0)]
    # with sharing: a single row never shares; the shared start counts as run once
    assert harness._plan_batches([long[:40], long[:30]], [39, 29], 2) == [(0, 2, 29)]
    assert harness._plan_batches([long[:40]], [39], 2) == [(0, 1, 0)]
    for a, b, limit, n in [((1, 2, 3), (1, 2, 4), 9, 2), ((1, 2), (1, 2, 3), 9, 2), ((5,), (6,), 9, 0),
                           ((1, 2, 3), (1, 2, 3), 2, 2), (long, long[:299] + (0,), 400, 299), ((), (1,), 3, 0)]:
        assert harness._common_length(a, b, limit) == n


@pytest.mark.parametrize("n_query_groups", [6, 2])
def test_rows_continuing_a_context_equal_the_last_positions_of_the_whole_sequence(n_query_groups):
    """model.score(suffix, position_ids, context_kv=the prefix's keys/values) gives the hidden states that the full
    sequences have at the suffix's positions, per row (right padding included), and the context's K/V come out of
    the KV cache, which is left as it was; keep= gives the same states at the kept positions only."""
    model = _tiny_gpt(n_query_groups)
    g = torch.Generator().manual_seed(2)
    prefix, suffix = torch.randint(0, 97, (1, 10), generator=g), torch.randint(0, 97, (2, 15), generator=g)
    kv = harness._context_kv(model, tuple(prefix[0].tolist()))
    assert len(kv) == 3 and kv[0][0].shape == (1, n_query_groups, 10, 8)
    assert all(block.attn.kv_cache is None for block in model.transformer.h)  # the cache is put back as it was
    with torch.no_grad():
        full = model(torch.cat([prefix.expand(2, -1), suffix], dim=1), return_hidden=True)  # (2, 25, C)
        rows = model.score(suffix, position_ids=torch.arange(10, 25)[None], context_kv=kv, return_hidden=True)
        default_positions = model.score(suffix, context_kv=kv, return_hidden=True)
        short = model.score(suffix[:1, :4], context_kv=kv, return_hidden=True)  # a shorter row: causal, no padding seen
    torch.testing.assert_close(rows, full[:, 10:], rtol=1e-5, atol=1e-5)
    assert torch.equal(default_positions, rows)
    torch.testing.assert_close(short, full[:1, 10:14], rtol=1e-5, atol=1e-5)
    # keep: the last block only at some positions per row, with a context or over the whole sequence
    keep = torch.tensor([[14, 3], [0, 14]])

    def at(h, positions):
        return h.gather(1, positions[..., None].expand(-1, -1, h.shape[-1]))

    with torch.no_grad():
        kept = model.score(suffix, context_kv=kv, keep=keep, return_hidden=True)
        kept_whole = model.score(torch.cat([prefix.expand(2, -1), suffix], dim=1), keep=keep + 10, return_hidden=True)
    assert kept.shape == (2, 2, 48)
    torch.testing.assert_close(kept, at(rows, keep), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kept_whole, at(full, keep + 10), rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError):  # the modes are separate entry points: forward takes no context, score no mask
        model(suffix, context_kv=kv, attention_mask=torch.ones(2, 15))
    with pytest.raises(TypeError):
        model.score(suffix, context_kv=kv, attention_mask=torch.ones(2, 15))


def test_loglikelihood_rolling_equals_lm_evals_hf_backend(lms):
    ours, hf = lms
    texts = ["The quick brown fox jumps over the lazy dog.", "Hello world",
             " ".join(f"word{i}" for i in range(150))]  # longer than the tiny model's 256 tokens: several windows
    reqs = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    for a, b in zip(ours.loglikelihood_rolling(reqs), hf.loglikelihood_rolling(reqs)):
        assert a == pytest.approx(b, abs=1e-3, rel=1e-5)


def _gen_requests(prompts, **kwargs):
    return [Instance("generate_until", {}, (p, {"until": [], "max_gen_toks": 12, "do_sample": False, **kwargs}), i)
            for i, p in enumerate(prompts)]


PROMPTS = ["Question: What is 2 + 2?\nAnswer:", "The capital of France is", "Once upon a time, in a land far away,"]


def test_generate_until_batched_equals_one_by_one_and_hf(lms):
    ours, hf = lms
    batched = ours.generate_until(_gen_requests(PROMPTS))
    ours.batch_size = 1
    try:
        alone = ours.generate_until(_gen_requests(PROMPTS))
    finally:
        ours.batch_size = 3
    assert batched == alone  # left padding and the KV cache change no token
    assert batched == hf.generate_until(_gen_requests(PROMPTS))
    assert any(batched)


def test_generate_until_stops_at_the_first_stop_string(lms):
    ours, hf = lms
    full = ours.generate_until(_gen_requests(PROMPTS))
    text = max(full, key=len)
    stop = text[len(text) // 2: len(text) // 2 + 2]  # a piece from the middle of the longest generation
    assert stop.strip(), full
    cut = ours.generate_until(_gen_requests(PROMPTS, until=[stop]))
    for a, b in zip(full, cut):
        assert b == a.split(stop)[0]
    assert cut == hf.generate_until(_gen_requests(PROMPTS, until=[stop]))


@pytest.mark.parametrize("method,args", [("prompt_tuning", PromptTuningArgs(num_virtual_tokens=3, init="random")),
                                         ("prefix_tuning", PrefixTuningArgs(num_virtual_tokens=3, hidden_size=16))])
def test_virtual_token_adapters_score_and_generate_the_same_batched_or_alone(tiny_checkpoint, method, args):
    """Adapters whose virtual tokens precede every sequence: right-padded scoring batches and left-padded decoding
    batches give what each request gets alone."""
    model = load_hf_checkpoint(tiny_checkpoint, dtype=torch.float32)
    apply_method(model, method, args)
    with torch.no_grad():
        for p in model.virtual.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    model.eval()
    lm = harness_lm(model, load_for_inference(tiny_checkpoint, "32-true")[1], batch_size=4)
    reqs = task_requests([f"{MMLU_EXEMPLARS}_anatomy"], limit=3)
    batched = lm.loglikelihood(reqs)
    lm.batch_size = 1
    alone, gen_alone = lm.loglikelihood(reqs), lm.generate_until(_gen_requests(PROMPTS))
    lm.batch_size = 4
    assert [g for _, g in batched] == [g for _, g in alone]
    assert [x for x, _ in batched] == pytest.approx([x for x, _ in alone], abs=1e-4)
    assert lm.generate_until(_gen_requests(PROMPTS)) == gen_alone


# ---- the command: --tasks, --adapter, --compare, reports -------------------------------------------------------
@pytest.fixture(scope="module")
def perturbed_adapter(tiny_checkpoint, tmp_path_factory):
    return random_lora(tiny_checkpoint, tmp_path_factory.mktemp("adapter") / "lora")


TASK = f"{MMLU_EXEMPLARS}_anatomy,{MMLU_EXEMPLARS}_astronomy"


def test_evaluate_tasks_with_an_adapter_and_compare(tiny_checkpoint, perturbed_adapter, tmp_path, capsys):
    single = evaluate(checkpoint_dir=tiny_checkpoint, adapter=perturbed_adapter, tasks=TASK, precision="32-true")
    assert set(single["tasks"]) == {f"{MMLU_EXEMPLARS}_anatomy", f"{MMLU_EXEMPLARS}_astronomy"}
    assert single["examples"] == 10 and single["examples_per_s"] > 0
    assert single["versions"]["lm_eval"].startswith("0.4")
    assert "val_loss" not in single  # --tasks alone runs only the tasks

    out = tmp_path / "cmp.json"
    result = evaluate(checkpoint_dir=tiny_checkpoint, compare=["base", f"mine={perturbed_adapter}", str(perturbed_adapter)],
                      tasks=TASK, precision="32-true", out_file=out)
    runs = result["runs"]
    assert list(runs) == ["base", "mine", "lora"]
    assert runs["mine"]["tasks"] == single["tasks"] == runs["lora"]["tasks"]  # the same adapter, the same numbers
    report = json.loads(out.read_text())
    assert report["task_list"] == TASK.split(",") and report["runs"]["base"]["adapter"] is None
    assert report["runs"]["base"]["lm_eval"]["versions"]
    table = out.with_suffix(".md").read_text()
    assert table.splitlines()[0] == "| metric | base | mine | lora |"
    assert "| anatomy acc |" in table and "| astronomy acc_norm |" in table
    assert table in capsys.readouterr().out


def test_evaluate_tasks_on_an_int8_weight_only_base(tiny_checkpoint):
    """--quantize int8 with --tasks: the quantized linears run under lm-eval, with the batch's common start shared,
    and the loglikelihoods stay close to the fp32 model's."""
    result = evaluate(checkpoint_dir=tiny_checkpoint, tasks=TASK, precision="32-true", quantize="int8")
    assert result["examples"] == 10 and result["quantize"] == "int8"
    assert set(result["tasks"]) == {f"{MMLU_EXEMPLARS}_anatomy", f"{MMLU_EXEMPLARS}_astronomy"}
    model, tok, _, _ = load_for_inference(tiny_checkpoint, "32-true", quantize="int8")
    assert type(model.transformer.h[0].attn.qkv).__name__ != "Linear"  # really quantized
    lm = harness_lm(model, tok, batch_size=4)
    reqs = task_requests([f"{MMLU_EXEMPLARS}_anatomy"], limit=3)
    pairs = [lm._encode_pair(*r.args) for r in reqs]
    shared = score_continuations(model, pairs, lm.max_length, batch_size=4)
    plain = score_continuations(model, pairs, lm.max_length, batch_size=4, plain=True)
    # the two paths send calls of different row counts: one may take the int8 kernels, the other the dense bf16 copy
    # of the same codes (leantune.decode.woq, 8+ rows), which round differently (measured 1.4e-3 absolute)
    _assert_same_scores(shared, plain, tol=5e-3)
    fp32 = harness_lm(*load_for_inference(tiny_checkpoint, "32-true")[:2], batch_size=4)
    assert [x for x, _ in lm.loglikelihood(reqs)] == pytest.approx([x for x, _ in fp32.loglikelihood(reqs)], abs=0.05)


def test_evaluate_loss_and_tasks_together_with_compare_base(tiny_checkpoint, perturbed_adapter, tmp_path):
    result = evaluate(checkpoint_dir=tiny_checkpoint, adapter=perturbed_adapter, compare_base=True, tasks=TASK,
                      metric="loss", max_batches=1, precision="32-true", limit=2)
    assert "val_loss" in result and "val_loss" in result["base"]
    assert result["examples"] == 4 and result["base"]["examples"] == 4  # --limit: 2 documents per task


def test_unknown_tasks_and_bad_compare_entries_fail_before_a_model_loads(tiny_checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["evaluate", "--checkpoint_dir", str(tiny_checkpoint), "--tasks", f"{MMLU_EXEMPLARS}_nonsense"])
    assert e.value.code == 2
    assert "unknown lm-eval task(s) mmlu_exemplars_nonsense" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither an adapter folder"):
        evaluate(checkpoint_dir=tiny_checkpoint, compare=["base", str(tmp_path / "empty")], tasks=TASK)
    with pytest.raises(FileNotFoundError, match="no such task YAML file"):
        evaluate(checkpoint_dir=tiny_checkpoint, tasks=str(tmp_path / "missing.yaml"))


def test_a_task_yaml_file_runs(tiny_checkpoint, tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"q": f"{i} plus {i} is", "choices": [str(2 * i), str(2 * i + 1)]}) + "\n"
                            for i in range(3)))
    (tmp_path / "my_task.yaml").write_text(json.dumps({
        "task": "my_sums", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{q}}", "doc_to_choice": "choices",
        "doc_to_target": 0, "metric_list": [{"metric": "acc"}]}))
    result = evaluate(checkpoint_dir=tiny_checkpoint, tasks=str(tmp_path / "my_task.yaml"), precision="32-true")
    assert result["examples"] == 3 and 0 <= result["tasks"]["my_sums"]["acc"] <= 1


def test_a_task_whose_data_is_on_the_hub_fails_with_one_line_offline(tiny_checkpoint, tmp_path, capsys):
    """A YAML-only run is kept offline: a Hub dataset is refused at once, naming it, without touching the network."""
    (tmp_path / "hub_task.yaml").write_text(json.dumps({
        "task": "hub_only", "dataset_path": "nobody/not-a-dataset", "test_split": "test",
        "output_type": "multiple_choice", "doc_to_text": "{{q}}", "doc_to_choice": "choices", "doc_to_target": 0}))
    with pytest.raises(SystemExit) as e:
        main(["evaluate", "--checkpoint_dir", str(tiny_checkpoint), "--tasks", str(tmp_path / "hub_task.yaml")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: lm-eval task data:") and "nobody/not-a-dataset" in err


def test_a_missing_extra_is_one_clear_line(monkeypatch, tiny_checkpoint, capsys):
    """The advice must work outside the project's venv and from any index: `pip install 'leantune[eval]'` does
    neither; the Python running leantune installing the lm-eval range of pyproject's eval extra does."""
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert f'eval = ["{LM_EVAL_REQUIREMENT}"]' in pyproject  # the extra's range, said once more in the message
    wanted = f"{shlex.quote(sys.executable)} -m pip install '{LM_EVAL_REQUIREMENT}'"
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    with pytest.raises(ImportError) as raised:
        require_lm_eval()
    assert wanted in str(raised.value) and "leantune[eval]" not in str(raised.value)
    with pytest.raises(SystemExit) as e:
        main(["evaluate", "--checkpoint_dir", str(tiny_checkpoint), "--tasks", MMLU_EXEMPLARS])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and wanted in err[0]


# ---- the real default model -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_default_model_parity_with_lm_evals_hf_backend(default_checkpoint):
    """SmolLM2-135M-Instruct: every per-choice loglikelihood equals lm-eval's hf backend to 1e-4, and the accuracy
    is identical, on four MMLU-exemplar subjects."""
    model, tok, _, _ = load_for_inference(default_checkpoint, "32-true")
    ours = harness_lm(model, tok, batch_size=8)
    hf = HFLM(pretrained=str(default_checkpoint), device="cpu", dtype="float32", batch_size=8)
    names = [f"{MMLU_EXEMPLARS}_{s}" for s in SUBJECTS]
    reqs = task_requests(names)
    mine, theirs = ours.loglikelihood(reqs), hf.loglikelihood(reqs)
    assert max(abs(a - b) for (a, _), (b, _) in zip(mine, theirs)) < 1e-4
    ra, rb = (run_tasks(lm, *resolve_tasks(names[:2])) for lm in (ours, hf))
    names = names[:2]
    assert {t: ra["tasks"][t]["acc"] for t in names} == {t: rb["tasks"][t]["acc"] for t in names}
