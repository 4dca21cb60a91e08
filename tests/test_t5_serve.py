"""`leantune serve` on an encoder-decoder (T5) through the real `openai` client against a server on a loopback port:
greedy and seeded completions equal `leantune generate`'s (`seq2seq_answer`), concurrent requests that join and
leave a running batch each get the text they get alone, streaming adds up to the same text, stop strings cut it,
LoRA, IA3 and prompt-tuning adapters served beside the base each answer as `generate --adapter`, and what T5 cannot
do (chat without a template, a prompt or completion over the limit, token ids outside the vocabulary) is a 4xx."""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time

import httpx
import openai
import pytest
import torch
from serve_support import LoopbackServer, one_thread
from t5_support import random_t5_hf, samsum_rows, tiny_t5_folder

from leantune.decode.generate import Sampling
from leantune.inference import load_for_inference, seq2seq_answer
from leantune.methods import apply_method, build_manifest, method_args_class, save_checkpoint
from leantune.models.kinds import load_model
from leantune.serve.app import ServeSettings, create_app
from leantune.serve.engine import ContextOverflow
from leantune.serve.seq2seq_engine import Seq2SeqEngine
from leantune.tokenizer import Tokenizer

KEY = "sk-test-key"
N = 10
PROMPTS = ["Amanda: I baked cookies.", "Tom: Nice, bring some tomorrow!", "Summarize the following conversation.",
           "Bob baked a cake for Anna. Jerry: I baked bread. Carla: Nice", "Hi", "Anna baked pizza"]

_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny T5 (random weights spread wide, so greedy choices have clear margins) with a real T5 tokenizer."""
    root = tmp_path_factory.mktemp("t5s")
    out = tiny_t5_folder(root / "t5", samsum_rows(), variant="v1.0")
    ref, _ = random_t5_hf("v1.0", root / "weights", noise=0.5, seed=5)
    ref.save_pretrained(out)
    return out


def make_t5_adapter(folder, out, method: str, seed: int, **args):
    """A leantune adapter folder of `method` on the T5 whose trained tensors are moved away from their initial values
    (so it changes the greedy text)."""
    model = load_model(folder, dtype=torch.float32)
    method_args = method_args_class(method)(**args)
    trainable = apply_method(model, method, method_args)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in trainable:
                p.add_(torch.randn_like(p) * 0.5)
    manifest = build_manifest(method, method_args, folder, Tokenizer(folder), None, "32-true", model=model)
    out.mkdir(parents=True)
    save_checkpoint(out, model, method, trainable, manifest, folder)
    return out


@pytest.fixture(scope="module")
def adapters(folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("t5a")
    return {"lora": make_t5_adapter(folder, root / "lora", "lora", 1, r=4, alpha=8),
            "lora-b": make_t5_adapter(folder, root / "lora-b", "lora", 4, r=2, alpha=4, targets="all"),
            "ia3": make_t5_adapter(folder, root / "ia3", "ia3", 2),
            "prompt": make_t5_adapter(folder, root / "prompt", "prompt_tuning", 3, num_virtual_tokens=3,
                                      init="random")}


class Reference:
    """What `leantune generate [--adapter DIR]` answers for a T5 prompt (`seq2seq_answer`)."""

    def __init__(self, folder, adapter=None) -> None:
        self.model, self.tokenizer, _, self.device = load_for_inference(folder, "32-true", adapter)

    def text(self, prompt: str, max_new_tokens: int, sampling: Sampling | None = None, seed: int = 0) -> str:
        generator = torch.Generator(device=self.device).manual_seed(seed)
        return seq2seq_answer(self.model, self.tokenizer, prompt, max_new_tokens, sampling or Sampling(),
                              generator=generator)[0]


@pytest.fixture(scope="module")
def ref(folder):
    return Reference(folder)


@pytest.fixture(scope="module")
def server(folder, adapters):
    model, tokenizer, _, _ = load_for_inference(folder, "32-true")
    engine = Seq2SeqEngine(model, tokenizer, folder, "t5", max_batch=3, max_queue=32, max_seq_length=64)
    for name, path in adapters.items():
        engine.add_adapter(name, path)
    srv = LoopbackServer(create_app(engine, ServeSettings(api_key=KEY, default_max_tokens=32)))
    yield engine, srv
    srv.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[1].url + "/v1", api_key=KEY, max_retries=0)


def complete(client, prompt, **kw):
    kw.setdefault("max_tokens", N)
    kw.setdefault("temperature", 0)
    return client.completions.create(model="t5", prompt=prompt, **kw)


def test_greedy_completions_equal_generate(ref, client):
    texts = []
    for p in PROMPTS:
        r = complete(client, p)
        texts.append(r.choices[0].text)
        assert r.choices[0].text == ref.text(p, N), p
        assert r.usage.prompt_tokens == len(ref.tokenizer.encode(p)) and 0 < r.usage.completion_tokens <= N
    assert len(set(texts)) > 2, texts  # the prompts matter: no constant answer hides a wrong encoder input
    ids = ref.tokenizer.encode(PROMPTS[0])
    assert complete(client, ids).choices[0].text == texts[0]  # token ids are the encoder input as given


def test_concurrent_requests_joining_a_running_batch_each_get_their_own_text(ref, client):
    """More requests than rows, of different prompt lengths and budgets, fired at once: rows finish at different
    steps and new ones join the running batch at other lengths; each text equals the request alone."""
    jobs = [(p, n) for n in (4, 15, 9) for p in PROMPTS]
    with cf.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda j: complete(client, j[0], max_tokens=j[1]), jobs))
    for (p, n), r in zip(jobs, answers):
        assert r.choices[0].text == ref.text(p, n), (p, n)


def test_a_request_joining_a_long_running_row_decodes_as_alone(ref, server):
    """Directly on the engine: a long request runs for some steps (its sink holds the engine thread after its 8th
    piece of text) before shorter ones of other encoder lengths join it (right-aligned decoder columns, padded
    cross-attention); all equal generate, and the cache is freed after."""
    engine, _ = server
    tok = ref.tokenizer
    long_prompt = max(PROMPTS, key=lambda p: len(tok.encode(ref.text(p, 30))))
    assert len(tok.encode(ref.text(long_prompt, 30))) > 20  # it runs long enough for others to join
    done: dict[int, threading.Event] = {}
    texts: dict[int, list[str]] = {}
    held, go = threading.Event(), threading.Event()

    def sink_for(i):
        done[i], texts[i] = threading.Event(), []

        def sink(kind, payload):
            if kind == "text":
                texts[i].append(payload)
                if i == 0 and len(texts[0]) == 8:
                    held.set()
                    go.wait(30)  # the engine thread waits here: the others queue meanwhile
            else:
                done[i].set()
        return sink

    engine.submit("t5", tok.encode(long_prompt), 30, 32, Sampling(), None, [], sink_for(0))
    assert held.wait(30)
    short = [p for p in PROMPTS if p != long_prompt][:2]
    for i, p in enumerate(short, start=1):
        engine.submit("t5", tok.encode(p), 6, 32, Sampling(), None, [], sink_for(i))
    go.set()
    for e in done.values():
        assert e.wait(60)
    assert "".join(texts[0]) == ref.text(long_prompt, 30)
    assert ["".join(texts[i]) for i in (1, 2)] == [ref.text(p, 6) for p in short]
    deadline = time.monotonic() + 10
    while engine.groups and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.groups == {}


def test_stream_adds_up_to_the_same_text(ref, client):
    chunks = list(complete(client, PROMPTS[1], max_tokens=12, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == ref.text(PROMPTS[1], 12)
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] in (["length"], ["stop"])


def test_stop_strings_cut_the_text_before_them(ref, client):
    full = ref.text(PROMPTS[0], 24)
    stop = full[len(full) // 2: len(full) // 2 + 2]
    assert stop.strip(), full
    r = complete(client, PROMPTS[0], max_tokens=24, stop=[stop])
    assert r.choices[0].text == full[: full.index(stop)] and r.choices[0].finish_reason == "stop"
    streamed = complete(client, PROMPTS[0], max_tokens=24, stop=[stop], stream=True)
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text


def test_seeded_sampling_repeats_and_matches_generate(ref, client):
    kw = dict(temperature=0.9, top_p=0.95, seed=7, max_tokens=N)
    first = complete(client, PROMPTS[2], **kw).choices[0].text
    assert complete(client, PROMPTS[2], **kw).choices[0].text == first
    assert first == ref.text(PROMPTS[2], N, sampling=Sampling(0.9, None, 0.95), seed=7)


def _post(server, path, body):
    return httpx.post(server[1].url + path, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)


def test_what_t5_cannot_do_is_a_4xx_naming_why(server):
    r = _post(server, "/v1/chat/completions", {"model": "t5", "messages": [{"role": "user", "content": "Hi"}]})
    assert r.status_code == 400 and "no chat template" in r.json()["error"]["message"]
    r = _post(server, "/v1/completions", {"model": "t5", "prompt": [5, 96], "max_tokens": 3})
    assert r.status_code == 400 and "[0, 96)" in r.json()["error"]["message"]
    r = _post(server, "/v1/completions", {"model": "t5", "prompt": [5] * 65, "max_tokens": 3})
    assert r.status_code == 400 and "maximum input length is 64" in r.json()["error"]["message"]
    with pytest.raises(ContextOverflow, match="maximum completion length is 64"):  # (HTTP caps max_tokens at 32)
        server[0].submit("t5", [5], 65, 100, Sampling(), None, [], lambda kind, payload: None)
    r = _post(server, "/v1/completions", {"model": "t5", "prompt": [5] * 64, "max_tokens": 30})
    assert r.status_code == 200  # prompt and completion are bounded apart: 94 tokens over a limit of 64 is fine
    r = _post(server, "/v1/completions", {"model": "nope", "prompt": "Hi"})
    assert r.status_code == 404


def test_adapters_are_served_beside_the_base_each_as_generate_adapter(folder, adapters, ref, server, client):
    """Concurrent requests for the base, two LoRAs (rows in the base's batch, each with its own update), an IA3 and a
    prompt-tuning adapter (virtual tokens before the encoder input; both in groups of their own), interleaved: each
    equals `generate --adapter` (and every adapter changes the text)."""
    refs = {"t5": ref, **{name: Reference(folder, path) for name, path in adapters.items()}}
    cards = {m.id: m.model_extra["kind"] for m in client.models.list().data}
    assert cards == {"t5": "base", "lora": "shared", "lora-b": "shared", "ia3": "grouped", "prompt": "grouped"}
    jobs = [(name, p) for p in PROMPTS[:4] for name in refs]
    with cf.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda j: client.completions.create(model=j[0], prompt=j[1], max_tokens=N,
                                                                    temperature=0), jobs))
    for (name, prompt), r in zip(jobs, answers):
        assert r.choices[0].text == refs[name].text(prompt, N), (name, prompt)
    texts = [refs[name].text(PROMPTS[0], N) for name in refs]
    assert len(set(texts)) == len(texts), texts


def test_adapters_load_and_unload_at_run_time(server, adapters):
    engine, _ = server
    engine.add_adapter("lora2", adapters["lora"])
    assert engine.lookup("lora2").method == "lora"
    engine.remove_adapter("lora2")
    deadline = time.monotonic() + 10
    while "lora2" in engine.adapters and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "lora2" not in engine.adapters


def test_the_serve_command_serves_a_t5_folder_with_an_adapter(folder, adapters, ref):
    """`leantune serve --checkpoint_dir <t5> --adapter lora=DIR` in its own process: the kind picks the encoder-
    decoder engine, the adapter loads, answers equal generate, SIGTERM exits 0."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "leantune.cli", "serve", "--checkpoint_dir", str(folder),
                             "--port", str(port), "--threads", "1", "--precision", "32-true",
                             "--adapter", f"lora={adapters['lora']}"],
                            env={**os.environ, "LEANTUNE_API_KEY": KEY}, stderr=subprocess.PIPE, text=True)
    url, auth = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {KEY}"}
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else ""
            time.sleep(0.1)
        for model, reference in (("t5", ref), ("lora", Reference(folder, adapters["lora"]))):
            r = httpx.post(url + "/v1/completions", headers=auth, timeout=60,
                           json={"model": model, "prompt": PROMPTS[0], "max_tokens": N, "temperature": 0})
            assert r.json()["choices"][0]["text"] == reference.text(PROMPTS[0], N)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        err = proc.stderr.read()
        assert "adapter lora: lora" in err and "context 512 tokens" in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
