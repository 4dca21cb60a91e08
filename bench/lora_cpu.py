"""CPU adapter training tokens/s: leantune vs transformers + peft, same model, method, targets, r, batch, length,
threads.

Usage: python bench/lora_cpu.py [--method lora|dora|loha|lokr|ia3] [--threads 2] [--batch 4] [--seq 256]
       [--steps 6] [--rounds 2] [--compile] [--dropout 0.05] [--device cpu|cuda] [--dtype float32|bfloat16]
       [--precision auto|32-true|bf16-true|bf16-mixed]
--precision auto (finetune's CPU default) measures leantune as finetune runs it on this CPU (bf16-mixed where the
CPU has AMX or AVX512-BF16: bf16 frozen base, fp32 adapter and optimizer, autocast) against peft under
torch.autocast("cpu", torch.bfloat16) over its fp32 model, plus leantune at 32-true in the same rounds: the two
ratios issue 25 names (default vs own fp32, default vs peft in the same precision).
--method picks the method on both sides (leantune's method vs peft's LoraConfig / use_dora=True / LoHaConfig /
LoKrConfig / IA3Config): LoRA-family methods on q/v with r=8 alpha=16, IA3 with both tools' defaults (k, v and the
MLP's down projection). Results go to bench/results/<method>_cpu.json. For DoRA with dropout > 0 both run the
dropped input through the frozen W as well (PEFT's DoRA formula); --dropout 0 shows the cost without that matmul
(LoHa, LoKr and IA3 have no input dropout).
With --compile leantune's blocks are compiled (leantune.decode.compile.compile_blocks); the compile time is reported
separately and excluded from tokens/s, as both sides are timed after warm-up. The peer side is the step of
../shared/bench/hf_peft_cpu.py (LoRA q/v r=8 alpha=16 dropout 0.05, AdamW 2e-4, loss on every position).
Both run in this process, alternating rounds. Writes bench/results/<method>_cpu.json (<method>_cuda.json on a GPU).
On a GPU (`--device cuda`, e.g. `--dtype bfloat16 --batch 4 --seq 2048`) each timed round is synchronised and each
tool's step peak is reported: allocated memory above the resident set (both models, adapters, optimizer states)
during its own steps, i.e. activations, gradients and temporaries (the DoRA target: <= peft's); on the CPU the two
tools' memory is not separable within one process and is left out.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_CHECKPOINT, environment, print_table, write_result  # noqa: E402


def method_configs(method: str, dropout: float):
    """(leantune's args, peft's config) for the same adapter."""
    import peft

    qv = dict(r=8, alpha=16, targets=["query", "value"])
    if method in ("lora", "dora"):
        return ({**qv, "dropout": dropout}, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, task_type="CAUSAL_LM",
                                                            target_modules=["q_proj", "v_proj"], use_dora=method == "dora"))
    if method == "loha":
        return qv, peft.LoHaConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    if method == "lokr":
        return qv, peft.LoKrConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    return None, peft.IA3Config(task_type="CAUSAL_LM")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint_dir", type=Path, default=DEFAULT_CHECKPOINT)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                    help="regional torch.compile of leantune's transformer blocks")
    ap.add_argument("--method", choices=["lora", "dora", "loha", "lokr", "ia3"], default="lora")
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda to measure on a GPU")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="weights, adapters and activations of both tools (with --precision 32-true or bf16-true)")
    ap.add_argument("--precision", default=None, choices=["auto", "32-true", "bf16-true", "bf16-mixed"],
                    help="leantune's training precision as `finetune --precision` sets it up (auto: bf16-mixed on a "
                         "CPU with AMX/AVX512-BF16); a -mixed one runs peft under torch.autocast(bfloat16) over its "
                         "fp32 model, and adds leantune at 32-true as a third row (its own fp32 baseline)")
    a = ap.parse_args()
    from leantune.runtime import autocast_dtype, cast_frozen_matrices, resolve_precision

    precision = resolve_precision(a.precision, torch.device(a.device), training=True) if a.precision else None
    if precision in ("32-true", "bf16-true"):
        a.dtype = "float32" if precision == "32-true" else "bfloat16"
    amp = autocast_dtype(precision) if precision else None
    device, dtype = torch.device(a.device), getattr(torch, a.dtype)
    cuda = device.type == "cuda"
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from leantune.checkpoint.hf import load_hf_checkpoint
    from leantune.methods import apply_method
    from leantune.train.loss import supervised_ce_sum

    x = torch.randint(0, 49152, (a.batch, a.seq), device=device)
    labels = torch.cat([x[:, 1:], torch.full((a.batch, 1), -100, device=device)], dim=1)  # pre-shifted: every position supervised
    n_sup = int((labels != -100).sum())

    ours = load_hf_checkpoint(a.checkpoint_dir, dtype=dtype, device=device)
    our_args, peft_config = method_configs(a.method, a.dropout)
    names = apply_method(ours, a.method, our_args)
    ours.to(device=device, dtype=dtype).train()
    compiled = False
    if a.compile:
        from leantune.decode.compile import compile_blocks

        compiled = compile_blocks(list(ours.transformer.h))
    params = dict(ours.named_parameters())
    opt_ours = torch.optim.AdamW([params[n] for n in names], lr=2e-4)

    def autocast():
        return torch.autocast(device.type, dtype=amp) if amp else torch.autocast(device.type, enabled=False)

    def make_step(model, optimizer, mixed: bool):
        def step() -> None:
            with autocast() if mixed else torch.autocast(device.type, enabled=False):
                hidden = model(x, return_hidden=True)
                loss = supervised_ce_sum(hidden, model.lm_head, labels) / n_sup
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step

    fp32_ours = None
    if amp:  # leantune at 32-true too, before its twin's frozen base goes to bf16 (finetune's -mixed setup)
        fp32_ours = load_hf_checkpoint(a.checkpoint_dir, dtype=dtype, device=device)
        fp32_names = apply_method(fp32_ours, a.method, our_args)
        fp32_ours.to(device=device, dtype=dtype).train()
        fp32_params = dict(fp32_ours.named_parameters())
        step_fp32 = make_step(fp32_ours, torch.optim.AdamW([fp32_params[n] for n in fp32_names], lr=2e-4), False)
        cast_frozen_matrices(ours, names, amp)
    step_ours = make_step(ours, opt_ours, True)

    hf = AutoModelForCausalLM.from_pretrained(a.checkpoint_dir, dtype=dtype)
    hf = get_peft_model(hf, peft_config).to(device=device, dtype=dtype)
    hf.train()
    opt_hf = torch.optim.AdamW([p for p in hf.parameters() if p.requires_grad], lr=2e-4)

    def step_hf() -> None:
        with autocast():
            out = hf(input_ids=x, labels=x)
        out.loss.backward()
        opt_hf.step()
        opt_hf.zero_grad(set_to_none=True)

    trainable = {"leantune": sum(params[n].numel() for n in names),
                 "hf_peft": sum(p.numel() for p in hf.parameters() if p.requires_grad)}
    t = time.perf_counter()
    step_ours()  # first step: compiles the block graphs when compiled
    first_step_s = time.perf_counter() - t
    tools = [("leantune", step_ours), ("hf_peft", step_hf)] + ([("leantune_32-true", step_fp32)] if amp else [])
    if amp:
        trainable["leantune_32-true"] = trainable["leantune"]
    for fn in (step_hf, step_ours, step_hf) + ((step_fp32,) if amp else ()):  # warm-up
        fn()
    times = {name: [] for name, _ in tools}
    peak_gb = {name: 0.0 for name, _ in tools}
    for _ in range(a.rounds):
        for name, fn in tools:
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                resident = torch.cuda.memory_allocated()  # both models, their adapters and optimizer states
            t = time.perf_counter()
            for _ in range(a.steps):
                fn()
            if cuda:
                torch.cuda.synchronize()
                # the peak above the resident set: this tool's activations, gradients and temporaries
                peak_gb[name] = max(peak_gb[name], (torch.cuda.max_memory_allocated() - resident) / 2**30)
            times[name].append((time.perf_counter() - t) / a.steps)
    tokens = a.batch * a.seq
    rows = [{"tool": k, "trainable": trainable[k], "s_per_step": round(min(v), 3), "tok_s": round(tokens / min(v), 1),
             **({"step_peak_gb": round(peak_gb[k], 2)} if cuda else {})} for k, v in times.items()]
    ratio = rows[0]["tok_s"] / rows[1]["tok_s"]
    print_table(rows, ["tool", "trainable", "s_per_step", "tok_s"] + (["step_peak_gb"] if cuda else []))
    print("s/step per round: " + "; ".join(f"{k} {', '.join(f'{t:.3f}' for t in v)}" for k, v in times.items()))
    per_round = {k: [tokens / t for t in v] for k, v in times.items()}
    own_ratio = None
    if amp:
        own_ratio = rows[0]["tok_s"] / rows[2]["tok_s"]
        print(f"ratio leantune {precision} / leantune 32-true: {own_ratio:.2f}x (rounds: " + ", ".join(
            f"{o / f:.2f}" for o, f in zip(per_round["leantune"], per_round["leantune_32-true"])) + ")")
    print("ratio leantune/hf_peft per round: " + ", ".join(
        f"{o / h:.2f}" for o, h in zip(per_round["leantune"], per_round["hf_peft"])))
    compile_s = round(max(first_step_s - min(times["leantune"]), 0.0), 1) if compiled else None
    what = "defaults" if a.method == "ia3" else f"q/v r=8 dropout {a.dropout}"
    mode = f"{precision} (peft under autocast {amp})" if amp else a.dtype
    print(f"ratio leantune/hf_peft: {ratio:.2f}x ({a.method} {what}, B={a.batch}, T={a.seq}, {a.device} {mode}, "
          f"threads={a.threads}, rounds={a.rounds}, "
          f"compiled={compiled}" + (f", compile ~{compile_s} s" if compiled else "") + ")")
    name = f"{a.method}_{device.type}" + (f"_{precision}" if precision else "")
    path = write_result(name, {"env": environment(), "method": a.method, "dropout": a.dropout, "precision": precision,
                               "own_fp32_ratio": round(own_ratio, 3) if own_ratio else None,
                               "device": a.device, "dtype": a.dtype, "batch": a.batch, "seq": a.seq,
                               "rounds": a.rounds, "steps": a.steps, "compiled": compiled, "compile_s": compile_s,
                               "rows": rows, "ratio": round(ratio, 3),
                               "s_per_step_all": {k: [round(t, 3) for t in v] for k, v in times.items()}})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
