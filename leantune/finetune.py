"""The finetuning recipe, for every method of the table: set up the run, the data and the model, evaluate, apply the
method (or continue an adapter), train with the one loop, evaluate again. `leantune finetune <method>` is a thin
command over `finetune`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from leantune.checkpoint.io import disk_full_names, write_json
from leantune.cpu_threads import apply_threads
from leantune.data import DataModule, Demo, PreferenceDataModule
from leantune.download import DEFAULT_CHECKPOINT, ensure_checkpoint
from leantune.evaluation.evaluate import cut_at_stop, encode_prompts, task_eval
from leantune.methods import apply_method, build_manifest, get_method, load_any_adapter, load_trainable, save_checkpoint
from leantune.models.kinds import (
    ACTIVATION_CHECKPOINTING,
    BNB_BASE,
    COMPILE,
    FSDP,
    folder_decoder_start_id,
    greedy_outputs,
    kind_of_folder,
    load_model,
)
from leantune.models.quantize import check_mode
from leantune.peft.base import Method, mark_trainable
from leantune.runtime import (
    autocast_dtype,
    compute_dtype,
    default_device,
    describe_precision,
    resolve_precision,
    weight_dtype,
)
from leantune.tokenizer import Tokenizer
from leantune.train.args import EvalArgs, TrainArgs, fit_max_seq_length
from leantune.train.distributed import (
    FSDPArgs,
    Parallel,
    check_fsdp_args,
    init_from_env,
    launched,
    quiet_unless_main,
    shutdown,
)
from leantune.train.loop import check_parallel_method, fit, resume_checkpoint
from leantune.train.optim import OptimizerArgs
from leantune.train.preference import (
    NEEDS_REFERENCE,
    Objective,
    PreferenceArgs,
    PreferenceObjective,
    check_objective,
    choose_reference,
    reference_for,
)
from leantune.train.run_config import load_run_config
from leantune.train.run_dir import prepare_run_dir
from leantune.train.tracking import finish_tracking
from leantune.train.validate import preference_validation


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One finetuning run as the flags describe it, its defaults filled in from the method's record and nothing
    loaded yet: what every step of the recipe reads, instead of a relay of positional arguments."""

    method: Method
    method_args: Any
    checkpoint_dir: Path
    out_dir: Path
    data: DataModule
    precision: str | None
    quantize: str | None
    prompt_style: str | None
    train: TrainArgs
    eval: EvalArgs
    optimizer: OptimizerArgs
    resume: str | None
    resume_adapter: Path | None
    threads: int | None
    overwrite: bool
    fsdp: FSDPArgs
    objective: str = "sft"
    preference: PreferenceArgs = dataclasses.field(default_factory=PreferenceArgs)


def resolve(method: str, checkpoint_dir: Path = DEFAULT_CHECKPOINT, out_dir: Path | None = None,
            data: DataModule | None = None, precision: str | None = None, quantize: str | None = None,
            prompt_style: str | None = None, train: TrainArgs | None = None, eval: EvalArgs | None = None,
            optimizer: OptimizerArgs | None = None, method_args: Any = None, resume: str | None = None,
            resume_adapter: Path | None = None, threads: int | None = None, overwrite: bool = False,
            fsdp: FSDPArgs | None = None, objective: str = "sft", preference: PreferenceArgs | None = None) -> RunSpec:
    """Check the method's flags against its record (defaults, quantization, learning rate) and fill the defaults in.
    Nothing is loaded."""
    m = get_method(method)
    quantize = quantize if quantize is not None else m.default_quantize
    if quantize and not m.accepts_quantized_base:
        raise ValueError(f"--quantize freezes a quantized base; it cannot be combined with {m.name} finetuning")
    check_mode(quantize)
    check_objective(objective)
    data = data if data is not None else Demo()
    if objective != "sft" and not isinstance(data, PreferenceDataModule):
        raise ValueError(f"--objective {objective} trains on preference pairs: use --data Preference "
                         "--data.json_path pairs.jsonl (prompt/chosen/rejected rows) or --data DemoPreference")
    if objective == "sft" and isinstance(data, PreferenceDataModule):
        raise ValueError(f"--data {type(data).__name__} holds preference pairs: pick --objective dpo, ipo, orpo or "
                         "simpo")
    optimizer = optimizer or OptimizerArgs()
    if optimizer.lr is None:
        optimizer = dataclasses.replace(optimizer, lr=m.default_lr)
    return RunSpec(method=m, method_args=m.make_args(method_args), checkpoint_dir=Path(checkpoint_dir),
                   out_dir=Path(out_dir or Path("out") / "finetune" / m.name),
                   data=data, precision=precision, quantize=quantize,
                   prompt_style=prompt_style, train=train or TrainArgs(), eval=eval or EvalArgs(),
                   optimizer=optimizer, resume=resume, resume_adapter=resume_adapter, threads=threads,
                   overwrite=overwrite, fsdp=fsdp or FSDPArgs(), objective=objective,
                   preference=preference or PreferenceArgs())


def check_model_kind(checkpoint_dir: Path | None, method: str, quantize: str | None, train: TrainArgs | None,
                     processes: int = 1) -> None:
    """Refuse, from config.json alone (before data or weights load, before torchrun starts), what the folder's model
    kind lacks: the method, a bitsandbytes base, activation checkpointing, compile or several processes."""
    folder = Path(checkpoint_dir or DEFAULT_CHECKPOINT)
    if not (folder / "config.json").is_file():
        return  # the default model before its first import, or a missing folder the loader names
    kind = kind_of_folder(folder)
    m = get_method(method)
    kind.check_method(m.name)
    quantize = quantize if quantize is not None else m.default_quantize
    if quantize and quantize.startswith("bnb."):
        kind.check(BNB_BASE, f"--quantize {quantize}")
    train = train or TrainArgs()
    if train.activation_checkpointing:
        kind.check(ACTIVATION_CHECKPOINTING)
    if train.compile:
        kind.check(COMPILE)
    if processes > 1:
        kind.check(FSDP)


def finetune(
    method: str,
    checkpoint_dir: Path = DEFAULT_CHECKPOINT,
    out_dir: Path | None = None,
    data: DataModule | None = None,
    precision: str | None = None,
    quantize: str | None = None,
    prompt_style: str | None = None,
    train: TrainArgs | None = None,
    eval: EvalArgs | None = None,
    optimizer: OptimizerArgs | None = None,
    method_args: Any = None,
    resume: str | None = None,
    resume_adapter: Path | None = None,
    threads: int | None = None,
    overwrite: bool = False,
    devices: int = 1,
    num_nodes: int = 1,
    fsdp: FSDPArgs | None = None,
    objective: Objective = "sft",
    preference: PreferenceArgs | None = None,
) -> dict:
    """Finetune `checkpoint_dir` with `method`; returns the run's summary (also written to out_dir/summary.json).

    Started by torchrun or a cluster launcher (RANK, WORLD_SIZE, LOCAL_RANK set), every process runs this and they
    train as one data-parallel job (leantune.train.distributed); `devices`/`num_nodes` are then only checked against
    the launcher's counts. Without a launcher, more than one device must go through `leantune finetune --devices N`
    (which starts torchrun)."""
    if (devices > 1 or num_nodes > 1) and not launched():
        raise ValueError(f"--devices {devices} --num_nodes {num_nodes}: start the run with `leantune finetune ... "
                         "--devices N` or under torchrun / a cluster launcher that sets RANK, WORLD_SIZE, LOCAL_RANK")
    run = resolve(method, checkpoint_dir=checkpoint_dir, out_dir=out_dir, data=data, precision=precision,
                  quantize=quantize, prompt_style=prompt_style, train=train, eval=eval, optimizer=optimizer,
                  method_args=method_args, resume=resume, resume_adapter=resume_adapter, threads=threads,
                  overwrite=overwrite, fsdp=fsdp, objective=objective, preference=preference)
    parallel = init_from_env(run.fsdp.timeout, devices)
    try:
        with quiet_unless_main(parallel), disk_full_names(run.out_dir):  # a full disk names the run's folder
            return run_finetune(run, parallel)
    finally:
        shutdown(parallel)


def run_finetune(run: RunSpec, parallel: Parallel) -> dict:
    """The recipe's steps over a resolved run, in this process (one rank of `parallel`)."""
    train, eval, data, resume, precision = run.train, run.eval, run.data, run.resume, run.precision
    check_parallel_method(parallel, run.method)
    check_fsdp_args(parallel, run.fsdp, precision, run.optimizer.name)
    # first: a bad or taken --out_dir fails before any loading (rank 0 checks and locks it; its error stops all)
    parallel.on_main(lambda: prepare_run_dir(run.out_dir, resume, run.overwrite))
    threads = apply_threads(run.threads)  # --threads, else one per usable CPU (leantune.cpu_threads)
    torch.manual_seed(train.seed)
    checkpoint_dir = parallel.on_main(lambda: ensure_checkpoint(run.checkpoint_dir))  # one import, not N racing
    check_model_kind(checkpoint_dir, run.method.name, run.quantize, train, parallel.world_size)
    train = dataclasses.replace(train, max_seq_length=fit_max_seq_length(train.max_seq_length, checkpoint_dir))

    device = parallel.device if parallel.enabled else default_device()
    requested, precision = precision, run_precision(precision, device, run.out_dir, resume)
    if parallel.is_main:
        print(f"finetune {run.method.name}: {checkpoint_dir.name}, {device.type}, "
              f"precision {describe_precision(requested, precision, device)}, threads {threads.describe()}")
    tokenizer = Tokenizer(checkpoint_dir)
    # several ranks: every rank plans the same global batches of micro x ranks rows and trains on its share
    data.connect(tokenizer, prompt_style=run.prompt_style, max_seq_length=train.max_seq_length,
                 batch_size=train.micro_batch_size * parallel.world_size, seed=train.seed, packing=train.packing,
                 decoder_start_id=folder_decoder_start_id(checkpoint_dir))
    data.setup()
    style = data.prompt_style

    model = load_model(checkpoint_dir, dtype=weight_dtype(precision), device=device, quantize=run.quantize,
                       compute_dtype=compute_dtype(precision))
    task = task_eval(data, tokenizer, style) if eval.exact_match else None
    report: dict = {"method": run.method.name, "checkpoint": str(checkpoint_dir), "out_dir": str(run.out_dir)}
    sample_fn = sampler(model, tokenizer, data, style, eval.sample_new_tokens)

    def before_training() -> None:
        if task and not resume:
            acc, _ = task(model)
            report["exact_match_before"] = acc
            print(f"held-out exact match before finetuning: {acc:.1%} ({len(data.test_set())} prompts)")
        if sample_fn is not None and not resume:  # the same held-out prompt is answered again after training
            print(describe_sample("before training", data, style, sample_fn(), eval.sample_new_tokens))

    if run.resume_adapter is not None:
        trainable, args = start_from_adapter(model, run.method, Path(run.resume_adapter), checkpoint_dir)
        before_training()  # a continued adapter: "before" is the model this run starts from
    else:
        before_training()
        args = run.method_args
        trainable = apply_method(model, run.method, args)
        if run.method.prepare is not None:
            run.method.prepare(model, args, tokenizer)
    trainable_in_weight_dtype(model, trainable, weight_dtype(precision))
    manifest = build_manifest(run.method.name, args, checkpoint_dir, tokenizer, style.name, precision, run.quantize,
                              extra={"data": type(data).__name__, "max_seq_length": train.max_seq_length}, model=model)

    def save_fn(path: Path) -> None:
        save_checkpoint(path, model, run.method, trainable, manifest, checkpoint_dir)

    def load_fn(path: Path) -> None:
        load_trainable(model, run.method, path, expected=trainable)

    objective = preference_objective(run, model, trainable, data, device, precision, parallel)
    if objective is not None and not resume:
        report.update(preference_before(model, data, device, objective, eval.max_batches, precision))

    summary = fit(model, trainable, data, run.out_dir, save_fn, load_fn, train, eval, run.optimizer,
                  precision=precision, device=device, resume=resume, sample_fn=sample_fn, method=run.method,
                  parallel=parallel, fsdp=run.fsdp, objective=objective,
                  run_config={"method": run.method.name, "checkpoint_dir": str(checkpoint_dir), "data": data,
                              run.method.flag: args, "quantize": run.quantize, "prompt_style": run.prompt_style,
                              **({"objective": run.objective, "preference": run.preference} if objective else {})})
    report.update(summary)
    if sample_fn is not None:  # one answer to the first held-out prompt, so a default run shows what it learned
        report["sample"] = sample_fn()
        print(describe_sample("after training", data, style, report["sample"], eval.sample_new_tokens))
    if task:
        acc, answers = task(model)
        report["exact_match_after"] = acc
        report["heldout_answers"] = heldout_answers(data, answers)
        print(f"held-out exact match after finetuning: {acc:.1%}")
    print_summary(report)
    if parallel.is_main:
        write_json(run.out_dir / "summary.json", json.loads(json.dumps(report, default=str)))
        finish_tracking(run.out_dir, report)
    return report


def run_precision(precision: str | None, device, out_dir: Path, resume: str | None) -> str:
    """The run's concrete precision. Unset or `auto` on a resumed run keeps the precision the run trained in
    (run.json), so a run started before `auto` existed, or on another machine, resumes as it was; otherwise `auto`
    picks the fastest safe training precision for the device."""
    if precision in (None, "auto"):
        ckpt = resume_checkpoint(out_dir, resume)
        saved = load_run_config(ckpt) if ckpt is not None else None
        if saved and saved.get("precision"):
            return resolve_precision(saved["precision"], device)
    return resolve_precision(precision, device, training=True)


def preference_objective(run: RunSpec, model, trainable: list[str], data, device, precision: str,
                         parallel: Parallel) -> PreferenceObjective | None:
    """The run's preference objective with its reference (None for SFT); prints which reference it uses."""
    if run.objective == "sft":
        return None
    reference = None
    if run.objective in NEEDS_REFERENCE:
        mode, layers = choose_reference(run.preference.reference, model, trainable, run.method.saves_full_model,
                                        run.resume_adapter is not None)
        print(f"--objective {run.objective}: reference = " + (
            "the base model, the adapter switched off in one extra forward" if mode == "adapter_off" else
            f"the starting model's log-probs, computed once and stored in {run.out_dir}/reference_logps.safetensors"))
        resuming = resume_checkpoint(run.out_dir, run.resume) is not None  # --resume auto may start afresh
        reference = reference_for(mode, layers, data, run.out_dir, resuming, model, device,
                                  autocast_for(precision, device), parallel.is_main)
    return PreferenceObjective(run.objective, run.preference, reference)


def autocast_for(precision: str, device):
    amp = autocast_dtype(precision)
    return (lambda: torch.autocast(device.type, dtype=amp)) if amp else contextlib.nullcontext


def preference_before(model, data, device, objective: PreferenceObjective, max_batches: int | None,
                      precision: str) -> dict[str, float]:
    """Held-out reward accuracy and margin before training, the baseline the summary compares with."""
    with autocast_for(precision, device)():
        row = preference_validation(model, data.val_dataloader(), device, objective, max_batches)
    print(f"held-out pairs before training: reward accuracy {row['val_reward_accuracy']:.1%}, margin "
          f"{row['val_reward_margin']:.4f}, {objective.objective} loss {row['val_loss']:.4f}")
    return {"reward_accuracy_before": row["val_reward_accuracy"], "reward_margin_before": row["val_reward_margin"]}


def trainable_in_weight_dtype(model, trainable: list[str], dtype: torch.dtype) -> None:
    """Trained tensors live in the precision's weight dtype (fp32 masters under -mixed), even where a method made
    them in a quantized base's compute dtype."""
    params = dict(model.named_parameters())
    for n in trainable:
        if params[n].dtype != dtype:
            params[n].data = params[n].data.to(dtype)


def start_from_adapter(model, method: Method, path: Path, checkpoint_dir: Path) -> tuple[list[str], Any]:
    """Load an existing adapter of the same method (leantune or PEFT folder) and train its tensors further; its
    hyperparameters replace the command line's."""
    if method.saves_full_model:
        raise ValueError(f"--resume_adapter continues an adapter; {method.name} finetuning starts from "
                         "--checkpoint_dir instead")
    loaded = load_any_adapter(model, path, checkpoint_dir)
    if get_method(loaded["method"]).kind != method.kind:
        raise ValueError(f"{path} holds a {loaded['method']} adapter; --resume_adapter for {method.name} needs a "
                         f"{method.kind} adapter")
    return mark_trainable(model, method.adapter_params(model)), method.make_args(loaded["method_args"])


def sampler(model, tokenizer, data, style, max_new_tokens):
    """A callable that greedily answers the first held-out prompt (shown at each evaluation), or None."""
    if not max_new_tokens or not hasattr(data, "test_set"):
        return None
    _, (ids,) = encode_prompts(model, data, tokenizer, style, data.test_set()[:1])
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0

    def sample() -> str:
        was = model.training
        model.eval()
        out = greedy_outputs(model, [ids], max_new_tokens, tokenizer.eos_ids, pad_id)[0]
        model.train(was)
        return tokenizer.decode(out, skip_special_tokens=True)

    return sample


HELDOUT_SHOWN = 5
"""Held-out prompts whose answers after training summary.json keeps (`leantune report` shows them side by side)."""


def heldout_answers(data, answers: list[str], n: int = HELDOUT_SHOWN) -> list[dict]:
    """The first held-out prompts with the reference, the model's answer after training and whether it is right."""
    out = []
    for record, answer in zip(data.test_set()[:n], answers):
        prompt = "\n".join(str(record[k]) for k in ("instruction", "input") if record.get(k))
        expected = str(record.get("output", ""))
        right = bool(data.score(answer, expected)) if hasattr(data, "score") else None
        out.append({"prompt": prompt, "expected": expected, "answer": answer, "right": right})
    return out


def describe_sample(when: str, data, style, answer: str, max_new_tokens: int) -> str:
    """The first held-out prompt, its expected answer and the model's (and whether it is right by the data's own
    score), so a wrong answer does not read as a result."""
    record = data.test_set()[0]
    prompt = "\n".join(str(record[k]) for k in ("instruction", "input") if record.get(k)) or style.render_prompt(record)
    answer = cut_at_stop(answer, style.stop_strings).strip()
    expected = record.get("output")
    verdict = ""
    if expected is not None and hasattr(data, "score"):
        verdict = "  (right)" if data.score(answer, str(expected)) else "  (wrong)"
    lines = [f"sample {when} (first held-out prompt, {max_new_tokens} new tokens at most):",
             f"  prompt:   {prompt!r}"]
    if expected is not None:
        lines.append(f"  expected: {str(expected)!r}")
    lines.append(f"  model:    {answer!r}{verdict}")
    return "\n".join(lines)


def print_summary(r: dict) -> None:
    lines = [
        f"method {r['method']}: {r.get('steps')} steps, {r.get('tokens')} tokens in {r.get('time_s')} s "
        f"({r.get('tokens_per_s')} tokens/s), peak memory {r.get('peak_memory_gb')} GB",
        f"trainable parameters {r.get('trainable_params'):,} of {r.get('total_params'):,}",
    ]
    if "val_reward_accuracy" in r:
        lines.append(f"validation preference loss {r['val_loss']:.4f}; held-out reward accuracy "
                     f"{r.get('reward_accuracy_before', float('nan')):.1%} -> {r['val_reward_accuracy']:.1%}, margin "
                     f"{r.get('reward_margin_before', float('nan')):.4f} -> {r['val_reward_margin']:.4f}")
    else:
        lines.append(f"validation loss {r.get('val_loss', float('nan')):.4f} (perplexity "
                     f"{r.get('val_ppl', float('nan')):.2f})")
    if "exact_match_after" in r:
        lines.append(f"held-out exact match: {r.get('exact_match_before', float('nan')):.1%} -> {r['exact_match_after']:.1%}")
    lines.append(f"checkpoint: {r.get('checkpoint')}")
    print("\n".join(lines))
