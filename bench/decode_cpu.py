"""CPU decode speed of weight-only int8/int4 (`--quantize int8|int4`) vs transformers fp32 `generate` (and, with
--llama_cpp, llama.cpp), side by side in one process, plus how often the quantized greedy tokens agree with
leantune's fp32 greedy tokens.

Usage: python bench/decode_cpu.py [--threads 2] [--new 64] [--rounds 3] [--batch 16] [--prompts 50] [--agree_new 32]
                                  [--agree_batch 1] [--modes int8,int4] [--compiled int8,int4]
                                  [--llama_cpp] [--llama_flash_attn] [--pp_tokens 512]

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
- prompt processing (pp_tok_s): tokens/s of the prompt forward of a --pp_tokens prompt (the first tokens of the
  chat-rendered Demo test prompts joined), timed as the first token of a generation from it, in every round.
  Compiled modes run their prompt eager, so only eager rows are timed.
- --llama_cpp (bench only; llama-cpp-python built once by bench/llama_cpp_setup.sh): adds llama.cpp rows on
  leantune's own GGUF exports of the model (f16, q8_0) and q4_0 / Q4_K_M quantized from the f16 file by
  llama.cpp, on --threads threads for prompt and decode, to the same alternating rounds, the same prompt token ids
  (leantune's, passed as ids), prompt-processing and agreement tables (its greedy sampler, the same stop ids), and
  prints the ratios issue 25 names: int8 vs q8_0 and int4 vs Q4_K_M single-stream tok/s, prompt processing in the
  same mode, each with whether leantune's agreement is at least the llama.cpp file's. Writes decode_cpu_llama.json
  (decode_cpu_llama_fa.json with --llama_flash_attn).
Prints tables and writes bench/results/decode_cpu.json (decode_cpu_llama.json with --llama_cpp).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
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


def long_prompt(tok, n: int) -> list[int]:
    """The first n token ids of one chat-rendered prompt made of Demo test instructions (prompt-processing speed)."""
    from leantune.data.demo import Demo
    from leantune.decode.generate import encode_prompt

    text, ids = "", []
    for r in Demo().test_set():
        text += r["instruction"] + "\n\n"
        ids = encode_prompt(tok, text)
        if len(ids) >= n:
            return ids[:n]
    raise ValueError(f"--pp_tokens {n}: the Demo test prompts give only {len(ids)} tokens")


def agreement(ref: list[list[int]], got: list[list[int]]) -> dict:
    same = sum(a == b for a, b in zip(ref, got))
    prefix = sum(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b))) for a, b in zip(ref, got))
    return {"identical_prompts": same, "prompts": len(ref), "identical_share": round(same / len(ref), 3),
            "token_agreement_to_first_divergence": round(prefix / max(1, sum(len(a) for a in ref)), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint_dir", type=Path, default=DEFAULT_CHECKPOINT)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16, help="rows of the batched table (0: skip it)")
    ap.add_argument("--prompts", type=int, default=50)
    ap.add_argument("--agree_new", type=int, default=32)
    ap.add_argument("--agree_batch", type=int, default=1,
                    help="prompts decoded together for the agreement table (1: the single-stream path of generate/chat)")
    ap.add_argument("--modes", default="int8,int4")
    ap.add_argument("--compiled", default="int8,int4", help="modes also timed with --compile ('' for none)")
    ap.add_argument("--pp_tokens", type=int, default=512, help="prompt length of the prompt-processing table (0: skip)")
    ap.add_argument("--llama_cpp", action="store_true",
                    help="also time llama.cpp (llama-cpp-python, built by bench/llama_cpp_setup.sh) on leantune's "
                         "GGUF exports: f16, q8_0, and q4_0 / Q4_K_M quantized from f16")
    ap.add_argument("--llama_flash_attn", action="store_true",
                    help="llama.cpp with flash attention (off by default in llama-cpp-python; llama.cpp's own 'auto' "
                         "enables it on CPU): faster prompts; writes decode_cpu_llama_fa.json")
    a = ap.parse_args()
    if a.llama_cpp:
        from llama_cpp_side import require_llama_cpp

        require_llama_cpp()  # fail in one line before any model loads
    torch.set_num_threads(a.threads)
    from transformers import AutoModelForCausalLM

    from leantune.decode.generate import encode_prompt, generate_tokens, greedy_batch
    from leantune.inference import load_for_inference

    modes = [m for m in a.modes.split(",") if m]
    fp32, tok, _, _ = load_for_inference(a.checkpoint_dir, "32-true")
    models = {"fp32": fp32, **{m: load_for_inference(a.checkpoint_dir, "32-true", quantize=m)[0] for m in modes}}
    hf = AutoModelForCausalLM.from_pretrained(a.checkpoint_dir, dtype=torch.float32).eval()
    ids = torch.tensor(encode_prompt(tok, "Write a short story about a robot who learns to paint."))
    long_ids = torch.tensor(long_prompt(tok, a.pp_tokens)) if a.pp_tokens else None
    prompts = demo_prompts(tok, max(a.prompts, a.batch))

    def run_hf(n: int, prompt: torch.Tensor = ids) -> list[int]:
        with torch.inference_mode():
            out = hf.generate(prompt[None], max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              attention_mask=torch.ones(1, len(prompt), dtype=torch.long), pad_token_id=tok.pad_id)
        return out[0, len(prompt):].tolist()

    from leantune.decode.compile import compile_unavailable_reason

    compiled = [m for m in a.compiled.split(",") if m] if compile_unavailable_reason() is None else []
    # name -> fn(n, prompt=ids): n greedy tokens (no early stop) after the prompt
    runners = {"transformers fp32": run_hf}
    for name, model in models.items():
        runners[f"leantune {name}"] = lambda n, prompt=ids, model=model: list(generate_tokens(model, prompt, n))
    for name in compiled:
        runners[f"leantune {name} compiled"] = lambda n, prompt=ids, model=models[name]: list(
            generate_tokens(model, prompt, n, compiled=True))
    gguf_dir = tempfile.TemporaryDirectory(prefix="decode_cpu_gguf_")
    llamas = {}
    if a.llama_cpp:
        import llama_cpp
        import llama_cpp_side

        files = llama_cpp_side.make_gguf_files(a.checkpoint_dir, Path(gguf_dir.name), a.threads)
        longest = max(len(ids) + a.new, a.pp_tokens + 1, max(len(p) for p in prompts) + a.agree_new)
        n_ctx = -(-(longest + 1) // 256) * 256
        for name, path in files.items():
            llm = llama_cpp_side.load(path, a.threads, n_ctx, max(512, a.pp_tokens), a.llama_flash_attn)
            llamas[f"llama.cpp {name}"] = llm
            runners[f"llama.cpp {name}"] = lambda n, prompt=ids, llm=llm: llama_cpp_side.greedy(llm, prompt.tolist(), n)
        print(f"llama-cpp-python {llama_cpp.__version__}; GGUF sizes: "
              + ", ".join(f"{k} {p.stat().st_size / 2**20:.0f} MiB" for k, p in files.items()), flush=True)
    pp_runners = [k for k in runners if not k.endswith(" compiled")] if long_ids is not None else []

    times: dict[str, list[float]] = {k: [] for k in runners}
    firsts: dict[str, list[float]] = {k: [] for k in runners}  # the prompt and the first token alone
    pp_times: dict[str, list[float]] = {k: [] for k in pp_runners}
    outputs = {}
    batched = []
    for fn in runners.values():  # warm-up; the compiled modes compile their step for both static cache lengths the
        fn(1)                    # rounds use (prompt + 1 and prompt + --new tokens, rounded up to 128)
        fn(a.new)
    for name in pp_runners:
        runners[name](1, long_ids)
    for r in range(a.rounds):
        for name, fn in runners.items():
            if name in pp_times:
                t = time.perf_counter()
                fn(1, long_ids)
                pp_times[name].append(time.perf_counter() - t)
            t = time.perf_counter()
            fn(1)
            firsts[name].append(time.perf_counter() - t)
            t = time.perf_counter()
            outputs[name] = fn(a.new)
            times[name].append(time.perf_counter() - t)
        print(f"round {r + 1}: " + ", ".join(f"{k} {a.new / v[-1]:.1f} tok/s" for k, v in times.items())
              + (f"; prompt {a.pp_tokens} tok: " + ", ".join(f"{k} {a.pp_tokens / v[-1]:.0f} tok/s"
                                                           for k, v in pp_times.items()) if pp_times else ""),
              flush=True)
    single = single_stream_rows(a, times, firsts, pp_times)
    print_table(single, ["decoder", "tok_s", "rounds_tok_s", "vs_transformers"])
    print_table(single, ["decoder", "prompt_ms", "decode_tok_s", "rounds_decode_tok_s", "decode_vs_transformers"])
    if pp_times:
        print_table([r for r in single if "pp_tok_s" in r], ["decoder", "pp_tok_s", "rounds_pp_tok_s"])

    batch_prompts = prompts[:a.batch]
    for name, model in models.items() if a.batch else ():  # batched weight-only steps run eager (compile.py)
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
                        "vs_transformers": round(agg * min(times["transformers fp32"]) / a.new, 2)})
    if batched:
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
    if llamas:
        import llama_cpp_side

        agree += [{"decoder": name, **agreement(reference, [llama_cpp_side.greedy(llm, p, a.agree_new, tok.eos_ids)
                                                           for p in prompts[:a.prompts]])}
                  for name, llm in llamas.items()]
    print_table(agree, ["decoder", "identical_prompts", "prompts", "identical_share",
                        "token_agreement_to_first_divergence"])
    print_table(summary_rows(single, agree), ["decoder", "tok_s", "rounds_tok_s", "decode_tok_s", "pp_tok_s",
                                              "identical_prompts", "token_agreement_to_first_divergence"])
    same_fp32 = outputs["leantune fp32"] == outputs["transformers fp32"]
    print(f"leantune fp32 single-stream tokens identical to transformers': {same_fp32}")
    result = {"env": environment(), "prompt_tokens": len(ids), "new_tokens": a.new, "pp_tokens": a.pp_tokens,
              "single_stream": single, "batched": batched, "agreement": agree, "agreement_new_tokens": a.agree_new,
              "agreement_batch": a.agree_batch, "fp32_identical_to_transformers": same_fp32}
    if llamas:
        import llama_cpp

        result["env"]["llama_cpp_python"] = llama_cpp.__version__
        result["env"]["llama_cpp_flash_attn"] = a.llama_flash_attn
        result["env"]["llama_cpp_system_info"] = llama_cpp.llama_print_system_info().decode().strip()
        result["vs_llama_cpp"] = llama_ratios(single, agree)
        for name in llamas:
            print(f"{name} single-stream tokens identical to leantune fp32's: {outputs[name] == outputs['leantune fp32']}")
        print_table(result["vs_llama_cpp"], ["comparison", "measure", "leantune", "llama_cpp", "ratio",
                                             "agreement_at_least_llama_cpp"])
    gguf_dir.cleanup()
    name = ("decode_cpu_llama_fa" if a.llama_flash_attn else "decode_cpu_llama") if llamas else "decode_cpu"
    path = write_result(name, result)
    print(f"wrote {path}")


def single_stream_rows(a, times: dict, firsts: dict, pp_times: dict) -> list[dict]:
    """One row per decoder: end-to-end tok/s, prompt+first-token ms, decode tok/s, prompt-processing tok/s; the best
    round counts, every round listed."""
    def decode_rate(name: str) -> list[float]:  # tokens after the first, per second of their own time
        return [(a.new - 1) / max(t - f, 1e-9) for t, f in zip(times[name], firsts[name])]

    hf_best = min(times["transformers fp32"])
    hf_decode = max(decode_rate("transformers fp32"))
    single = []
    for name, ts in times.items():
        best = min(ts)
        decode = decode_rate(name)
        row = {"decoder": name, "tok_s": round(a.new / best, 1), "rounds_tok_s": [round(a.new / t, 1) for t in ts],
               "vs_transformers": round(hf_best / best, 2),
               "prompt_ms": round(1000 * min(firsts[name]), 1), "decode_tok_s": round(max(decode), 1),
               "rounds_decode_tok_s": [round(d, 1) for d in decode],
               "decode_vs_transformers": round(max(decode) / hf_decode, 2)}
        if name in pp_times:
            row["pp_tok_s"] = round(a.pp_tokens / min(pp_times[name]), 1)
            row["rounds_pp_tok_s"] = [round(a.pp_tokens / t, 1) for t in pp_times[name]]
        single.append(row)
    return single


def summary_rows(single: list[dict], agree: list[dict]) -> list[dict]:
    """One row per decoder: speed (end to end with every round, decode, prompt) next to its agreement with fp32."""
    agreements = {r["decoder"]: r for r in agree}
    keys = ("identical_prompts", "token_agreement_to_first_divergence")
    return [{**{k: r[k] for k in ("decoder", "tok_s", "rounds_tok_s", "decode_tok_s") if k in r},
             "pp_tok_s": r.get("pp_tok_s", "eager's" if r["decoder"].endswith(" compiled") else ""),
             **({"identical_prompts": "reference"} if r["decoder"] == "leantune fp32" else
                {k: agreements[r["decoder"]][k] for k in keys} if r["decoder"] in agreements else {})}
            for r in single]


LLAMA_PAIRS = [("int8", "q8_0"), ("int4", "Q4_K_M"), ("int4", "q4_0"), ("fp32", "f16")]
"""(leantune mode, llama.cpp file) compared; int8 vs q8_0 and int4 vs Q4_K_M are issue 25's targets."""


def llama_ratios(single: list[dict], agree: list[dict]) -> list[dict]:
    """leantune / llama.cpp for single-stream end-to-end and decode tok/s (eager and compiled) and prompt processing,
    each with whether leantune's greedy agreement with fp32 is at least the llama.cpp file's (both measures)."""
    rows = {r["decoder"]: r for r in single}
    agreements = {r["decoder"]: r for r in agree}
    keys = ("identical_share", "token_agreement_to_first_divergence")

    def agrees(ours: str, theirs: str) -> bool | str:
        if ours == "leantune fp32":
            return True  # the reference itself
        if ours not in agreements or theirs not in agreements:
            return "n/a"
        return all(agreements[ours][k] >= agreements[theirs][k] for k in keys)

    out = []
    for mode, file in LLAMA_PAIRS:
        theirs = f"llama.cpp {file}"
        if theirs not in rows:
            continue
        for ours in (f"leantune {mode}", f"leantune {mode} compiled"):
            if ours not in rows:
                continue
            measures = ["tok_s", "decode_tok_s"] + (["pp_tok_s"] if "pp_tok_s" in rows[ours] else [])
            for m in measures:
                if m in rows[theirs]:
                    out.append({"comparison": f"{ours} / {theirs}", "measure": m, "leantune": rows[ours][m],
                                "llama_cpp": rows[theirs][m], "ratio": round(rows[ours][m] / rows[theirs][m], 2),
                                "agreement_at_least_llama_cpp": agrees(ours, theirs)})
    return out


if __name__ == "__main__":
    main()
