"""Property-based fuzzing of `leantune serve` on loopback (Hypothesis, fixed seed, a fixed number of examples, a tiny
model): random valid-JSON bodies to every endpoint, near-valid ones (the real field names with random values) as well
as arbitrary JSON, while a thread keeps sending good requests. Properties: no bad input gets a 5xx (nor a stream that
ends in a server error), and every good request returns the text it returns alone."""

from __future__ import annotations

import json
import threading
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serve_support import LoopbackServer, build_world, one_thread

from leantune.inference import load_for_inference
from leantune.serve.app import ServeSettings, create_app
from leantune.serve.engine import Engine

KEY = "sk-fuzz"
KEEP = "keep-lora-7f3a"  # the good traffic's adapter: a name no example will unload
EXAMPLES = 300
_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)

ODD_TEXT = ["", " ", "\ud800", "a\udfffb", "\x00", "tiny", "a", KEEP[:4], "../..", "/", "é" * 3, "{{ raise }}"]
text = st.one_of(st.text(max_size=24), st.sampled_from(ODD_TEXT))
numbers = st.one_of(st.integers(-3, 12), st.integers(), st.floats(allow_nan=False),
                    st.sampled_from([0, 1e-40, 1e-300, 2, 2.0000001, 1e308, -0.0, 5e-324]))
scalars = st.one_of(st.none(), st.booleans(), numbers, text)
anything = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(text, inner, max_size=4), max_leaves=12)


def maybe(strategy):
    """The field's plausible values most of the time (4 in 5), anything JSON otherwise."""
    return st.one_of(strategy, strategy, strategy, strategy, anything)


def rare(strategy):
    """Mostly null (the no-op value every unsupported field takes), so most bodies get past validation."""
    return st.one_of(st.none(), st.none(), st.none(), st.none(), strategy)


COMMON = {"max_tokens": maybe(st.integers(-1, 6)),
          "temperature": maybe(numbers), "top_p": maybe(numbers), "top_k": maybe(st.integers(-2, 100)),
          "stop": maybe(st.one_of(text, st.lists(text, max_size=6))), "seed": maybe(st.integers(-1, 2**64)),
          "n": maybe(st.integers(0, 2)), "stream": maybe(st.booleans()),
          "stream_options": maybe(st.fixed_dictionaries({"include_usage": anything})),
          "logprobs": rare(anything), "logit_bias": rare(anything), "presence_penalty": rare(numbers),
          "user": rare(anything)}
part = st.fixed_dictionaries({"type": maybe(st.sampled_from(["text", "image_url"]))}, optional={"text": maybe(text)})
message = st.fixed_dictionaries({"role": maybe(st.sampled_from(["system", "developer", "user", "assistant", "x"]))},
                                optional={"content": maybe(st.one_of(text, st.lists(part, max_size=3)))})
model = maybe(st.sampled_from(["tiny", "tiny", "a", KEEP, "nope", ""]))
chat_body = st.fixed_dictionaries({"model": model, "messages": maybe(st.lists(message, min_size=1, max_size=3))},
                                  optional={
    **COMMON, "max_completion_tokens": maybe(st.integers(-1, 6)), "tools": rare(anything),
    "response_format": rare(anything)})
valid_fields = {"model": st.sampled_from(["tiny", "a", KEEP]), "max_tokens": st.integers(1, 6),
                "temperature": st.sampled_from([0, 1e-40, 1e-300, 5e-324, 1e-5, 0.7, 2]),
                "top_p": st.sampled_from([1e-300, 0.5, 1]), "top_k": st.one_of(st.none(), st.integers(1, 100)),
                "seed": st.integers(0, 2**63 - 1), "stop": st.lists(text, max_size=4), "stream": st.booleans()}
valid_chat = st.fixed_dictionaries({**valid_fields, "messages": st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant"]), "content": text}), min_size=1, max_size=3)})
"""Bodies that pass validation but for their text and sampling edges: they reach templates, tokenizer and decoding."""
token_ids = st.lists(st.integers(-5, 60_000), max_size=6)
completion_body = st.fixed_dictionaries({"model": model, "prompt": maybe(st.one_of(text, st.lists(text, max_size=3), token_ids,
                                                                   st.lists(token_ids, max_size=3)))},
                                        optional={**COMMON, "echo": rare(anything), "best_of": rare(anything),
                                                  "suffix": rare(anything)})
adapter_body = st.fixed_dictionaries({"name": maybe(text)}, optional={
    "path": maybe(st.sampled_from([".", "missing", "/", "inside"])), "action": maybe(st.sampled_from(["load",
                                                                                                       "unload"]))})
path_part = st.builds(lambda s: quote(s.encode("utf-8", "surrogatepass"), safe=""), text)  # %ED%A0%80 too
requests = st.one_of(
    st.tuples(st.just("POST"), st.just("/v1/chat/completions"), st.one_of(chat_body, valid_chat, anything)),
    st.tuples(st.just("POST"), st.just("/v1/chat/completions"), valid_chat),
    st.tuples(st.just("POST"), st.just("/v1/completions"), st.fixed_dictionaries({**valid_fields, "prompt": text})),
    st.tuples(st.just("POST"), st.just("/v1/completions"), st.one_of(completion_body, completion_body, anything)),
    st.tuples(st.just("POST"), st.just("/v1/adapters"), st.one_of(adapter_body, anything)),
    st.tuples(st.sampled_from(["GET", "DELETE"]), st.builds("/v1/adapters/{}".format, path_part),
              st.none()),
    st.tuples(st.just("GET"), st.builds("/v1/models/{}".format, path_part), st.none()),
    st.tuples(st.sampled_from(["GET", "POST"]), st.sampled_from(["/health", "/v1/models", "/v1/adapters"]),
              st.one_of(st.none(), anything)),
)

GOOD = [("tiny", "Hello there", False), (KEEP, "What is 2+2?", False), ("tiny", "Tell me a story", True),
        (KEEP, "Hi", True)]


def good_answer(client: httpx.Client, model: str, prompt: str, stream: bool) -> str:
    body = {"model": model, "max_tokens": 8, "temperature": 0, "stream": stream,
            "messages": [{"role": "user", "content": prompt}]}
    if not stream:
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        events = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
    return "".join(e["choices"][0]["delta"].get("content", "") for e in events if e.get("choices"))


@pytest.fixture(scope="module")
def server(default_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    world = build_world(default_checkpoint, root)
    (root / "adapters").mkdir()
    model, tokenizer, _, _ = load_for_inference(world["ckpt"], "32-true")
    engine = Engine(model, tokenizer, world["ckpt"], "tiny", max_batch=4, max_queue=64)
    engine.add_adapter("a", world["a"])
    engine.add_adapter(KEEP, world["b"])
    srv = LoopbackServer(create_app(engine, ServeSettings(api_key=KEY, default_max_tokens=8,
                                                          adapter_root=root / "adapters")))
    yield world, srv
    srv.close()


def test_random_requests_get_no_5xx_and_leave_good_requests_unchanged(server):
    world, srv = server
    client = httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
    alone = {g: good_answer(client, *g) for g in GOOD}
    assert alone[GOOD[0]] == world["refs"]["tiny"].text("Hello there", 8)  # alone = generate's text
    stop, wrong, served = threading.Event(), [], [0]

    def good_traffic():
        with httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as c:
            while not stop.is_set():
                for g in GOOD:
                    got = good_answer(c, *g)
                    served[0] += 1
                    if got != alone[g]:
                        wrong.append((g, got, alone[g]))

    traffic = threading.Thread(target=good_traffic)
    traffic.start()
    failures: list = []
    statuses: dict[int, int] = {}

    @settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(req=requests)
    def one(req):
        method, path, body = req
        content = None if body is None else json.dumps(body).encode()  # escapes lone surrogates as \ud800
        r = client.request(method, path, content=content, headers={"Content-Type": "application/json"})
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        if r.status_code >= 500 or (r.status_code == 200 and '"server_error"' in r.text):
            failures.append((method, path, body, r.status_code, r.text[:300]))
        assert r.status_code < 500, (method, path, body, r.text[:300])
        if r.status_code >= 400:
            error = r.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}

    try:
        one()
    finally:
        stop.set()
        traffic.join(timeout=120)
        client.close()
    print(f"\nserve fuzz: {EXAMPLES} examples, statuses {dict(sorted(statuses.items()))}, "
          f"{served[0]} good requests beside them")
    assert not failures, failures[:3]
    assert statuses.get(200, 0) >= EXAMPLES // 10  # the examples reach generation, not only validation
    assert not wrong, wrong[:3]
    assert served[0] >= len(GOOD), served  # the good traffic really ran beside the examples
