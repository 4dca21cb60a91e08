"""The DemoPreference flow of the README on the real default model: SFT on Demo (the main job), then DPO from that
adapter on DemoPreference. Held-out reward accuracy rises and held-out exact match does not fall."""

from __future__ import annotations

import pytest

from leantune.data import Demo, DemoPreference
from leantune.finetune import finetune
from leantune.train.args import EvalArgs, TrainArgs
from leantune.train.optim import OptimizerArgs


@pytest.mark.slow
def test_dpo_after_sft_raises_reward_accuracy_and_keeps_exact_match(default_checkpoint, tmp_path):
    """The README's flow, shortened: 8 SFT steps on Demo (the README runs 20), then its 10 DPO steps of 8 pairs from
    that adapter."""
    finetune("lora", checkpoint_dir=default_checkpoint, out_dir=tmp_path / "sft", data=Demo(), threads=2,
             train=TrainArgs(max_steps=8), eval=EvalArgs(exact_match=False, sample_new_tokens=0, max_batches=1))
    dpo = finetune("lora", checkpoint_dir=default_checkpoint, out_dir=tmp_path / "dpo", objective="dpo",
                   data=DemoPreference(num_train=80, num_val=30, num_test=30),
                   resume_adapter=tmp_path / "sft" / "final", threads=2, optimizer=OptimizerArgs(lr=5e-4),
                   train=TrainArgs(global_batch_size=8, max_steps=10, warmup_steps=2),
                   eval=EvalArgs(sample_new_tokens=0))
    assert (tmp_path / "dpo" / "reference_logps.safetensors").is_file()  # --resume_adapter: the SFT model's
    assert dpo["reward_accuracy_before"] == 0.0  # policy == reference at the start: every reward is 0
    assert dpo["val_reward_accuracy"] > 0.5 and dpo["val_reward_margin"] > 0
    assert dpo["exact_match_after"] >= dpo["exact_match_before"] - 0.04  # greedy ties can flip a prompt
