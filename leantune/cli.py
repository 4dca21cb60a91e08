"""The command table: `leantune <command>`; each command is a plain typed function (docstrings become --help).

Every flag can also come from a YAML file with --config.
"""

from __future__ import annotations

import os
import sys


def _components() -> dict:
    from leantune.chat import chat_command
    from leantune.data.preview import preview_command
    from leantune.download import download_command
    from leantune.estimate import estimate_command
    from leantune.evaluate import evaluate_command
    from leantune.export import export_command
    from leantune.finetune import finetune
    from leantune.generate import generate_command
    from leantune.merge import merge_command

    return {
        "download": download_command,
        "finetune": finetune,
        "generate": generate_command,
        "chat": chat_command,
        "merge": merge_command,
        "evaluate": evaluate_command,
        "estimate": estimate_command,
        "export": export_command,
        "data": {"preview": preview_command},
    }


def main(argv: list[str] | None = None) -> None:
    from jsonargparse import CLI, set_parsing_settings

    from leantune.data import DataModule

    # --data Demo / --data JSON --data.json_path f.jsonl: dataset modules are chosen by class name;
    # dataclass field docstrings become the --help of each --x.y option.
    set_parsing_settings(subclasses_enabled=[DataModule], docstring_parse_attribute_docstrings=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:] if argv is None else argv
    try:
        CLI(_components(), args=argv, as_positional=True, fail_untyped=False, parser_mode="yaml")
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    except (ValueError, FileNotFoundError, KeyError, NotImplementedError) as e:
        if os.environ.get("LEANTUNE_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
