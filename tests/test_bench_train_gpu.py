"""bench/train_gpu.py: the CPU smoke run of its leantune path, its refusal without CUDA, and its tables.

The GPU measurement itself needs a CUDA machine; here `--smoke` runs the same per-setting child processes (random
HF folder -> load_hf_checkpoint with bnb quantization -> LoRA -> timed steps -> generation) on a tiny Llama config.
Without --smoke and without CUDA the script exits with status 2 and a message saying why (it measures nothing).
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "bench" / "train_gpu.py"


def _module():
    spec = importlib.util.spec_from_file_location("bench_train_gpu", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow  # four fresh interpreters (torch + bitsandbytes imports): ~30 s on 2 idle cores
def test_smoke_runs_every_setting_with_finite_loss(tmp_path: Path) -> None:
    out = tmp_path / "x.json"
    p = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out)], cwd=REPO_ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    result = json.loads(out.read_text())
    records = result["records"]
    mod = _module()
    assert sorted(r["setting"] for r in records) == sorted(mod.SETTINGS)
    for r in records:
        assert r.get("error") is None, r
        assert r["tool"] == "leantune" and r["device"] == "cpu"
        assert math.isfinite(r["loss"]) and r["loss"] > 0, r
        assert r["tok_s"] > 0 and r["train_s"] > 0, r
        assert r["peak_gb"] is None and r["infer_peak_gb"] is None  # no CUDA: no peak memory
        assert r["infer_new_tokens"] == 4
        assert r["trainable"] > 0
    assert len({r["trainable"] for r in records}) == 1  # same LoRA on every setting
    assert len(result["tables"]["qlora"]) == len(mod.SETTINGS)
    assert "smoke ok" in p.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the script would run the real GPU benchmark")
def test_without_cuda_exits_2_with_a_clear_message(tmp_path: Path) -> None:
    out = tmp_path / "x.json"
    p = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--skip_peers"], cwd=REPO_ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert "no CUDA device" in p.stderr and "--smoke" in p.stderr
    assert not out.exists()


def _rec(tool, model, batch, setting, tok_s, peak, **kw):
    key = "peak_gb" if tool == "leantune" else "peak_alloc_gb"
    return dict(tool=tool, model=model, batch=batch, seq=2048, setting=setting, tok_s=tok_s, **{key: peak}, **kw)


def test_tables_ratios_and_missing_peers() -> None:
    mod = _module()
    m = "Llama-3.2-1B"
    records = [
        _rec("leantune", m, 4, "bf16-true", 60000.0, 20.0, train_s=1.0, infer_peak_gb=3.0),
        _rec("leantune", m, 4, "bf16-true+bnb.nf4-dq", 54000.0, 10.0, train_s=1.1, infer_peak_gb=1.5),
        _rec("leantune", m, 4, "bf16-mixed", 50000.0, 30.0, train_s=1.2, infer_peak_gb=6.0),
        _rec("hf_peft", m, 4, "bf16-true", 30000.0, 40.0),
        _rec("litgpt", m, 4, "bf16-true", 40000.0, 25.0),
        _rec("hf_peft", m, 4, "bf16-true+bnb.nf4-dq", 10000.0, 50.0),
        dict(tool="litgpt", model=m, batch=4, seq=2048, setting="bf16-true+bnb.nf4-dq", error="exit 1: no litgpt"),
    ]
    flops = {m: 1e10}
    t = mod.build_tables(records, flops, 989.0)
    r = t["lora"]["ratios"]
    assert r["tok_s_vs_hf"] == 2.0 and r["tok_s_vs_litgpt"] == 1.5 and r["peak_vs_litgpt"] == 0.8
    assert r["mfu"] == round(60000 * 1e10 / 989e12, 4)
    rows = {row["setting"]: row for row in t["qlora"]}
    assert list(rows) == ["bf16-mixed", "bf16-true", "bf16-true+bnb.nf4-dq"]  # SETTINGS order, missing ones skipped
    q = rows["bf16-true+bnb.nf4-dq"]
    assert q["tok_s/hf"] == "5.40x" and q["vs_lora_tok_s"] == "0.90x" and q["peak/hf"] == "0.20x"
    assert q["litgpt_tok_s"] == "err" and q["tok_s/litgpt"] == "-"  # a failed peer is shown, not hidden
    assert rows["bf16-mixed"]["hf_tok_s"] == "n/a"  # the peers have no bf16-mixed setting


def test_peer_commands_match_the_peer_scripts(tmp_path: Path) -> None:
    mod = _module()
    args = type("A", (), dict(seq=2048, steps=7, peer_dir=tmp_path))()
    llama = mod.peer_runs("Llama-3.2-1B", 4, list(mod.SETTINGS), args)
    assert [(tool, s) for tool, s, _ in llama] == [("hf_peft", "bf16-true"), ("litgpt", "bf16-true"),
                                                   ("hf_peft", "bf16-true+bnb.nf4-dq"),
                                                   ("litgpt", "bf16-true+bnb.nf4-dq")]
    hf_qlora = llama[2][2]
    assert hf_qlora[1].endswith("hf_peft_gpu.py")
    assert hf_qlora[2:] == ["--size", "1b", "--mode", "qlora", "--batch", "4", "--seq", "2048", "--steps", "7",
                            "--r", "16", "--targets", "all"]
    smol = mod.peer_runs("SmolLM2-135M", 1, list(mod.SETTINGS), args)
    assert {tool for tool, _, _ in smol} == {"litgpt"}  # hf_peft_gpu.py has no SmolLM2 size
    assert smol[0][2][2:6] == ["--model", "SmolLM2-135M", "--mode", "lora"]


def test_last_json_line_of_noisy_output() -> None:
    mod = _module()
    out = 'Seed set to 0\n{"not": "last"}\nwarning: {oops\n{"tool": "litgpt", "tok_s": 1.5}\n\n'
    assert mod.last_json(out) == {"tool": "litgpt", "tok_s": 1.5}
    assert mod.last_json("no json here") is None
