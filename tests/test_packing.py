"""Packing end to end: a packed batch from the data layer gives each sample exactly its standalone loss."""

import torch

from leantune.data import Demo
from leantune.models.decoder.config import Config
from leantune.models.decoder.model import GPT
from leantune.tokenizer import Tokenizer
from leantune.train.loss import supervised_ce_sum


def test_packed_loss_equals_one_by_one(default_checkpoint):
    torch.manual_seed(0)
    data = Demo(num_train=24, num_val=4, num_test=4)
    data.connect(Tokenizer(default_checkpoint), max_seq_length=256, batch_size=2, seed=3, packing=True)
    data.setup()
    model = GPT(Config(vocab_size=49152, block_size=256, n_layer=2, n_embd=32, n_head=4, n_query_groups=2)).eval()
    batch = next(iter(data.train_dataloader(epoch=0)))
    assert int(batch["segment_ids"].max()) > 1, "rows must hold several samples for the test to mean anything"
    with torch.no_grad():
        hidden = model(batch["input_ids"], position_ids=batch["position_ids"], segment_ids=batch["segment_ids"],
                       return_hidden=True)
        packed = supervised_ce_sum(hidden, model.lm_head, batch["labels"])
        packed_logits = model.lm_head(hidden)
        separate = torch.zeros(())
        for row in range(batch["input_ids"].shape[0]):
            for seg in batch["segment_ids"][row].unique().tolist():
                if seg == 0:
                    continue
                cols = (batch["segment_ids"][row] == seg).nonzero().flatten()
                ids = batch["input_ids"][row, cols][None]
                logits = model(ids)
                torch.testing.assert_close(packed_logits[row, cols][None], logits, atol=1e-5, rtol=1e-5)
                separate += supervised_ce_sum(model(ids, return_hidden=True), model.lm_head,
                                              batch["labels"][row, cols][None])
    torch.testing.assert_close(packed, separate, atol=1e-4, rtol=1e-5)
