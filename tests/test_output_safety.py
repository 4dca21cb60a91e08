"""Nothing lost, nothing crossed (issue items 1, 4, 12): merge/export never replace a folder leantune did not write,
their defaults live outside the run folder, and an adapter that does not fit the base is refused before any write."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from leantune.checkpoint.hf import TOKENIZER_FILES
from leantune.cli import main
from leantune.data import JSON
from leantune.finetune import finetune
from leantune.train.args import EvalArgs, TrainArgs


@pytest.fixture(scope="module")
def lora_final(tiny_checkpoint, json_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "lora"
    finetune("lora", checkpoint_dir=tiny_checkpoint, out_dir=out, data=JSON(json_path=json_data),
             train=TrainArgs(micro_batch_size=2, global_batch_size=2, max_steps=1, max_seq_length=64),
             eval=EvalArgs(max_batches=1, sample_new_tokens=0, exact_match=False), threads=2)
    return out / "final"


def run(argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    return e.value.code, err


def test_merge_into_a_folder_with_other_files_is_refused(tiny_checkpoint, lora_final, tmp_path, capsys):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep")
    code, err = run(["merge", "--adapter", str(lora_final), "--checkpoint_dir", str(tiny_checkpoint),
                     "--out_dir", str(precious), "--overwrite", "true"], capsys)
    assert code == 2 and "notes.txt" in err and err.count("\n") == 1
    assert sorted(p.name for p in precious.iterdir()) == ["notes.txt"]  # untouched, even with --overwrite


def test_export_into_a_run_folder_is_refused(tiny_checkpoint, lora_final, capsys):
    run_dir = lora_final.parent
    before = sorted(p.name for p in run_dir.iterdir())
    for fmt in ("hf", "peft"):
        code, err = run(["export", "--adapter", str(lora_final), "--checkpoint_dir", str(tiny_checkpoint),
                         "--format", fmt, "--out_dir", str(run_dir)], capsys)
        assert code == 2 and "nothing was written" in err
    assert sorted(p.name for p in run_dir.iterdir()) == before


def test_merge_default_is_outside_the_run_and_replaced_only_on_request(tiny_checkpoint, lora_final, tmp_path,
                                                                      monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["merge", "--adapter", str(lora_final), "--checkpoint_dir", str(tiny_checkpoint)]
    main(argv)
    out = tmp_path / "out" / "merged" / f"{lora_final.parent.name}-final"
    assert (out / "config.json").is_file() and not (lora_final / "merged").exists()
    code, err = run(argv, capsys)
    assert code == 2 and "--overwrite" in err
    main([*argv, "--overwrite", "true"])
    assert (out / "model.safetensors").is_file()


@pytest.fixture(scope="module")
def wider_checkpoint(default_checkpoint, tmp_path_factory):
    """A random Llama of another size (3 layers, width 48) with the same tokenizer."""
    import transformers as tf

    path = tmp_path_factory.mktemp("wide") / "wide-llama"
    cfg = tf.LlamaConfig(vocab_size=49152, hidden_size=48, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    for name in TOKENIZER_FILES:
        if (default_checkpoint / name).is_file() and name != "generation_config.json":
            shutil.copy(default_checkpoint / name, path / name)
    return path


@pytest.mark.parametrize("command", ["merge", "generate", "export"])
def test_an_adapter_of_another_base_is_refused_by_name(command, wider_checkpoint, lora_final, tmp_path, capsys):
    argv = [command, "--adapter", str(lora_final), "--checkpoint_dir", str(wider_checkpoint)]
    if command in ("merge", "export"):
        argv += ["--out_dir", str(tmp_path / "x")]
    code, err = run(argv, capsys)
    assert code == 2 and "trained on a different base model" in err and "n_layer 2 vs 3" in err
    assert not (tmp_path / "x").exists()


def test_an_adapter_missing_tensors_is_refused(tiny_checkpoint, lora_final, tmp_path, capsys):
    from leantune.checkpoint.io import load_safetensors, save_safetensors

    broken = tmp_path / "broken"
    shutil.copytree(lora_final, broken)
    tensors = load_safetensors(broken / "adapter.safetensors")
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    save_safetensors(tensors, broken / "adapter.safetensors")
    manifest = json.loads((broken / "leantune.json").read_text())
    manifest.pop("base_architecture")  # an older manifest: only the tensor check can catch it
    (broken / "leantune.json").write_text(json.dumps(manifest))
    code, err = run(["generate", "--adapter", str(broken), "--checkpoint_dir", str(tiny_checkpoint)], capsys)
    assert code == 2 and "1 tensors missing" in err and dropped in err
    assert torch.is_tensor(tensors[sorted(tensors)[0]])
