"""A sweep's YAML spec: the fixed `finetune` flags, the search space over any of its flags, the objective and how to
search. Read and checked whole before any trial starts, so a typo ends in one line, not in six failed trials.

    name: lora-r-alpha                 # the study's name (default: the file's stem)
    method: lora                       # or a dimension of the space: `method: [lora, dora]`
    flags: {--data: Demo, --train.max_steps: 20}
    space:
      --lora.r: [8, 16, 64]            # a list: choices
      --lora.alpha: ["{--lora.r}", "{2*--lora.r}"]   # a choice may be another flag's value times a number
      --optimizer.lr: {low: 1.0e-4, high: 1.0e-2, log: true}   # a range (random and tpe only)
      layers:                          # a named group: each choice sets several flags at once
        - {--lora.targets: [query, value]}
        - {--lora.targets: [query, key, value, projection, mlp]}
    objective: exact_match             # exact_match | val_loss | rouge | task:<lm-eval task>
    sampler: grid                      # grid | random | tpe
    trials: 6                          # random/tpe: how many trials (grid: every point)
    pruner: median                     # median | none: prunes on intermediate validation loss (--eval.interval)
"""

from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

OBJECTIVES = ("exact_match", "val_loss", "rouge")
SAMPLERS = ("grid", "random", "tpe")
PRUNERS = ("median", "none")
KEYS = {"name", "method", "flags", "space", "objective", "direction", "sampler", "trials", "pruner", "seed"}
# "{--lora.r}" or "{2*--lora.r}": another dimension's value, optionally times a number (no expressions are evaluated)
TEMPLATE = re.compile(r"^\{\s*(?:(\d+(?:\.\d+)?)\s*\*\s*)?(--[\w.]+)\s*\}$")


@dataclass(frozen=True)
class Dimension:
    """One axis of the space: a flag (`--lora.r`), `method`, or a named group of flags; choices or a range."""

    name: str
    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None

    @property
    def is_int_range(self) -> bool:
        return (self.choices is None and all(isinstance(v, int) for v in (self.low, self.high))
                and (self.step is None or isinstance(self.step, int)))

    @property
    def is_group(self) -> bool:
        return self.name != "method" and not self.name.startswith("--")

    def encoded(self) -> tuple[Any, ...]:
        """The choices as Optuna stores them (None, bool, int, float or str): lists and groups as JSON text."""
        return tuple(encode(c) for c in self.choices or ())

    def decode(self, value: Any) -> Any:
        for c in self.choices or ():
            if encode(c) == value:
                return c
        return value


@dataclass(frozen=True)
class SweepSpec:
    name: str
    path: Path
    method: str | None
    flags: dict[str, Any]
    space: tuple[Dimension, ...]
    objective: str = "val_loss"
    direction: str = "minimize"
    sampler: str = "grid"
    trials: int | None = None
    pruner: str = "none"
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def swept(self) -> list[str]:
        return [d.name for d in self.space]

    def slots(self) -> int:
        """How many trials the sweep runs in all (over every process sharing the study)."""
        if self.sampler == "grid":
            n = len(grid_points(self))
            return min(n, self.trials) if self.trials else n
        return int(self.trials or 0)


def encode(choice: Any) -> Any:
    if choice is None or isinstance(choice, bool | int | float | str):
        return choice
    return json.dumps(choice, sort_keys=True)


def load_spec(path: Path | str) -> SweepSpec:
    """Read and check a sweep spec; every problem is a ValueError naming the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such sweep spec (a YAML file; see the README's Experiments section)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a sweep spec is a mapping with keys {', '.join(sorted(KEYS))}")
    unknown = sorted(set(raw) - KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown key {unknown[0]!r}; a sweep spec has {', '.join(sorted(KEYS))}")
    flags = raw.get("flags") or {}
    if not isinstance(flags, dict) or not all(isinstance(k, str) and k.startswith("--") for k in flags):
        raise ValueError(f"{path}: flags: a mapping of finetune flags written with their dashes, e.g. "
                         "{--train.max_steps: 20}")
    space = _space(path, raw.get("space"))
    method = raw.get("method")
    if isinstance(method, list):  # `method: [lora, dora]` is a dimension like any other
        space = (Dimension("method", tuple(method)), *space) if method else space
        method = None
        if not space[0].choices:
            raise ValueError(f"{path}: method: an empty list of methods")
    elif method is not None and not isinstance(method, str):
        raise ValueError(f"{path}: method: a method name (lora, dora, ...) or a list of them")
    if method is None and not any(d.name == "method" for d in space):
        method = "lora"
    objective = str(raw.get("objective", "val_loss"))
    if objective not in OBJECTIVES and not (objective.startswith("task:") and len(objective) > 5):
        raise ValueError(f"{path}: objective: {objective!r}; choose {', '.join(OBJECTIVES)} or task:<lm-eval task>")
    direction = raw.get("direction", "minimize" if objective == "val_loss" else "maximize")
    if direction not in ("minimize", "maximize"):
        raise ValueError(f"{path}: direction: {direction!r}; choose minimize or maximize")
    sampler = raw.get("sampler", "grid")
    if sampler not in SAMPLERS:
        raise ValueError(f"{path}: sampler: {sampler!r}; choose {', '.join(SAMPLERS)}")
    pruner = str(raw.get("pruner", "none"))
    if pruner not in PRUNERS:
        raise ValueError(f"{path}: pruner: {pruner!r}; choose {', '.join(PRUNERS)}")
    trials = raw.get("trials")
    if trials is not None and (isinstance(trials, bool) or not isinstance(trials, int) or trials < 1):
        raise ValueError(f"{path}: trials: {trials!r}; a whole number >= 1")
    seed = raw.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"{path}: seed: {seed!r}; a whole number")
    spec = SweepSpec(name=str(raw.get("name") or path.stem), path=path, method=method, flags=dict(flags),
                     space=space, objective=objective, direction=direction, sampler=sampler, trials=trials,
                     pruner=pruner, seed=seed)
    if sampler == "grid":
        ranges = [d.name for d in space if d.choices is None]
        if ranges:
            raise ValueError(f"{path}: space: {ranges[0]} is a range; sampler grid needs a list of choices "
                             "(or use sampler: random or tpe)")
    elif not trials:
        raise ValueError(f"{path}: trials: sampler {sampler} needs how many trials to run (trials: N)")
    _check_templates(spec)
    return spec


def _space(path: Path, raw: Any) -> tuple[Dimension, ...]:
    if raw is None or raw == {}:
        raise ValueError(f"{path}: space: empty; give at least one flag with its choices, e.g. --lora.r: [8, 16]")
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: space: a mapping of flag -> list of choices or {{low, high}} range")
    dims = []
    for name, value in raw.items():
        name = str(name)
        where = f"{path}: space: {name}"
        if isinstance(value, list):
            if not value:
                raise ValueError(f"{where}: an empty list of choices; give at least one value")
            dim = Dimension(name, tuple(value))
            if dim.is_group and not all(isinstance(c, dict) and c and all(str(k).startswith("--") for k in c)
                                        for c in value):
                raise ValueError(f"{where}: a named group's choices are mappings of flags, e.g. "
                                 "- {--lora.targets: [query, value]}; a flag is written with its dashes")
            if len(set(dim.encoded())) != len(value):
                raise ValueError(f"{where}: a choice is listed twice")
        elif isinstance(value, dict) and {"low", "high"} <= set(value) and set(value) <= {"low", "high", "log", "step"}:
            low, high = value["low"], value["high"]
            if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in (low, high)):
                raise ValueError(f"{where}: low and high must be numbers")
            if low > high or (value.get("log") and low <= 0):
                raise ValueError(f"{where}: an empty range (low {low}, high {high}{', log needs low > 0' if value.get('log') else ''})")
            if name == "method" or not name.startswith("--"):
                raise ValueError(f"{where}: only a flag (--x.y) can take a range")
            dim = Dimension(name, None, low, high, bool(value.get("log", False)), value.get("step"))
        else:
            raise ValueError(f"{where}: a list of choices, or a range {{low: A, high: B, log: true}}")
        dims.append(dim)
    return tuple(dims)


def _check_templates(spec: SweepSpec) -> None:
    names = {d.name for d in spec.space} | set(spec.flags)
    for d in spec.space:
        for c in d.choices or ():
            m = TEMPLATE.match(c) if isinstance(c, str) and c.startswith("{") else None
            if isinstance(c, str) and c.startswith("{") and not m:
                raise ValueError(f"{spec.path}: space: {d.name}: {c!r}; a reference is written {{--flag}} or "
                                 "{2*--flag}")
            if m and (m[2] not in names or m[2] == d.name):
                raise ValueError(f"{spec.path}: space: {d.name}: {c!r} refers to {m[2]}, which is not another "
                                 "flag of the spec")


def grid_points(spec: SweepSpec) -> list[dict[str, Any]]:
    """Every combination of the choices, in a fixed order (slot i of a grid sweep is point i)."""
    dims = [d for d in spec.space]
    return [dict(zip([d.name for d in dims], combo)) for combo in itertools.product(*(d.encoded() for d in dims))]


def resolve_params(spec: SweepSpec, params: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(method, {flag: value}) of one trial: the spec's fixed flags, then its point in the space (groups expanded,
    references like {2*--lora.r} replaced by the number)."""
    method = spec.method
    flags = dict(spec.flags)
    dims = {d.name: d for d in spec.space}
    for name, value in params.items():
        choice = dims[name].decode(value) if name in dims else value
        if name == "method":
            method = str(choice)
        elif dims.get(name) is not None and dims[name].is_group:
            flags.update(choice)
        else:
            flags[name] = choice
    for name, value in list(flags.items()):
        m = TEMPLATE.match(value) if isinstance(value, str) else None
        if m:
            base = flags.get(m[2])
            if isinstance(base, str) or base is None:
                raise ValueError(f"{spec.path}: {name}: {value!r} refers to {m[2]}, which has no number in this trial")
            scaled = float(m[1] or 1) * base
            flags[name] = int(scaled) if float(scaled).is_integer() else scaled
    assert method is not None
    return method, flags


def flag_value(value: Any) -> str:
    """A flag's value as the command line writes it (YAML: lists as [a,b], booleans lower case)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, list | dict):
        return json.dumps(value)
    return str(value)


def finetune_argv(method: str, flags: dict[str, Any], out_dir: Path) -> list[str]:
    """The `leantune finetune` command line of one trial, writing its run folder to out_dir."""
    argv = ["finetune", method]
    for name, value in flags.items():
        if name == "--out_dir":
            continue
        argv += [name, flag_value(value)]
    return [*argv, "--out_dir", str(out_dir)]
