"""Fuzz the CLI as a careless or hostile user would (issue 11): bad flag values and bad files must end in exit code 2
with one `error:` line naming the flag or the file; never a traceback, never exit 0 with nothing done.

Flag cases are random combinations (seeded, so a failure reproduces from its printed argv) of one or two bad values
per command, run in-process through `leantune.cli.main` with every model loader patched to raise: a bad flag must
be refused before any model loads. File cases run for real on a tiny random checkpoint, so a late refusal is cheap;
a few subprocess cases check the console script's real exit code.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from leantune.cli import main

SEED = 11
N_COMBOS = 60

POS_INT = ["0", "-1", "-7", "abc", "", "1.5", ".nan", "[1]"]
NONNEG_INT = ["-1", "abc", "", "2.5"]
POS_FLOAT = ["0", "-0.5", ".nan", "-.inf", "abc", ""]
FINITE_POS_FLOAT = [*POS_FLOAT, ".inf"]
BOOL = ["maybe", "", "2"]
PRECISION = ["fp8", "", "64-true", "16"]
QUANTIZE = ["bnb.nope", "nf4", ""]
HUGE_SEED = str(2**70)

TRAIN = {
    "--train.micro_batch_size": POS_INT, "--train.global_batch_size": POS_INT, "--train.epochs": POS_INT,
    "--train.max_steps": POS_INT, "--train.max_tokens": POS_INT, "--train.max_time": POS_FLOAT,
    "--train.max_seq_length": POS_INT, "--train.warmup_steps": NONNEG_INT,
    "--train.min_lr_ratio": ["-0.1", "1.5", ".nan", "abc"], "--train.max_norm": POS_FLOAT,
    "--train.log_interval": POS_INT, "--train.save_interval": POS_INT, "--train.logger": ["comet", ""],
    "--train.packing": BOOL, "--train.compile": BOOL, "--train.seed": ["abc", "-1", HUGE_SEED, "1.5"],
}
EVAL = {"--eval.interval": POS_INT, "--eval.max_batches": POS_INT, "--eval.sample_new_tokens": NONNEG_INT,
        "--eval.exact_match": BOOL, "--eval.initial_validation": BOOL}
OPTIMIZER = {"--optimizer.lr": [*FINITE_POS_FLOAT, "1.0e300"], "--optimizer.weight_decay": ["-0.1", ".nan", ".inf", "abc"],
             "--optimizer.betas": ["[0.9]", "[1.5,0.9]", "[.nan,0.9]", "abc"], "--optimizer.momentum": ["-1", ".nan"],
             "--optimizer.name": ["NoSuchOptimizer", "", "bnb.NoSuch", "Optimizer"]}
LORA = {"--lora.r": POS_INT, "--lora.alpha": [".nan", ".inf", "abc", "0", "-16"],
        "--lora.dropout": ["-0.1", "1", "1.5", ".nan"], "--lora.targets": ["", "nope", "query,nope", "[]"]}
FINETUNE_COMMON = {**TRAIN, **EVAL, **OPTIMIZER, "--precision": PRECISION, "--quantize": QUANTIZE,
                   "--threads": ["0", "-2", "abc"], "--resume": ["/no/such/run/step-000002"]}


def adapter_flags(flag: str) -> dict[str, list[str]]:
    return {f"--{flag}.prompt_length": POS_INT, f"--{flag}.start_layer": ["-1", "abc", "1.5"]}


SAMPLING = {"--temperature": ["-1", ".nan", ".inf", "abc", ""], "--top_k": ["0", "-5", "1.5", "abc"],
            "--top_p": ["0", "-0.1", "1.5", ".nan"], "--max_new_tokens": ["0", "-1", "abc", "1.5"],
            "--precision": PRECISION, "--quantize": QUANTIZE, "--seed": ["abc", HUGE_SEED]}

# command words -> {flag: bad values}; every command's numeric, choice and path flags.
TABLE: dict[tuple[str, ...], dict[str, list[str]]] = {
    ("finetune", "lora"): {**FINETUNE_COMMON, **LORA},
    ("finetune", "qlora"): {**FINETUNE_COMMON, **LORA},
    ("finetune", "adapter"): {**FINETUNE_COMMON, **adapter_flags("adapter")},
    ("finetune", "adapter_v2"): {**FINETUNE_COMMON, **adapter_flags("adapter_v2")},
    ("finetune", "dora"): {**FINETUNE_COMMON, **{k.replace("--lora.", "--dora."): v for k, v in LORA.items()}},
    ("finetune", "loha"): {**FINETUNE_COMMON, "--loha.r": ["0", "-1"], "--loha.alpha": ["-1", ".nan"],
                           "--loha.targets": ["", "nope"], "--loha.rank_dropout": ["1.5", "-0.1"]},
    ("finetune", "lokr"): {**FINETUNE_COMMON, "--lokr.r": ["0", "-1"], "--lokr.alpha": ["-1", ".inf"],
                           "--lokr.targets": ["", "nope"], "--lokr.decompose_factor": ["0", "-2"]},
    ("finetune", "adalora"): {**FINETUNE_COMMON, "--adalora.init_r": ["0", "-1"], "--adalora.target_r": ["0", "99"],
                              "--adalora.beta1": ["1.5", ".nan"], "--adalora.targets": ["", "nope"],
                              "--adalora.orth_reg_weight": ["-1"], "--adalora.delta_t": ["0"]},
    ("finetune", "ia3"): {**FINETUNE_COMMON, "--ia3.targets": ["", "nope", "key,nope", "[]"],
                          "--ia3.feedforward": ["key", "nope"]},
    ("finetune", "full"): {**FINETUNE_COMMON, "--quantize": [*QUANTIZE, "bnb.nf4"]},
    ("finetune", "prompt_tuning"): {**FINETUNE_COMMON, "--prompt_tuning.num_virtual_tokens": POS_INT,
                                    "--prompt_tuning.init": ["nope", "", "text"]},
    ("finetune", "p_tuning"): {**FINETUNE_COMMON, "--p_tuning.num_virtual_tokens": POS_INT,
                               "--p_tuning.encoder": ["gru", ""], "--p_tuning.encoder_hidden_size": ["0", "-1"],
                               "--p_tuning.encoder_dropout": ["1.5", "-0.1"], "--p_tuning.encoder_num_layers": ["0"]},
    ("finetune", "prefix_tuning"): {**FINETUNE_COMMON, "--prefix_tuning.num_virtual_tokens": POS_INT,
                                    "--prefix_tuning.hidden_size": POS_INT, "--prefix_tuning.projection": BOOL},
    ("generate",): {**SAMPLING, "--threads": ["0", "-2"], "--raw": BOOL},
    ("chat",): SAMPLING,
    ("evaluate",): {"--max_seq_length": POS_INT, "--batch_size": POS_INT, "--max_batches": POS_INT,
                    "--max_new_tokens": POS_INT, "--exact_match": BOOL, "--precision": PRECISION,
                    "--quantize": QUANTIZE, "--threads": ["0", "-2"], "--metric": ["nope", "", "rouge,nope"],
                    "--limit": POS_INT, "--compare_base": BOOL},
    ("estimate",): {"--method": ["nope", ""], "--micro_batch_size": POS_INT, "--max_seq_length": POS_INT,
                    "--precision": PRECISION, "--quantize": QUANTIZE, "--optimizer": ["NoSuchOptimizer", ""],
                    "--device": ["tpu", ""], "--lora.r": POS_INT, "--lora.dropout": ["1.5"],
                    "--adapter.prompt_length": POS_INT},
    ("merge",): {"--weights": ["[.nan]", "[.inf]", "[1.0,2.0]", "abc", "[]"], "--dtype": ["int8", "float64", ""],
                 "--dequantize_base": BOOL},
    ("export",): {"--format": ["xyz", ""], "--dtype": ["int8", "float64", ""], "--gguf_type": ["q4_0", ""]},
    ("data", "preview"): {"--num_samples": ["-1", "abc"], "--max_seq_length": POS_INT},
    ("serve",): {"--port": ["-1", "70000", "abc"], "--max_batch_size": POS_INT, "--max_queue": POS_INT, "--prefill_chunk": POS_INT,
                 "--max_new_tokens": POS_INT, "--max_seq_length": ["1", "0", "-3", "abc", "1.5"],
                 "--threads": ["0", "-2"], "--precision": PRECISION, "--adapter": ["=x", "nope", "a b=x"],
                 "--shutdown_timeout": ["-1", ".nan", "abc"], "--log_level": ["loud", ""], "--allow_adapter_loading": BOOL,
                 "--max_body_mb": ["0", "-1", ".nan", "abc"], "--adapter_root": ["no-such-folder"],
                 "--allowed_hosts": ['[""]']},
    ("sweep",): {"--stale_after": ["0", "-1", "abc", ".nan"], "--storage": ["nodb:/x", "sqlite:///no-such-dir/\0/x.db"],
                 "--check_only": ["maybe"]},
    ("report",): {"--out": ["report.txt", ""], "--markdown": ["maybe"]},
    ("upload",): {"--repo_id": ["", "a/b/c", "has space"], "--private": BOOL, "--dry_run": BOOL,
                  "--run_dir": ["no-such-run-folder"], "--checkpoint_dir": ["no-such-base-folder"]},
}


class ModelLoaded(Exception):
    """Raised by the patched loaders: a bad flag got as far as loading a model (no USER_ERROR: the CLI lets it out)."""


@pytest.fixture(scope="module")
def files(tiny_checkpoint, tmp_path_factory) -> dict[str, Path]:
    """Good and bad inputs: a tiny model, a LoRA adapter for it, and broken copies of both."""
    import transformers as tf

    from leantune.checkpoint.hf import TOKENIZER_FILES

    root = tmp_path_factory.mktemp("fuzz")
    f = {"tiny": tiny_checkpoint, "missing": root / "missing-folder", "a_file": root / "a_file.txt",
         "empty": root / "empty-folder"}
    f["a_file"].write_text("not a model\n")
    f["empty"].mkdir()
    rows = [{"instruction": f"Add {i} and {i}.", "input": "", "output": str(2 * i)} for i in range(12)]
    f["data"] = root / "train.jsonl"
    f["data"].write_text("\n".join(json.dumps(r) for r in rows))

    f["adapter"] = _lora_adapter(tiny_checkpoint, root / "good-adapter")
    f["truncated_model"] = _copy(tiny_checkpoint, root / "truncated-model")
    weights = f["truncated_model"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    f["bad_config"] = _copy(tiny_checkpoint, root / "bad-config-model")
    (f["bad_config"] / "config.json").write_text("{not json")
    f["garbage_manifest"] = _copy(f["adapter"], root / "garbage-manifest-adapter")
    (f["garbage_manifest"] / "leantune.json").write_text("\x00\x01 garbage {")
    f["truncated_adapter"] = _copy(f["adapter"], root / "truncated-adapter")
    blob = f["truncated_adapter"] / "adapter.safetensors"
    blob.write_bytes(blob.read_bytes()[:100])

    other = root / "other-size-model"  # same family and tokenizer, another width and depth
    cfg = tf.LlamaConfig(vocab_size=49152, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(other)
    for name in TOKENIZER_FILES:
        if (tiny_checkpoint / name).is_file():
            shutil.copy(tiny_checkpoint / name, other / name)
    f["other_size_adapter"] = _lora_adapter(other, root / "other-size-adapter")
    return f


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _lora_adapter(checkpoint: Path, out: Path) -> Path:
    """A saved (untrained) LoRA adapter for `checkpoint`, written through the same code a run uses."""
    from leantune.checkpoint.hf import load_hf_checkpoint
    from leantune.methods import apply_method, build_manifest, save_checkpoint
    from leantune.peft.lora import LoRAArgs
    from leantune.tokenizer import Tokenizer

    model = load_hf_checkpoint(checkpoint, dtype=torch.float32)
    args = LoRAArgs(r=2, targets="all")
    trainable = apply_method(model, "lora", args)
    manifest = build_manifest("lora", args, checkpoint, Tokenizer(checkpoint), "template", "32-true", model=model)
    out.mkdir(parents=True)
    save_checkpoint(out, model, "lora", trainable, manifest, checkpoint)
    return out


def base_argv(words: tuple[str, ...], f: dict[str, Path], out: Path) -> list[str]:
    """Valid flags that make a case cheap if it ever got past validation (tiny model, one step, small data)."""
    tiny, data = str(f["tiny"]), ["--data", "JSON", "--data.json_path", str(f["data"])]
    if words[0] == "finetune":
        return [*words, "--checkpoint_dir", tiny, *data, "--out_dir", str(out), "--train.max_steps", "1",
                "--train.micro_batch_size", "2", "--train.global_batch_size", "2", "--train.max_seq_length", "64",
                "--eval.exact_match", "false", "--eval.max_batches", "1", "--eval.sample_new_tokens", "0"]
    if words[0] in ("generate", "chat"):
        return [*words, "--checkpoint_dir", tiny, "--max_new_tokens", "2"]
    if words[0] == "evaluate":
        return [*words, "--checkpoint_dir", tiny, *data, "--max_batches", "1", "--exact_match", "false"]
    if words[0] in ("merge", "export"):
        return [*words, "--adapter", str(f["adapter"]), "--checkpoint_dir", tiny, "--out_dir", str(out)]
    if words[0] == "data":
        return [*words, "--checkpoint_dir", tiny, *data]
    if words[0] == "serve":
        return [*words, "--checkpoint_dir", tiny, "--port", "0"]
    if words[0] == "sweep":  # a checked spec of one tiny trial; --check_only: nothing would run
        spec = out.with_suffix(".yaml")
        spec.write_text(json.dumps({"flags": {"--checkpoint_dir": tiny, "--data": "JSON",
                                              "--data.json_path": str(f["data"]), "--train.max_steps": 1},
                                    "space": {"--lora.r": [2]}}))
        return [*words, str(spec), "--out_dir", str(out), "--check_only", "true"]
    if words[0] == "report":
        return [*words, str(f["adapter"])]
    if words[0] == "upload":  # a dry run: nothing would be sent even if a bad flag got through
        return [*words, str(f["adapter"]), "--repo_id", "me/x", "--dry_run", "true"]
    return list(words)


def flag_cases() -> list[tuple[tuple[str, ...], list[str], list[str]]]:
    """(command words, bad flags, names the error may give), seeded: every flag of every command once with a
    random bad value, then N_COMBOS random pairs of bad flags."""
    rng = random.Random(SEED)
    cases = []
    for words in sorted(TABLE):
        for flag in sorted(TABLE[words]):
            cases.append((words, [flag, rng.choice(TABLE[words][flag])], [flag.lstrip("-")]))
    commands = sorted(TABLE)
    for _ in range(N_COMBOS):
        words = rng.choice(commands)
        chosen = rng.sample(sorted(TABLE[words]), k=2)
        argv = [a for flag in chosen for a in (flag, rng.choice(TABLE[words][flag]))]
        cases.append((words, argv, [flag.lstrip("-") for flag in chosen]))
    return cases


def shell(argv: list[str]) -> str:
    return "leantune " + " ".join(repr(a) if not a or " " in a else a for a in argv)


def run_cli(argv: list[str], capsys, name: str | list[str]) -> str | None:
    """Run `leantune argv` in-process; None if it exited 2 with exactly one `error:` line naming `name` (or one
    of the names), else what went wrong."""
    try:
        main(argv)
        code, trace = 0, ""
    except SystemExit as e:
        code, trace = e.code, ""
    except Exception as e:  # noqa: BLE001 -- a traceback is the failure being looked for
        code, trace = "exception", f"{type(e).__name__}: {e}"
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    names = [name] if isinstance(name, str) else name
    named = len(errors) == 1 and any(n in errors[0] or n.split(".")[-1] in errors[0] for n in names)
    if code == 2 and not trace and "Traceback" not in err and named:
        return None
    return f"{shell(argv)}\n  exit {code} {trace}\n  stdout: {out[-300:]!r}\n  stderr: {err[-600:]!r}\n  wanted: {names}"


@pytest.fixture
def no_model_load(monkeypatch):
    """Every leantune module's model loaders (and the default model's import) raise ModelLoaded."""
    def refuse(*args, **kwargs):
        raise ModelLoaded("a model load started before the bad flag was refused")

    for name, module in list(sys.modules.items()):
        if name == "leantune" or name.startswith("leantune."):
            for attr in ("load_hf_checkpoint", "load_t5_checkpoint", "load_model", "load_for_inference", "gguf_to_hf"):
                if hasattr(module, attr):
                    monkeypatch.setattr(module, attr, refuse)
    monkeypatch.setattr("builtins.input", lambda *a: (_ for _ in ()).throw(EOFError))


def test_bad_flags_fail_before_loading_with_one_named_error(files, no_model_load, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anything written by mistake (default out/, checkpoints/) lands in the temp dir
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cases = flag_cases()
    failures = [f for i, (words, argv, names) in enumerate(cases)
                if (f := run_cli([*base_argv(words, files, tmp_path / f"case-{i}"), *argv], capsys, names))]
    assert not failures, f"{len(failures)} of {len(cases)} cases failed:\n" + "\n".join(failures)
    assert len(cases) > 250


def test_empty_raw_prompt_is_refused_before_loading(files, no_model_load, capsys):
    failure = run_cli(["generate", "--checkpoint_dir", str(files["tiny"]), "--prompt", "", "--raw", "true"], capsys,
                      "--prompt")
    assert failure is None, failure


def file_cases(f: dict[str, Path], out: Path) -> list[tuple[list[str], str]]:
    """(argv, the file or flag the error must name): every command's path flags against every kind of bad file."""
    tiny = str(f["tiny"])
    bad_models = ["missing", "a_file", "empty", "adapter", "truncated_model", "bad_config"]
    bad_adapters = ["missing", "a_file", "empty", "tiny", "garbage_manifest", "truncated_adapter",
                    "other_size_adapter"]
    data = ["--data", "JSON", "--data.json_path", str(f["data"])]
    cases: list[tuple[list[str], str]] = []
    for key in bad_models:
        cases += [
            (["generate", "--checkpoint_dir", str(f[key]), "--max_new_tokens", "2"], f[key].name),
            (["evaluate", "--checkpoint_dir", str(f[key]), *data, "--max_batches", "1", "--exact_match", "false"],
             f[key].name),
            (["finetune", "lora", "--checkpoint_dir", str(f[key]), *data, "--out_dir", str(out / f"m-{key}"),
              "--train.max_steps", "1", "--eval.exact_match", "false"], f[key].name),
        ]
        if key != "truncated_model":  # estimate reads config.json only, never the weights
            cases.append((["estimate", "--model", str(f[key])], f[key].name))
    cases.append((["merge", "--adapter", str(f["adapter"]), "--checkpoint_dir", str(f["bad_config"]),
                   "--out_dir", str(out / "merged-bad-config")], f["bad_config"].name))
    for key in bad_adapters:
        cases += [
            (["generate", "--checkpoint_dir", tiny, "--adapter", str(f[key]), "--max_new_tokens", "2"], f[key].name),
            (["merge", "--checkpoint_dir", tiny, "--adapter", str(f[key]), "--out_dir", str(out / f"merge-{key}")],
             f[key].name),
            (["export", "--checkpoint_dir", tiny, "--adapter", str(f[key]), "--format", "peft", "--out_dir",
              str(out / f"export-{key}")], f[key].name),
            (["evaluate", "--checkpoint_dir", tiny, "--adapter", str(f[key]), *data, "--max_batches", "1",
              "--exact_match", "false"], f[key].name),
        ]
    cases += [
        (["finetune", "lora", "--checkpoint_dir", tiny, *data, "--out_dir", str(out / "resume-adapter"),
          "--resume_adapter", str(f["other_size_adapter"]), "--train.max_steps", "1", "--eval.exact_match", "false"],
         f["other_size_adapter"].name),
        (["finetune", "lora", "--checkpoint_dir", tiny, "--data", "JSON", "--data.json_path", str(f["missing"]),
          "--out_dir", str(out / "missing-data"), "--train.max_steps", "1"], f["missing"].name),
        (["finetune", "lora", "--checkpoint_dir", tiny, *data, "--out_dir", str(f["a_file"]),
          "--train.max_steps", "1"], f["a_file"].name),
        (["finetune", "adapter", "--checkpoint_dir", tiny, *data, "--out_dir", str(out / "start-layer"),
          "--adapter.start_layer", "99", "--train.max_steps", "1", "--eval.exact_match", "false"], "start_layer"),
        (["finetune", "lora", "--checkpoint_dir", tiny, *data, "--out_dir", str(out / "diverges"), "--optimizer.lr",
          "1.0e30", "--train.max_steps", "2", "--train.micro_batch_size", "2", "--train.global_batch_size", "2",
          "--eval.exact_match", "false", "--eval.sample_new_tokens", "0"], "learning rate"),
        (["merge", "--checkpoint_dir", tiny, "--adapter", str(f["adapter"]), "--out_dir", str(f["a_file"])],
         f["a_file"].name),
        (["export", "--checkpoint_dir", tiny, "--adapter", str(f["adapter"]), "--out_dir", str(f["a_file"])],
         f["a_file"].name),
        (["download", str(f["missing"] / "model.gguf")], "model.gguf"),
        (["download", str(f["a_file"])], f["a_file"].name),
        (["download", str(f["empty"])], f["empty"].name),
        (["download", "../escape"], "../escape"),
        (["download", str(f["tiny"]), "--checkpoint_dir", str(f["a_file"])], f["a_file"].name),
        (["data", "preview", "--checkpoint_dir", str(f["bad_config"]), *data], f["bad_config"].name),
        (["finetune", "lora", "--config", str(f["a_file"])], f["a_file"].name),
    ]
    return cases


def test_bad_files_give_one_error_naming_the_file(files, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cases = file_cases(files, tmp_path)
    failures = [f for argv, name in cases if (f := run_cli(argv, capsys, name))]
    assert not failures, f"{len(failures)} of {len(cases)} cases failed:\n" + "\n".join(failures)
    assert len(cases) >= 60


@pytest.mark.parametrize("argv, name", [
    (["generate", "--top_k", "0"], "--top_k"),
    (["finetune", "lora", "--train.max_steps", "abc"], "train.max_steps"),
    (["merge", "--adapter", "{missing}"], "missing-folder"),
])
def test_console_script_exit_code(argv, name, files, tmp_path):
    """The real process: exit status 2, one error line, no traceback."""
    argv = [a.format(missing=files["missing"]) for a in argv]
    script = Path(sys.executable).parent / "leantune"
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "leantune.cli"]
    proc = subprocess.run([*cmd, *argv], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and name in errors[0], proc.stderr


def test_cases_cover_every_command_and_method():
    from leantune.cli import components
    from leantune.methods import METHODS

    covered = {words[0] for words in TABLE} | {"download"}
    assert covered == set(components())
    assert {words[1] for words in TABLE if words[0] == "finetune"} == set(METHODS)


# ---- generated fault cases: (command x file kind x fault), issue 23 ------------------------------------------------
FAULTS = ("missing", "empty", "truncated", "fifo", "dir_for_file", "unreadable", "full_disk")
READERS = {  # the file kind -> the commands that read it
    "data": ("finetune", "evaluate"),
    "checkpoint": ("finetune", "generate", "evaluate"),
    "adapter": ("generate", "merge", "export", "evaluate"),
}
WRITERS = ("finetune", "merge", "export")  # a full disk is a fault of commands that write
INNER = {"checkpoint": "model.safetensors", "adapter": "adapter.safetensors"}  # the file a folder's fault hits


@pytest.fixture(scope="module")
def faulty(files, tmp_path_factory) -> dict[tuple[str, str], Path]:
    """{(kind, fault): the path given on the command line}; for folders the fault sits in their weights file."""
    root = tmp_path_factory.mktemp("faults")
    out: dict[tuple[str, str], Path] = {}
    good = {"data": files["data"], "checkpoint": files["tiny"], "adapter": files["adapter"]}
    for kind, source in good.items():
        for fault in FAULTS:
            path = root / f"{kind}-{fault}" if kind != "data" else root / f"{fault}.jsonl"
            if fault in ("unreadable", "full_disk"):  # a good input; the fault is injected while it runs
                path = source
            elif fault == "missing":
                pass
            elif kind == "data":
                if fault == "empty":
                    path.write_bytes(b"")
                elif fault == "truncated":
                    path.write_text('[{"instruction": "Add 1 and 1.", "input": "", "out')
                elif fault == "fifo":
                    os.mkfifo(path)
                else:  # a folder where the file should be (and no train.json inside)
                    path.mkdir()
            elif fault == "empty":
                path.mkdir()
            else:
                shutil.copytree(source, path)
                inner = path / INNER[kind]
                if fault == "truncated":
                    inner.write_bytes(inner.read_bytes()[: max(inner.stat().st_size // 2, 64)])
                else:
                    inner.unlink()
                    os.mkfifo(inner) if fault == "fifo" else inner.mkdir()
            out[kind, fault] = path
    return out


def fault_argv(command: str, kind: str, path: Path, f: dict[str, Path], out: Path) -> list[str]:
    """`command` reading `path` as its `kind` input, every other input good and every size tiny."""
    data = str(path) if kind == "data" else str(f["data"])
    ckpt = str(path) if kind == "checkpoint" else str(f["tiny"])
    adapter = ["--adapter", str(path)] if kind == "adapter" else []
    json_data = ["--data", "JSON", "--data.json_path", data]
    if command == "finetune":
        return ["finetune", "lora", "--checkpoint_dir", ckpt, *json_data, "--out_dir", str(out), "--train.max_steps",
                "1", "--train.micro_batch_size", "2", "--train.global_batch_size", "2", "--train.max_seq_length",
                "64", "--eval.exact_match", "false", "--eval.max_batches", "1", "--eval.sample_new_tokens", "0"]
    if command == "evaluate":
        return ["evaluate", "--checkpoint_dir", ckpt, *adapter, *json_data, "--max_batches", "1", "--exact_match",
                "false", "--max_seq_length", "64"]
    if command == "generate":
        return ["generate", "--checkpoint_dir", ckpt, *adapter, "--prompt", "hi", "--max_new_tokens", "2"]
    if command == "merge":
        return ["merge", "--checkpoint_dir", ckpt, *adapter, "--out_dir", str(out)]
    return ["export", "--checkpoint_dir", ckpt, *adapter, "--format", "peft", "--out_dir", str(out)]


def fault_cases() -> list[tuple[str, str, str]]:
    cases = [(command, kind, fault) for kind, commands in READERS.items() for command in commands for fault in FAULTS
             if fault != "full_disk" or command in WRITERS]
    return cases


def one_line_naming(argv: list[str], capsys, path: str) -> str | None:
    """None if `leantune argv` exited 2 with exactly one `error:` line holding `path` itself, and no traceback."""
    try:
        main(argv)
        code, trace = 0, ""
    except SystemExit as e:
        code, trace = e.code, ""
    except Exception as e:  # noqa: BLE001 -- a traceback is the failure being looked for
        code, trace = "exception", f"{type(e).__name__}: {e}"
    _, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    if code == 2 and not trace and "Traceback" not in err and len(errors) == 1 and path in errors[0]:
        return None
    return f"{shell(argv)}\n  exit {code} {trace}\n  stderr: {err[-600:]!r}\n  wanted: {path}"


@contextlib.contextmanager
def unreadable(path: Path, monkeypatch):
    """Reads of `path` (or anything under it) fail with EACCES: the tests run as root, where chmod 000 stops
    nothing, so the refusal is injected at every way leantune opens a file (Python's open and os.open, and the
    safetensors readers, which open files from Rust)."""
    import builtins
    import io as pyio

    import safetensors
    import safetensors.torch

    import leantune.checkpoint.hf as hf

    target = str(path)

    def denied(p) -> bool:
        p = os.fspath(p) if isinstance(p, str | os.PathLike) else ""
        return p == target or p.startswith(target + os.sep)

    def guard(fn, name_arg=0):
        def wrapped(*args, **kwargs):
            name = args[name_arg] if len(args) > name_arg else kwargs.get("filename", kwargs.get("file", ""))
            if denied(name):
                raise PermissionError(errno.EACCES, "Permission denied", os.fspath(name))
            return fn(*args, **kwargs)
        return wrapped

    with monkeypatch.context() as m:
        for owner, attr in ((builtins, "open"), (pyio, "open"), (os, "open"), (safetensors, "safe_open"),
                            (hf, "safe_open"), (safetensors.torch, "load_file")):
            m.setattr(owner, attr, guard(getattr(owner, attr)))
        yield


@contextlib.contextmanager
def disk_full(monkeypatch):
    """Every write that reaches the disk fails with ENOSPC: safetensors' writer, fsync (which reports a delayed
    write's failure), and Python's own file writes in binary and text mode."""
    import safetensors.torch

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(safetensors.torch, "save_file", full)
        m.setattr(os, "fsync", full)
        yield


def test_every_reader_of_a_file_fails_on_every_fault_in_one_line(files, faulty, tmp_path, capsys, monkeypatch):
    """Each (command x file kind x fault): exit 2, ONE `error:` line naming the path (the output folder for a full
    disk), no traceback, and no temporary left beside the output."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    failures, cases = [], fault_cases()
    for i, (command, kind, fault) in enumerate(cases):
        path, out = faulty[kind, fault], tmp_path / f"out-{i}"
        argv = fault_argv(command, kind, path, files, out)
        injected = (unreadable(path / INNER[kind] if kind in INNER else path, monkeypatch) if fault == "unreadable"
                    else disk_full(monkeypatch) if fault == "full_disk" else contextlib.nullcontext())
        with injected:
            problem = one_line_naming(argv, capsys, str(out) if fault == "full_disk" else str(path))
        leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
        if problem or leftovers:
            failures.append(f"[{command} x {kind} x {fault}] {problem or ''} leftovers: {leftovers}")
    assert not failures, f"{len(failures)} of {len(cases)} cases failed:\n" + "\n".join(failures)
    assert len(cases) == 2 * 6 + 1 + 3 * 6 + 1 + 4 * 6 + 2


def test_fault_cases_cover_every_kind_and_fault():
    covered = {(kind, fault) for _, kind, fault in fault_cases()}
    assert covered == {(k, f) for k in READERS for f in FAULTS}
