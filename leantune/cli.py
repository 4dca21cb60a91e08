"""The command table: `leantune <command>`; each command is a plain typed function in `leantune.commands` whose
docstring becomes its --help. Every flag can also come from a YAML file with --config.

User errors (bad flags, files, folders) end with one line on stderr and exit code 2; `--debug` (or LEANTUNE_DEBUG=1)
shows the traceback instead. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys

from jsonargparse import CLI, set_parsing_settings

from leantune.commands import chat, estimate, evaluate, export, generate, merge
from leantune.commands import finetune as finetune_commands
from leantune.data import DataModule
from leantune.data.preview import preview_command
from leantune.download import HubUnreachableError, download_command
from leantune.methods import METHODS

# Errors a user causes and can fix from the message alone.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError,
               KeyError, NotImplementedError, ImportError, HubUnreachableError)


def components() -> dict:
    return {
        "download": download_command,
        "finetune": {"_help": f"Finetune a model with one method ({', '.join(METHODS)}) through the one training "
                              "loop; `leantune finetune <method> --help` lists its flags.",
                     **finetune_commands.commands()},
        "generate": generate.generate,
        "chat": chat.chat,
        "merge": merge.merge,
        "evaluate": evaluate.evaluate,
        "estimate": estimate.estimate_command,
        "export": export.export,
        "data": {"_help": "Inspect training data: `leantune data preview --data JSON --data.json_path f.jsonl`.",
                 "preview": preview_command},
    }


def _message(e: BaseException) -> str:
    text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    if isinstance(e, PermissionError | IsADirectoryError | NotADirectoryError) and e.filename:
        text = f"{e.filename}: {e.strerror or text}"
    if isinstance(e, ImportError) and getattr(e, "name", None) and "pip install" not in text:
        text = f"{text} (pip install {e.name})"
    return text


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
    try:
        CLI(components(), args=argv, as_positional=True, fail_untyped=False, parser_mode="yaml",
            description="Finetune open LLMs (LoRA, QLoRA, LLaMA-Adapter, full), then generate, chat, merge, evaluate "
                        "and export. `leantune <command> --help` explains each command; --debug shows tracebacks.")
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    except USER_ERRORS as e:
        if debug:
            raise
        print(f"error: {_message(e)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
