"""The issue-13 flow in CI: a tiny random T5 (tokenizer.json folder) finetuned with LoRA through `leantune finetune`
on a samsum-format fixture written here; the loss falls, a resumed run matches a straight one, ROUGE is computed
for the base and the adapter side by side, and `generate` decodes greedily, by sampling and by beam search."""

import csv
import json

import pytest
import torch
from t5_support import samsum_rows, tiny_t5_folder

from leantune.cli import main

STEPS = 24


@pytest.fixture(scope="module")
def flow(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("t5flow")
    rows = samsum_rows(40)
    model_dir = tiny_t5_folder(root / "t5", rows)
    data = root / "samsum.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, model_dir, data


def finetune(model_dir, data, out, *extra):
    main(["finetune", "lora", "--checkpoint_dir", str(model_dir), "--data", "Summarization",
          "--data.json_path", str(data), "--data.val_split_fraction", "0.1", "--out_dir", str(out),
          "--precision", "32-true", "--train.global_batch_size", "4", "--train.micro_batch_size", "2",
          "--train.max_seq_length", "128", "--optimizer.lr", "0.02", "--lora.r", "8", "--lora.dropout", "0",
          "--eval.interval", "1000", *extra])
    return json.loads((out / "summary.json").read_text())


def losses(out) -> list[float]:
    with open(out / "metrics.csv") as fh:
        return [float(r["loss"]) for r in csv.DictReader(fh) if r["loss"]]


def test_lora_finetune_loss_falls_and_rouge_before_after(flow, capsys):
    root, model_dir, data = flow
    out = root / "run"
    summary = finetune(model_dir, data, out, "--train.max_steps", str(STEPS))
    curve = losses(out)
    assert len(curve) == STEPS and summary["steps"] == STEPS
    assert sum(curve[-4:]) / 4 < 0.75 * sum(curve[:4]) / 4, curve  # it learns the pattern
    assert summary["trainable_params"] == 8 * (32 + 32) * 2 * (2 + 3 * 2)  # r (in + out) x (q, v) x 8 attentions
    manifest = json.loads((out / "final" / "leantune.json").read_text())
    assert manifest["base_architecture"]["model_type"] == "t5"

    report = root / "rouge.json"
    main(["evaluate", "--checkpoint_dir", str(model_dir), "--adapter", str(out / "final"), "--data", "Summarization",
          "--data.json_path", str(data), "--data.val_split_fraction", "0.1", "--metric", "rouge,loss",
          "--compare_base", "true", "--max_new_tokens", "16", "--precision", "32-true", "--out_file", str(report)])
    result = json.loads(report.read_text())
    for side in (result["base"], result):
        assert set(side["rouge"]) == {"rouge1", "rouge2", "rougeL", "rougeLsum"}
        assert side["rouge_samples"] == 4
    assert result["val_loss"] < result["base"]["val_loss"] - 1.0  # the adapter's validation loss is far lower
    assert result["rouge"]["rouge1"] >= result["base"]["rouge"]["rouge1"]
    assert "| rouge1 |" in capsys.readouterr().out


def test_resume_matches_straight_run(flow):
    root, model_dir, data = flow
    straight = finetune(model_dir, data, root / "straight", "--train.max_steps", "6")
    finetune(model_dir, data, root / "halves", "--train.max_steps", "6", "--train.save_interval", "3")
    resumed = finetune(model_dir, data, root / "halves", "--train.max_steps", "6", "--resume",
                       str(root / "halves" / "step-000003"))
    assert resumed["final_loss"] == straight["final_loss"]
    assert resumed["val_loss"] == straight["val_loss"]


@pytest.mark.parametrize("extra", [[], ["--temperature", "0.8", "--top_k", "5"],
                                   ["--num_beams", "3", "--length_penalty", "0.6"]])
def test_generate_with_adapter(flow, extra):
    root, model_dir, data = flow
    adapter = root / "gen"
    if not (adapter / "final").is_dir():
        finetune(model_dir, data, adapter, "--train.max_steps", "2")
    prompt = "Summarize the following conversation.\n\nTom: I baked bread.\nAnna: Nice!\n\nSummary: "
    main(["generate", "--checkpoint_dir", str(model_dir), "--adapter", str(adapter / "final"), "--prompt", prompt,
          "--max_new_tokens", "6", "--precision", "32-true", *extra])


def test_export_peft_and_merge_through_the_cli(flow):
    """The trained T5 adapter leaves the tool both ways: `export --format peft` loads in peft on
    T5ForConditionalGeneration, and `merge` writes a folder transformers loads, each equal to the unmerged adapter;
    GGUF is refused with a clear message."""
    import peft
    import transformers as tf

    from leantune.checkpoint.t5_hf import load_t5_checkpoint
    from leantune.methods import load_any_adapter

    root, model_dir, data = flow
    out = root / "short"
    finetune(model_dir, data, out, "--train.max_steps", "3")
    main(["export", "--checkpoint_dir", str(model_dir), "--adapter", str(out / "final"), "--format", "peft",
          "--out_dir", str(root / "peft")])
    main(["merge", "--checkpoint_dir", str(model_dir), "--adapter", str(out / "final"), "--out_dir",
          str(root / "merged")])
    ours = load_t5_checkpoint(model_dir)
    load_any_adapter(ours, out / "final")
    ids = torch.randint(3, 90, (2, 10))
    dec = torch.randint(3, 90, (2, 5))
    with torch.no_grad():
        want = ours.eval()(ids, dec)
        base = tf.T5ForConditionalGeneration.from_pretrained(model_dir)
        got = peft.PeftModel.from_pretrained(base, root / "peft").eval()(input_ids=ids, decoder_input_ids=dec).logits
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        merged = tf.T5ForConditionalGeneration.from_pretrained(root / "merged").eval()
        torch.testing.assert_close(merged(input_ids=ids, decoder_input_ids=dec).logits, want, atol=1e-4, rtol=0)
    with pytest.raises(SystemExit):
        main(["export", "--checkpoint_dir", str(model_dir), "--adapter", str(out / "final"), "--format", "gguf",
              "--out_dir", str(root / "gguf")])


def test_full_finetune_writes_a_folder_transformers_loads(flow):
    """`finetune full` on T5 trains every weight through the same loop; its checkpoint is an HF T5 folder."""
    import transformers as tf

    root, model_dir, data = flow
    out = root / "full"
    main(["finetune", "full", "--checkpoint_dir", str(model_dir), "--data", "Summarization", "--data.json_path",
          str(data), "--data.val_split_fraction", "0.1", "--out_dir", str(out), "--precision", "32-true",
          "--train.global_batch_size", "4", "--train.micro_batch_size", "2", "--train.max_seq_length", "128",
          "--train.max_steps", "3", "--optimizer.lr", "1e-3", "--eval.interval", "1000"])
    trained = tf.T5ForConditionalGeneration.from_pretrained(out / "final" / "model")
    base = tf.T5ForConditionalGeneration.from_pretrained(model_dir)
    changed = [n for (n, p), (_, q) in zip(trained.named_parameters(), base.named_parameters()) if not torch.equal(p, q)]
    assert len(changed) == len(list(base.named_parameters()))  # every tensor moved
