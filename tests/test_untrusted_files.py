"""No command runs what a run, adapter or model folder holds (issue 23, "Trust").

Every file a command unpickles gets a `__reduce__` payload planted in it: unpickled by plain pickle (or torch.load
with weights_only=False) the payload creates a marker file. Each command must then end with exit code 2 and ONE
`error:` line naming the file, and the marker must not exist. The files: a resumed checkpoint's `training_state.pt`,
a sharded checkpoint's `dcp/.metadata` and the items of its `*.distcp` shard (tensor and non-tensor), an HF model's
`pytorch_model.bin`, a PEFT adapter's `adapter_model.bin`; and the pickles commands must never open at all
(`training_args.bin`, `optimizer.pt`, `rng_state.pth`, a `.bin` beside safetensors, ...) are planted where a command
would find them, which must then just work. The commands run for real (in-process `leantune.cli.main`) on the tiny
random Llama; the sharded checkpoint comes from a real one-rank FSDP run (gloo, one process).
"""

from __future__ import annotations

import dataclasses
import io
import json
import pickle
import shutil
import socket
from pathlib import Path

import httpx
import pytest
import torch
import torch.distributed as dist

from leantune.checkpoint.safe_pickle import UntrustedFileError, load_dcp_metadata, load_torch_file
from leantune.cli import main
from leantune.train.distributed import DCP_DIR, Parallel
from leantune.train.state import STATE_FILE


class Payload:
    """Unpickling this opens (creates) `marker`: proof that a loader ran what the file holds."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


class OneRankFSDP(Parallel):
    """One process that still shards (a 1-rank gloo mesh): its checkpoints are DCP folders, as on N ranks."""

    @property
    def enabled(self) -> bool:
        return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torch_payload(path: Path, marker: Path) -> Path:
    """A torch.save file (zip format) whose one tensor is the payload, as a hostile `.bin` or `.pt` would be."""
    torch.save({"model.embed_tokens.weight": Payload(marker)}, path)
    return path


# ---- the world: a tiny model, data, a one-process run, a sharded run, a LoRA adapter and its PEFT export --------
@pytest.fixture(scope="module")
def world(tiny_checkpoint, json_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("untrusted")
    data = ["--data", "JSON", "--data.json_path", str(json_data)]
    steps = ["--train.max_steps", "1", "--train.save_interval", "1", "--train.micro_batch_size", "2",
             "--train.global_batch_size", "2", "--train.max_seq_length", "64", "--eval.max_batches", "1",
             "--eval.sample_new_tokens", "0", "--eval.exact_match", "false", "--eval.initial_validation", "false"]
    finetune = ["finetune", "lora", "--checkpoint_dir", str(tiny_checkpoint), *data, *steps]
    main_quiet([*finetune, "--out_dir", str(root / "run")])
    sharded_run(finetune, root / "sharded")
    return {"tiny": tiny_checkpoint, "root": root, "data": data, "steps": steps, "finetune": finetune,
            "run": root / "run", "sharded": root / "sharded", "adapter": root / "run" / "final",
            "peft": export_peft(root / "run" / "final", tiny_checkpoint, root / "peft")}


def main_quiet(argv: list[str]) -> None:
    try:
        main(argv)
    except SystemExit as e:
        assert e.code in (0, None), f"leantune {' '.join(argv)} exited {e.code}"


def sharded_run(finetune: list[str], out_dir: Path) -> None:
    """`finetune` as rank 0 of a one-rank FSDP job: its final/ is a DCP checkpoint (dcp/ + training state)."""
    import leantune.finetune as recipe

    original = recipe.init_from_env
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    recipe.init_from_env = lambda *a, **k: OneRankFSDP()
    try:
        main_quiet([*finetune, "--out_dir", str(out_dir)])
    finally:
        recipe.init_from_env = original
        if dist.is_initialized():
            dist.destroy_process_group()
    assert (out_dir / "final" / DCP_DIR / ".metadata").is_file()


def export_peft(adapter: Path, checkpoint: Path, out: Path) -> Path:
    from leantune.commands.export import export

    return export(adapter=adapter, checkpoint_dir=checkpoint, format="peft", out_dir=out)


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def checkpoint_copy(world, run: str, name: str) -> Path:
    """A fresh run folder holding a copy of `run`'s final checkpoint as its step-000001; returns that folder."""
    out = world["root"] / name
    out.mkdir()
    return copy(world[run] / "final", out / "step-000001")


# ---- running a command ----------------------------------------------------------------------------------------
def refused(argv: list[str], file: str, marker: Path, capsys) -> str | None:
    """None if `leantune argv` exited 2 with one `error:` line naming `file`, no traceback, and no payload ran."""
    try:
        main(argv)
        code, trace = 0, ""
    except SystemExit as e:
        code, trace = e.code, ""
    except BaseException as e:  # noqa: BLE001 -- an escaped exception is the failure being looked for
        code, trace = "exception", f"{type(e).__name__}: {str(e)[:300]}"
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    ran = marker.exists()
    marker.unlink(missing_ok=True)
    if code == 2 and not trace and not ran and "Traceback" not in err and len(errors) == 1 and file in errors[0]:
        return None
    return (f"leantune {' '.join(argv)}\n  exit {code} {trace}\n  payload ran: {ran}\n  stderr: {err[-700:]!r}\n"
            f"  wanted one error naming {file}")


@pytest.fixture
def marker(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anything a command writes by mistake lands here
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "PAYLOAD-RAN"


def test_a_resumed_checkpoint_never_runs_its_training_state(world, marker, capsys):
    ckpt = checkpoint_copy(world, "run", "state-payload")
    torch.save({"format": 2, "step": Payload(marker)}, ckpt / STATE_FILE)
    cases = [
        ([*world["finetune"], "--out_dir", str(ckpt.parent), "--resume", str(ckpt)], STATE_FILE),
        ([*world["finetune"], "--out_dir", str(ckpt.parent), "--resume", "auto"], STATE_FILE),
        # without --resume the folder is described (its step count read) before it is refused: nothing runs either
        ([*world["finetune"], "--out_dir", str(ckpt.parent)], ckpt.parent.name),
    ]
    failures = [f for argv, name in cases if (f := refused(argv, name, marker, capsys))]
    assert not failures, "\n".join(failures)


def test_a_training_state_of_another_shape_is_one_error(world, marker, capsys):
    """A weights-only-clean file that is not leantune's state dict (a list of tensors) gave a TypeError trace."""
    ckpt = checkpoint_copy(world, "run", "state-list")
    torch.save([torch.zeros(2)], ckpt / STATE_FILE)
    failure = refused([*world["finetune"], "--out_dir", str(ckpt.parent), "--resume", str(ckpt)], STATE_FILE, marker,
                      capsys)
    assert failure is None, failure


def test_a_sharded_checkpoint_never_runs_its_metadata(world, marker, capsys):
    """torch's FileSystemReader reads dcp/.metadata with plain pickle.load: this ran the payload before."""
    ckpt = checkpoint_copy(world, "sharded", "metadata-payload")
    with open(ckpt / DCP_DIR / ".metadata", "wb") as f:
        pickle.dump(Payload(marker), f)
    failure = refused([*world["finetune"], "--out_dir", str(ckpt.parent), "--resume", str(ckpt)], ".metadata",
                      marker, capsys)
    assert failure is None, failure


def plant_in_shard(ckpt: Path, item: str, payload: object) -> str:
    """Append `payload` (torch.save) to the checkpoint's shard and point the first `item` entry ('bytes': an
    optimizer hyperparameter, 'tensor': a weight) at it, rewriting .metadata as torch wrote it. Returns the shard."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

    folder = ckpt / DCP_DIR
    with open(folder / ".metadata", "rb") as f:
        md = pickle.load(f)  # noqa: S301 -- the test's own, freshly written checkpoint
    kind = BytesStorageMetadata if item == "bytes" else TensorStorageMetadata
    fqn = next(k for k, v in md.state_dict_metadata.items() if isinstance(v, kind))
    shard = next(folder.glob("*.distcp"))
    buf = io.BytesIO()
    torch.save(payload, buf)
    offset = shard.stat().st_size
    with open(shard, "ab") as f:
        f.write(buf.getvalue())
    for index, info in list(md.storage_data.items()):
        if index.fqn == fqn:
            md.storage_data[index] = dataclasses.replace(info, offset=offset, length=len(buf.getvalue()))
    with open(folder / ".metadata", "wb") as f:
        pickle.dump(md, f)
    return shard.name


@pytest.mark.parametrize("item", ["bytes", "tensor"])
def test_a_sharded_checkpoint_never_runs_its_shard_items(world, marker, capsys, item):
    """DCP's DefaultLoadPlanner.load_bytes reads a shard's non-tensor items with torch.load(weights_only=False):
    the payload ran before; a tensor item was refused by weights_only but as a multi-line trace."""
    ckpt = checkpoint_copy(world, "sharded", f"shard-{item}-payload")
    shard = plant_in_shard(ckpt, item, Payload(marker))
    failure = refused([*world["finetune"], "--out_dir", str(ckpt.parent), "--resume", str(ckpt)], shard, marker,
                      capsys)
    assert failure is None, failure


def test_sharded_metadata_pointing_outside_its_folder_is_refused(world, marker, capsys, tmp_path):
    ckpt = checkpoint_copy(world, "sharded", "metadata-escape")
    folder = ckpt / DCP_DIR
    with open(folder / ".metadata", "rb") as f:
        md = pickle.load(f)  # noqa: S301 -- the test's own, freshly written checkpoint
    md.storage_data = {k: dataclasses.replace(v, relative_path="../../elsewhere.distcp")
                       for k, v in md.storage_data.items()}
    with open(folder / ".metadata", "wb") as f:
        pickle.dump(md, f)
    failure = refused([*world["finetune"], "--out_dir", str(ckpt.parent), "--resume", str(ckpt)], ".metadata",
                      marker, capsys)
    assert failure is None, failure


def test_a_sharded_checkpoint_missing_a_tensor_is_one_error(world, marker, capsys):
    """DCP's own refusals (a key the run needs is not in the checkpoint) came out as a CheckpointException, a
    BaseException the CLI printed as a trace."""
    ckpt = checkpoint_copy(world, "sharded", "metadata-missing-key")
    with open(ckpt / DCP_DIR / ".metadata", "rb") as f:
        md = pickle.load(f)  # noqa: S301 -- the test's own, freshly written checkpoint
    md.state_dict_metadata.pop(next(k for k in md.state_dict_metadata if k.startswith("model.")))
    with open(ckpt / DCP_DIR / ".metadata", "wb") as f:
        pickle.dump(md, f)
    failure = refused([*world["finetune"], "--out_dir", str(ckpt.parent), "--resume", str(ckpt)], DCP_DIR, marker,
                      capsys)
    assert failure is None, failure


def test_an_untouched_sharded_checkpoint_still_resumes_in_one_process(world, marker, capsys):
    """The guard refuses payloads, not DCP: the one-rank FSDP checkpoint resumes in a plain process and runs on."""
    ckpt = checkpoint_copy(world, "sharded", "sharded-clean")
    main_quiet([*world["finetune"], "--train.max_steps", "2", "--out_dir", str(ckpt.parent), "--resume", str(ckpt)])
    capsys.readouterr()
    assert (ckpt.parent / "final" / "adapter.safetensors").is_file() and not marker.exists()
    assert json.loads((ckpt.parent / "final" / "leantune.json").read_text())["method"] == "lora"


def test_a_model_folder_with_a_pickled_bin_never_runs_it(world, marker, capsys):
    """An HF folder with pytorch_model.bin only (no safetensors): every command that loads a base refuses it."""
    model = copy(world["tiny"], world["root"] / "bin-model")
    for f in model.glob("*.safetensors*"):
        f.unlink()
    torch_payload(model / "pytorch_model.bin", marker)
    out = world["root"] / "bin-model-out"
    cases = [
        ["generate", "--checkpoint_dir", str(model), "--max_new_tokens", "2"],
        ["evaluate", "--checkpoint_dir", str(model), *world["data"], "--max_batches", "1", "--exact_match", "false"],
        ["merge", "--checkpoint_dir", str(model), "--adapter", str(world["adapter"]), "--out_dir", str(out / "m")],
        ["export", "--checkpoint_dir", str(model), "--adapter", str(world["adapter"]), "--out_dir", str(out / "e")],
        ["finetune", "lora", "--checkpoint_dir", str(model), *world["data"], *world["steps"], "--out_dir",
         str(out / "f")],
    ]
    failures = [f for argv in cases if (f := refused(argv, "pytorch_model.bin", marker, capsys))]
    assert not failures, f"{len(failures)} of {len(cases)}:\n" + "\n".join(failures)


def test_a_weight_index_naming_files_outside_the_folder_is_refused(world, marker, capsys):
    model = copy(world["tiny"], world["root"] / "escape-index-model")
    for f in model.glob("*.safetensors*"):
        f.unlink()
    torch_payload(world["root"] / "outside.bin", marker)
    (model / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"w": "../outside.bin"}}))
    failure = refused(["generate", "--checkpoint_dir", str(model), "--max_new_tokens", "2"],
                      "pytorch_model.bin.index.json", marker, capsys)
    assert failure is None, failure


def test_a_peft_folder_with_a_pickled_bin_never_runs_it(world, marker, capsys):
    """An old PEFT folder (adapter_model.bin) is read with weights_only: a payload is one error, never run."""
    peft = copy(world["peft"], world["root"] / "bin-peft")
    (peft / "adapter_model.safetensors").unlink()
    torch_payload(peft / "adapter_model.bin", marker)
    tiny, out = str(world["tiny"]), world["root"] / "bin-peft-out"
    cases = [
        ["generate", "--checkpoint_dir", tiny, "--adapter", str(peft), "--max_new_tokens", "2"],
        ["evaluate", "--checkpoint_dir", tiny, "--adapter", str(peft), *world["data"], "--max_batches", "1",
         "--exact_match", "false"],
        ["merge", "--checkpoint_dir", tiny, "--adapter", str(peft), "--out_dir", str(out / "m")],
        ["export", "--checkpoint_dir", tiny, "--adapter", str(peft), "--out_dir", str(out / "e")],
        ["finetune", "lora", "--checkpoint_dir", tiny, *world["data"], *world["steps"], "--resume_adapter", str(peft),
         "--out_dir", str(out / "f")],
    ]
    failures = [f for argv in cases if (f := refused(argv, "adapter_model.bin", marker, capsys))]
    assert not failures, f"{len(failures)} of {len(cases)}:\n" + "\n".join(failures)


def test_pickles_no_command_reads_are_never_opened(world, marker, capsys):
    """Trainer leftovers and a .bin beside safetensors sit in the folders; generate and merge work and run none."""
    model = copy(world["tiny"], world["root"] / "planted-model")
    adapter = copy(world["adapter"], world["root"] / "planted-adapter")
    for folder, names in ((model, ("pytorch_model.bin", "training_args.bin", "optimizer.pt", "scheduler.pt",
                                   "rng_state.pth", "consolidated.00.pth")),
                          (adapter, ("adapter_model.bin", "training_args.bin", "optimizer.pt", STATE_FILE))):
        for name in names:
            torch_payload(folder / name, marker)
    for argv in (["generate", "--checkpoint_dir", str(model), "--adapter", str(adapter), "--max_new_tokens", "2"],
                 ["merge", "--checkpoint_dir", str(model), "--adapter", str(adapter), "--out_dir",
                  str(world["root"] / "planted-merged")]):
        main_quiet(argv)
        assert not marker.exists(), argv
    capsys.readouterr()


def test_serve_answers_400_for_a_peft_folder_with_a_pickled_bin(world, marker):
    """POST /v1/adapters on such a folder answered 500 (UnpicklingError); now 400 naming the file."""
    from serve_support import LoopbackServer

    from leantune.inference import load_for_inference
    from leantune.serve.app import ServeSettings, create_app
    from leantune.serve.engine import Engine

    peft = copy(world["peft"], world["root"] / "serve-bin-peft")
    (peft / "adapter_model.safetensors").unlink()
    torch_payload(peft / "adapter_model.bin", marker)
    model, tokenizer, _, _ = load_for_inference(world["tiny"], "32-true")
    settings = ServeSettings(allow_adapter_loading=True)
    server = LoopbackServer(create_app(Engine(model, tokenizer, world["tiny"], "tiny"), settings))
    try:
        r = httpx.post(server.url + "/v1/adapters", json={"name": "x", "path": str(peft)}, timeout=60)
    finally:
        server.close()
    assert r.status_code == 400, r.text
    assert "adapter_model.bin" in r.json()["error"]["message"] and not marker.exists()


@pytest.mark.parametrize("zip_format", [True, False])
def test_plain_bin_weights_still_load(world, tmp_path, zip_format):
    """The guard refuses payloads, not .bin files: plain tensors (torch's zip format, mmap-ed, or the older bare
    pickle, which the previous always-mmap read refused as damaged) load equal to the safetensors weights."""
    from safetensors.torch import load_file

    from leantune.checkpoint.hf import load_hf_checkpoint
    from leantune.checkpoint.peft_dir import peft_weights

    model = copy(world["tiny"], tmp_path / "bin-model")
    sd = load_file(model / "model.safetensors")
    for f in model.glob("*.safetensors*"):
        f.unlink()
    torch.save(sd, model / "pytorch_model.bin", _use_new_zipfile_serialization=zip_format)
    a = load_hf_checkpoint(world["tiny"], dtype=torch.float32).state_dict()
    b = load_hf_checkpoint(model, dtype=torch.float32).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    peft = copy(world["peft"], tmp_path / "bin-peft")
    tensors = load_file(peft / "adapter_model.safetensors")
    (peft / "adapter_model.safetensors").unlink()
    torch.save(tensors, peft / "adapter_model.bin", _use_new_zipfile_serialization=zip_format)
    loaded = peft_weights(peft)
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], tensors[k]) for k in tensors)


# ---- the readers themselves ----------------------------------------------------------------------------------
def test_load_torch_file_names_the_file_and_the_fix(tmp_path):
    marker = tmp_path / "ran"
    with pytest.raises(UntrustedFileError, match=r"evil\.pt: holds a pickle that is not plain tensors \(it names "
                                                 r"io\.open\).*convert it to safetensors"):
        load_torch_file(torch_payload(tmp_path / "evil.pt", marker))
    garbage = tmp_path / "garbage.bin"
    garbage.write_text("hello, not a torch file")
    with pytest.raises(ValueError, match=r"garbage\.bin: .*damaged") as e:
        load_torch_file(garbage)
    assert not isinstance(e.value, UntrustedFileError) and not marker.exists()
    with pytest.raises(FileNotFoundError):
        load_torch_file(tmp_path / "missing.pt")


@pytest.mark.parametrize("module, name", [("builtins", "eval"), ("os", "system"), ("torch", "load"),
                                          ("pathlib", "Path.write_text"), ("torch", "onnx")])
def test_the_metadata_unpickler_refuses_every_other_global(tmp_path, module, name):
    """A pickle naming any callable outside the allowed metadata classes is refused before anything is called."""
    blob = (b"\x80\x04\x8c" + bytes([len(module)]) + module.encode() + b"\x8c" + bytes([len(name)]) + name.encode()
            + b"\x93\x8c\x01x\x85R.")  # STACK_GLOBAL module name, then call it with ("x",)
    (tmp_path / ".metadata").write_bytes(blob)
    with pytest.raises(UntrustedFileError, match=f"it names {module}.{name}"):
        load_dcp_metadata(tmp_path / ".metadata")
