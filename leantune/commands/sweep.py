"""`leantune sweep SPEC.yaml`: run a search over `finetune` flags (see leantune.experiments.spec for the spec)."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from jsonargparse import CLI, ArgumentError, capture_parser

from leantune import finetune as recipe
from leantune.commands import finetune as finetune_commands
from leantune.experiments.slots import require_sweep
from leantune.experiments.spec import SweepSpec, finetune_argv, grid_points, load_spec, resolve_params
from leantune.experiments.sweep import open_storage, run_sweep
from leantune.methods import METHODS


def sweep(spec: Path, out_dir: Path | None = None, storage: str | None = None, stale_after: float = 120.0,
          check_only: bool = False) -> dict:
    """Run an Optuna search over `finetune` flags: each trial is an ordinary run folder under OUT_DIR/trials.

    The spec (YAML) names the fixed flags, the space (choices or ranges of any finetune flag, the method, named
    groups of flags), the objective (exact_match, val_loss, rouge or task:<lm-eval task>), the sampler (grid, random,
    tpe) and the pruner (median, on the intermediate validation losses of --eval.interval). Every trial's flags are
    checked before the first one starts. The same command run by several processes or machines on one --storage
    shares the trials out with none run twice; run again after an interruption, it finishes what is left.

    Args:
        spec: The sweep spec, a YAML file.
        out_dir: The sweep folder: trials/, study.db (the default storage), sweep.json (default out/sweep/<name>).
        storage: An SQLAlchemy database URL holding the study (default sqlite:///OUT_DIR/study.db), e.g.
            postgresql://user:password@host/db for processes on several machines.
        stale_after: Seconds without a heartbeat after which a trial of a killed process is run again.
        check_only: Check the spec and every trial's flags, then stop without running anything.
    """
    require_sweep()
    parsed = load_spec(spec)
    if not stale_after > 0:  # NaN too
        raise ValueError(f"--stale_after must be > 0 seconds, got {stale_after}")
    out = Path(out_dir or Path("out") / "sweep" / parsed.name)
    check_trials(parsed, out)
    if storage is not None:
        open_storage(storage)  # an unreachable or malformed URL ends here, before any trial
    if check_only:
        print(f"{spec}: {parsed.slots()} trials, every trial's flags accepted")
        return {"name": parsed.name, "trials": parsed.slots(), "checked": True}
    result = run_sweep(parsed, out, storage, stale_after)
    return {k: v for k, v in result.items() if k != "trials"}


def check_trials(spec: SweepSpec, out: Path) -> None:
    """Parse each trial's command line as `leantune finetune` would (grid: every point; a range: its two ends), so a
    flag or value the command refuses ends the sweep in one line before any trial runs."""
    for params in _points_to_check(spec):
        method, flags = resolve_params(spec, params)
        argv = finetune_argv(method, flags, out / "trials" / "check")
        try:
            check_finetune_argv(argv[1:])
        except (ValueError, FileNotFoundError, NotADirectoryError, KeyError) as e:
            shown = {k: v for k, v in params.items()}
            text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
            raise ValueError(f"{spec.path}: the trial {json.dumps(shown)} is refused: {text}") from None


def _points_to_check(spec: SweepSpec) -> list[dict[str, Any]]:
    if spec.sampler == "grid":
        return grid_points(spec)
    points: list[dict[str, Any]] = []
    for end in (0, -1):  # the low ends of every range with each first choice, then the high ends with the last
        points.append({d.name: (d.encoded()[end] if d.choices is not None else (d.low if end == 0 else d.high))
                       for d in spec.space})
    for d in spec.space:  # and every choice of every dimension once
        for c in d.encoded() if d.choices is not None else ():
            points.append({**points[0], d.name: c})
    return points


@functools.cache
def _parser(method: str):
    return capture_parser(lambda: CLI({method: finetune_commands.commands()[method]}, args=[], as_positional=True,
                                      fail_untyped=False, parser_mode="yaml", exit_on_error=False))


def check_finetune_argv(argv: list[str]) -> None:
    """`finetune METHOD FLAGS...` parsed and checked as the command would, without loading anything."""
    method = argv[0]
    if method not in METHODS:
        raise ValueError(f"method {method!r}: choose one of {', '.join(METHODS)}")
    parser = _parser(method)
    try:
        cfg = parser.parse_args(argv)
    except ArgumentError as e:
        raise ValueError(" ".join(str(e).split())) from None
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    kwargs = dict(instantiate(cfg)[method])
    m = METHODS[method]
    method_args = kwargs.pop(m.flag, None) if m.args_class is not None else None
    finetune_commands.check_flags(**kwargs)
    recipe.resolve(method, quantize=kwargs.get("quantize"), optimizer=kwargs.get("optimizer"), method_args=method_args)
    recipe.check_model_kind(kwargs.get("checkpoint_dir"), method, kwargs.get("quantize"), kwargs.get("train"))
