"""`estimate --objective`: pairs are two rows each, and dpo/ipo with the adapter switched off count the reference pass."""

from __future__ import annotations

import pytest

from leantune.estimate import estimate, resolve_config


@pytest.fixture(scope="module")
def cfg():
    return resolve_config("HuggingFaceTB/SmolLM2-135M-Instruct")


def test_reference_pass_is_counted_for_adapter_off_only(cfg):
    sft = estimate(cfg, "lora", precision="bf16-true", micro_batch_size=2, max_seq_length=512)
    dpo = estimate(cfg, "lora", precision="bf16-true", micro_batch_size=2, max_seq_length=512, objective="dpo")
    pre = estimate(cfg, "lora", precision="bf16-true", micro_batch_size=2, max_seq_length=512, objective="dpo",
                   reference="precomputed")
    orpo = estimate(cfg, "lora", precision="bf16-true", micro_batch_size=2, max_seq_length=512, objective="orpo")
    assert "reference_pass_gb" not in sft
    assert dpo["reference_pass_gb"] > 0 and pre["reference_pass_gb"] == 0 and orpo["reference_pass_gb"] == 0
    assert dpo["activations_gb"] >= pre["activations_gb"] > sft["activations_gb"]  # 4 rows against 2
    assert dpo["weights_gb"] == sft["weights_gb"] and dpo["optimizer_gb"] == sft["optimizer_gb"]  # no second copy
    full = estimate(cfg, "full", precision="bf16-true", micro_batch_size=2, max_seq_length=512, objective="dpo")
    assert full["reference_pass_gb"] == 0  # full finetuning: the precomputed reference
