"""Tasks for `leantune evaluate --tasks`: lm-eval task names, task YAML files, and `mmlu_exemplars`, a multiple-choice
benchmark built offline from the MMLU questions that the lm-eval package itself ships.

lm-eval's `mmlu_flan_cot_fewshot_<subject>` configs carry MMLU's chain-of-thought few-shot exemplars, written by
MMLU's authors: about five questions for each of the 57 subjects, each with four choices and the answer
("... The answer is (C)."). `mmlu_exemplars` reads them at run time from the installed package (nothing is copied
into leantune), writes one JSON Lines file per subject and lm-eval task configs over them (`dataset_path: json`, so
no hub is touched) into a cache folder, and lm-eval runs them like any of its tasks:

- prompt: MMLU's standard zero-shot format, as lm-eval's `mmlu` task: "The following are multiple choice questions
  (with answers) about <subject>.\\n\\n<question>\\nA. <choice>\\nB. ...\\nD. <choice>\\nAnswer:"
- scoring: the loglikelihood of each choice " A", " B", " C", " D"; `acc` (the most likely choice is the answer) and
  `acc_norm` (likelihoods divided by the choices' byte lengths, equal to acc here as every choice is one letter).
- groups: `mmlu_exemplars` (all subjects) over `mmlu_exemplars_{stem,humanities,social_sciences,other}` over
  `mmlu_exemplars_<subject>`, accuracies weighted by size, as lm-eval's `mmlu` groups.
An exemplar whose question does not end in exactly four "(A) .. (D)" choices, or whose answer is not one of them,
is left out and counted (the package's college_chemistry has one with five choices).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from leantune.download import HubUnreachableError
from leantune.evaluation.harness import install_hint

MMLU_EXEMPLARS = "mmlu_exemplars"
CATEGORIES = ("stem", "humanities", "social_sciences", "other")
SOURCE_DIR = ("tasks", "mmlu", "flan_cot_fewshot")
LETTERS = ("A", "B", "C", "D")
CHOICES = re.compile(r"\(A\)(.*?)\(B\)(.*?)\(C\)(.*?)\(D\)(.*)", re.S)
ANSWER = re.compile(r"answer is \(([A-Z])\)")
DOC_TO_TEXT = "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\nD. {{choices[3]}}\nAnswer:"


def lm_eval_dir() -> Path:
    """The installed lm_eval package's folder (found without importing it)."""
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the mmlu_exemplars task is built from the lm-eval package; install it into the Python "
                          f"that runs leantune: {install_hint()}")
    return Path(next(iter(spec.submodule_search_locations)))


class _Loader(yaml.SafeLoader):
    """safe_load that reads lm-eval's custom tags (`!function utils.x`) as plain strings."""


_Loader.add_multi_constructor("!", lambda loader, suffix, node: loader.construct_scalar(node)
                              if isinstance(node, yaml.ScalarNode) else None)


def parse_exemplar(sample: dict[str, Any]) -> dict[str, Any] | None:
    """{question, choices, answer} of one fewshot sample ({question: text with "(A) .. (D) .." at the end, target:
    "... The answer is (X)."}), or None when it is not a four-choice question with one of those answers."""
    text, target = str(sample.get("question", "")), str(sample.get("target", ""))
    start = text.rfind("(A)")
    m = CHOICES.fullmatch(text[start:].strip()) if start >= 0 else None
    answers = ANSWER.findall(target)
    if m is None or not answers or answers[-1] not in LETTERS or "(E)" in text[start:]:
        return None
    choices = [c.strip() for c in m.groups()]
    question = text[:start].strip()
    if not question or not all(choices):
        return None
    return {"question": question, "choices": choices, "answer": LETTERS.index(answers[-1])}


def read_exemplars(source: Path | None = None) -> tuple[dict[str, dict[str, Any]], int]:
    """({subject: {"category", "docs"}}, exemplars left out) from lm-eval's flan_cot_fewshot configs."""
    folder = source or lm_eval_dir().joinpath(*SOURCE_DIR)
    files = sorted(folder.glob("mmlu_*.yaml"))
    if not files:
        raise FileNotFoundError(f"{folder}: no mmlu_*.yaml task configs (is lm-eval 0.4.x installed?)")
    subjects: dict[str, dict[str, Any]] = {}
    skipped = 0
    for path in files:
        config = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader) or {}
        samples = (config.get("fewshot_config") or {}).get("samples") or []
        subject = config.get("dataset_name") or path.stem.removeprefix("mmlu_")
        docs = [d for d in map(parse_exemplar, samples) if d is not None]
        skipped += len(samples) - len(docs)
        if docs:
            tag = str(config.get("tag", ""))
            category = next((c for c in CATEGORIES if tag.endswith(c)), "other")
            subjects[subject] = {"category": category, "docs": [{**d, "subject": subject} for d in docs]}
    return subjects, skipped


def cache_root() -> Path:
    base = os.environ.get("LEANTUNE_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or
                                                            os.path.expanduser("~/.cache"), "leantune")
    return Path(base)


def build_mmlu_exemplars(root: Path | None = None) -> Path:
    """Write the mmlu_exemplars data and task configs (once per source version) and return their folder, for
    lm-eval's `TaskManager(include_path=...)`."""
    subjects, skipped = read_exemplars()
    blob = json.dumps(subjects, sort_keys=True).encode()
    folder = (root or cache_root() / "lm_eval_tasks") / f"{MMLU_EXEMPLARS}-{hashlib.sha256(blob).hexdigest()[:12]}"
    if (folder / "info.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder.parent))
    try:
        _write_tasks(tmp, folder, subjects, skipped)
        try:
            tmp.rename(folder)
        except OSError:  # another process wrote it first
            if not (folder / "info.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _write_tasks(tmp: Path, final: Path, subjects: dict[str, dict[str, Any]], skipped: int) -> None:
    """One .jsonl and one task YAML per subject, a group YAML per category and one for all (paths point at `final`,
    where `tmp` is renamed to once written)."""
    (tmp / "data").mkdir()
    by_category: dict[str, list[str]] = {c: [] for c in CATEGORIES}
    for subject, entry in sorted(subjects.items()):
        name = f"{MMLU_EXEMPLARS}_{subject}"
        lines = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in entry["docs"])
        (tmp / "data" / f"{subject}.jsonl").write_text(lines, encoding="utf-8")
        readable = subject.replace("_", " ")
        _dump(tmp / f"{name}.yaml", {
            "task": name, "task_alias": subject,
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(final / "data" / f"{subject}.jsonl")}},
            "test_split": "test",
            "output_type": "multiple_choice",
            "description": f"The following are multiple choice questions (with answers) about {readable}.\n\n",
            "doc_to_text": DOC_TO_TEXT,
            "doc_to_choice": list(LETTERS),
            "doc_to_target": "answer",
            "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                            for m in ("acc", "acc_norm")],
            "metadata": {"version": 1.0},
        })
        by_category[entry["category"]].append(name)
    aggregate = [{"metric": m, "weight_by_size": True} for m in ("acc", "acc_norm")]
    groups = []
    for category, tasks in by_category.items():
        if tasks:
            group = f"{MMLU_EXEMPLARS}_{category}"
            _dump(tmp / f"{group}.yaml", {"group": group, "group_alias": category.replace("_", " "), "task": tasks,
                                          "aggregate_metric_list": aggregate, "metadata": {"version": 1.0}})
            groups.append(group)
    _dump(tmp / f"{MMLU_EXEMPLARS}.yaml", {"group": MMLU_EXEMPLARS, "task": groups,
                                           "aggregate_metric_list": aggregate, "metadata": {"version": 1.0}})
    info = {"subjects": len(subjects), "questions": sum(len(e["docs"]) for e in subjects.values()),
            "skipped": skipped, "source": str(lm_eval_dir().joinpath(*SOURCE_DIR))}
    (tmp / "info.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")


def _dump(path: Path, config: dict[str, Any]) -> None:
    path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True, width=1000), encoding="utf-8")


def is_local_task(name: str) -> bool:
    return name == MMLU_EXEMPLARS or name.startswith(MMLU_EXEMPLARS + "_")


def parse_tasks(tasks: str | list[str] | None) -> list[str]:
    """--tasks as a list: comma-separated names or YAML files (a list may hold several)."""
    items = [tasks] if isinstance(tasks, str) else list(tasks or [])
    names = list(dict.fromkeys(t.strip() for item in items for t in str(item).split(",") if t.strip()))
    if not names:
        raise ValueError("--tasks is empty: give lm-eval task names or task YAML files, comma-separated "
                         f"(e.g. --tasks {MMLU_EXEMPLARS} or --tasks hellaswag,my_task.yaml)")
    for name in names:
        if name.endswith((".yaml", ".yml")) and not Path(name).is_file():
            raise FileNotFoundError(f"--tasks {name}: no such task YAML file")
    return names


def resolve_tasks(names: list[str]) -> tuple[list[Any], Any, bool]:
    """(task specs for `simple_evaluate`, a TaskManager, whether every task is local). YAML files are loaded as
    configs (their folder joins the include path, so `include:` of a sibling works), `mmlu_exemplars*` names from
    the folder `build_mmlu_exemplars` writes; lm-eval's own task index (several seconds) is read only when a name
    needs it. A local-only run is kept offline (`offline`) so nothing reaches for a hub."""
    local = all(is_local_task(n) or n.endswith((".yaml", ".yml")) for n in names)
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    include: list[str] = []
    if any(is_local_task(n) for n in names):
        include.append(str(build_mmlu_exemplars()))
    specs: list[Any] = []
    for name in names:
        if name.endswith((".yaml", ".yml")):
            include.append(str(Path(name).resolve().parent))
            specs.append(load_yaml(name, resolve_func=True))
        else:
            specs.append(name)
    manager = TaskManager(include_path=list(dict.fromkeys(include)) or None,
                          include_defaults=not all(is_local_task(n) or not isinstance(s, str)
                                                   for n, s in zip(names, specs)))
    unknown = [s for s in specs if isinstance(s, str) and not manager.match_tasks([s])]
    if unknown:
        raise ValueError(f"--tasks: unknown lm-eval task(s) {', '.join(unknown)} (`lm-eval ls tasks` lists them; "
                         f"{MMLU_EXEMPLARS} is the offline MMLU-exemplar benchmark)")
    return specs, manager, local


@contextlib.contextmanager
def offline(enabled: bool = True) -> Iterator[None]:
    """Keep datasets and huggingface_hub off the network inside the block (also when they were imported already:
    both read the environment at import), then restore what was there."""
    if not enabled:
        yield
        return
    saved_env = {k: os.environ.get(k) for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    flags = [(sys.modules.get("datasets") and sys.modules["datasets"].config, "HF_DATASETS_OFFLINE"),
             (sys.modules.get("huggingface_hub") and sys.modules["huggingface_hub"].constants, "HF_HUB_OFFLINE")]
    saved = [(obj, key, getattr(obj, key)) for obj, key in flags if obj is not None and hasattr(obj, key)]
    os.environ.update({k: "1" for k in saved_env})
    for obj, key, _ in saved:
        setattr(obj, key, True)
    try:
        yield
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for obj, key, value in saved:
            setattr(obj, key, value)


def run_tasks(lm, specs: list[Any], manager, local: bool, num_fewshot: int | None = None, limit: int | None = None,
              seed: int = 1234) -> dict[str, Any]:
    """Run lm-eval's `simple_evaluate` on an LM (leantune's `harness_lm` or any lm-eval LM): {"tasks": {name:
    {metric: value}} in lm-eval's order (groups before their subtasks), "lm_eval": its results less per-sample
    logs, "examples", "seconds", "examples_per_s"}."""
    from lm_eval import simple_evaluate

    t0 = time.perf_counter()
    try:
        with offline(local):
            out = simple_evaluate(model=lm, tasks=specs, task_manager=manager, num_fewshot=num_fewshot, limit=limit,
                                  log_samples=False, random_seed=seed, numpy_random_seed=seed,
                                  torch_random_seed=seed, fewshot_random_seed=seed)
    except ConnectionError as e:  # a task whose dataset lives on the Hub, with no Hub to reach
        raise HubUnreachableError(f"lm-eval task data: {e}. That task's dataset downloads from the Hugging Face Hub "
                                  f"(or its datasets cache); {MMLU_EXEMPLARS} and task YAML files over local files "
                                  "(dataset_path: json, data_files) run offline") from None
    seconds = time.perf_counter() - t0
    raw = {k: out[k] for k in ("results", "groups", "group_subtasks", "configs", "versions", "n-shot",
                               "higher_is_better", "n-samples") if k in out}
    leaves = [t for t, n in (out.get("n-samples") or {}).items() if isinstance(n, dict)]
    examples = sum(int(out["n-samples"][t].get("effective", 0)) for t in leaves)
    model_seconds = getattr(lm, "seconds", None)
    rate_time = model_seconds if model_seconds else seconds
    results = ordered(out.get("results") or {}, out.get("group_subtasks") or {})
    return {"tasks": flatten_results(results), "examples": examples, "seconds": round(seconds, 3),
            "model_seconds": None if model_seconds is None else round(model_seconds, 3),
            "examples_per_s": round(examples / rate_time, 3) if rate_time > 0 else None, "lm_eval": _jsonable(raw)}


def ordered(results: dict[str, Any], group_subtasks: dict[str, list[str]]) -> dict[str, Any]:
    """`results` with each group before its members, depth first from the top-level groups (mmlu_exemplars, then
    stem and its subjects, ...); tasks in no group keep their place after."""
    children = {c for members in group_subtasks.values() for c in members}
    out: dict[str, Any] = {}

    def visit(name: str) -> None:
        if name in results and name not in out:
            out[name] = results[name]
        for child in group_subtasks.get(name, []):
            visit(child)

    for name in [*(g for g in group_subtasks if g not in children), *results]:
        visit(name)
    return out


def flatten_results(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """lm-eval's {"task": {"alias": .., "acc,none": x, "acc_stderr,none": s}} as {"task": {"alias": .., "acc": x,
    "acc_stderr": s}} (a filter other than `none` stays in the key: "exact_match,strict-match")."""
    out: dict[str, dict[str, Any]] = {}
    for task, metrics in results.items():
        row: dict[str, Any] = {"alias": str(metrics.get("alias", task)).strip(" -")}
        for key, value in metrics.items():
            if key == "alias" or "," not in key:
                continue
            name, _, filt = key.partition(",")
            if isinstance(value, int | float) and not isinstance(value, bool):
                row[name if filt == "none" else key] = value
        out[task] = row
    return out


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))
