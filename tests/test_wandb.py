"""--train.logger wandb, offline: the run's transaction log (<out_dir>/wandb/offline-run-*/run-*.wandb, what `wandb
sync` uploads) holds the per-step scalars, the settings as config, the final results and the run's files."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from leantune.cli import main
from tests.sweep_support import tiny_flags

pytest.importorskip("wandb", reason="the [wandb] extra is not installed")
from wandb.proto import wandb_internal_pb2  # noqa: E402

BLOCK = 32768


def read_records(path) -> list:
    """The records of a W&B transaction log: a 7-byte header (:W&B, magic, version), then LevelDB log blocks of
    32 KiB whose chunks (crc32, length, type: full, first, middle, last) carry protobuf Records."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            r = wandb_internal_pb2.Record()
            r.ParseFromString(pending)
            records.append(r)
    return records


def test_offline_run_log(tmp_path, tiny_checkpoint, json_data, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    out = tmp_path / "run"
    flags = {**tiny_flags(tiny_checkpoint, json_data), "--train.max_steps": 3, "--train.logger": "wandb",
             "--lora.r": 4}
    main(["finetune", "lora", *[str(x) for kv in flags.items() for x in kv], "--out_dir", str(out)])
    run_id = json.loads((out / "tracking.json").read_text())["run_id"]
    (log,) = (out / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    records = read_records(log)
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    losses = [h["train/loss"] for h in history if "train/loss" in h]
    assert len(losses) == 3 and [h["_step"] for h in history if "train/loss" in h] == [1, 2, 3]
    config = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for r in records
              if r.WhichOneof("record_type") == "config" for i in r.config.update}
    assert config["lora.r"] == "4" and config["method"] == "lora"
    summary = json.loads((out / "summary.json").read_text())
    finals = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for r in records
              if r.WhichOneof("record_type") == "summary" for i in r.summary.update}
    assert finals["final/val_loss"] == pytest.approx(summary["val_loss"])
    assert any(r.WhichOneof("record_type") == "artifact" for r in records)
    assert any(r.WhichOneof("record_type") == "exit" for r in records)  # the run was finished


def test_a_sweeps_trials_share_a_group_and_are_named_after_their_parameters(tmp_path, tiny_checkpoint, json_data,
                                                                              monkeypatch):
    """Under `--train.logger wandb` the sweep's trials are one W&B group (the sweep's name), each run named after its
    trial number and swept values, as MLflow shows them as child runs of the sweep's run."""
    pytest.importorskip("optuna", reason="the [sweep] extra is not installed")
    from tests.sweep_support import read_trials, write_spec

    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    spec = write_spec(tmp_path / "grouped.yaml", tiny_checkpoint, json_data,
                      space={"--lora.r": [2, 4], "--lora.alpha": ["{2*--lora.r}"]},
                      flags={"--train.logger": "wandb", "--train.max_seq_length": 64})
    out = tmp_path / "sweep"
    main(["sweep", str(spec), "--out_dir", str(out)])
    trials = read_trials(f"sqlite:///{out / 'study.db'}", "grouped")
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"], [t.user_attrs.get("error") for t in trials]
    names = set()
    for t in trials:
        run = Path(t.user_attrs["run_dir"])
        run_id = json.loads((run / "tracking.json").read_text())["run_id"]
        (log,) = (run / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
        (record,) = [r.run for r in read_records(log) if r.WhichOneof("record_type") == "run"]
        r = t.params["--lora.r"]
        assert record.run_group == "grouped"
        assert record.display_name == f"trial-{t.number:03d} lora.r={r} lora.alpha={2 * r}" == t.user_attrs["title"]
        names.add(record.display_name)
    assert len(names) == 2
