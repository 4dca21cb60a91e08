"""`leantune upload` against a local stand-in for the Hub (tests/hub_support.py, 127.0.0.1): a finetuned adapter
goes up in PEFT's format and a merged model as an HF folder, each with a model card from the run's records; the token
travels only as a Bearer header, never into a file or the output. No network."""

import json
from pathlib import Path

import pytest
import torch
from hub_support import FakeHub

from leantune.cli import main

BASE_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def run_dir(tiny_checkpoint, tmp_path_factory) -> Path:
    """A real 2-step LoRA run on the tiny Llama (run.json, summary.json, final/ beside each other)."""
    out = tmp_path_factory.mktemp("runs") / "lora"
    main(["finetune", "lora", "--checkpoint_dir", str(tiny_checkpoint), "--out_dir", str(out), "--train.max_steps",
          "2", "--threads", "1", "--eval.sample_new_tokens", "0", "--eval.exact_match", "false", "--lora.r", "4"])
    return out


@pytest.fixture
def hub(monkeypatch, tmp_path):
    with FakeHub() as hub:
        monkeypatch.setenv("HF_TOKEN", hub.token)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # no saved login of this machine
        yield hub


def assert_token_never_leaked(hub: FakeHub, texts: list[str], roots: list[Path]) -> None:
    posts = [r for r in hub.requests if r["method"] == "POST"]
    assert posts and all(r["headers"].get("authorization") == f"Bearer {hub.token}" for r in posts)
    for repo in hub.repos.values():
        assert all(hub.token.encode() not in data for data in repo["files"].values())
    assert all(hub.token not in t for t in texts)
    for root in roots:
        for f in root.rglob("*"):
            if f.is_file():
                assert hub.token.encode() not in f.read_bytes(), f


def test_adapter_goes_up_in_peft_format_with_a_model_card(run_dir, tiny_checkpoint, hub, capsys):
    main(["upload", str(run_dir / "final"), "--repo_id", "me/tiny-lora", "--endpoint", hub.url,
          "--base_model", BASE_ID, "--private", "true"])
    out, err = capsys.readouterr()
    repo = hub.repos["me/tiny-lora"]
    assert sorted(repo["files"]) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert repo["private"] and repo["commits"] == ["Upload peft adapter (lora)"]
    cfg = json.loads(repo["files"]["adapter_config.json"])
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["base_model_name_or_path"] == BASE_ID
    card = repo["files"]["README.md"].decode()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert card.startswith(f"---\nbase_model: {BASE_ID}\nlibrary_name: peft\n")
    assert hub.validated == [card]  # the client checked the card's front matter with the Hub first
    for fact in ("| lora.r | 4 |", "| train.max_steps | 2 |", "| optimizer.name | AdamW |", "`--data Demo`",
                 f"| validation loss | {summary['val_loss']:.4g} |", f"| optimizer steps | {summary['steps']} |",
                 'PeftModel.from_pretrained(base, "me/tiny-lora")'):
        assert fact in card, fact
    assert str(tiny_checkpoint) not in card and str(run_dir) not in card  # no local paths go public
    assert "uploaded: README.md, adapter_config.json, adapter_model.safetensors" in out
    assert_token_never_leaked(hub, [out, err], [run_dir])


def test_uploaded_adapter_loads_in_peft_with_our_logits(run_dir, tiny_checkpoint, hub, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from leantune.checkpoint.hf import load_hf_checkpoint
    from leantune.methods import load_any_adapter

    main(["upload", str(run_dir / "final"), "--repo_id", "me/tiny-lora", "--endpoint", hub.url])
    local = tmp_path / "downloaded"
    local.mkdir()
    for name, data in hub.repos["me/tiny-lora"]["files"].items():
        (local / name).write_bytes(data)
    ids = torch.tensor([[1, 5, 9, 200, 31]])
    hf = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_checkpoint), local).eval()
    ours = load_hf_checkpoint(tiny_checkpoint)
    load_any_adapter(ours, run_dir / "final")
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours.eval()(ids)[..., :hf.config.vocab_size], atol=1e-5, rtol=1e-4)


def test_merged_model_goes_up_as_an_hf_folder(run_dir, tiny_checkpoint, hub, tmp_path, capsys):
    merged = tmp_path / "merged"
    main(["export", "--adapter", str(run_dir / "final"), "--checkpoint_dir", str(tiny_checkpoint), "--format", "hf",
          "--out_dir", str(merged)])
    main(["upload", str(merged), "--repo_id", "me/tiny-merged", "--endpoint", hub.url, "--run_dir", str(run_dir),
          "--base_model", BASE_ID])
    out, err = capsys.readouterr()
    files = hub.repos["me/tiny-merged"]["files"]
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= set(files)
    assert not any(n.startswith(".") or n.endswith((".pt", "run.json")) for n in files)
    assert files["model.safetensors"] == next(merged.glob("*.safetensors")).read_bytes()
    card = files["README.md"].decode()
    assert "library_name: transformers" in card and "| method | lora |" in card and "| lora.r | 4 |" in card
    assert "| validation loss |" in card
    assert_token_never_leaked(hub, [out, err], [merged, run_dir])


def test_without_a_token_nothing_is_sent(run_dir, hub, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(SystemExit) as e:
        main(["upload", str(run_dir / "final"), "--repo_id", "me/x", "--endpoint", hub.url])
    assert e.value.code == 2 and "no Hugging Face token: set HF_TOKEN" in capsys.readouterr().err
    assert hub.requests == []


def test_a_refused_token_is_one_clear_error(run_dir, hub, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", "hf_wrong_token_value_123")
    with pytest.raises(SystemExit) as e:
        main(["upload", str(run_dir / "final"), "--repo_id", "me/x", "--endpoint", hub.url])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "HTTP 401" in err and "write token" in err
    assert "hf_wrong_token_value_123" not in err


def test_dry_run_prints_the_card_and_sends_nothing(run_dir, hub, capsys):
    main(["upload", str(run_dir / "final"), "--repo_id", "me/x", "--endpoint", hub.url, "--dry_run", "true"])
    out = capsys.readouterr().out
    assert "# x" in out and "would upload: README.md, adapter_config.json, adapter_model.safetensors" in out
    assert hub.requests == []


def test_a_folder_that_is_no_finetune_is_refused(tmp_path, hub, capsys):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(SystemExit):
        main(["upload", str(tmp_path), "--repo_id", "me/x", "--endpoint", hub.url])
    assert "not an adapter or model folder" in capsys.readouterr().err
