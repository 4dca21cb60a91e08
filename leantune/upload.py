"""Push a finetune to a Hugging Face Hub repo with a model card written from the run's own records.

What goes up depends on the folder: a leantune adapter (`leantune.json` + `adapter.safetensors`) is converted to PEFT's
format when its method has one (else it goes up as is, for `--adapter` in leantune); a full finetune's `model/` HF
folder, a PEFT folder, or a merged HF model folder go up as they are. Optimizer state, pickles, leantune's own markers
and `run.json` (it names local paths) stay home. The card's facts come from the adapter manifest, `run.json` and the
run folder's `summary.json` (the folder itself or its parent): base model, method and hyperparameters, data, metrics.

The token is huggingface_hub's (HF_TOKEN, or a saved `hf auth login`); it is passed to the client and never printed,
logged or written anywhere.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import get_token

from leantune.checkpoint.io import OUTPUT_MARKER, check_not_being_written
from leantune.checkpoint.peft_dir import CONFIG_FILE as PEFT_CONFIG
from leantune.checkpoint.peft_dir import is_peft_dir, read_peft_config
from leantune.export import export_peft_adapter
from leantune.methods import ADAPTER_FILE, MANIFEST_FILE, get_method, read_manifest
from leantune.train.run_config import RUN_FILE

SUMMARY_FILE = "summary.json"
CARD_FILE = "README.md"
NEVER_UPLOADED = re.compile(r"(^\.|\.tmp$|\.(pt|pth|bin|pkl|pickle)$|^README\.md$|^run\.json$)")
TRAIN_FIELDS = ("micro_batch_size", "global_batch_size", "epochs", "max_steps", "max_tokens", "max_seq_length",
                "warmup_steps", "min_lr_ratio", "max_norm", "packing", "seed")
OPTIMIZER_FIELDS = ("name", "lr", "weight_decay", "betas")
METRICS = (("val_loss", "validation loss"), ("val_ppl", "validation perplexity"),
           ("exact_match_before", "held-out exact match before (%)"),
           ("exact_match_after", "held-out exact match after (%)"),
           ("final_loss", "final training loss"), ("steps", "optimizer steps"), ("tokens", "training tokens"),
           ("tokens_per_s", "training tokens/s"), ("time_s", "training time (s)"),
           ("trainable_params", "trainable parameters"), ("total_params", "total parameters"))


@dataclass
class Upload:
    """The files to push (path in repo -> local file) and what the model card says."""

    files: dict[str, Path]
    kind: str  # "peft-adapter", "leantune-adapter" or "model"
    method: str | None = None
    method_args: dict[str, Any] = field(default_factory=dict)
    base_model: str | None = None
    run: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    precision: str | None = None
    quantize: str | None = None


def hub_id(path_or_id: str | None) -> str | None:
    """A Hub repo id for a base given as a local checkpoint folder (`.../checkpoints/ORG/NAME`) or an id; None when
    it is a local path that names no repo (a card never shows this machine's paths)."""
    if not path_or_id:
        return None
    parts = Path(path_or_id).parts
    if "checkpoints" in parts:
        tail = parts[len(parts) - parts[::-1].index("checkpoints"):]
        if len(tail) == 2:
            return "/".join(tail)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", str(path_or_id)) and not Path(path_or_id).is_absolute():
        return str(path_or_id)
    return None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from e
    return data if isinstance(data, dict) else {}


def _plain_files(folder: Path) -> dict[str, Path]:
    files = {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}
    return {rel: p for rel, p in files.items() if not any(NEVER_UPLOADED.search(part) for part in rel.split("/"))
            and OUTPUT_MARKER not in rel}


def _run_records(folder: Path, run_dir: Path | None) -> tuple[dict, dict]:
    """(run.json, summary.json) of the run that wrote `folder`: looked up in run_dir, the folder, then its parents."""
    places = [Path(run_dir), Path(run_dir) / "final"] if run_dir is not None else [folder, folder.parent,
                                                                                    folder.parent.parent]
    run = next((r for p in places if (r := _read_json(p / RUN_FILE))), {})
    summary = next((s for p in places if (s := _read_json(p / SUMMARY_FILE))), {})
    return run, summary


def _run_method_args(run: dict) -> dict[str, Any]:
    """The method's hyperparameters as run.json recorded them (under the method's flag, e.g. "lora")."""
    try:
        args = run.get(get_method(run["method"]).flag) if run.get("method") else None
    except ValueError:
        return {}
    return {k: v for k, v in args.items() if k != "class"} if isinstance(args, dict) else {}


def plan_upload(folder: Path, staging: Path, checkpoint_dir: Path | None = None, run_dir: Path | None = None,
                base_model: str | None = None) -> Upload:
    """Decide what to push from `folder` (converting a leantune adapter to PEFT's format inside `staging`)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder (give an adapter folder, e.g. out/finetune/lora/final, a "
                                "PEFT folder or a merged model folder)")
    run, summary = _run_records(folder, run_dir)
    if (folder / MANIFEST_FILE).is_file():
        manifest = read_manifest(folder)
        m = get_method(manifest["method"])
        base = checkpoint_dir or run.get("checkpoint_dir") or manifest.get("base_checkpoint", {}).get("path")
        plan = Upload({}, "model", m.name, manifest.get("method_args", {}),
                      base_model or hub_id(str(base) if base else None), run, summary, manifest.get("precision"),
                      manifest.get("quantize"))
        if m.saves_full_model:
            plan.files = _plain_files(folder / "model")
        elif m.peft is not None:
            if base is None or not Path(base).is_dir():
                raise FileNotFoundError(f"{folder}: converting the adapter to PEFT's format needs its base model; "
                                        f"pass --checkpoint_dir (the manifest names {base!r})")
            out = export_peft_adapter(folder, Path(base), staging / "peft")
            plan.files, plan.kind = _plain_files(out), "peft-adapter"
        else:
            plan.files = {n: folder / n for n in (ADAPTER_FILE, MANIFEST_FILE)}
            plan.kind = "leantune-adapter"
        return plan
    if is_peft_dir(folder):
        pcfg = read_peft_config(folder)
        args = {k: pcfg[k] for k in ("peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "use_dora",
                                     "num_virtual_tokens") if pcfg.get(k) is not None}
        return Upload(_plain_files(folder), "peft-adapter", run.get("method") or str(pcfg.get("peft_type", "")).lower(),
                      args, base_model or hub_id(pcfg.get("base_model_name_or_path")) or hub_id(run.get("checkpoint_dir")),
                      run, summary, run.get("precision"), run.get("quantize"))
    if (folder / "config.json").is_file():
        return Upload(_plain_files(folder), "model", run.get("method"), _run_method_args(run), base_model or
                      hub_id(run.get("checkpoint_dir")), run, summary, run.get("precision"), run.get("quantize"))
    raise ValueError(f"{folder}: not an adapter or model folder (no {MANIFEST_FILE}, {PEFT_CONFIG} or config.json)")


def portable_peft_config(plan: Upload, staging: Path) -> None:
    """Point the adapter_config.json that goes up at the base's Hub id (or its folder name), never a local path."""
    src = plan.files.get(PEFT_CONFIG)
    if src is None:
        return
    cfg = _read_json(src)
    base = cfg.get("base_model_name_or_path")
    portable = plan.base_model or (Path(base).name if base else None)
    if base != portable:
        cfg["base_model_name_or_path"] = portable
        out = staging / "config" / PEFT_CONFIG
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        plan.files[PEFT_CONFIG] = out


def _value(v: Any) -> str:
    if isinstance(v, float):
        return (f"{v:.1f}" if abs(v) >= 1000 else f"{v:.4g}") if math.isfinite(v) else str(v)
    if isinstance(v, list | tuple):
        return ", ".join(_value(x) for x in v)
    if isinstance(v, str) and ("/" in v or "\\" in v):
        return Path(v).name  # a file the run read: its name, never this machine's path
    return str(v)


def _table(rows: list[tuple[str, Any]]) -> list[str]:
    return ["| setting | value |", "|---|---|", *(f"| {k} | {_value(v)} |" for k, v in rows)]


def model_card(plan: Upload, repo_id: str) -> str:
    """A Hub model card (YAML front matter + markdown) from the plan's records."""
    tags = ["leantune", *([plan.method] if plan.method else [])]
    front = ["---"]
    if plan.base_model:
        front.append(f"base_model: {plan.base_model}")
    front.append(f"library_name: {'peft' if plan.kind == 'peft-adapter' else 'transformers'}")
    front += ["tags:", *(f"- {t}" for t in tags), "---", ""]
    what = {"peft-adapter": "a PEFT adapter", "leantune-adapter": "a leantune adapter", "model": "a model"}[plan.kind]
    base = f"[{plan.base_model}](https://huggingface.co/{plan.base_model})" if plan.base_model else "its base model"
    lines = [*front, f"# {repo_id.split('/')[-1]}", "",
             f"{what[0].upper() + what[1:]} finetuned from {base}"
             + (f" with [leantune](https://pypi.org/project/leantune/) `{plan.method}`." if plan.method else "."), ""]
    setup: list[tuple[str, Any]] = [("method", plan.method)] if plan.method else []
    setup += [(f"{plan.method or 'method'}.{k}", v) for k, v in plan.method_args.items()]
    train, opt = plan.run.get("train", {}), plan.run.get("optimizer", {})
    setup += [(f"train.{k}", train[k]) for k in TRAIN_FIELDS if train.get(k) is not None]
    setup += [(f"optimizer.{k}", opt[k]) for k in OPTIMIZER_FIELDS if opt.get(k) is not None]
    setup += [(k, v) for k, v in (("precision", plan.precision), ("quantize", plan.quantize)) if v]
    if setup:
        lines += ["## Training", "", *_table(setup), ""]
    data = plan.run.get("data")
    if isinstance(data, dict) and data.get("class"):
        rows = [(k, v) for k, v in data.items() if k != "class" and v not in (None, "", [], {})]
        lines += ["## Data", "", f"`--data {data['class']}`", "", *(_table(rows) if rows else []), ""]
    metrics = [(label, 100 * plan.summary[k] if k.startswith("exact_match") else plan.summary[k])
               for k, label in METRICS if plan.summary.get(k) is not None]
    if metrics:
        lines += ["## Results", "", "| metric | value |", "|---|---|",
                  *(f"| {label} | {_value(v)} |" for label, v in metrics), ""]
    lines += ["## Use", ""]
    if plan.kind == "peft-adapter" and plan.base_model:
        lines += ["```python", "from peft import PeftModel", "from transformers import AutoModelForCausalLM", "",
                  f'base = AutoModelForCausalLM.from_pretrained("{plan.base_model}")',
                  f'model = PeftModel.from_pretrained(base, "{repo_id}")', "```", ""]
    elif plan.kind == "model":
        lines += ["```python", "from transformers import AutoModelForCausalLM", "",
                  f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")', "```", ""]
    lines += ["```sh", f"hf download {repo_id} --local-dir {repo_id.split('/')[-1]}",
              f"leantune generate {'--adapter' if 'adapter' in plan.kind else '--checkpoint_dir'} "
              f"{repo_id.split('/')[-1]}" + (" --checkpoint_dir <base model folder>" if "adapter" in plan.kind else ""),
              "```", ""]
    return "\n".join(lines)


def push(folder: Path, repo_id: str, checkpoint_dir: Path | None = None, run_dir: Path | None = None,
         base_model: str | None = None, private: bool = False, revision: str | None = None,
         commit_message: str | None = None, endpoint: str | None = None, dry_run: bool = False) -> tuple[str, Upload]:
    """Create the repo if needed and push the folder's files plus the card in one commit; returns (url, plan).

    With dry_run nothing is sent: the url is empty and the plan says what would go up.
    """
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", repo_id or ""):
        raise ValueError(f"--repo_id {repo_id!r}: give a Hub repo id such as your-name/smollm2-lora")
    check_not_being_written(folder)  # a merge, export or run still writing it: its files could be half old, half new
    with tempfile.TemporaryDirectory(prefix="leantune-upload-") as tmp:
        plan = plan_upload(Path(folder), Path(tmp), checkpoint_dir, run_dir, base_model)
        portable_peft_config(plan, Path(tmp))
        card = model_card(plan, repo_id)
        if dry_run:
            plan.files[CARD_FILE] = Path(tmp) / CARD_FILE
            (Path(tmp) / CARD_FILE).write_text(card, encoding="utf-8")
            print(card)
            return "", plan
        if not get_token():
            raise ValueError("no Hugging Face token: set HF_TOKEN (a write token from huggingface.co/settings/tokens) "
                             "or run `hf auth login`")
        api = HfApi(endpoint=endpoint)
        ops = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(p)) for rel, p in plan.files.items()]
        ops.append(CommitOperationAdd(path_in_repo=CARD_FILE, path_or_fileobj=card.encode("utf-8")))
        message = commit_message or f"Upload {plan.kind.replace('-', ' ')}" + (f" ({plan.method})" if plan.method else "")
        try:
            url = api.create_repo(repo_id, private=private, exist_ok=True)
            info = api.create_commit(url.repo_id, ops, commit_message=message, revision=revision)
        except HfHubHTTPError as e:  # one line naming the status; the message never holds the token
            status = getattr(e.response, "status_code", "?")
            hint = " (check that HF_TOKEN is a write token for this repo)" if status in (401, 403) else ""
            raise ValueError(f"the Hub refused the upload to {repo_id}: HTTP {status}{hint}: "
                             f"{str(e).splitlines()[0]}") from None
        plan.files[CARD_FILE] = Path(CARD_FILE)
        return getattr(info, "commit_url", str(url)), plan
