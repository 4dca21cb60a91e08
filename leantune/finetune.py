"""`leantune finetune <method>`: one command for every method, driving the one training loop."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Literal

import torch

from leantune.data import DataModule, Demo
from leantune.download import DEFAULT_REPO_ID
from leantune.peft.adapter import AdapterArgs
from leantune.peft.lora import LoRAArgs
from leantune.train.loop import EvalArgs, TrainArgs
from leantune.train.optim import DEFAULT_LR, OptimizerArgs

DEFAULT_CHECKPOINT = Path("checkpoints") / DEFAULT_REPO_ID


def finetune(
    method: Literal["lora", "qlora", "adapter", "adapter_v2", "full"],
    checkpoint_dir: Path = DEFAULT_CHECKPOINT,
    out_dir: Path | None = None,
    data: DataModule | None = None,
    precision: str | None = None,
    quantize: str | None = None,
    prompt_style: str | None = None,
    train: TrainArgs = TrainArgs(),
    eval: EvalArgs = EvalArgs(),
    optimizer: OptimizerArgs = OptimizerArgs(),
    lora: LoRAArgs = LoRAArgs(),
    adapter: AdapterArgs = AdapterArgs(),
    resume: str | None = None,
    resume_adapter: Path | None = None,
    threads: int | None = None,
) -> dict:
    """Finetune a checkpoint with one method through the shared training loop.

    Args:
        method: lora, qlora, adapter (LLaMA-Adapter v1), adapter_v2, or full.
        checkpoint_dir: Base model: a Hugging Face folder (the default model is imported on first use).
        out_dir: Where checkpoints, metrics.csv and loss.png go (default out/finetune/<method>).
        data: Dataset module (default Demo, the built-in verifiable tasks), e.g. --data JSON
            --data.json_path file.jsonl, --data Alpaca, --data Chat.
        precision: 32-true, bf16-true, bf16-mixed, 16-mixed (default: fastest safe one for the device).
        quantize: Store the frozen base's block linears in 4 or 8 bits with bitsandbytes (QLoRA): bnb.nf4,
            bnb.nf4-dq (double-quantized scales; the qlora default), bnb.fp4, bnb.fp4-dq, bnb.int8. Works with every
            PEFT method, not with full. Compute runs in the --precision dtype.
        prompt_style: Prompt style name (default: the checkpoint's chat template, else from its config).
        train: Training loop settings (--train.*).
        eval: Evaluation settings (--eval.*).
        optimizer: Optimizer and learning rate (--optimizer.*).
        lora: LoRA hyperparameters (--lora.r, --lora.alpha, --lora.dropout, --lora.targets).
        adapter: LLaMA-Adapter hyperparameters (--adapter.prompt_length, --adapter.start_layer).
        resume: "auto" (latest step-N in out_dir) or a checkpoint folder to resume from exactly.
        resume_adapter: Start LoRA training from an existing LoRA: a leantune adapter folder or a PEFT folder
            (adapter_config.json + adapter_model.safetensors); its r/alpha/targets replace --lora.*.
        threads: CPU threads for torch.
    """
    from leantune.checkpoint.hf import load_hf_checkpoint
    from leantune.evaluate import task_eval
    from leantune.methods import apply_method, build_manifest, load_trainable, save_checkpoint
    from leantune.runtime import compute_dtype, default_device, resolve_precision, weight_dtype
    from leantune.tokenizer import Tokenizer
    from leantune.train.loop import fit

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(train.seed)
    data = data if data is not None else Demo()
    if optimizer.lr is None:
        optimizer = dataclasses.replace(optimizer, lr=DEFAULT_LR[method])
    out_dir = Path(out_dir or Path("out") / "finetune" / method)
    checkpoint_dir = _ensure_checkpoint(Path(checkpoint_dir))
    if method == "qlora" and quantize is None:
        quantize = "bnb.nf4-dq"
    if quantize and method == "full":
        raise ValueError("--quantize freezes a quantized base; it cannot be combined with full finetuning")
    if quantize:
        from leantune.quantize import check_mode

        check_mode(quantize)
    args = _method_args(method, lora, adapter)

    device = default_device()
    precision = resolve_precision(precision, device)
    tokenizer = Tokenizer(checkpoint_dir)
    data.connect(tokenizer, prompt_style=prompt_style, max_seq_length=train.max_seq_length,
                 batch_size=train.micro_batch_size, seed=train.seed, packing=train.packing)
    data.setup()
    style = data.prompt_style

    model = load_hf_checkpoint(checkpoint_dir, dtype=weight_dtype(precision), device=device, quantize=quantize,
                               compute_dtype=compute_dtype(precision))
    task = task_eval(data, tokenizer, style) if eval.exact_match else None
    report: dict = {"method": method, "checkpoint": str(checkpoint_dir), "out_dir": str(out_dir)}
    if task and not resume:
        acc, _ = task(model)
        report["exact_match_before"] = acc
        print(f"held-out exact match before finetuning: {acc:.1%} ({len(data.test_set())} prompts)")

    if resume_adapter is not None:
        trainable, args = _start_from_adapter(model, method, Path(resume_adapter), checkpoint_dir)
    else:
        trainable = apply_method(model, method, args)
    _trainable_in_weight_dtype(model, trainable, weight_dtype(precision))
    manifest = build_manifest(method, args, checkpoint_dir, tokenizer, style.name, precision, quantize,
                              extra={"data": type(data).__name__, "max_seq_length": train.max_seq_length})

    def save_fn(path: Path) -> None:
        save_checkpoint(path, model, method, trainable, manifest, checkpoint_dir)

    sample_fn = _sampler(model, tokenizer, data, style, eval.sample_new_tokens)
    summary = fit(model, trainable, data, out_dir, save_fn, lambda p: load_trainable(model, method, p), train, eval,
                  optimizer, precision=precision, device=device, resume=resume, sample_fn=sample_fn)
    report.update(summary)
    if task:
        acc, preds = task(model)
        report["exact_match_after"] = acc
        print(f"held-out exact match after finetuning: {acc:.1%}")
    _print_summary(report)
    (out_dir / "summary.json").write_text(json.dumps(report, indent=2, default=str))
    return report


def _trainable_in_weight_dtype(model, trainable: list[str], dtype: torch.dtype) -> None:
    """Trained tensors live in the precision's weight dtype (fp32 masters under -mixed), even where a method made
    them in a quantized base's compute dtype."""
    params = dict(model.named_parameters())
    for n in trainable:
        if params[n].dtype != dtype:
            params[n].data = params[n].data.to(dtype)


def _method_args(method: str, lora, adapter):
    from leantune.methods import method_args_class

    cls = method_args_class(method)
    if cls is None:
        return None
    given = lora if method in ("lora", "qlora") else adapter
    if given is None:
        return cls()
    if isinstance(given, cls):
        return given
    fields = given.__dict__ if hasattr(given, "__dict__") else dict(given)
    return cls(**fields)  # adapter_v2 takes the same fields as adapter


def _start_from_adapter(model, method: str, path: Path, checkpoint_dir: Path):
    """Load an existing LoRA (leantune or PEFT format) and make its tensors the trainable ones."""
    from leantune.checkpoint.peft_format import load_any_adapter
    from leantune.peft.lora import LoRALinear, target_layers

    if method not in ("lora", "qlora"):
        raise ValueError(f"--resume_adapter continues a LoRA; method {method!r} cannot start from {path}")
    loaded = load_any_adapter(model, path, checkpoint_dir)
    if loaded["method"] not in ("lora", "qlora"):
        raise ValueError(f"{path} holds a {loaded['method']} adapter; --resume_adapter needs a LoRA")
    # the targets actually present in the model (PEFT folders do not name ours)
    targets = [t for t in ("query", "key", "value", "projection", "mlp", "head")
               if any(isinstance(getattr(p, n), LoRALinear) and all(r in getattr(p, n).parts for r in parts)
                      for p, n, parts in target_layers(model, [t]))]
    margs = {k: v for k, v in loaded["method_args"].items() if k != "targets"}
    args = LoRAArgs(**margs, targets=targets)
    trainable = []
    for n, p in model.named_parameters():
        if n.endswith((".lora_A", ".lora_B")):
            p.requires_grad_(True)
            trainable.append(n)
    return trainable, args


def _ensure_checkpoint(checkpoint_dir: Path) -> Path:
    """The default model is imported from its bundled GGUF on first use; other folders must exist."""
    if (checkpoint_dir / "config.json").is_file():
        return checkpoint_dir
    if checkpoint_dir == DEFAULT_CHECKPOINT:
        from leantune.download import download

        return download(DEFAULT_REPO_ID, checkpoint_dir=Path("checkpoints"))
    raise FileNotFoundError(f"{checkpoint_dir}: no config.json. Import a model first: leantune download <repo_id or path>")


def _sampler(model, tokenizer, data, style, max_new_tokens):
    if not max_new_tokens or not hasattr(data, "test_set"):
        return None
    from leantune.evaluate import greedy_batch

    record = data.test_set()[0]
    ids = tokenizer.encode(style.render_prompt(record))

    def sample() -> str:
        was = model.training
        model.eval()
        out = greedy_batch(model, [ids], max_new_tokens, tokenizer.eos_ids)[0]
        model.train(was)
        return tokenizer.decode(out, skip_special_tokens=True)

    return sample


def _print_summary(r: dict) -> None:
    lines = [
        f"method {r['method']}: {r.get('steps')} steps, {r.get('tokens')} tokens in {r.get('time_s')} s "
        f"({r.get('tokens_per_s')} tokens/s), peak memory {r.get('peak_memory_gb')} GB",
        f"trainable parameters {r.get('trainable_params'):,} of {r.get('total_params'):,}",
        f"validation loss {r.get('val_loss', float('nan')):.4f} (perplexity {r.get('val_ppl', float('nan')):.2f})",
    ]
    if "exact_match_after" in r:
        lines.append(f"held-out exact match: {r.get('exact_match_before', float('nan')):.1%} -> {r['exact_match_after']:.1%}")
    lines.append(f"checkpoint: {r.get('checkpoint')}")
    print("\n".join(lines))
