"""`leantune finetune <method>`: one subcommand per method of the table, each with its own flags and --help.

The subcommands are built from the method records and the recipe's signature, so a new method (one module under
`leantune/peft/`) appears here with its `--<name>.*` flags without touching this file.
"""

from __future__ import annotations

import inspect
import json
import typing
from collections.abc import Callable
from pathlib import Path

from leantune import finetune as recipe
from leantune.commands.flags import check_folder, check_model_flags, check_threads
from leantune.data import DataModule, Demo
from leantune.methods import METHODS
from leantune.peft.base import Method
from leantune.train.args import EvalArgs, TrainArgs
from leantune.train.distributed import FSDPArgs, check_batch_sizes, launch, launched
from leantune.train.optim import OptimizerArgs, optimizer_class
from leantune.train.preference import PreferenceArgs
from leantune.train.state import STATE_FILE

HELP = {
    "checkpoint_dir": "Base model: a Hugging Face folder (the default model is imported on first use).",
    "out_dir": "Where checkpoints, metrics.csv and loss.png go (default out/finetune/<method>).",
    "data": "Dataset module (default Demo, the built-in verifiable tasks), e.g. --data JSON --data.json_path "
            "file.jsonl, --data Alpaca, --data Chat; `--data.help JSON` lists a module's own flags.",
    "precision": "auto (default), 32-true, bf16-true, bf16-mixed, 16-mixed. auto: bf16-mixed on a CPU with AMX or "
                 "AVX512-BF16 (bf16 matmuls over a bf16 frozen base; trained tensors and optimizer state fp32), "
                 "32-true on other CPUs, bf16-true on a GPU with bf16; a resumed run keeps the precision it trained "
                 "in. The choice is printed at the start and stored in run.json.",
    "quantize": "Store the frozen base's block linears in 4 or 8 bits with bitsandbytes (QLoRA): bnb.nf4, bnb.nf4-dq, "
                "bnb.fp4, bnb.fp4-dq, bnb.int8. Compute runs in the --precision dtype.",
    "prompt_style": "Prompt style name (default: the checkpoint's chat template, else from its config).",
    "train": "Training loop settings (--train.*).",
    "eval": "Evaluation settings (--eval.*).",
    "optimizer": "Optimizer and learning rate (--optimizer.*).",
    "resume": '"auto" (latest step-N in out_dir) or a checkpoint folder to resume from exactly.',
    "resume_adapter": "Start from an existing adapter of this method: a leantune adapter folder or a PEFT folder "
                      "(adapter_config.json + adapter_model.safetensors); its hyperparameters replace the flags.",
    "threads": "CPU threads for torch.",
    "overwrite": "Replace the previous run in out_dir (only leantune's own outputs are removed).",
    "devices": "Processes (GPUs) per node: > 1 starts the run under torchrun, data parallel with FSDP2 (--train."
               "micro_batch_size is per process; --train.global_batch_size is over all of them).",
    "num_nodes": "Nodes of a multi-node run: run the same command on every node with MASTER_ADDR/MASTER_PORT of the "
                 "first (the rendezvous endpoint) and a shared LEANTUNE_RDZV_ID (SLURM_JOB_ID is used when set).",
    "fsdp": "Multi-process settings (--fsdp.*): CPU offload, resharding after forward, collective timeout.",
    "objective": "sft (default: cross-entropy on the replies), or preference tuning on chosen/rejected pairs (--data "
                 "Preference / DemoPreference): dpo, ipo (need a reference: see --preference.reference), orpo, simpo.",
    "preference": "Preference-tuning settings (--preference.*): beta, label_smoothing, gamma, reference.",
}
# Defaults the command line shows in full (the recipe takes None for "default").
CLI_DEFAULTS = {"train": TrainArgs(), "eval": EvalArgs(), "optimizer": OptimizerArgs(), "fsdp": FSDPArgs(),
                "preference": PreferenceArgs()}
_argv: list[str] | None = None


def set_argv(argv: list[str]) -> None:
    """The command line being run (set by leantune.cli): `--devices N` re-runs it under torchrun, once per process."""
    global _argv
    _argv = list(argv)


def _recipe_parameters() -> list[inspect.Parameter]:
    hints = typing.get_type_hints(recipe.finetune, include_extras=True)
    params = []
    for p in inspect.signature(recipe.finetune).parameters.values():
        if p.name in ("method", "method_args"):
            continue
        annotation = hints.get(p.name, p.annotation)
        if p.name == "data":
            annotation, default = DataModule | None, None
        else:
            default = CLI_DEFAULTS.get(p.name, p.default)
            if p.name in CLI_DEFAULTS:
                annotation = type(default)
        params.append(inspect.Parameter(p.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation))
    return params


def method_command(method: Method) -> Callable[..., dict]:
    """A typed function for `leantune finetune <method.name>` whose docstring is that method's --help."""
    params = _recipe_parameters()
    if method.args_class is not None:
        params.append(inspect.Parameter(method.flag, inspect.Parameter.KEYWORD_ONLY, default=method.args_class(),
                                        annotation=method.args_class))

    def command(**kwargs) -> dict:
        check_flags(**kwargs)
        recipe.check_model_kind(kwargs.get("checkpoint_dir"), method.name, kwargs.get("quantize"), kwargs.get("train"),
                                kwargs.get("devices", 1) * kwargs.get("num_nodes", 1))
        if (kwargs.get("devices", 1) > 1 or kwargs.get("num_nodes", 1) > 1) and not launched() and _argv:
            train = kwargs.get("train") or TrainArgs()  # refused here, not inside every rank after torchrun started
            check_batch_sizes(train.micro_batch_size, train.global_batch_size, kwargs["devices"] * kwargs["num_nodes"])
            return launch_command(_argv, kwargs["devices"], kwargs["num_nodes"], kwargs.get("out_dir"), method.name)
        method_args = kwargs.pop(method.flag, None) if method.args_class is not None else None
        if kwargs.get("data") is None:
            kwargs["data"] = Demo()
        return recipe.finetune(method.name, method_args=method_args, **kwargs)

    command.__signature__ = inspect.Signature(params, return_annotation=dict)
    command.__name__ = command.__qualname__ = method.name
    lines = [f"{method.summary}.", "", f"Default learning rate {method.default_lr:g}"
             + (f"; default --quantize {method.default_quantize}" if method.default_quantize else "") + ".", "",
             "Args:"]
    for p in params:
        text = HELP.get(p.name) or (f"{method.name} hyperparameters (--{method.flag}.*)." if p.name == method.flag
                                    else p.name.replace("_", " ") + ".")
        lines.append(f"    {p.name}: {text}")
    command.__doc__ = "\n".join(lines)
    return command


def launch_command(argv: list[str], devices: int, num_nodes: int, out_dir: Path | None, method: str) -> dict:
    """Run this command line on devices x num_nodes processes (torchrun); returns the run's summary.json."""
    run_dir = Path(out_dir or Path("out") / "finetune" / method)
    launch(argv, devices, num_nodes, out_dir=run_dir)
    summary = run_dir / "summary.json"
    return json.loads(summary.read_text()) if summary.is_file() else {}


def check_flags(threads: int | None = None, optimizer: OptimizerArgs | None = None, resume: str | None = None,
                resume_adapter: Path | None = None, precision: str | None = None, quantize: str | None = None,
                devices: int = 1, num_nodes: int = 1, **_) -> None:
    """The flags the args dataclasses cannot check alone, checked before the recipe loads data or a model."""
    check_threads(threads)
    for flag, value in (("devices", devices), ("num_nodes", num_nodes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"--{flag} must be an integer >= 1, got {value}")
    check_model_flags(precision, quantize)
    if optimizer is not None:
        optimizer_class(optimizer.name)
    if resume and str(resume) != "auto" and not (Path(resume) / STATE_FILE).is_file():
        raise FileNotFoundError(f"--resume {resume}: not a checkpoint of a run (no {STATE_FILE}); pass a step-N "
                                "folder of the run, or auto for the latest one in --out_dir")
    check_folder("resume_adapter", resume_adapter)


def commands() -> dict[str, Callable[..., dict]]:
    """{method name: its finetune subcommand} for every registered method."""
    return {name: method_command(m) for name, m in METHODS.items()}
