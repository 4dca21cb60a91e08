"""`leantune serve` on the real default model (slow tier): the base and a LoRA adapter answered concurrently in one
batch through the `openai` client give `generate`'s greedy text, streamed and not."""

from __future__ import annotations

import concurrent.futures as cf

import openai
import pytest
from serve_support import LoopbackServer, Reference, make_adapter

from leantune.inference import load_for_inference
from leantune.serve.app import ServeSettings, create_app
from leantune.serve.engine import Engine

pytestmark = pytest.mark.slow
N = 12


def test_default_model_base_and_lora_in_one_batch_equal_generate(default_checkpoint, tmp_path):
    adapter = make_adapter(default_checkpoint, tmp_path / "lora", "lora", seed=0, scale=0.05, r=4,
                           targets="query,value")
    model, tokenizer, _, _ = load_for_inference(default_checkpoint, "32-true")
    engine = Engine(model, tokenizer, default_checkpoint, "smol", max_batch=4)
    engine.add_adapter("lora", adapter)
    srv = LoopbackServer(create_app(engine, ServeSettings(default_max_tokens=N)))
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        jobs = [("smol", "What is the capital of France?"), ("lora", "Name three colors."),
                ("lora", "What is the capital of France?"), ("smol", "Name three colors.")]

        def ask(job, stream=False):
            r = client.chat.completions.create(model=job[0], messages=[{"role": "user", "content": job[1]}],
                                               max_tokens=N, temperature=0, stream=stream)
            return "".join(c.choices[0].delta.content or "" for c in r if c.choices) if stream else \
                r.choices[0].message.content

        with cf.ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(ask, jobs))
        streamed = ask(jobs[1], stream=True)
    finally:
        srv.close()
    refs = {"smol": Reference(default_checkpoint), "lora": Reference(default_checkpoint, adapter)}
    expected = [refs[m].text(p, N) for m, p in jobs]
    assert answers == expected and streamed == expected[1]
    assert "Paris" in expected[0] and expected[1] != expected[3]  # the adapter's own answer, not the base's
