"""GPU LoRA / QLoRA training benchmark: leantune vs HF transformers + peft and LitGPT, measured in one run.

Usage (on a CUDA machine; see "Running it" below):
    python bench/train_gpu.py [--models SmolLM2-135M,Llama-3.2-1B] [--batches 1,4] [--steps 10] [--seq 2048]
        [--settings bf16-mixed,bf16-true,bf16-true+bnb.nf4,bf16-true+bnb.nf4-dq] [--skip_peers]
        [--peer_dir ../shared/bench] [--out bench/results/train_gpu.json]
    python bench/train_gpu.py --smoke --out /tmp/x.json     # CPU: the same leantune code path on a tiny model
    python bench/train_gpu.py --merge a.json b.json --out bench/results/train_gpu.json   # join split runs

What is measured, per (model, micro-batch, setting), each leantune run in a fresh subprocess (`--one`) so that
`torch.cuda.max_memory_allocated` starts clean:
  * a random-weight HF folder of the architecture (N(0, 0.02) matrices, bf16) is written once per model
    (`--ckpt_root`), and loaded with `load_hf_checkpoint(dir, dtype, device="cuda", quantize, compute_dtype)`:
    the real streaming loader, so the quantized settings quantize tensor by tensor as `leantune finetune` does;
  * LoRA r=16, alpha=32, dropout 0 on every block linear (q, k, v, proj, mlp; not the head) with `apply_lora`;
    trained tensors in the precision's weight dtype (fp32 masters under bf16-mixed), AdamW lr 1e-4;
  * one training step = forward(return_hidden=True) -> supervised_ce_sum(hidden, lm_head, labels) / n ->
    backward -> AdamW step -> zero_grad(set_to_none); bf16-mixed wraps forward+loss in autocast(bf16).
    Random token ids, every position supervised (labels = ids shifted by one), like the peers' loss;
  * `--warmup` steps, then `--steps` timed steps between torch.cuda.synchronize(): tokens/s = steps*B*T / time;
  * peak memory: loading (peak_load_gb) and training after the load (peak_train_gb); `peak_gb` = the larger, the
    figure compared with the peers (HF's includes its load, LitGPT's starts after model setup);
  * inference peak: after training the optimizer is dropped, the peak reset, and the trained model greedily
    generates `--infer_new` tokens from a `--infer_prompt`-token prompt with the KV cache (batch 1);
  * MFU with the peers' formula: (4 * N_matmul + 6 * T * d * L) FLOPs per token against `--peak_tflops` (989,
    H100 SXM dense bf16); N_matmul counts every block linear and the (tied) LM head.
Peers (subprocesses, their printed JSON line parsed; a failure is recorded and the run goes on):
  `hf_peft_gpu.py --size 1b --mode lora|qlora` (Llama-3.2-1B only: the script has no SmolLM2 size) and
  `litgpt_gpu.py --model <name> --mode lora|qlora`; mode lora is bf16-true, qlora is bf16-true + bnb.nf4-dq
  (LitGPT: PagedAdamW; HF: prepare_model_for_kbit_training). Other settings have no peer figure ("n/a").
Tables: (1) LoRA bf16-true on Llama-3.2-1B, batch 4: tok/s, peak, MFU and ratios vs HF and LitGPT;
(2) per model, batch and setting: leantune training peak, time, tok/s, inference peak, the peers' tok/s and
peak on the same setting, and the ratios tok/s vs LitGPT / HF, QLoRA/LoRA tok/s, peak vs LitGPT / HF.
The JSON (`--out`) is rewritten after every run, so a run cut short keeps what it measured.

Running it on a lent GPU machine: ../shared does not travel, and bitsandbytes / litgpt may be missing there. Copy
the peer scripts into an ignored folder of the repo (e.g. `.peers/`), carry it and wheels (`.whl/`, see
../shared/bench/README.md) and pass `--peer_dir .peers --out $OUT/train_gpu.json`. The full default grid is 16
leantune and 12 peer processes; where one command may run at most 10 minutes, split it with --models / --batches
(each part writes its own JSON) and join the parts with --merge. `bench/device_lease.sh` is such a split, sized for
one 9-minute call: the headline table, the CUDA tests, the AMX CPU training bench, then the batch-1 rows.
Exit status: 0 when every leantune run gave a finite loss (a failed peer is recorded, not fatal), 1 otherwise,
2 without CUDA and without --smoke (nothing is measured; the message says so).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # leantune from this checkout, installed or not
from common import environment, print_table, write_result  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ("bf16-mixed", "bf16-true", "bf16-true+bnb.nf4", "bf16-true+bnb.nf4-dq")
MODELS = {"SmolLM2-135M": "HuggingFaceTB/SmolLM2-135M-Instruct", "Llama-3.2-1B": "meta-llama/Llama-3.2-1B"}
HF_SIZES = {"Llama-3.2-1B": "1b"}  # hf_peft_gpu.py --size
LITGPT_NAMES = {"Llama-3.2-1B": "Llama-3.2-1B", "SmolLM2-135M": "SmolLM2-135M"}  # litgpt_gpu.py --model
PEER_MODES = {"bf16-true": "lora", "bf16-true+bnb.nf4-dq": "qlora"}  # setting -> the peers' --mode
LORA = dict(r=16, alpha=32.0, dropout=0.0, targets=["query", "key", "value", "projection", "mlp"])
# A tiny Llama-architecture config for --smoke (GQA, SwiGLU, tied head, like both benchmarked models).
SMOKE_CONFIG = dict(name="smoke-llama", hf_model_type="llama", block_size=256, vocab_size=1000, n_layer=2, n_embd=64,
                    n_head=4, n_query_groups=2, intermediate_size=128, norm_eps=1e-5, rope_base=10000.0,
                    tie_embeddings=True, bos_token_id=1, eos_token_id=2)
GB = 2**30


# ---- the leantune side (runs in a child process) --------------------------------------------------------------------
def model_config(spec: dict):
    from leantune.models.decoder.config import Config

    return Config(**SMOKE_CONFIG) if spec.get("smoke") else Config.from_name(MODELS[spec["model"]])


def flops_per_token(config, seq: int) -> float:
    """Frozen-base training FLOPs per token, as the peer script counts them: 4 * N_matmul + 6 * T * d * L."""
    h, L = config.n_embd, config.n_layer
    q, k, v = config.qkv_sizes
    n_mm = L * (h * (q + k + v) + q * h + 3 * h * config.intermediate_size) + h * config.padded_vocab_size
    return 4 * n_mm + 6 * seq * h * L


def make_checkpoint(spec: dict) -> dict:
    """Write a random-weight HF folder (bf16, N(0, 0.02) matrices, unit norms) for the spec's model, once."""
    import torch

    from leantune.checkpoint.hf import save_hf_checkpoint
    from leantune.models.decoder.model import GPT

    out = Path(spec["ckpt"])
    if (out / "config.json").is_file():
        return {"ckpt": str(out), "made": False}
    config = model_config(spec)
    device = "cuda" if spec["device"] == "cuda" else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = GPT(config).to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)  # transformers' initializer_range; the default init gives N(0, 1) embeddings
    out.parent.mkdir(parents=True, exist_ok=True)
    save_hf_checkpoint(model, out, dtype=torch.bfloat16)
    return {"ckpt": str(out), "made": True}


def run_one(spec: dict) -> dict:
    """Load, apply LoRA, train `steps` timed steps after `warmup`, then generate; returns the measurements."""
    import gc

    import torch

    from leantune.checkpoint.hf import load_hf_checkpoint
    from leantune.decode.generate import generate_tokens
    from leantune.peft.lora import LoRAArgs, apply_lora
    from leantune.runtime import autocast_dtype, compute_dtype, weight_dtype
    from leantune.train.loss import supervised_ce_sum
    from leantune.train.optim import OptimizerArgs, build_optimizer

    cuda = spec["device"] == "cuda"
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        torch.set_num_threads(spec.get("threads", 1))

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def peak() -> float | None:
        return round(torch.cuda.max_memory_allocated() / GB, 3) if cuda else None

    def reset_peak() -> None:
        if cuda:
            torch.cuda.reset_peak_memory_stats()

    precision, _, quant = spec["setting"].partition("+")
    quant = quant or None
    B, T = spec["batch"], spec["seq"]
    reset_peak()
    t0 = time.perf_counter()
    model = load_hf_checkpoint(spec["ckpt"], dtype=weight_dtype(precision), device=device, quantize=quant,
                               compute_dtype=compute_dtype(precision))
    sync()
    load_s = time.perf_counter() - t0
    peak_load = peak()
    reset_peak()
    names = apply_lora(model, LoRAArgs(**LORA))
    params = dict(model.named_parameters())
    trainable = [params[n] for n in names]
    for p in trainable:  # as `leantune finetune`: trained tensors in the weight dtype (fp32 masters under -mixed)
        if p.dtype != weight_dtype(precision):
            p.data = p.data.to(weight_dtype(precision))
    model.train()
    opt = build_optimizer(trainable, OptimizerArgs(name="AdamW", lr=1e-4))
    amp = autocast_dtype(precision)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, model.config.vocab_size, (B, T), generator=g).to(device)
    labels = torch.cat([x[:, 1:], torch.full((B, 1), -100, device=device)], dim=1)  # pre-shifted; last unsupervised
    n_sup = B * (T - 1)

    def step() -> torch.Tensor:
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            hidden = model(x, return_hidden=True)  # (B, T, C)
            loss = supervised_ce_sum(hidden, model.lm_head, labels) / n_sup
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    for _ in range(spec["warmup"]):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(spec["steps"]):
        loss = step()
    sync()
    train_s = time.perf_counter() - t0
    peak_train = peak()
    reserved = round(torch.cuda.max_memory_reserved() / GB, 3) if cuda else None
    loss_value = float(loss)

    opt.state.clear()  # the AdamW moments; gradients are already None
    del loss
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    reset_peak()
    model.eval()
    prompt = x[0, :spec["infer_prompt"]]
    sync()
    t0 = time.perf_counter()
    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        new = list(generate_tokens(model, prompt, spec["infer_new"]))
    sync()
    infer_s = time.perf_counter() - t0
    tok_s = spec["steps"] * B * T / train_s
    return dict(tool="leantune", model=spec["model"], batch=B, seq=T, setting=spec["setting"], steps=spec["steps"],
                trainable=sum(p.numel() for p in trainable), load_s=round(load_s, 2), train_s=round(train_s, 3),
                s_per_step=round(train_s / spec["steps"], 4), tok_s=round(tok_s, 1), loss=round(loss_value, 4),
                peak_load_gb=peak_load, peak_train_gb=peak_train,
                peak_gb=None if not cuda else max(peak_load, peak_train), peak_reserved_gb=reserved,
                infer_peak_gb=peak(), infer_new_tokens=len(new), infer_s=round(infer_s, 3),
                mfu=round(tok_s * flops_per_token(model.config, T) / (spec["peak_tflops"] * 1e12), 4) if cuda else None,
                device=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__)


# ---- subprocess plumbing --------------------------------------------------------------------------------------------
def last_json(stdout: str) -> dict | None:
    """The last line of a child's stdout that parses as a JSON object."""
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def run_child(cmd: list[str], timeout: float, env: dict | None = None) -> tuple[dict | None, str | None, float]:
    """(parsed JSON line, error text or None, wall seconds) of a subprocess."""
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT, env=env)
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        return None, f"timed out after {timeout:.0f}s: {err[-1500:]}", time.perf_counter() - t0
    wall = time.perf_counter() - t0
    res = last_json(p.stdout)
    if p.returncode != 0 or res is None:
        tail = (p.stderr.strip() or p.stdout.strip())[-1500:]
        return None, f"exit {p.returncode}: {tail}", wall
    return res, None, wall


def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


def leantune_child(flag: str, spec: dict, timeout: float) -> tuple[dict | None, str | None, float]:
    return run_child([sys.executable, str(Path(__file__).resolve()), flag, json.dumps(spec)], timeout, child_env())


def peer_runs(model: str, batch: int, settings: list[str], a) -> list[tuple[str, str, list[str]]]:
    """(tool, setting, command) for every peer measurement that exists for this model, batch and settings."""
    runs = []
    common = ["--batch", str(batch), "--seq", str(a.seq), "--steps", str(a.steps), "--r", str(LORA["r"]),
              "--targets", "all"]
    for setting in settings:
        mode = PEER_MODES.get(setting)
        if mode is None:
            continue
        if model in HF_SIZES:
            runs.append(("hf_peft", setting, [sys.executable, str(a.peer_dir / "hf_peft_gpu.py"), "--size",
                                              HF_SIZES[model], "--mode", mode, *common]))
        if model in LITGPT_NAMES:
            runs.append(("litgpt", setting, [sys.executable, str(a.peer_dir / "litgpt_gpu.py"), "--model",
                                             LITGPT_NAMES[model], "--mode", mode, *common]))
    return runs


# ---- tables ---------------------------------------------------------------------------------------------------------
def _find(records: list[dict], tool: str, model: str, batch: int, setting: str) -> dict | None:
    hits = [r for r in records if (r["tool"], r["model"], r["batch"], r["setting"]) == (tool, model, batch, setting)]
    return hits[-1] if hits else None


def _ok(r: dict | None) -> bool:
    return r is not None and r.get("error") is None and r.get("tok_s") is not None


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def _cell(r: dict | None, key: str, fmt: str = "{:,.0f}") -> str:
    if r is None:
        return "n/a"
    if r.get("error") is not None:
        return "err"
    v = r.get(key)
    return "-" if v is None else fmt.format(v)


def _fmt_ratio(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def tok(r: dict | None) -> float | None:
    return r["tok_s"] if _ok(r) else None


def peak_of(r: dict | None) -> float | None:
    """The peak compared across tools: leantune's max(load, train); the peers' own figure."""
    if not _ok(r):
        return None
    return r.get("peak_gb") if r["tool"] == "leantune" else r.get("peak_alloc_gb")


def build_tables(records: list[dict], config_flops: dict[str, float], peak_tflops: float) -> dict:
    """Table rows (for print_table) and the ratios, from the flat list of run records."""
    def mfu(r):
        if not _ok(r) or r["model"] not in config_flops:
            return None
        return round(r["tok_s"] * config_flops[r["model"]] / (peak_tflops * 1e12), 4)

    lora = {}
    m, b, s = "Llama-3.2-1B", 4, "bf16-true"
    ours, hf, lit = (_find(records, t, m, b, s) for t in ("leantune", "hf_peft", "litgpt"))
    if ours is not None:
        rows = [{"tool": t, "tok_s": _cell(r, "tok_s"), "peak_gb": _cell(r, "peak_gb" if t == "leantune" else
                                                                           "peak_alloc_gb", "{:.2f}"),
                 "mfu": "-" if mfu(r) is None else f"{mfu(r):.1%}"}
                for t, r in (("leantune", ours), ("hf_peft", hf), ("litgpt", lit))]
        ratios = {"tok_s_vs_hf": _ratio(tok(ours), tok(hf)), "tok_s_vs_litgpt": _ratio(tok(ours), tok(lit)),
                  "peak_vs_litgpt": _ratio(peak_of(ours), peak_of(lit)), "peak_vs_hf": _ratio(peak_of(ours), peak_of(hf)),
                  "mfu": mfu(ours)}
        lora = {"model": m, "batch": b, "setting": s, "rows": rows, "ratios": ratios}

    qrows = []
    keys = sorted({(r["model"], r["batch"]) for r in records if r["tool"] == "leantune"},
                  key=lambda k: (list(MODELS).index(k[0]) if k[0] in MODELS else 99, k[1]))
    for model, batch in keys:
        base = _find(records, "leantune", model, batch, "bf16-true")
        for setting in SETTINGS:
            r = _find(records, "leantune", model, batch, setting)
            if r is None:
                continue
            hf, lit = _find(records, "hf_peft", model, batch, setting), _find(records, "litgpt", model, batch, setting)
            qrows.append({
                "model": model, "batch": batch, "setting": setting,
                "train_peak_gb": _cell(r, "peak_gb", "{:.2f}"), "time_s": _cell(r, "train_s", "{:.2f}"),
                "tok_s": _cell(r, "tok_s"), "infer_peak_gb": _cell(r, "infer_peak_gb", "{:.2f}"),
                "mfu": "-" if mfu(r) is None else f"{mfu(r):.1%}",
                "hf_tok_s": _cell(hf, "tok_s"), "hf_peak_gb": _cell(hf, "peak_alloc_gb", "{:.2f}"),
                "litgpt_tok_s": _cell(lit, "tok_s"), "litgpt_peak_gb": _cell(lit, "peak_alloc_gb", "{:.2f}"),
                "tok_s/litgpt": _fmt_ratio(_ratio(tok(r), tok(lit))), "tok_s/hf": _fmt_ratio(_ratio(tok(r), tok(hf))),
                "vs_lora_tok_s": _fmt_ratio(_ratio(tok(r), tok(base))),
                "peak/litgpt": _fmt_ratio(_ratio(peak_of(r), peak_of(lit))),
                "peak/hf": _fmt_ratio(_ratio(peak_of(r), peak_of(hf))),
            })
    return {"lora": lora, "qlora": qrows}


QLORA_COLS = ["model", "batch", "setting", "train_peak_gb", "time_s", "tok_s", "infer_peak_gb", "mfu", "hf_tok_s",
              "hf_peak_gb", "litgpt_tok_s", "litgpt_peak_gb", "tok_s/litgpt", "tok_s/hf", "vs_lora_tok_s",
              "peak/litgpt", "peak/hf"]


def report(records: list[dict], meta: dict, out: Path, env: dict | None = None, quiet: bool = False) -> dict:
    flops = {}
    for model in {r["model"] for r in records}:
        if model in MODELS:
            from leantune.models.decoder.config import Config

            flops[model] = flops_per_token(Config.from_name(MODELS[model]), meta["seq"])
    tables = build_tables(records, flops, meta["peak_tflops"])
    result = {"env": env, **meta, "tables": tables, "records": records}
    write_result(out.stem, result, out.parent)
    if not quiet:
        if tables["lora"]:
            t = tables["lora"]
            print(f"\nLoRA {t['setting']}, {t['model']}, batch {t['batch']}, seq {meta['seq']}, all linear r=16:")
            print_table(t["rows"], ["tool", "tok_s", "peak_gb", "mfu"])
            rt = t["ratios"]
            print("leantune/HF tok/s {}, leantune/LitGPT tok/s {}, peak leantune/LitGPT {}, peak leantune/HF {}".format(
                *(_fmt_ratio(rt[k]) for k in ("tok_s_vs_hf", "tok_s_vs_litgpt", "peak_vs_litgpt", "peak_vs_hf"))))
        if tables["qlora"]:
            print(f"\nLoRA / QLoRA by setting (seq {meta['seq']}, {meta['steps']} timed steps; GB = max allocated):")
            print_table(tables["qlora"], QLORA_COLS)
        print(f"wrote {out}")
    return result


def run_environment(light: bool = False) -> dict:
    """bench/common.py's environment() plus the quantization / peer package versions. `light` (the CPU smoke run)
    reads versions from package metadata instead of importing transformers, which takes seconds."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    if light:
        env = {"date": time.strftime("%Y-%m-%d"), "python": sys.version.split()[0], "torch": torch.__version__,
               "cpu_threads": torch.get_num_threads()}
    else:
        env = environment()
    for pkg in ("transformers", "peft", "bitsandbytes", "litgpt", "lightning"):
        try:
            env.setdefault(pkg, version(pkg))
        except PackageNotFoundError:
            env[pkg] = None
    return env


# ---- main -----------------------------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated among {', '.join(MODELS)}")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--skip_peers", action="store_true")
    ap.add_argument("--peer_dir", type=Path, default=REPO_ROOT.parent / "shared" / "bench")
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "train_gpu.json")
    ap.add_argument("--ckpt_root", type=Path, default=Path(tempfile.gettempdir()) / "leantune_bench_ckpt")
    ap.add_argument("--infer_prompt", type=int, default=128)
    ap.add_argument("--infer_new", type=int, default=32)
    ap.add_argument("--peak_tflops", type=float, default=989.0, help="dense bf16 peak for MFU (H100 SXM: 989)")
    ap.add_argument("--timeout", type=float, default=420.0, help="seconds per subprocess")
    ap.add_argument("--smoke", action="store_true", help="CPU check of the leantune path on a tiny model; no peers")
    ap.add_argument("--merge", type=Path, nargs="+", help="join the records of earlier JSON outputs into --out")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--make_ckpt", help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a.one or a.make_ckpt:  # child process: one measurement, one JSON line on stdout
        print(json.dumps(run_one(json.loads(a.one)) if a.one else make_checkpoint(json.loads(a.make_ckpt))))
        return 0

    if a.merge:
        records, meta = [], None
        for path in a.merge:
            res = json.loads(path.read_text())
            meta = meta or {k: res[k] for k in ("seq", "steps", "warmup", "peak_tflops", "smoke") if k in res}
            records.extend(res["records"])
        report(records, meta, a.out, env=res.get("env"))
        return 0

    import torch

    if not a.smoke and not torch.cuda.is_available():
        print("bench/train_gpu.py: no CUDA device (torch.cuda.is_available() is False); this benchmark measures GPU "
              "training. Nothing was run. Use --smoke for the CPU check of the same code path.", file=sys.stderr)
        return 2
    if a.smoke:
        a.models, a.batches, a.seq, a.steps, a.warmup = "smoke-llama", "2", 64, 2, 1
        a.infer_prompt, a.infer_new, a.skip_peers = 16, 4, True
    models = [m.strip() for m in a.models.split(",") if m.strip()]
    batches = [int(b) for b in a.batches.split(",")]
    settings = [s.strip() for s in a.settings.split(",") if s.strip()]
    bad = [m for m in models if m not in MODELS and not a.smoke] + [s for s in settings if s not in SETTINGS]
    if bad:
        ap.error(f"unknown model or setting {bad}; models: {', '.join(MODELS)}; settings: {', '.join(SETTINGS)}")
    device = "cpu" if a.smoke else "cuda"
    a.peer_dir = a.peer_dir.resolve()
    meta = dict(seq=a.seq, steps=a.steps, warmup=a.warmup, peak_tflops=a.peak_tflops, smoke=a.smoke,
                lora=LORA, optimizer="AdamW lr 1e-4 (peers: AdamW; LitGPT QLoRA: bnb PagedAdamW)")
    ckpt_root = Path(tempfile.mkdtemp(prefix="train_gpu_smoke_")) if a.smoke else a.ckpt_root
    records: list[dict] = []
    t_start = time.perf_counter()

    def add(rec: dict, wall: float) -> None:
        rec["wall_s"] = round(wall, 1)
        records.append(rec)
        what = f"{rec['tool']} {rec['model']} b{rec['batch']} {rec['setting']}"
        if rec.get("error"):
            print(f"[{time.perf_counter() - t_start:6.0f}s] {what}: FAILED {rec['error'][-300:]}", flush=True)
        else:
            peak = rec.get("peak_gb", rec.get("peak_alloc_gb"))
            finite = "" if math.isfinite(rec.get("loss", float("nan"))) else " NON-FINITE LOSS"
            print(f"[{time.perf_counter() - t_start:6.0f}s] {what}: {rec['tok_s']:,.0f} tok/s, peak "
                  f"{'-' if peak is None else f'{peak:.2f} GB'}, loss {rec.get('loss')}{finite}", flush=True)
        report(records, meta, a.out, quiet=True)  # rewritten after every run: a cut-short run keeps its results

    for model in models:
        ckpt = ckpt_root / model
        spec = dict(model=model, ckpt=str(ckpt), device=device, smoke=a.smoke)
        if a.smoke:  # CPU: no CUDA context to keep out of this process, so write it here (one interpreter less)
            made, err, wall = make_checkpoint(spec), None, 0.0
        else:
            made, err, wall = leantune_child("--make_ckpt", spec, a.timeout)
        if err:
            for batch in batches:
                for setting in settings:
                    add(dict(tool="leantune", model=model, batch=batch, seq=a.seq, setting=setting,
                             error=f"random checkpoint: {err}"), wall)
            continue
        print(f"[{time.perf_counter() - t_start:6.0f}s] {model}: random checkpoint "
              f"{'written' if made['made'] else 'reused'} at {ckpt}", flush=True)
        for batch in batches:
            for setting in settings:
                one = dict(spec, batch=batch, seq=a.seq, setting=setting, steps=a.steps, warmup=a.warmup,
                           infer_prompt=min(a.infer_prompt, a.seq), infer_new=a.infer_new, peak_tflops=a.peak_tflops)
                res, err, wall = leantune_child("--one", one, a.timeout)
                add(res or dict(tool="leantune", model=model, batch=batch, seq=a.seq, setting=setting, error=err), wall)
            if a.skip_peers:
                continue
            for tool, setting, cmd in peer_runs(model, batch, settings, a):
                res, err, wall = run_child(cmd, a.timeout)
                rec = dict(tool=tool, model=model, batch=batch, seq=a.seq, setting=setting, cmd=" ".join(cmd[1:]))
                if res is not None and (res.get("batch"), res.get("seq")) != (batch, a.seq):
                    err, res = f"peer reported batch/seq {res.get('batch')}/{res.get('seq')}", None
                rec.update(res or {"error": err})
                rec["tool"], rec["setting"], rec["model"] = tool, setting, model
                add(rec, wall)

    report(records, meta, a.out, env=run_environment(light=a.smoke))
    if a.smoke:
        import shutil

        shutil.rmtree(ckpt_root, ignore_errors=True)
    # Exit status 1 when a leantune run failed or its loss is not finite (a peer's failure is only recorded).
    bad = [r for r in records if r["tool"] == "leantune" and
           (not _ok(r) or not math.isfinite(r.get("loss", float("nan"))) or r["tok_s"] <= 0)]
    if bad:
        why = [f"{r['model']} b{r['batch']} {r['setting']}: {(r.get('error') or 'loss ' + str(r.get('loss')))[-300:]}"
               for r in bad]
        print("leantune runs FAILED: " + "; ".join(why), file=sys.stderr)
        return 1
    if a.smoke:
        print(f"smoke ok: {len(records)} settings, finite loss, tokens/s > 0")
    return 0


if __name__ == "__main__":
    sys.exit(main())
