"""--train.max_seq_length against the model's context: refused in one line above it (before any weight loads), the
default 512 capped with one warning on a model built for fewer positions; T5's context is config.json's n_positions."""

from __future__ import annotations

import json
import warnings

import pytest
from t5_support import samsum_rows, tiny_t5_folder

import leantune.finetune
from leantune.cli import main
from leantune.train.args import fit_max_seq_length

CONTEXT = 256  # conftest's tiny_checkpoint: max_position_embeddings 256


@pytest.fixture
def no_weights(monkeypatch):
    """Fail the test if finetune gets as far as loading weights (the refusal must come from config.json first)."""
    def load_model(*args, **kwargs):
        raise AssertionError("the model's weights were loaded before --train.max_seq_length was checked")

    monkeypatch.setattr(leantune.finetune, "load_model", load_model)


def finetune_args(checkpoint, data, out, *extra) -> list[str]:
    return ["finetune", "lora", "--checkpoint_dir", str(checkpoint), "--data", "JSON", "--data.json_path", str(data),
            "--out_dir", str(out), "--train.max_steps", "1", "--train.micro_batch_size", "2",
            "--train.global_batch_size", "2", "--eval.max_batches", "1", "--eval.sample_new_tokens", "0",
            "--eval.exact_match", "false", "--lora.r", "2", "--threads", "1", *extra]


def refusal(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: ")
    return err


def test_a_decoder_refuses_a_length_past_its_context(tiny_checkpoint, json_data, tmp_path, capsys, no_weights):
    err = refusal(finetune_args(tiny_checkpoint, json_data, tmp_path / "out", "--train.max_seq_length", "100000"),
                  capsys)
    assert "--train.max_seq_length 100000" in err and f"{CONTEXT}-token context" in err
    assert f"{tiny_checkpoint}/config.json" in err and f"--train.max_seq_length {CONTEXT} or less" in err


def test_the_context_itself_is_accepted_and_one_more_is_not(tiny_checkpoint):
    assert fit_max_seq_length(CONTEXT, tiny_checkpoint) == CONTEXT
    assert fit_max_seq_length(7, tiny_checkpoint) == 7
    with pytest.raises(ValueError, match=f"--train.max_seq_length {CONTEXT + 1} is more than"):
        fit_max_seq_length(CONTEXT + 1, tiny_checkpoint)


def test_the_default_is_capped_to_the_context_with_one_warning(tiny_checkpoint, json_data, tmp_path):
    """A run that never names the flag (default 512) still trains on a 256-position model, at 256, and says so."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(finetune_args(tiny_checkpoint, json_data, tmp_path / "out"))
    said = [str(w.message) for w in caught if "--train.max_seq_length" in str(w.message)]
    assert said == [f"--train.max_seq_length defaults to 512, more than the {CONTEXT}-token context "
                    f"{tiny_checkpoint}/config.json gives the model: training with {CONTEXT}"]
    manifest = json.loads((tmp_path / "out" / "final" / "leantune.json").read_text())
    assert manifest["max_seq_length"] == CONTEXT


@pytest.fixture(scope="module")
def t5_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("t5ctx")
    folder = tiny_t5_folder(root / "t5", samsum_rows())
    data = root / "samsum.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in samsum_rows(8)))
    return folder, data


def with_n_positions(folder, n):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.pop("n_positions", None)
    if n is not None:
        cfg["n_positions"] = n
    (folder / "config.json").write_text(json.dumps(cfg))


def test_t5_context_is_n_positions(t5_folder, tmp_path, capsys, no_weights):
    folder, data = t5_folder
    with_n_positions(folder, 64)
    try:
        argv = finetune_args(folder, data, tmp_path / "out", "--train.max_seq_length", "100")
        argv[argv.index("JSON")] = "Summarization"
        err = refusal(argv, capsys)
        assert "--train.max_seq_length 100 is more than the 64-token context" in err
        assert fit_max_seq_length(64, folder) == 64
    finally:
        with_n_positions(folder, None)
    assert fit_max_seq_length(100_000, folder) == 100_000  # no n_positions: relative positions set no limit
