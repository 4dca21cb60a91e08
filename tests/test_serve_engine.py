"""The serving engine without HTTP: every adapter method decodes in one engine, mixed with the base and each other
and admitted while others run (continuous batching), each row equal to `generate` with its own adapter; LoRA rows of
different adapters share one forward (segments and the gathered bmm); the base's weights are shared, never copied;
per-row sliding windows; the bounded queue, cancellation and unloading while requests run."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from serve_support import Reference, StubTokenizer, make_adapter, one_thread, sliding_window_model, tiny_checkpoint

from leantune.decode.generate import Sampling, encode_prompt, generate_tokens
from leantune.inference import load_for_inference
from leantune.methods import METHODS
from leantune.serve import adapters as serve_adapters
from leantune.serve.adapters import MultiLoRALinear
from leantune.serve.engine import Engine, QueueFull, UnknownModel

PROMPTS = ["Hello there", "Sort 3 1 2 please", "Tell me a story about a cat and a dog"]
ARGS = {"adapter": {"start_layer": 1}, "adapter_v2": {"start_layer": 0}, "lora": {"r": 4, "targets": "all"}}


_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)

class Collector:
    """A request's sink: its text, its final event and when it finished."""

    def __init__(self) -> None:
        self.parts, self.done, self.error = [], None, None
        self.finished = threading.Event()
        self.at = None

    def __call__(self, kind, payload) -> None:
        if kind == "text":
            self.parts.append(payload)
        else:
            self.done, self.error = (payload, None) if kind == "done" else (None, payload)
            self.at = time.perf_counter()
            self.finished.set()

    @property
    def text(self) -> str:
        assert self.finished.wait(60) and self.error is None, self.error
        return "".join(self.parts)


def submit(engine, name, prompt, max_tokens=10, sampling=None, seed=None, stop=()):
    c = Collector()
    ids = encode_prompt(engine.tokenizer, prompt) if isinstance(prompt, str) else prompt
    c.req = engine.submit(name, ids, max_tokens, 10_000, sampling or Sampling(), seed, list(stop), c)
    return c


@pytest.fixture(scope="module")
def world(default_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    ckpt = tiny_checkpoint(default_checkpoint, root / "tiny")
    folders = {m: make_adapter(ckpt, root / m, m, seed=i, **ARGS.get(m, {}))
               for i, m in enumerate(sorted(METHODS)) if not METHODS[m].saves_full_model}
    folders["lora2"] = make_adapter(ckpt, root / "lora2", "lora", seed=50, r=2, targets="query,value,projection")
    folders["lora3"] = make_adapter(ckpt, root / "lora3", "lora", seed=51, r=8, targets="mlp,head")
    return ckpt, folders


def new_engine(ckpt, max_batch=4, max_queue=64, **kw):
    model, tokenizer, _, _ = load_for_inference(ckpt, "32-true")
    return Engine(model, tokenizer, ckpt, "base", max_batch=max_batch, max_queue=max_queue, **kw)


def test_every_method_decodes_mixed_in_one_engine_equal_to_generate(world):
    ckpt, folders = world
    engine = new_engine(ckpt)
    try:
        before = {n: t.clone() for n, t in engine.pristine.state_dict().items()}
        kinds = {name: engine.add_adapter(name, path).kind for name, path in folders.items()}
        assert {n for n, k in kinds.items() if k == "shared"} == {"lora", "qlora", "lora2", "lora3"}
        names = ["base", *folders]
        jobs = [(n, p) for p in PROMPTS for n in names]
        got = []
        for i, job in enumerate(jobs):  # admitted while earlier rows are decoding
            got.append(submit(engine, *job, max_tokens=10 + i % 5))
            if i % 7 == 0:
                time.sleep(0.01)
        refs = {n: Reference(ckpt, folders.get(n)) for n in names}
        for (name, prompt), c, i in zip(jobs, got, range(len(jobs))):
            assert c.text == refs[name].text(prompt, 10 + i % 5), (name, prompt)
        # the base was never changed (adapter_v2 trains norms: they went into the adapter's own clones)
        after = engine.pristine.state_dict()
        assert all(torch.equal(before[n], after[n]) for n in before)
        # and never copied: every large tensor of every adapter's model is the base's own
        big = {t.data_ptr() for t in engine.pristine.state_dict().values() if t.numel() >= 4096}
        for a in engine.adapters.values():
            if a.model is not None:
                own = {n: t for n, t in a.model.state_dict().items() if t.numel() >= 4096}
                shared = [n for n, t in own.items() if t.data_ptr() in big]
                assert len(shared) >= len(big) - 1, (a.name, set(own) - set(shared))
    finally:
        engine.close()


@pytest.mark.parametrize("path", ["masked", "segments", "bmm"])
def test_lora_rows_of_different_adapters_share_one_forward(world, monkeypatch, path):
    """Three LoRA adapters of different ranks and targets plus the base in one batch: one forward per step, each row
    with its own update (all factors side by side with other adapters' columns masked, per-adapter segments, or the
    gathered bmm over rank-padded stacks)."""
    ckpt, folders = world
    if path == "bmm":
        monkeypatch.setattr(serve_adapters, "BMM_MIN", 1)
    if path == "segments":
        monkeypatch.setattr(serve_adapters, "MASKED_RANK", 0)
    engine = new_engine(ckpt, max_batch=8)
    calls = []
    try:
        for name in ("lora", "lora2", "lora3"):
            engine.add_adapter(name, folders[name])
        layer = next(m for m in engine.served.modules() if isinstance(m, MultiLoRALinear))
        orig = layer.forward
        layer.forward = lambda x: calls.append(x.shape[0]) or orig(x)
        with engine.cv:  # all eight rows are admitted together
            got = [(n, p, submit(engine, n, p, max_tokens=8))
                   for p in PROMPTS[:2] for n in ("lora", "base", "lora2", "lora3")]
        for name, prompt, c in got:
            assert c.text == Reference(ckpt, folders.get(name)).text(prompt, 8), (name, prompt)
        assert max(calls) == 8  # decode steps ran all rows, of four models, in one forward
    finally:
        engine.close()


def test_sliding_window_per_row_and_seeded_sampling_equal_generate(tmp_path):
    """A Mistral-style window of 6 with rows of different lengths (each row's window is its own), and seeded
    top-p sampling, against generate_tokens one prompt at a time."""
    torch.manual_seed(0)
    model = sliding_window_model()
    tok = StubTokenizer(eos_ids=[96])
    engine = Engine(model, tok, tmp_path, "base", max_batch=4)
    try:
        prompts = [torch.randint(0, 97, (n,)).tolist() for n in (3, 11, 7, 17)]
        s = Sampling(temperature=0.8, top_p=0.9)
        greedy = [submit(engine, "base", p, max_tokens=20) for p in prompts]
        sampled = [submit(engine, "base", p, max_tokens=20, sampling=s, seed=i) for i, p in enumerate(prompts)]
        for i, (p, g, r) in enumerate(zip(prompts, greedy, sampled)):
            assert g.text == tok.text(generate_tokens(model, torch.tensor(p), 20, stop_ids=[96]))
            gen = torch.Generator().manual_seed(i)
            assert r.text == tok.text(generate_tokens(model, torch.tensor(p), 20, s, [96], generator=gen))
    finally:
        engine.close()


def test_a_finished_row_frees_its_slot_for_a_waiting_request(world):
    """Two slots, one long request and three short ones: the short ones run one after another in the second slot
    while the long one keeps decoding (no static batches)."""
    ckpt, _ = world
    engine = new_engine(ckpt, max_batch=2)
    try:
        with engine.cv:
            long = submit(engine, "base", PROMPTS[2], max_tokens=150)
            short = [submit(engine, "base", p, max_tokens=4) for p in PROMPTS]
        assert all(len(c.text) > 0 for c in short) and long.text
        assert max(c.at for c in short) < long.at
        assert engine.stats()["served_requests"] == 4
    finally:
        engine.close()


def test_bounded_queue_cancel_and_unload_while_running(world):
    ckpt, folders = world
    engine = new_engine(ckpt, max_batch=1, max_queue=2)
    try:
        engine.add_adapter("lora", folders["lora"])
        with engine.cv:  # nothing is admitted while the lock is held: the queue fills
            first = submit(engine, "lora", PROMPTS[0], max_tokens=100)
            second = submit(engine, "base", PROMPTS[1], max_tokens=100)
            with pytest.raises(QueueFull) as e:
                submit(engine, "base", PROMPTS[2])
            assert e.value.retry_after >= 1
            engine.cancel(second.req)
        engine.remove_adapter("lora")  # while its request runs
        with pytest.raises(UnknownModel):
            submit(engine, "lora", PROMPTS[0])
        assert first.text == Reference(ckpt, folders["lora"]).text(PROMPTS[0], 100)
        assert second.finished.wait(30) and second.done["finish_reason"] == "cancelled"
        deadline = time.monotonic() + 10
        while "lora" in engine.adapters and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "lora" not in engine.adapters
        assert not [m for m in engine.served.modules() if isinstance(m, MultiLoRALinear) and m.factors]
    finally:
        engine.close()


def test_a_failing_step_fails_its_requests_and_the_engine_keeps_serving(world, monkeypatch):
    ckpt, _ = world
    engine = new_engine(ckpt, max_batch=2)
    try:
        real = engine._decode_step
        calls = []

        def flaky():
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("simulated allocation failure")
            real()
        monkeypatch.setattr(engine, "_decode_step", flaky)
        broken = submit(engine, "base", PROMPTS[0], max_tokens=8)
        assert broken.finished.wait(30) and "simulated allocation failure" in broken.error
        assert submit(engine, "base", PROMPTS[1], max_tokens=8).text == Reference(ckpt).text(PROMPTS[1], 8)
        assert engine.stats()["running"] == 0 and engine.thread.is_alive()
    finally:
        engine.close()


def test_a_shared_prompt_start_is_reused_per_adapter_and_gives_the_same_text(world):
    """Rows keep their prompt's keys/values: a later request for the same adapter whose prompt starts alike (here
    the chat template's system message and more) prefills only the rest, from a running row, a finished one or
    its own slot; another adapter's rows are never used. Texts equal `generate` either way."""
    ckpt, folders = world
    engine = new_engine(ckpt, max_batch=2)
    try:
        engine.add_adapter("lora", folders["lora"])
        engine.add_adapter("prefix", folders["prefix_tuning"])
        refs = {n: Reference(ckpt, folders.get(n)) for n in ("base", "lora", "prefix_tuning")}
        long = "Tell me a story about a cat and a dog who live in a small house by the sea."
        for name, ref in (("lora", "lora"), ("prefix", "prefix_tuning"), ("base", "base")):
            before = engine.stats()["prompt_tokens_reused"]
            first = submit(engine, name, long, max_tokens=6)
            assert first.text == refs[ref].text(long, 6)
            reused = engine.stats()["prompt_tokens_reused"] - before
            second = submit(engine, name, long + " Make it short.", max_tokens=6)
            assert second.text == refs[ref].text(long + " Make it short.", 6)
            grown = engine.stats()["prompt_tokens_reused"] - before - reused
            assert grown >= len(encode_prompt(engine.tokenizer, long)) - 8, (name, reused, grown)
        off = new_engine(ckpt, max_batch=2, prefix_cache=False)
        try:
            assert submit(off, "base", long, max_tokens=6).text == refs["base"].text(long, 6)
            assert submit(off, "base", long, max_tokens=6).text and off.stats()["prompt_tokens_reused"] == 0
        finally:
            off.close()
    finally:
        engine.close()


def test_a_request_s_own_failure_ends_it_alone_and_its_batch_mates_go_on(world, monkeypatch):
    """One batch of eight: a LoRA whose decode forward breaks (the shared group's step fails, then runs row by row),
    a grouped adapter whose forward breaks, a request whose sampling raises, one whose text fails to decode, and
    four good rows (base, LoRA, prefix tuning, seeded sampling; plus temperature 1e-40, which used to give NaN
    probabilities and is greedy now). Only the four broken requests fail; every other text equals `generate`'s
    alone, and the engine serves on."""
    import leantune.serve.engine as serve_engine

    ckpt, folders = world
    engine = new_engine(ckpt, max_batch=9)
    try:
        engine.add_adapter("lora", folders["lora"])
        broken = engine.add_adapter("broken-lora", folders["lora2"])
        engine.add_adapter("prefix", folders["prefix_tuning"])
        bad_group = engine.add_adapter("broken-prefix", folders["prefix_tuning"])
        layer = next(m for m in engine.served.modules() if isinstance(m, MultiLoRALinear) and broken.id in m.factors)
        real_forward = layer.forward

        def lora_forward(x):  # fails on decode steps (one token a row) whenever the broken adapter's rows are in
            if x.shape[-2] == 1 and any(i == broken.id for i, _ in layer.rows.segments):
                raise RuntimeError("broken LoRA kernel")
            return real_forward(x)
        layer.forward = lora_forward
        group_decode = bad_group.model.decode
        bad_group.model.decode = lambda idx, pos, **kw: (_ for _ in ()).throw(RuntimeError("broken adapter forward")) \
            if idx.shape[1] == 1 else group_decode(idx, pos, **kw)
        real_sample = serve_engine.sample
        monkeypatch.setattr(serve_engine, "sample", lambda logits, s, g: (_ for _ in ()).throw(
            RuntimeError("probability tensor contains nan")) if s.top_k == 13 else real_sample(logits, s, g))
        hot, tiny_t = Sampling(temperature=0.9, top_p=0.95), Sampling(temperature=1e-40)
        with engine.cv:  # all nine are admitted together
            good = [("base", submit(engine, "base", PROMPTS[0], max_tokens=8)),
                    ("lora", submit(engine, "lora", PROMPTS[1], max_tokens=8)),
                    ("prefix", submit(engine, "prefix", PROMPTS[2], max_tokens=8))]
            seeded = submit(engine, "lora", PROMPTS[0], max_tokens=8, sampling=hot, seed=3)
            cold = submit(engine, "base", PROMPTS[1], max_tokens=8, sampling=tiny_t, seed=1)
            bad = {"broken LoRA kernel": submit(engine, "broken-lora", PROMPTS[0], max_tokens=8),
                   "broken adapter forward": submit(engine, "broken-prefix", PROMPTS[1], max_tokens=8),
                   "probability tensor": submit(engine, "base", PROMPTS[2], max_tokens=8,
                                                sampling=Sampling(0.8, top_k=13), seed=1)}
            undecodable = submit(engine, "base", PROMPTS[0], max_tokens=8)
            undecodable.req.decoder = BrokenDecoder(after=3)
        refs = {"base": Reference(ckpt), "lora": Reference(ckpt, folders["lora"]),
                "prefix": Reference(ckpt, folders["prefix_tuning"])}
        for (name, c), prompt in zip(good, PROMPTS):
            assert c.text == refs[name].text(prompt, 8), name
        assert seeded.text == refs["lora"].text(PROMPTS[0], 8, sampling=hot, seed=3)
        assert cold.text == refs["base"].text(PROMPTS[1], 8)  # greedy
        for message, c in bad.items():
            assert c.finished.wait(30) and c.error and message in c.error, (message, c.error, c.done)
        assert undecodable.finished.wait(30) and "UnicodeDecodeError" in undecodable.error
        assert submit(engine, "lora", PROMPTS[2], max_tokens=8).text == refs["lora"].text(PROMPTS[2], 8)
        assert engine.stats()["running"] == 0 and engine.thread.is_alive() and engine.failure is None
    finally:
        engine.close()


class BrokenDecoder:
    """A stream decoder that fails on its `after`-th token."""

    def __init__(self, after: int) -> None:
        self.n, self.after = 0, after

    def push(self, token) -> str:
        self.n += 1
        if self.n >= self.after:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
        return "x"

    def flush(self) -> str:
        return ""


def test_adapter_names_follow_one_pattern(world):
    ckpt, folders = world
    engine = new_engine(ckpt, max_batch=1)
    try:
        for bad in ("", "has space", "-dash-first", "x" * 129, "semi;colon", "caf\u00e9", "tab\tname"):
            with pytest.raises(ValueError, match="adapter name"):
                engine.add_adapter(bad, folders["lora"])
        assert engine.add_adapter("org/lora-v1.2:ft_x", folders["lora"]).name == "org/lora-v1.2:ft_x"
        assert engine.add_adapter("y" * 128, folders["lora"]).kind == "shared"
    finally:
        engine.close()
