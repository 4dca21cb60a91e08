"""The command table: `leantune <command>`; each command is a plain typed function in `leantune.commands` whose
docstring becomes its --help. Every flag can also come from a YAML file with --config.

User errors (bad flags, files, folders) end with one line on stderr and exit code 2; `--debug` (or LEANTUNE_DEBUG=1)
shows the traceback instead. Anything else is a bug and keeps its traceback.
"""

# ruff: noqa: E402  (cpu_threads.prepare() runs before torch is imported)
from __future__ import annotations

import json
import os
import re
import sys

from leantune import cpu_threads

cpu_threads.prepare()  # before torch loads libgomp, which reads its waiting policy once

import torch
from jsonargparse import CLI, ArgumentError, set_parsing_settings
from tqdm import tqdm

from leantune.checkpoint.io import NoSpaceError, is_disk_full
from leantune.commands import (
    chat,
    data,
    download,
    estimate,
    evaluate,
    export,
    generate,
    merge,
    report,
    serve,
    sweep,
    upload,
)
from leantune.commands import finetune as finetune_commands
from leantune.data import DATA_MODULES, DataModule
from leantune.download import HubUnreachableError
from leantune.methods import METHODS
from leantune.train.distributed import DistributedJobError
from leantune.train.step import NonFiniteError

# Errors a user causes and can fix from the message alone (NonFiniteError names the step, samples and the fix); a
# ValueError subclass of any module is one of them. A full disk (ENOSPC, EDQUOT) is too, whatever raised it.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError,
               KeyError, NotImplementedError, ImportError, HubUnreachableError, NonFiniteError, DistributedJobError)


def components() -> dict:
    return {
        "download": download.download,
        "finetune": {"_help": f"Finetune a model with one method ({', '.join(METHODS)}) through the one training "
                              "loop; `leantune finetune <method> --help` lists its flags.",
                     **finetune_commands.commands()},
        "generate": generate.generate,
        "chat": chat.chat,
        "merge": merge.merge,
        "evaluate": evaluate.evaluate,
        "estimate": estimate.estimate_command,
        "export": export.export,
        "upload": upload.upload,
        "serve": serve.serve,
        "sweep": sweep.sweep,
        "report": report.report,
        "data": {"_help": "Inspect training data: `leantune data preview --data JSON --data.json_path f.jsonl`.",
                 "preview": data.preview},
    }


def _message(e: BaseException) -> str:
    if is_disk_full(e):
        if isinstance(e, NoSpaceError):
            return e.strerror
        where = f"writing {e.filename}" if getattr(e, "filename", None) else "while writing"
        return f"no space left on the device ({where}): free some space, or write to another disk"
    text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    if isinstance(e, PermissionError | IsADirectoryError | NotADirectoryError | FileNotFoundError) and e.filename:
        text = f"{e.filename}: {e.strerror or text}"
        if isinstance(e, PermissionError):
            text += " (check its permissions and owner, or give a path you may use)"
    if isinstance(e, ImportError) and getattr(e, "name", None) and "pip install" not in text:
        text = f"{text} (pip install {e.name})"
    if _out_of_memory(e):
        first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
        text = (f"out of memory ({first[:300]}); lower --train.micro_batch_size or --train.max_seq_length, use a "
                "lower --precision or --quantize, or check sizes such as --lora.r")
    return text


def _fail(message: str) -> None:
    """Print the one error line and exit 2; progress bars a failed phase left open are closed first, so the
    line starts on its own instead of being glued to the end of a bar."""
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _out_of_memory(e: BaseException) -> bool:
    """A failed allocation (CUDA OOM, or the CPU allocator's refusal): the sizes asked for, not a bug."""
    return isinstance(e, torch.OutOfMemoryError) or (isinstance(e, RuntimeError) and "can't allocate memory" in str(e))


def _chosen(table, argv: list[str]) -> tuple[dict, list[str]]:
    """Only the named command's branch of the table, and the command words: building every command's parser on
    each start costs ~0.5 s; an unknown or missing command keeps the whole (sub)table for its error and --help."""
    word = argv[0] if argv else ""
    if not isinstance(table, dict) or word.startswith("-") or word == "_help" or word not in table:
        return table, []
    branch, words = _chosen(table[word], argv[1:])
    return {**({"_help": table["_help"]} if "_help" in table else {}), word: branch}, [word, *words]


def _parse_error(message: str, words: list[str], argv: list[str]) -> str:
    """jsonargparse's multi-line parse error as one line naming the flag, the accepted types and the given value."""
    hint = f" (`{' '.join(['leantune', *words, '--help'])}` lists the flags)"
    message = message.replace("argument subcommand: invalid choice:", "unknown command")
    m = re.match(r'Parser key "([^"]+)":\s*(.*)', message, re.S)
    configs = [argv[i + 1] for i in range(len(argv) - 1) if argv[i] == "--config"]
    if not m and configs and "config" in message.lower():  # e.g. "Unexpected config": name the file
        return f"--config {configs[-1]}: {' '.join(message.split())}"
    if not m:
        return " ".join(message.split()) + hint
    key, rest = m.groups()
    if key == "config":
        return f"--config: {' '.join(rest.split())}"
    refused = re.findall(r"Option '([^']+)' is not accepted", rest)
    if refused:
        return (f"--{key}.{refused[0]}: not a flag of this --{key} module (choose the module first, e.g. --data JSON "
                f"--data.json_path f.jsonl; `--{key}.help NAME` lists a module's flags)")
    expected = [_type_name(t) for t in re.findall(r"Expected an? (.+?)(?:\. Got value:.*)?$", rest, re.M)]
    expected = [t for t in dict.fromkeys(expected) if t != "None"]
    value = re.search(r"(?:Given|Got) value: ?(.*)", rest)
    if key == "data":
        names = ", ".join(cls.__name__ for cls in DATA_MODULES.values())
        return f"--data {value[1] if value else ''}: choose a data module among {names}"
    shown = repr(value[1]) if value else "an invalid value"
    return f"--{key}: expected {' or '.join(expected) or 'another value'}, got {shown}" + hint


def _type_name(text: str) -> str:
    text = text.strip()
    named = re.fullmatch(r"<class '(?:builtins\.)?([\w.]+)'>", text)
    if named:
        return {"NoneType": "None", "int": "an integer", "float": "a number", "bool": "true or false",
                "str": "a string", "list": "a list"}.get(named[1], named[1])
    literal = re.fullmatch(r"typing\.Literal\[(.*)\]", text)
    if literal:
        return "one of " + literal[1].replace("'", "")
    return text


REPEATABLE = {("serve",): ("--adapter",)}
"""List flags given once per value (`serve --adapter a=DIR --adapter b=DIR`), besides jsonargparse's own `[a,b]`."""


def _repeated_flags(argv: list[str], words: list[str]) -> list[str]:
    """`--flag V` of a repeatable list flag becomes jsonargparse's appending `--flag+ V` (a list value is kept)."""
    flags = REPEATABLE.get(tuple(words), ())
    out = []
    for i, arg in enumerate(argv):
        name, eq, value = arg.partition("=")
        nxt = value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
        if name in flags and not nxt.startswith("["):
            arg = f"{name}+{eq}{value}"
        out.append(arg)
    return out


POSITIONAL_LISTS = {("report",)}
"""Commands whose one positional argument is a list given as several words (`report RUN RUN ...`)."""


def _positional_list(argv: list[str], words: list[str]) -> list[str]:
    """`report a b --out x` becomes `report ["a", "b"] --out x` (a JSON list: any path survives as one string)."""
    if tuple(words) not in POSITIONAL_LISTS:
        return argv
    n = len(words)
    end = next((i for i in range(n, len(argv)) if argv[i].startswith("-")), len(argv))
    if end == n or any(a in ("-h", "--help") for a in argv[n:]):
        return argv
    return [*argv[:n], json.dumps(argv[n:end]), *argv[end:]]


def main(argv: list[str] | None = None) -> None:
    # --data Demo / --data JSON --data.json_path f.jsonl: dataset modules are chosen by class name;
    # dataclass field docstrings become the --help of each --x.y option.
    set_parsing_settings(subclasses_enabled=[DataModule], docstring_parse_attribute_docstrings=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = bool(os.environ.get("LEANTUNE_DEBUG"))
    if "--debug" in argv:
        argv.remove("--debug")
        debug = True
    table, words = _chosen(components(), argv)
    finetune_commands.set_argv(argv)  # `finetune --devices N` runs this same command line under torchrun
    argv = _positional_list(_repeated_flags(argv, words), words)
    try:
        CLI(table, args=argv, as_positional=True, fail_untyped=False, parser_mode="yaml", exit_on_error=False,
            description="Finetune open LLMs (LoRA, QLoRA, LLaMA-Adapter, full), then generate, chat, merge, evaluate "
                        "and export. `leantune <command> --help` explains each command; --debug shows tracebacks.")
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    except ArgumentError as e:  # a flag's value jsonargparse could not parse (wrong type, unknown choice or flag)
        if debug:
            raise
        _fail(_parse_error(str(e), words, argv))
    except Exception as e:
        if debug or not (isinstance(e, USER_ERRORS) or _out_of_memory(e) or is_disk_full(e)):
            raise
        _fail(_message(e))


if __name__ == "__main__":
    main()
