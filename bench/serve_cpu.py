"""`leantune serve` under load on CPU: the default model with two LoRA adapters, through HTTP and the real `openai`
client on loopback (the server is a `leantune serve` process), against the compiled single stream.

Usage: python bench/serve_cpu.py [--threads 2] [--requests 64] [--concurrency 16] [--max_batch 16] [--new 32]
                                 [--quantize MODE] [--precision P] [--rounds 2]

Requests cycle over the base and the two adapters (q/v LoRA r=8 with random non-zero B, one leantune and one PEFT
folder), each a different prompt, greedy, exactly --new tokens unless EOS comes first. Each round runs, one after
the other: the compiled single stream (`generate --compile true`'s decode loop in this process, same precision and
--quantize as the server, the first --sequential prompts one at a time on the base, prompt included; compiled in a
warm-up run of the same prompts that is not timed), the server with one client at a time (--sequential requests), and the server with
--concurrency clients at once (--requests requests, continuous batching). Reports every round's tokens/s, p50/p95
latency per request, and the ratios the issue names: concurrent aggregate / compiled single stream, and concurrent /
sequential through the server. Every answer is checked against the sequential run's answer for the same request
(nothing crossed). Prints a table and writes bench/results/serve_cpu.json (serve_cpu_int8.json, serve_cpu_bf16-true.json,
... under --quantize/--precision). Only 127.0.0.1 is used; the run stops by
itself.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_CHECKPOINT, environment, print_table, write_result  # noqa: E402

TOPICS = ["the sea", "a red fox", "prime numbers", "the moon", "bread", "a quiet town", "rain", "chess", "bees",
          "a lighthouse", "winter", "a violin", "volcanoes", "a library", "trains", "tea"]


def make_lora(checkpoint: Path, out: Path, seed: int) -> Path:
    from leantune.checkpoint.hf import load_hf_checkpoint
    from leantune.methods import apply_method, build_manifest, save_checkpoint
    from leantune.peft.lora import LoRAArgs
    from leantune.tokenizer import Tokenizer

    model = load_hf_checkpoint(checkpoint, dtype=torch.float32)
    args = LoRAArgs(r=8, alpha=16, targets="query,value")
    torch.manual_seed(seed)  # before apply_method: A's initialisation is random too
    trainable = apply_method(model, "lora", args)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.02)
    manifest = build_manifest("lora", args, checkpoint, Tokenizer(checkpoint), None, "32-true", model=model)
    out.mkdir(parents=True)
    save_checkpoint(out, model, "lora", trainable, manifest, checkpoint)
    return out


def run(client, jobs: list[tuple[str, str]], new: int, concurrency: int) -> dict:
    def one(job):
        model, prompt = job
        t0 = time.perf_counter()
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                           max_tokens=new, temperature=0, timeout=600)
        return r.choices[0].message.content, r.usage.completion_tokens, time.perf_counter() - t0

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as pool:
        out = list(pool.map(one, jobs))
    wall = time.perf_counter() - t0
    lat = [x[2] for x in out]
    q = statistics.quantiles(lat, n=100) if len(lat) > 1 else [lat[0]] * 99
    tokens = sum(x[1] for x in out)
    return {"texts": [x[0] for x in out], "tokens": tokens, "wall_s": round(wall, 2),
            "tokens_per_s": round(tokens / wall, 1), "p50_ms": round(q[49] * 1000), "p95_ms": round(q[94] * 1000)}


class compiled_single_stream:
    """`generate --compile true`'s loop in this process on the base (same precision and --quantize as the server):
    one request at a time, chat-rendered prompt included, exactly what one client of the server asks for."""

    def __init__(self, a) -> None:
        from leantune.decode.generate import encode_prompt
        from leantune.inference import load_for_inference

        self.model, self.tokenizer, self.precision, _ = load_for_inference(a.checkpoint_dir, a.precision, None,
                                                                           a.quantize)
        self.new, self.encode = a.new, lambda text: torch.tensor(encode_prompt(self.tokenizer, text))
        self.compile_s = None  # the untimed warm-up run, compiling included

    def _one(self, prompt: str) -> int:
        from leantune.decode.generate import generate_tokens

        return len(list(generate_tokens(self.model, self.encode(prompt), self.new, stop_ids=self.tokenizer.eos_ids,
                                        compiled=True)))

    def run(self, jobs: list[tuple[str, str]]) -> dict:
        lat, tokens = [], 0
        t0 = time.perf_counter()
        for _, prompt in jobs:
            t = time.perf_counter()
            tokens += self._one(prompt)
            lat.append(time.perf_counter() - t)
        wall = time.perf_counter() - t0
        q = statistics.quantiles(lat, n=100) if len(lat) > 1 else [lat[0]] * 99
        return {"tokens": tokens, "wall_s": round(wall, 2), "tokens_per_s": round(tokens / wall, 1),
                "p50_ms": round(q[49] * 1000), "p95_ms": round(q[94] * 1000)}


def server_env() -> dict[str, str]:
    """The server's environment with this process's OpenMP waiting. Left alone, `leantune serve` would look at the
    machine while this process loads its own model, count it as another runnable task and wait passively, while the
    single stream it is compared with keeps libgomp's default spinning (passive waiting made a tiny matmul ~3x slower
    at 2 threads): both sides get the same. Set OMP_WAIT_POLICY or GOMP_SPINCOUNT to choose another for both."""
    env = dict(os.environ)
    if "OMP_WAIT_POLICY" not in env and "GOMP_SPINCOUNT" not in env:
        env["GOMP_SPINCOUNT"] = "300000"  # libgomp's own default spin count when OMP_WAIT_POLICY is unset
    return env


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint_dir", type=Path, default=DEFAULT_CHECKPOINT)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max_batch", type=int, default=16)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--quantize", default=None)
    ap.add_argument("--sequential", type=int, default=16, help="requests in the one-at-a-time run")
    ap.add_argument("--prefix_cache", default="true", help="serve --prefix_cache")
    ap.add_argument("--precision", default=None, help="serve/generate --precision (default: theirs)")
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    import httpx
    import openai

    from leantune.commands.export import export

    with tempfile.TemporaryDirectory() as tmp, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        lora = make_lora(a.checkpoint_dir, Path(tmp) / "lora", 1)
        peft = export(adapter=make_lora(a.checkpoint_dir, Path(tmp) / "lora2", 2), checkpoint_dir=a.checkpoint_dir,
                      format="peft", out_dir=Path(tmp) / "peft")
        cmd = [sys.executable, "-m", "leantune.cli", "serve", "--checkpoint_dir", str(a.checkpoint_dir),
               "--adapter", f"lora={lora}", "--adapter", f"peft={peft}", "--model_name", "base",
               "--port", str(port), "--threads", str(a.threads), "--max_batch_size", str(a.max_batch),
               "--max_queue", str(a.requests), "--max_new_tokens", str(a.new), "--log_level", "warning",
               "--prefix_cache", a.prefix_cache]
        cmd += ["--quantize", a.quantize] if a.quantize else []
        cmd += ["--precision", a.precision] if a.precision else []
        server = subprocess.Popen(cmd, env=server_env())
        single = compiled_single_stream(a)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 300
            while True:  # the server process is up once /health answers
                try:
                    if httpx.get(url + "/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the server did not start")
                time.sleep(0.2)
            client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
            models = ["base", "lora", "peft"]
            jobs = [(models[i % 3], f"Request {i}: write two sentences about {TOPICS[i % len(TOPICS)]}.")
                    for i in range(a.requests)]
            run(client, jobs[:2], 4, 1)  # warm-up
            t0 = time.perf_counter()
            single.run(jobs[: a.sequential])  # warm-up: compiles, and again for any prompt length that needs it
            single.compile_s = round(time.perf_counter() - t0, 1)
            rows, rounds, crossed = [], [], set()
            for r in range(a.rounds):  # alternating, so machine noise hits every run alike
                one = single.run(jobs[: a.sequential])
                seq = run(client, jobs[: a.sequential], a.new, 1)
                conc = run(client, jobs, a.new, a.concurrency)
                crossed |= {i for i, (x, y) in enumerate(zip(seq["texts"], conc["texts"])) if x != y}
                rows += [{"round": r, "run": "compiled single stream (in process)", "requests": a.sequential, **one},
                         {"round": r, "run": "server, 1 client", "requests": a.sequential,
                          **{k: v for k, v in seq.items() if k != "texts"}},
                         {"round": r, "run": f"server, {a.concurrency} concurrent clients", "requests": a.requests,
                          **{k: v for k, v in conc.items() if k != "texts"}}]
                rounds.append({"round": r, "vs_compiled": round(conc["tokens_per_s"] / one["tokens_per_s"], 2),
                               "vs_sequential": round(conc["tokens_per_s"] / seq["tokens_per_s"], 2)})
            health = httpx.get(url + "/health").json()
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=120)
    print_table(rows, ["round", "run", "requests", "tokens", "wall_s", "tokens_per_s", "p50_ms", "p95_ms"])
    for x in rounds:
        print(f"round {x['round']}: {a.concurrency} concurrent / compiled single stream: {x['vs_compiled']}x; "
              f"/ server with 1 client: {x['vs_sequential']}x")
    print(f"answers differing from the sequential run: {len(crossed)} of {a.sequential}; "
          f"{a.quantize or 'no --quantize'}, precision {single.precision}, torch.set_num_threads({a.threads}), "
          f"{a.max_batch} rows; prompt tokens {health['prompt_tokens']}, {health['prompt_tokens_reused']} of them "
          f"reused from rows holding the same start; warm-up run with compiling {single.compile_s} s (not timed)")
    result = {"environment": environment(), "args": vars(a) | {"checkpoint_dir": str(a.checkpoint_dir)},
              "precision": single.precision, "rows": rows, "rounds": rounds, "crossed": sorted(crossed),
              "compile_s": single.compile_s,
              "prompt_tokens": health["prompt_tokens"], "prompt_tokens_reused": health["prompt_tokens_reused"]}
    mode = "".join(f"_{m}" for m in (a.quantize, a.precision) if m)  # fp32 (the defaults): serve_cpu.json
    print(write_result("serve_cpu" + mode, result))


if __name__ == "__main__":
    main()
