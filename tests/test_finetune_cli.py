"""End to end through the commands on a tiny model with the real default tokenizer: finetune (every method),
resume, generate with --adapter, merge into a folder transformers loads, estimate."""

import json
import math

import pytest
import torch
import transformers as tf
from method_cases import EVERY_METHOD, tiny_args

from leantune.cli import main
from leantune.data import JSON
from leantune.finetune import finetune
from leantune.train.args import EvalArgs, TrainArgs
from leantune.train.optim import OptimizerArgs


def small_run(method, ckpt, data_path, out_dir, quantize=None, precision=None, **train):
    return finetune(method, checkpoint_dir=ckpt, out_dir=out_dir, data=JSON(json_path=data_path), quantize=quantize,
                    precision=precision,
                    train=TrainArgs(micro_batch_size=2, global_batch_size=4, max_steps=3, max_seq_length=128,
                                    warmup_steps=1, **train),
                    eval=EvalArgs(max_batches=2, sample_new_tokens=0), optimizer=OptimizerArgs(lr=1e-2), threads=2,
                    method_args=tiny_args(method))


@pytest.mark.parametrize("method", EVERY_METHOD)
def test_every_method_trains_through_the_one_loop(method, tiny_checkpoint, json_data, tmp_path):
    report = small_run(method, tiny_checkpoint, json_data, tmp_path / method)
    final = tmp_path / method / "final"
    manifest = json.loads((final / "leantune.json").read_text())
    assert manifest["method"] == method and manifest["prompt_style"] == "template"
    assert manifest["special_tokens"]["eos_ids"] == [2]
    assert (final / ("model/config.json" if method == "full" else "adapter.safetensors")).is_file()
    assert report["steps"] == 3 and report["trainable_params"] > 0
    assert (tmp_path / method / "loss.png").is_file() and (tmp_path / method / "metrics.csv").is_file()


def test_resume_auto_continues_from_latest_step(tiny_checkpoint, json_data, tmp_path):
    small_run("lora", tiny_checkpoint, json_data, tmp_path, save_interval=2)
    assert (tmp_path / "step-000002" / "training_state.pt").is_file()
    report = finetune("lora", checkpoint_dir=tiny_checkpoint, out_dir=tmp_path, data=JSON(json_path=json_data),
                      train=TrainArgs(micro_batch_size=2, global_batch_size=4, max_steps=5, max_seq_length=128),
                      eval=EvalArgs(max_batches=1, sample_new_tokens=0), optimizer=OptimizerArgs(lr=1e-2),
                      method_args=tiny_args("lora"), resume="auto")
    assert report["steps"] == 5


def test_generate_with_adapter_and_merge_cli(tiny_checkpoint, json_data, tmp_path, capsys):
    small_run("lora", tiny_checkpoint, json_data, tmp_path / "run")
    adapter = tmp_path / "run" / "final"
    main(["generate", "--checkpoint_dir", str(tiny_checkpoint), "--adapter", str(adapter), "--prompt", "Add 2 and 3.",
          "--max_new_tokens", "5", "--temperature", "0"])
    assert "tokens/s" in capsys.readouterr().err
    main(["merge", "--adapter", str(adapter), "--checkpoint_dir", str(tiny_checkpoint), "--out_dir",
          str(tmp_path / "merged")])
    from leantune.checkpoint.hf import iter_hf_tensors

    written = json.loads((tmp_path / "merged" / "config.json").read_text())
    base_cfg = json.loads((tiny_checkpoint / "config.json").read_text())
    declared = written.get("torch_dtype") or written.get("dtype")
    assert declared == (base_cfg.get("torch_dtype") or base_cfg.get("dtype") or "float32")
    assert {str(t.dtype) for _, t in iter_hf_tensors(tmp_path / "merged")} == {f"torch.{declared}"}
    merged = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    from leantune.inference import load_for_inference

    ours, _, _, _ = load_for_inference(tiny_checkpoint, adapter=adapter)
    idx = torch.randint(0, 49152, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(merged(idx).logits, ours(idx), atol=1e-5, rtol=1e-5)


def test_cli_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--checkpoint_dir", str(tmp_path / "missing")])
    assert e.value.code == 2
    assert "no config.json" in capsys.readouterr().err


def test_estimate_reproduces_seed_counts(capsys):
    from leantune.commands.estimate import estimate_command

    r = estimate_command(model="tiiuae/falcon-7b", method="adapter_v2")
    assert r["trainable_params"] == 3_839_186
    r = estimate_command(model="tiiuae/falcon-7b", method="adapter")
    assert r["trainable_params"] == 1_365_330
    main(["estimate", "--model", "meta-llama/Llama-2-7b-hf", "--method", "lora", "--lora.targets", "all"])
    assert "20,277,248" in capsys.readouterr().out


@pytest.mark.parametrize("fmt", ["leantune", "peft"])
def test_resume_adapter_starts_from_an_existing_lora(fmt, tiny_checkpoint, json_data, tmp_path):
    from leantune.commands.export import export as export_command
    from leantune.peft.lora import LoRAArgs

    first = finetune("lora", checkpoint_dir=tiny_checkpoint, out_dir=tmp_path / "a", data=JSON(json_path=json_data),
                     train=TrainArgs(micro_batch_size=2, global_batch_size=4, max_steps=2, max_seq_length=128),
                     eval=EvalArgs(max_batches=1, sample_new_tokens=0), optimizer=OptimizerArgs(lr=1e-2),
                     method_args=LoRAArgs(r=4, targets=["query", "value", "mlp"]))
    start = tmp_path / "a" / "final"
    if fmt == "peft":
        start = export_command(adapter=start, checkpoint_dir=tiny_checkpoint, format="peft", out_dir=tmp_path / "p")
    second = finetune("lora", checkpoint_dir=tiny_checkpoint, out_dir=tmp_path / "b", data=JSON(json_path=json_data),
                      train=TrainArgs(micro_batch_size=2, global_batch_size=4, max_steps=1, max_seq_length=128),
                      eval=EvalArgs(max_batches=1, sample_new_tokens=0), optimizer=OptimizerArgs(lr=1e-9),
                      resume_adapter=start)
    assert second["trainable_params"] == first["trainable_params"]
    manifest = json.loads((tmp_path / "b" / "final" / "leantune.json").read_text())
    assert manifest["method_args"]["targets"] == ["query", "value", "mlp"] and manifest["method_args"]["r"] == 4
    # a near-zero learning rate keeps the loaded LoRA: validation loss continues from where the first run ended
    assert second["val_loss"] == pytest.approx(first["val_loss"], abs=1e-4)


def test_merge_keeps_the_base_dtype(tiny_checkpoint, json_data, tmp_path):
    """A bfloat16 base merges into bfloat16 weights, and config.json says so (no fp32 file labelled bf16)."""
    from leantune.checkpoint.hf import iter_hf_tensors
    from leantune.commands.merge import merge as merge_command

    small_run("lora", tiny_checkpoint, json_data, tmp_path / "run")
    bf16_base = tmp_path / "bf16-base"
    tf.AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.bfloat16).save_pretrained(bf16_base)
    merge_command(adapter=tmp_path / "run" / "final", checkpoint_dir=bf16_base, out_dir=tmp_path / "merged")
    written = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert (written.get("torch_dtype") or written.get("dtype")) == "bfloat16"
    assert {t.dtype for _, t in iter_hf_tensors(tmp_path / "merged")} == {torch.bfloat16}


def test_qlora_trains_generates_and_merges_into_the_dequantized_base(tiny_checkpoint, json_data, tmp_path, capsys):
    from leantune.commands.merge import merge as merge_command
    from leantune.inference import load_for_inference

    # fp32 compute (the CPU default may be bf16-mixed): merge dequantizes into the dtype training computed in, and
    # inference below computes in fp32
    report = small_run("qlora", tiny_checkpoint, json_data, tmp_path / "run", precision="32-true")
    adapter = tmp_path / "run" / "final"
    manifest = json.loads((adapter / "leantune.json").read_text())
    assert manifest["method"] == "qlora" and manifest["quantize"] == "bnb.nf4-dq"
    assert report["total_params"] == sum(p.numel() for p in tf.AutoModelForCausalLM.from_pretrained(
        tiny_checkpoint).parameters()) + report["trainable_params"]  # logical count, not packed bytes
    main(["generate", "--checkpoint_dir", str(tiny_checkpoint), "--adapter", str(adapter), "--quantize",
          "bnb.nf4-dq", "--prompt", "Add 2 and 3.", "--max_new_tokens", "4", "--temperature", "0"])
    assert "tokens/s" in capsys.readouterr().err

    ours, _, _, _ = load_for_inference(tiny_checkpoint, adapter=adapter, quantize="bnb.nf4-dq")
    merge_command(adapter=adapter, checkpoint_dir=tiny_checkpoint, out_dir=tmp_path / "merged")
    merge_command(adapter=adapter, checkpoint_dir=tiny_checkpoint, out_dir=tmp_path / "merged-orig",
                  dequantize_base=False)
    idx = torch.randint(0, 49152, (1, 12))
    with torch.no_grad():
        expected = ours(idx)
        merged = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()(idx).logits
        orig = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "merged-orig", dtype=torch.float32).eval()(idx).logits
    torch.testing.assert_close(merged, expected, atol=1e-5, rtol=1e-5)
    assert (orig - expected).abs().max() > 1e-3  # the original weights are not what the adapter was trained on
    with pytest.warns(UserWarning, match="full precision"):
        load_for_inference(tiny_checkpoint, adapter=adapter)
    import warnings

    from leantune.commands.export import export as export_command

    with warnings.catch_warnings():  # exporting the LoRA tensors alone does not involve the base's quantization
        warnings.simplefilter("error", UserWarning)
        peft_dir = export_command(adapter=adapter, checkpoint_dir=tiny_checkpoint, format="peft",
                                  out_dir=tmp_path / "peft")
    assert (peft_dir / "adapter_model.safetensors").is_file()


def test_adapter_v2_trains_on_an_int8_base(tiny_checkpoint, json_data, tmp_path):
    report = small_run("adapter_v2", tiny_checkpoint, json_data, tmp_path / "run", quantize="bnb.int8")
    assert report["steps"] == 3 and math.isfinite(report["val_loss"])
    assert json.loads((tmp_path / "run" / "final" / "leantune.json").read_text())["quantize"] == "bnb.int8"


def test_quantize_with_full_finetuning_is_refused(tiny_checkpoint, json_data, tmp_path):
    with pytest.raises(ValueError, match="cannot be combined with full"):
        small_run("full", tiny_checkpoint, json_data, tmp_path, quantize="bnb.nf4")
    with pytest.raises(ValueError, match="is not one of"):
        small_run("lora", tiny_checkpoint, json_data, tmp_path, quantize="nf4")


def test_evaluate_reproduces_the_validation_loss_of_training(tiny_checkpoint, json_data, tmp_path):
    from leantune.commands.evaluate import evaluate as evaluate_command

    report = small_run("lora", tiny_checkpoint, json_data, tmp_path / "run", precision="32-true")  # evaluate: fp32
    main(["evaluate", "--checkpoint_dir", str(tiny_checkpoint), "--adapter", str(tmp_path / "run" / "final"),
          "--data", "JSON", "--data.json_path", str(json_data), "--batch_size", "2", "--max_seq_length", "128",
          "--max_batches", "2", "--out_file", str(tmp_path / "eval.json")])
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["val_loss"] == pytest.approx(report["val_loss"], abs=1e-5)
    base = evaluate_command(checkpoint_dir=tiny_checkpoint, data=JSON(json_path=json_data), batch_size=2,
                            max_seq_length=128, max_batches=2)
    assert base["val_loss"] != pytest.approx(result["val_loss"], abs=1e-3)  # the adapter made a difference
    quantized = evaluate_command(checkpoint_dir=tiny_checkpoint, data=JSON(json_path=json_data), batch_size=2,
                                 max_seq_length=128, max_batches=2, quantize="bnb.int8")
    assert quantized["val_loss"] == pytest.approx(base["val_loss"], rel=0.02) and quantized["quantize"] == "bnb.int8"


def test_exact_match_evaluation_can_be_switched_off(tiny_checkpoint, tmp_path):
    from leantune.data import Demo

    kw = dict(checkpoint_dir=tiny_checkpoint, data=Demo(num_train=16, num_val=4, num_test=4), threads=2,
              train=TrainArgs(micro_batch_size=2, global_batch_size=2, max_steps=1, max_seq_length=128))
    on = finetune("lora", out_dir=tmp_path / "on", eval=EvalArgs(max_batches=1, sample_new_tokens=0), **kw)
    off = finetune("lora", out_dir=tmp_path / "off", eval=EvalArgs(max_batches=1, sample_new_tokens=0,
                                                                     exact_match=False), **kw)
    assert "exact_match_before" in on and "exact_match_after" in on
    assert "exact_match_before" not in off and "exact_match_after" not in off


@pytest.mark.parametrize("quantize", ["int8", "int4", "bnb.nf4"])
def test_an_adapter_loads_onto_a_quantized_base(quantize, tiny_checkpoint, json_data, tmp_path, capsys):
    """The adapter's dry run on a storage-free copy of the base steps aside for packed weights (weight-only int8/int4,
    bitsandbytes), whose meta copies are plain integer tensors: `generate --quantize int4 --adapter` failed with
    'Only Tensors of floating point ... can require gradients'."""
    small_run("lora", tiny_checkpoint, json_data, tmp_path / "run")
    main(["generate", "--checkpoint_dir", str(tiny_checkpoint), "--adapter", str(tmp_path / "run" / "final"),
          "--quantize", quantize, "--prompt", "Add 2 and 3.", "--max_new_tokens", "3"])
    assert "tokens/s" in capsys.readouterr().err
