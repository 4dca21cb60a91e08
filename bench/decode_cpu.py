"""CPU decode speed of weight-only int8/int4 (`--quantize int8|int4`) vs transformers fp32 `generate`, side by side in one
process, plus how often the quantized greedy tokens agree with leantune's fp32 greedy tokens.

Usage: python bench/decode_cpu.py [--threads 2] [--new 64] [--rounds 3] [--batch 16] [--prompts 50] [--agree_new 32]
                                  [--agree_batch 1] [--modes int8,int4] [--compiled int8,int4]

- single stream: every model generates exactly --new tokens greedily (no early stop) from the same chat-rendered
  prompt; rounds alternate over the models so machine noise hits all alike; the best round counts. tok_s is
  end to end (the prompt's forward included); each round also times the prompt and first token alone (prompt_ms),
  and decode_tok_s is the other --new - 1 tokens over the rest of the time, the rate llama.cpp reports as "eval".
- batched: `leantune.decode.generate.greedy_batch` decodes --batch different prompts at once (left padded, --new tokens
  each); aggregate tokens/s over all rows, against the same model's single stream.
- compiled: the modes in --compiled also run single-stream with `--compile` (the decode step compiled whole over a
  static KV cache; compiled during the warm-up, which is not timed), as "<mode> compiled" rows. Batched weight-only
  steps stay eager under --compile, so the batched table also gives each mode's aggregate against its fastest single
  stream, compiled or not.
- agreement: greedy continuations (--agree_new tokens, stopping at EOS) of the first --prompts Demo test prompts,
  quantized vs leantune fp32, both through greedy_batch in batches of --agree_batch (default 1: the single-stream
  path, whose weight-only head screens greedy picks; 8 or more rows take the batched bfloat16 path): the share of
  prompts whose whole continuation is identical, and the share of reference tokens matched before the first
  difference.
Prints tables and writes bench/results/decode_cpu.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_CHECKPOINT, environment, print_table, write_result  # noqa: E402


def demo_prompts(tok, n: int) -> list[list[int]]:
    from leantune.data.demo import Demo
    from leantune.decode.generate import encode_prompt

    records = Demo().test_set()[:n]
    return [encode_prompt(tok, r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "")) for r in records]


def agreement(ref: list[list[int]], got: list[list[int]]) -> dict:
    same = sum(a == b for a, b in zip(ref, got))
    prefix = sum(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b))) for a, b in zip(ref, got))
    return {"identical_prompts": same, "prompts": len(ref), "identical_share": round(same / len(ref), 3),
            "token_agreement_to_first_divergence": round(prefix / max(1, sum(len(a) for a in ref)), 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint_dir", type=Path, default=DEFAULT_CHECKPOINT)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompts", type=int, default=50)
    ap.add_argument("--agree_new", type=int, default=32)
    ap.add_argument("--agree_batch", type=int, default=1,
                    help="prompts decoded together for the agreement table (1: the single-stream path of generate/chat)")
    ap.add_argument("--modes", default="int8,int4")
    ap.add_argument("--compiled", default="int8,int4", help="modes also timed with --compile ('' for none)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from transformers import AutoModelForCausalLM

    from leantune.decode.generate import encode_prompt, generate_tokens, greedy_batch
    from leantune.inference import load_for_inference

    modes = [m for m in a.modes.split(",") if m]
    fp32, tok, _, _ = load_for_inference(a.checkpoint_dir, "32-true")
    models = {"fp32": fp32, **{m: load_for_inference(a.checkpoint_dir, "32-true", quantize=m)[0] for m in modes}}
    hf = AutoModelForCausalLM.from_pretrained(a.checkpoint_dir, dtype=torch.float32).eval()
    ids = torch.tensor(encode_prompt(tok, "Write a short story about a robot who learns to paint."))

    def run_hf(n: int) -> list[int]:
        with torch.inference_mode():
            out = hf.generate(ids[None], max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              attention_mask=torch.ones(1, len(ids), dtype=torch.long), pad_token_id=tok.pad_id)
        return out[0, len(ids):].tolist()

    from leantune.decode.compile import compile_unavailable_reason

    compiled = [m for m in a.compiled.split(",") if m] if compile_unavailable_reason() is None else []
    runners = {"transformers fp32": run_hf}
    for name, model in models.items():
        runners[f"leantune {name}"] = lambda n, model=model: list(generate_tokens(model, ids, n))
    for name in compiled:
        runners[f"leantune {name} compiled"] = lambda n, model=models[name]: list(
            generate_tokens(model, ids, n, compiled=True))
    for fn in runners.values():
        fn(8)  # warm-up
    times: dict[str, list[float]] = {k: [] for k in runners}
    firsts: dict[str, list[float]] = {k: [] for k in runners}  # the prompt and the first token alone
    outputs = {}
    for r in range(a.rounds):
        for name, fn in runners.items():
            t = time.perf_counter()
            fn(1)
            firsts[name].append(time.perf_counter() - t)
            t = time.perf_counter()
            outputs[name] = fn(a.new)
            times[name].append(time.perf_counter() - t)
        print(f"round {r + 1}: " + ", ".join(f"{k} {a.new / v[-1]:.1f} tok/s" for k, v in times.items()), flush=True)

    def decode_rate(name: str) -> list[float]:  # tokens after the first, per second of their own time
        return [(a.new - 1) / max(t - f, 1e-9) for t, f in zip(times[name], firsts[name])]

    hf_best = min(times["transformers fp32"])
    hf_decode = max(decode_rate("transformers fp32"))
    single = []
    for name, ts in times.items():
        best = min(ts)
        decode = decode_rate(name)
        single.append({"decoder": name, "tok_s": round(a.new / best, 1), "rounds_tok_s": [round(a.new / t, 1) for t in ts],
                       "vs_transformers": round(hf_best / best, 2),
                       "prompt_ms": round(1000 * min(firsts[name]), 1), "decode_tok_s": round(max(decode), 1),
                       "rounds_decode_tok_s": [round(d, 1) for d in decode],
                       "decode_vs_transformers": round(max(decode) / hf_decode, 2)})
    print_table(single, ["decoder", "tok_s", "rounds_tok_s", "vs_transformers"])
    print_table(single, ["decoder", "prompt_ms", "decode_tok_s", "rounds_decode_tok_s", "decode_vs_transformers"])

    prompts = demo_prompts(tok, max(a.prompts, a.batch))
    batch_prompts = prompts[:a.batch]
    batched = []
    for name, model in models.items():  # batched weight-only steps run eager under --compile too (compile.py)
        label = f"leantune {name}"
        greedy_batch(model, batch_prompts, 4, stop_ids=[])  # warm-up
        ts = []
        for _ in range(a.rounds):
            t = time.perf_counter()
            out = greedy_batch(model, batch_prompts, a.new, stop_ids=[])
            ts.append(time.perf_counter() - t)
        assert all(len(o) == a.new for o in out)
        agg = a.batch * a.new / min(ts)
        one = next(r["tok_s"] for r in single if r["decoder"] == label)
        best_one = max(r["tok_s"] for r in single if r["decoder"] in (label, f"{label} compiled"))
        batched.append({"decoder": label, "batch": a.batch, "aggregate_tok_s": round(agg, 1),
                        "rounds_tok_s": [round(a.batch * a.new / t, 1) for t in ts],
                        "vs_own_single_stream": round(agg / one, 2),
                        "vs_fastest_single_stream": round(agg / best_one, 2),
                        "vs_transformers": round(agg * hf_best / a.new, 2)})
    print_table(batched, ["decoder", "batch", "aggregate_tok_s", "rounds_tok_s", "vs_own_single_stream",
                          "vs_fastest_single_stream", "vs_transformers"])

    def continuations(model, comp: bool = False) -> list[list[int]]:
        out = []
        for i in range(0, a.prompts, a.agree_batch):
            out += greedy_batch(model, prompts[i:i + a.agree_batch][: a.prompts - i], a.agree_new,
                                stop_ids=tok.eos_ids, compiled=comp)
        return out

    reference = continuations(models["fp32"])
    agree = [{"decoder": f"leantune {m}", **agreement(reference, continuations(models[m]))} for m in modes]
    agree += [{"decoder": f"leantune {m} compiled", **agreement(reference, continuations(models[m], True))}
              for m in compiled]
    print_table(agree, ["decoder", "identical_prompts", "prompts", "identical_share",
                        "token_agreement_to_first_divergence"])
    same_fp32 = outputs["leantune fp32"] == outputs["transformers fp32"]
    print(f"leantune fp32 single-stream tokens identical to transformers': {same_fp32}")
    path = write_result("decode_cpu", {"env": environment(), "prompt_tokens": len(ids), "new_tokens": a.new,
                                       "single_stream": single, "batched": batched, "agreement": agree,
                                       "agreement_new_tokens": a.agree_new, "agreement_batch": a.agree_batch,
                                       "fp32_identical_to_transformers": same_fp32})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
