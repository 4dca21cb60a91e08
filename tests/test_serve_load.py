"""A bounded load test on loopback: 64 requests from 16 concurrent clients (the `openai` client, half streamed) over
the base, a leantune LoRA, a PEFT LoRA and a prefix-tuning adapter, on a server with 8 rows and a queue. Nothing may
be lost, no answer may carry another request's text (each equals `generate` for its own prompt and adapter), no
5xx; p50/p95 latency and tokens/s are printed. It stops by itself: a fixed number of requests, each with a timeout."""

from __future__ import annotations

import concurrent.futures as cf
import statistics
import time

import openai
import pytest
from serve_support import build_world, one_thread, start_server

REQUESTS, CONCURRENCY = 64, 16
MODELS = ["tiny", "a", "b", "c"]
TOPICS = ["the sea", "a red fox", "prime numbers", "the moon", "bread", "a quiet town", "rain", "chess"]


_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)

@pytest.fixture(scope="module")
def world(default_checkpoint, tmp_path_factory):
    return build_world(default_checkpoint, tmp_path_factory.mktemp("load"))


def one(client, i: int) -> dict:
    model = MODELS[i % len(MODELS)]
    prompt = f"Request {i}: write one sentence about {TOPICS[i % len(TOPICS)]}."
    max_tokens = 8 + (i * 7) % 25
    t0 = time.perf_counter()
    kw = dict(model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0,
              timeout=120)
    if i % 2:
        chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        tokens = chunks[-1].usage.completion_tokens
    else:
        r = client.chat.completions.create(**kw)
        text, tokens = r.choices[0].message.content, r.usage.completion_tokens
    return {"i": i, "model": model, "prompt": prompt, "max_tokens": max_tokens, "text": text, "tokens": tokens,
            "latency": time.perf_counter() - t0}


def test_64_requests_16_concurrent_nothing_lost_or_crossed(world):
    engine, srv = start_server(world, max_batch=8, max_queue=64, default_max_tokens=64, adapters=("a", "b", "c"))
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        t0 = time.perf_counter()
        with cf.ThreadPoolExecutor(CONCURRENCY) as pool:
            futures = [pool.submit(one, client, i) for i in range(REQUESTS)]
            results = [f.result(timeout=300) for f in futures]  # any 4xx/5xx raises here
        wall = time.perf_counter() - t0
    finally:
        srv.close()
    assert sorted(r["i"] for r in results) == list(range(REQUESTS))
    refs = world["refs"]
    crossed = [r["i"] for r in results if r["text"] != refs[r["model"]].text(r["prompt"], r["max_tokens"])]
    assert not crossed, crossed
    assert len({r["text"] for r in results}) > REQUESTS // 2  # the answers really differ from one another
    lat = sorted(r["latency"] for r in results)
    q = statistics.quantiles(lat, n=100)
    tokens = sum(r["tokens"] for r in results)
    print(f"\nserve load: {REQUESTS} requests, {CONCURRENCY} concurrent, 8 rows, tiny 2-layer model: "
          f"p50 {q[49] * 1000:.0f} ms, p95 {q[94] * 1000:.0f} ms, {tokens} tokens in {wall:.2f} s = "
          f"{tokens / wall:.0f} tokens/s")
