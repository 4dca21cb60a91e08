"""`leantune estimate` against reality: the per-block activation formula equals the bytes autograd actually saves,
and the estimated peak is within 15% of a measured CPU training step (bench/estimate_memory.py runs more cases)."""

import pytest
import torch

from leantune.estimate import _block_bytes, build_random_model, estimate, measure_training_memory
from leantune.models.decoder.config import Config
from leantune.peft.lora import LoRAArgs

TOLERANCE = 0.15
LLAMA = dict(vocab_size=1000, n_embd=64, n_head=4, n_query_groups=2, intermediate_size=176, block_size=64)
NEOX = dict(LLAMA, mlp_class="gelu", norm_class="layernorm", parallel_residual=True, shared_attention_norm=True,
            rotary_percentage=0.25)


def saved_bytes_per_token(config: Config, method: str, args, precision: str, T: int = 32) -> float:
    """Bytes of distinct non-parameter storages autograd saves during one forward, per token."""
    model, _ = build_random_model(config, method, args, precision)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}
    alive = []  # hold every saved tensor so no freed address is reused and mistaken for one already counted

    def pack(t):
        alive.append(t)
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.randint(0, config.vocab_size, (1, T)), return_hidden=True)
    return sum(seen.values()) / T


@pytest.mark.parametrize("method,args", [("lora", None), ("lora", LoRAArgs(targets="all", dropout=0.1)),
                                         ("adapter", None), ("adapter_v2", None), ("full", None)])
@pytest.mark.parametrize("precision", ["32-true", "bf16-true"])
@pytest.mark.parametrize("arch,rel", [(LLAMA, 0.0), (NEOX, 0.09)])
def test_block_formula_counts_what_autograd_saves(method, args, precision, arch, rel):
    """One more block adds exactly _block_bytes per token (+ the adapter prefix and LoRA's update matrices, which
    are per block, not per token). Llama-style blocks match to the byte; the NeoX/Falcon variant within `rel`."""
    T = 32
    grown = [saved_bytes_per_token(Config(n_layer=n, **arch), method, args, precision, T) for n in (4, 5)]
    cfg = Config(n_layer=5, **arch)
    model, _ = build_random_model(cfg, method, args, precision)
    block = model.transformer.h[-1]
    act = 4 if precision == "32-true" else 2
    expected = _block_bytes(block, cfg, act)
    from leantune.estimate import _block_constant_bytes

    expected += _block_constant_bytes(block, cfg, act) / T  # per block, not per token: spread over the T tokens
    assert grown[1] - grown[0] == pytest.approx(expected, rel=rel, abs=4)


# ~16M parameters: weights, optimizer state and activations all matter; one step takes seconds on 2 cores.
MID = dict(vocab_size=8000, n_layer=6, n_embd=384, n_head=6, n_query_groups=2, intermediate_size=1024,
           block_size=512, tie_embeddings=False)


@pytest.mark.slow
@pytest.mark.parametrize("method,precision,checkpointing,batch,seq", [
    ("lora", "32-true", False, 2, 256),
    ("full", "bf16-true", True, 1, 128),  # bf16 matmuls are slow on CPUs without AVX512: fewer tokens
])
def test_estimate_within_tolerance_of_a_measured_step(method, precision, checkpointing, batch, seq):
    cfg = Config(**MID)
    kw = dict(micro_batch_size=batch, max_seq_length=seq, activation_checkpointing=checkpointing)
    est = estimate(cfg, method, None, precision, device="cpu", **kw)
    meas = measure_training_memory(cfg, method, None, precision, **kw)
    # exact components first: these are sums of real tensors
    for part in ("weights", "optimizer", "gradients"):
        assert est[f"{part}_gb"] == pytest.approx(meas[f"{part}_gb"], rel=0.02, abs=2e-3), part
    assert meas["total_gb"] > meas["baseline_gb"]  # the step allocated something: the measurement saw it
    assert est["total_gb"] == pytest.approx(meas["total_gb"], rel=TOLERANCE), (est, meas)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["bnb.nf4-dq", "bnb.int8"])
def test_quantized_estimate_within_tolerance_of_a_measured_step(mode):
    """QLoRA: the quantized weights are counted exactly; the step's peak within the tolerance."""
    import functools

    from leantune.estimate import build_random_model

    cfg = Config(**MID)
    kw = dict(micro_batch_size=2, max_seq_length=256)
    est = estimate(cfg, "lora", None, "32-true", quantize=mode, device="cpu", **kw)
    meas = measure_training_memory(cfg, "lora", None, "32-true", build_model=functools.partial(
        build_random_model, quantize=mode), **kw)
    for part in ("weights", "optimizer", "gradients"):
        assert est[f"{part}_gb"] == pytest.approx(meas[f"{part}_gb"], rel=0.02, abs=2e-3), part
    plain = estimate(cfg, "lora", None, "32-true", device="cpu", **kw)
    assert est["weights_gb"] < 0.6 * plain["weights_gb"]  # the quantization is really counted
    assert est["total_gb"] == pytest.approx(meas["total_gb"], rel=TOLERANCE), (est, meas)


def test_bf16_mixed_counts_the_frozen_matrices_at_two_bytes():
    """-mixed stores the frozen matrices in bf16 for the run (runtime.cast_frozen_matrices): the estimate's weights are
    what the model cast that way holds (to the estimate's 1 MB rounding)."""
    from leantune.runtime import cast_frozen_matrices

    cfg = Config(vocab_size=8192, block_size=64, n_layer=4, n_embd=256, n_head=4, n_query_groups=2,
                 intermediate_size=1024)
    model, names = build_random_model(cfg, "lora", LoRAArgs(r=4), "32-true")
    cast_frozen_matrices(model, names, torch.bfloat16)
    rope = 2 * cfg.block_size * cfg.rope_n_elem * 4
    stored = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values()) + rope
    mixed = estimate(cfg, "lora", LoRAArgs(r=4), precision="bf16-mixed", device="cpu")["weights_gb"]
    fp32 = estimate(cfg, "lora", LoRAArgs(r=4), precision="32-true", device="cpu")["weights_gb"]
    assert mixed == pytest.approx(stored / 2**30, abs=1e-3) and mixed < fp32 - 0.005
