"""lm-eval on CPU: leantune's in-process LM vs lm-eval's own `hf` backend (HFLM) on the offline MMLU-exemplar task.

Usage: python bench/lm_eval_cpu.py [--threads 2] [--rounds 3] [--batch_size 16] [--subjects all|N|a,b]
                                   [--adapter out/finetune/lora/final] [--hf_batch_sizes 16,4]
Both answer the same lm-eval request instances (MMLU's standard zero-shot prompt, four one-token choices per
question) built once from the task configs; rounds alternate between the backends so machine noise hits all alike.
HFLM runs at every --hf_batch_sizes and the ratio is against its fastest (leantune's --batch_size is a cap: it plans
smaller batches where that saves padding, and HFLM too is faster with small batches on a CPU). Every
per-choice loglikelihood is compared (max |difference|) and the accuracy recomputed from each backend's numbers.
With --adapter (a LoRA-family adapter), leantune applies it unmerged and HFLM gets the same adapter in PEFT format
(`leantune export --format peft`, HFLM's `peft=`). Prints a table and writes bench/results/lm_eval_cpu.json (with
--adapter: lm_eval_cpu_adapter.json).
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


def requests_for(names: list[str]):
    from leantune.evaluation.harness_tasks import offline, resolve_tasks

    specs, manager, local = resolve_tasks(names)
    with offline(local):
        loaded = manager.load(specs)
    reqs = []
    for task in loaded["tasks"].values():
        task.set_config(key="num_fewshot", value=0)
        task.build_all_requests(limit=None)
        reqs += task.instances
    return reqs


def accuracy(reqs, scores) -> dict[str, float]:
    """acc per subject and overall from (logprob, greedy) per request: the most likely choice is the gold one."""
    docs: dict[tuple[str, int], dict] = {}
    for r, (logp, _) in zip(reqs, scores):
        d = docs.setdefault((r.task_name, r.doc_id), {"gold": r.doc["answer"], "scores": {}})
        d["scores"][r.idx] = logp
    per: dict[str, list[int]] = {}
    for (task, _), d in docs.items():
        pred = max(d["scores"], key=d["scores"].get)
        per.setdefault(task, []).append(int(pred == d["gold"]))
    out = {t.removeprefix("mmlu_exemplars_"): sum(v) / len(v) for t, v in per.items()}
    allv = [x for v in per.values() for x in v]
    out["overall"] = sum(allv) / len(allv)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint_dir", type=Path, default=DEFAULT_CHECKPOINT)
    ap.add_argument("--adapter", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--subjects", default="all", help="all, a number (the first N subjects), or a comma list")
    ap.add_argument("--hf_batch_sizes", default="16,4",
                    help="HFLM batch sizes timed (the ratio is against the fastest; on this CPU HFLM gains from "
                         "smaller batches, as leantune's planned batches do)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from leantune.evaluation.harness import harness_lm
    from leantune.evaluation.harness_tasks import MMLU_EXEMPLARS, read_exemplars
    from leantune.export import export_peft_adapter
    from leantune.inference import load_for_inference

    subjects = sorted(read_exemplars()[0])
    if a.subjects.isdigit():
        subjects = subjects[:int(a.subjects)]
    elif a.subjects != "all":
        subjects = a.subjects.split(",")
    reqs = requests_for([f"{MMLU_EXEMPLARS}_{s}" for s in subjects])
    n_docs = len({(r.task_name, r.doc_id) for r in reqs})

    model, tok, _, _ = load_for_inference(a.checkpoint_dir, "32-true", a.adapter)
    ours = harness_lm(model, tok, batch_size=a.batch_size)
    ours.progress = False
    hf_kwargs = {}
    tmp = tempfile.TemporaryDirectory()
    if a.adapter is not None:
        peft_dir = Path(tmp.name) / "peft"
        export_peft_adapter(a.adapter, a.checkpoint_dir, peft_dir)
        hf_kwargs["peft"] = str(peft_dir)
    backends = {f"leantune (batch_size {a.batch_size})": ours}
    for bs in (int(b) for b in a.hf_batch_sizes.split(",") if b):
        backends[f"lm-eval hf (batch_size {bs})"] = HFLM(pretrained=str(a.checkpoint_dir), device="cpu",
                                                          dtype="float32", batch_size=bs, **hf_kwargs)
    ours_name = next(iter(backends))

    times: dict[str, list[float]] = {name: [] for name in backends}
    scores: dict[str, list] = {}
    for lm in backends.values():  # untimed warm-up: first-call allocations and lazy initialisation
        lm.loglikelihood(reqs[:64], disable_tqdm=True)
    for _ in range(a.rounds):
        for name, lm in backends.items():
            t0 = time.perf_counter()
            scores[name] = lm.loglikelihood(reqs, disable_tqdm=True)
            times[name].append(time.perf_counter() - t0)
    tmp.cleanup()
    hf_names = [n for n in backends if n != ours_name]
    diff = max(abs(x[0] - y[0]) for n in hf_names for x, y in zip(scores[ours_name], scores[n]))
    acc = {name: accuracy(reqs, s) for name, s in scores.items()}
    rows = []
    for name, ts in times.items():
        total = sum(ts)
        rows.append({"backend": name, "examples/s": round(n_docs * len(ts) / total, 3),
                     "requests/s": round(len(reqs) * len(ts) / total, 2),
                     "s per round": ", ".join(f"{t:.1f}" for t in ts), "accuracy": round(acc[name]["overall"], 4)})
    best_hf = max(rows[1:], key=lambda r: r["examples/s"])
    ratio = rows[0]["examples/s"] / best_hf["examples/s"]
    per_round = [h / o for o, h in zip(times[ours_name], times[best_hf["backend"]])]
    print_table(rows, ["backend", "examples/s", "requests/s", "s per round", "accuracy"])
    print(f"leantune / fastest lm-eval hf ({best_hf['backend']}): {ratio:.2f}x "
          f"(rounds: {', '.join(f'{r:.2f}' for r in per_round)}); "
          f"{n_docs} questions, {len(reqs)} requests, {len(subjects)} subjects; max |loglikelihood difference| "
          f"{diff:.2e}; identical accuracy: {all(acc[ours_name] == acc[n] for n in hf_names)}")
    result = {"environment": {**environment(), "lm_eval": lm_eval.__version__},
              "task": f"{MMLU_EXEMPLARS} ({len(subjects)} subjects, zero-shot, choices ' A'..' D')",
              "checkpoint": str(a.checkpoint_dir), "adapter": str(a.adapter) if a.adapter else None,
              "batch_size": a.batch_size, "questions": n_docs, "requests": len(reqs), "rows": rows,
              "ratio": round(ratio, 3), "ratio_against": best_hf["backend"],
              "ratio_per_round": [round(r, 3) for r in per_round],
              "max_abs_loglikelihood_diff": diff, "identical_accuracy": all(acc[ours_name] == acc[n] for n in hf_names),
              "accuracy": acc[ours_name]}
    path = write_result("lm_eval_cpu" + ("_adapter" if a.adapter else ""), result)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
