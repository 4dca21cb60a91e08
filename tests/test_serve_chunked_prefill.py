"""Chunked prefill in the serving engine: a prompt read a few tokens per engine turn gives exactly the tokens of the
whole-prompt prefill (`generate`), for the base, a shared LoRA, virtual-token adapters and reused prompt starts, mixed
with running rows; the running rows get a token between every two chunks of a long prompt; a failing chunk ends its
request alone."""

from __future__ import annotations

import threading

import pytest
import torch
from serve_support import Reference, StubTokenizer, make_adapter, one_thread, sliding_window_model, tiny_checkpoint

from leantune.decode.generate import Sampling, encode_prompt, generate_tokens
from leantune.inference import load_for_inference
from leantune.serve.engine import Engine

_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)

LONG = ("Tell me a story about a cat and a dog who live in a small house by the sea, with a garden, two old trees "
        "and a red door that never closes.")
PROMPTS = ["Hello there", "Sort 3 1 2 please", LONG]


class Collector:
    """A request's sink; `log`, when given, gets ("token", name) for each text event (shared across requests)."""

    def __init__(self, name: str = "", log: list | None = None) -> None:
        self.name, self.log = name, log
        self.parts, self.done, self.error = [], None, None
        self.finished = threading.Event()

    def __call__(self, kind, payload) -> None:
        if kind == "text":
            self.parts.append(payload)
            if self.log is not None:
                self.log.append(("token", self.name))
        else:
            self.done, self.error = (payload, None) if kind == "done" else (None, payload)
            self.finished.set()

    @property
    def text(self) -> str:
        assert self.finished.wait(60) and self.error is None, self.error
        return "".join(self.parts)


def submit(engine, name, prompt, max_tokens=8, collector=None):
    c = collector or Collector(name)
    ids = encode_prompt(engine.tokenizer, prompt) if isinstance(prompt, str) else prompt
    c.req = engine.submit(name, ids, max_tokens, 10_000, Sampling(), None, [], c)
    return c


def count_chunks(engine, log: list | None = None) -> list:
    """Wrap the engine's `_prefill_chunk` (a chunk's own forward) and `_decode_group` (chunks run inside the decode
    step) to record (slot, tokens run) per chunk (and ("chunk", slot) into `log`)."""
    calls, real, real_group = [], engine._prefill_chunk, engine._decode_group

    def chunk(req, budget):
        if log is not None:
            log.append(("chunk", req.slot))  # before: the last chunk pushes the request's first token
        n = real(req, budget)
        calls.append((req.slot, n))
        return n

    def group(slots, mixed=()):
        runs = [(r.slot, end - r.length) for r, end in mixed]
        if log is not None:
            log.extend(("chunk", s) for s, _ in runs)
        real_group(slots, mixed)
        calls.extend(runs)
    engine._prefill_chunk, engine._decode_group = chunk, group
    return calls


@pytest.fixture(scope="module")
def world(default_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("chunked")
    ckpt = tiny_checkpoint(default_checkpoint, root / "tiny")
    folders = {"lora": make_adapter(ckpt, root / "lora", "lora", seed=1, r=4, targets="all"),
               "prefix": make_adapter(ckpt, root / "prefix", "prefix_tuning", seed=2),
               "prompt": make_adapter(ckpt, root / "prompt", "prompt_tuning", seed=3)}
    refs = {n: Reference(ckpt, folders.get(n)) for n in ("base", *folders)}
    return ckpt, folders, refs


def new_engine(ckpt, folders=(), **kw):
    model, tokenizer, _, _ = load_for_inference(ckpt, "32-true")
    engine = Engine(model, tokenizer, ckpt, "base", **kw)
    for name, path in folders:
        engine.add_adapter(name, path)
    return engine


@pytest.mark.parametrize("mix", [True, False])
@pytest.mark.parametrize("chunk", [1, 7])
def test_chunked_prefill_gives_the_tokens_of_the_whole_prompt(world, chunk, mix):
    """Base, a shared LoRA, prefix tuning (virtual keys/values) and prompt tuning (virtual embeddings), each on a
    short and a long prompt, admitted in two waves so the second wave's prompts are read in chunks between decode
    steps of the first; every text equals `generate`'s with the same adapter, whether the base's and the LoRA's
    chunks run inside the decode step (mix) or in forwards of their own."""
    ckpt, folders, refs = world
    engine = new_engine(ckpt, folders.items(), max_batch=8, prefill_chunk=chunk, mix_prefill=mix)
    calls = count_chunks(engine)
    try:
        names = ["base", "lora", "prefix", "prompt"]
        with engine.cv:
            first = [(n, PROMPTS[0], 24, submit(engine, n, PROMPTS[0], max_tokens=24)) for n in names]
        second = [(n, p, 8, submit(engine, n, p, max_tokens=8)) for p in PROMPTS[1:] for n in names]
        for name, prompt, new, c in first + second:
            assert c.text == refs[name].text(prompt, new), (name, prompt)
        longest = len(encode_prompt(engine.tokenizer, LONG))
        assert max(n for _, n in calls) <= chunk and len(calls) >= longest // chunk  # prompts ran in chunks
    finally:
        engine.close()


def test_a_running_stream_gets_a_token_between_every_two_chunks(world):
    """One running row and a long prompt admitted together, 4 prompt tokens a turn: after the short prompt is in,
    the engine's turns alternate exactly: one chunk of the long prompt, then one token of the running row."""
    ckpt, _, refs = world
    engine = new_engine(ckpt, max_batch=2, prefill_chunk=4)
    log: list = []
    calls = count_chunks(engine, log)
    try:
        short_ids = encode_prompt(engine.tokenizer, PROMPTS[0])
        long_ids = encode_prompt(engine.tokenizer, LONG)
        with engine.cv:
            running = submit(engine, "base", short_ids, max_tokens=200, collector=Collector("running", log))
            long = submit(engine, "base", long_ids, max_tokens=4, collector=Collector("long", log))
        assert long.text == refs["base"].text(LONG, 4)
        assert running.text == refs["base"].text(PROMPTS[0], 200)
        long_slot = long.req.slot
        chunks = [i for i, e in enumerate(log) if e == ("chunk", long_slot)]
        assert len(chunks) >= len(long_ids) // 4 >= 10
        if running.done["completion_tokens"] > len(chunks):  # it ran all along: a token between every two chunks
            for a, b in zip(chunks, chunks[1:]):
                assert log[a + 1:b] == [("token", "running")], log[a:b + 1]
        else:  # it ended (EOS) during the long prefill: still a token per chunk until then
            assert log[chunks[0] + 1] == ("token", "running")
        assert sum(n for s, n in calls if s == long_slot) == len(long_ids)
    finally:
        engine.close()


def test_a_reused_prompt_start_and_chunked_rest_give_the_same_text(world):
    """A second request whose prompt starts like a finished row's copies those keys/values and prefills only the
    rest, in chunks; for the base, the LoRA and prefix tuning (whose virtual columns come along)."""
    ckpt, folders, refs = world
    engine = new_engine(ckpt, folders.items(), max_batch=2, prefill_chunk=5)
    calls = count_chunks(engine)
    try:
        more = LONG + " Make it short, and make it about the door."
        for name in ("base", "lora", "prefix"):
            assert submit(engine, name, LONG, max_tokens=6).text == refs[name].text(LONG, 6)
            before, n0 = engine.stats()["prompt_tokens_reused"], len(calls)
            assert submit(engine, name, more, max_tokens=6).text == refs[name].text(more, 6), name
            reused = engine.stats()["prompt_tokens_reused"] - before
            assert reused >= len(encode_prompt(engine.tokenizer, LONG)) - 8, (name, reused)
            ran = sum(n for _, n in calls[n0:])
            assert ran == len(encode_prompt(engine.tokenizer, more)) - reused and len(calls) - n0 >= 2
    finally:
        engine.close()


def test_a_failing_chunk_ends_its_request_alone(world, monkeypatch):
    """The prefix adapter's forward breaks on any chunk after its prompt's first: that request ends with the error
    after its first chunk; a running base row and a later LoRA request are unaffected and equal `generate`."""
    ckpt, folders, refs = world
    engine = new_engine(ckpt, folders.items(), max_batch=3, prefill_chunk=6)
    try:
        model = engine.adapters["prefix"].model
        real = model.decode
        model.decode = lambda idx, pos, **kw: (_ for _ in ()).throw(RuntimeError("broken chunk")) \
            if idx.shape[1] > 1 and int(pos[0]) > 0 else real(idx, pos, **kw)
        with engine.cv:
            running = submit(engine, "base", PROMPTS[0], max_tokens=30)
            broken = submit(engine, "prefix", LONG, max_tokens=8)
        assert broken.finished.wait(60) and "broken chunk" in broken.error
        after = submit(engine, "lora", LONG, max_tokens=8)
        assert running.text == refs["base"].text(PROMPTS[0], 30)
        assert after.text == refs["lora"].text(LONG, 8)
        assert engine.stats()["running"] == 0 and engine.failure is None and not engine.prefilling
    finally:
        engine.close()


def test_chunks_across_a_sliding_window_equal_generate(tmp_path):
    """A Mistral-style window of 6 with prompts of 3 to 17 tokens read 4 at a time: each chunk sees only its
    window of the earlier chunks' keys."""
    torch.manual_seed(0)
    model = sliding_window_model()
    engine = Engine(model, StubTokenizer(), tmp_path, "base", max_batch=4, prefill_chunk=4)
    try:
        prompts = [torch.randint(0, 97, (n,)).tolist() for n in (3, 11, 7, 17)]
        got = [submit(engine, "base", p, max_tokens=12) for p in prompts]
        for p, c in zip(prompts, got):
            want = generate_tokens(model, torch.tensor(p), 12)
            assert c.text == StubTokenizer().text(want)
    finally:
        engine.close()
    with pytest.raises(ValueError, match="prefill_chunk"):
        Engine(model, StubTokenizer(), tmp_path, "base", prefill_chunk=0)


def test_short_chunks_run_inside_the_decode_step(world):
    """With mixing on, the base's and the LoRA's short prompts never get a forward of their own: every forward of the
    served model is one token a row (decode rows and prompt rows together), one per engine turn, and the texts still
    equal `generate`'s; the prefix adapter (a grouped model) still prefills alone."""
    ckpt, folders, refs = world
    engine = new_engine(ckpt, folders.items(), max_batch=4, prefill_chunk=16)
    shapes = []
    real = engine.served.decode
    engine.served.decode = lambda idx, pos, **kw: shapes.append(tuple(idx.shape)) or real(idx, pos, **kw)
    try:
        first = submit(engine, "base", PROMPTS[0], max_tokens=12)
        assert first.finished.wait(60)
        with engine.cv:  # a running row, then two short prompts that join it
            running = submit(engine, "lora", PROMPTS[0], max_tokens=20)
        later = [(n, submit(engine, n, PROMPTS[1], max_tokens=6)) for n in ("base", "lora", "prefix")]
        assert running.text == refs["lora"].text(PROMPTS[0], 20)
        for name, c in later:
            assert c.text == refs[name].text(PROMPTS[1], 6), name
        assert first.text == refs["base"].text(PROMPTS[0], 12)
        assert shapes and all(t == 1 for _, t in shapes)  # no (1, T) prefill forward of the served model
        assert max(b for b, _ in shapes) > 4  # some step carried prompt rows beside its decode rows
    finally:
        engine.close()
