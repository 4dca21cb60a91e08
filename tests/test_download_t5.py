"""`download google/flan-t5-base` through the same Hub code as the decoder models, against the local imitation of the
Hub in test_download: a flan-t5-like repo (tiny random T5 written by transformers, spiece.model + tokenizer.json,
the .bin / TF / Flax copies a real repo also holds) lands as a folder that `load_t5_checkpoint` and leantune's
Tokenizer load, equal to transformers; a T5 repo with only `spiece.model` is complete and reused too."""

import io
import json
import shutil

import pytest
import sentencepiece as spm
import torch
import transformers as tf
from t5_support import random_t5_hf
from test_download import SHA, hub  # noqa: F401  (the local Hub fixture)

from leantune.checkpoint.t5_hf import load_t5_checkpoint
from leantune.commands.download import download as download_command
from leantune.download import download, is_complete
from leantune.tokenizer import Tokenizer

REPO = "google/flan-t5-base"
TEXT = ["summarize: studies have shown that owning a dog is good for you", "translate English to German: That is good.",
        "Answer the question: what does the quick brown fox jump over?", "numbers 123 456 and café naïve"] * 20
SAMPLES = ["summarize: the dog is good <extra_id_0> for you", "translate English to German: café 123"]
EXTRA_IDS = 20  # 70 sentencepiece pieces + 20 sentinels = 90 ids, under the model's 96 (flan-t5: 32100 vs 32128)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """(the repo's files as the Hub serves them, transformers' model, transformers' tokenizer)."""
    root = tmp_path_factory.mktemp("flan")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXT), model_writer=model, vocab_size=70,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>",
                                   eos_piece="</s>", unk_piece="<unk>", character_coverage=1.0, minloglevel=2)
    src = root / "src"
    ref_model, _ = random_t5_hf("v1.1", src)
    (src / "spiece.model").write_bytes(model.getvalue())
    (src / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer", "extra_ids": EXTRA_IDS}))
    ref_tok = tf.T5Tokenizer.from_pretrained(src)
    ref_tok.save_pretrained(src)  # tokenizer.json + tokenizer_config.json next to spiece.model, as on the Hub
    files = {p.name: p.read_bytes() for p in src.iterdir()}
    hub_files = {"config.json", "generation_config.json", "model.safetensors", "spiece.model", "tokenizer.json"}
    assert hub_files <= files.keys()
    assert json.loads(files["config.json"])["model_type"] == "t5"
    files.update({"pytorch_model.bin": b"pickle!", "tf_model.h5": b"tf", "flax_model.msgpack": b"flax",
                  "README.md": b"# flan", ".gitattributes": b"*.safetensors filter=lfs"})
    return files, ref_model, ref_tok


def _fetched(log):
    return {p.split(f"/resolve/{SHA}/")[-1] for m, p, _ in log if m == "GET" and "/resolve/" in p}


def test_flan_t5_repo_downloads_and_loads(tmp_path, hub, repo, capsys):  # noqa: F811
    server, url = hub
    files, ref_model, ref_tok = repo
    server.repos[REPO] = files
    out = download(REPO, tmp_path / "checkpoints", endpoint=url)
    assert out == tmp_path / "checkpoints" / "google" / "flan-t5-base" and is_complete(out)
    want_files = {"config.json", "generation_config.json", "model.safetensors", "spiece.model", "tokenizer.json",
                  "tokenizer_config.json"}
    assert {p.name for p in out.iterdir()} == want_files
    assert all((out / f).read_bytes() == files[f] for f in want_files)
    assert not _fetched(server.log) & {"pytorch_model.bin", "tf_model.h5", "flax_model.msgpack"}

    model, tok = load_t5_checkpoint(out), Tokenizer(out)
    assert tok.backend == "tokenizers" and tok.vocab_size == len(ref_tok) == 70 + EXTRA_IDS
    enc = ref_tok(SAMPLES, padding=True, return_tensors="pt")
    ids = [tok.encode(s) for s in SAMPLES]  # EOS appended, as transformers' T5 tokenizer does
    assert [i + [0] * (enc.input_ids.shape[1] - len(i)) for i in ids] == enc.input_ids.tolist()
    dec = torch.tensor([[0, 5, 9, 1], [0, 7, 3, 11]])
    with torch.no_grad():
        want = ref_model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, decoder_input_ids=dec).logits
        got = model(enc.input_ids, dec, attention_mask=enc.attention_mask)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)

    # the spiece.model that came along tokenizes the same on its own (a folder without tokenizer.json)
    sp_only = tmp_path / "sp-only"
    shutil.copytree(out, sp_only)
    (sp_only / "tokenizer.json").unlink()
    sp_tok = Tokenizer(sp_only)
    assert sp_tok.backend == "sentencepiece" and sp_tok.vocab_size == tok.vocab_size
    assert [sp_tok.encode(s) for s in SAMPLES] == ids
    assert sp_tok.decode(ids[0]) == tok.decode(ids[0]) == ref_tok.decode(ids[0])

    # the CLI's download command reuses the complete folder without a request
    n = len(server.log)
    assert download_command(REPO, tmp_path / "checkpoints") == out
    assert "already downloaded" in capsys.readouterr().out and len(server.log) == n


def test_spiece_only_t5_repo_is_complete_and_reused(tmp_path, hub, repo):  # noqa: F811
    """Older T5 repos (t5-v1_1) hold spiece.model and no tokenizer.json: the folder counts as complete."""
    server, url = hub
    files, _, ref_tok = repo
    server.repos["google/t5-v1_1-tiny"] = {k: v for k, v in files.items() if k not in ("tokenizer.json",)}
    out = download("google/t5-v1_1-tiny", tmp_path / "ck", endpoint=url)
    assert (out / "spiece.model").read_bytes() == files["spiece.model"] and not (out / "tokenizer.json").exists()
    assert is_complete(out)
    n = len(server.log)
    assert download("google/t5-v1_1-tiny", tmp_path / "ck", endpoint=url) == out and len(server.log) == n
    tok = Tokenizer(out)
    assert tok.backend == "sentencepiece" and [tok.encode(s) for s in SAMPLES] == ref_tok(SAMPLES).input_ids


def test_local_t5_folder_import_carries_spiece_model(tmp_path, repo):
    files, _, _ = repo
    src = tmp_path / "flan-local"
    src.mkdir()
    for name in ("config.json", "model.safetensors", "spiece.model", "tokenizer_config.json"):
        (src / name).write_bytes(files[name])
    out = download(str(src), tmp_path / "ck")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "spiece.model",
                                                     "tokenizer_config.json"]
    assert is_complete(out) and Tokenizer(out).use_eos
