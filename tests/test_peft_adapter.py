"""LLaMA-Adapter v1/v2: seed parameter counts, exact base model at init, trainability, prefix K/V cache, save/load."""

import math

import pytest
import torch
import torch.nn.functional as F

from leantune.models.decoder.config import Config
from leantune.models.decoder.model import GPT
from leantune.peft.adapter import AdapterArgs, AdapterPrefix, apply_adapter
from leantune.peft.adapter_v2 import AdapterV2Args, AdapterV2Linear, apply_adapter_v2

FALCON_7B = dict(n_layer=32, n_embd=4544, n_head=71, n_query_groups=1, vocab_size=65024, intermediate_size=18176,
                 mlp_class="gelu", norm_class="layernorm", parallel_residual=True, shared_attention_norm=True,
                 bias=False, hf_model_type="falcon", tie_embeddings=True)
LLAMA_2_7B = dict(n_layer=32, n_embd=4096, n_head=32, vocab_size=32000, intermediate_size=11008)

TINY = dict(vocab_size=101, block_size=64, n_layer=3, n_embd=64, n_head=4)
CONFIGS = {
    "llama-gqa": dict(n_query_groups=2),
    "falcon-mqa-parallel": dict(n_query_groups=1, mlp_class="gelu", norm_class="layernorm", parallel_residual=True,
                                shared_attention_norm=True, tie_embeddings=True),
    "gpt2": dict(mlp_class="gelu", gelu_approximate="tanh", norm_class="layernorm", bias=True, learned_pos_emb=True,
                 tie_embeddings=True, lm_head_bias=True),
}
METHODS = {"adapter": (apply_adapter, AdapterArgs), "adapter_v2": (apply_adapter_v2, AdapterV2Args)}


def transform(model: GPT, method: str, **args) -> list[str]:
    apply, args_cls = METHODS[method]
    return apply(model, args_cls(**args))


def trainable_count(model: GPT, names: list[str]) -> int:
    params = dict(model.named_parameters())
    return sum({id(params[n]): params[n].numel() for n in names}.values())  # a tied tensor counts once


def v2_count(cfg: Config, prompt_length: int = 10, start_layer: int = 2) -> int:
    """The v2 rule: v1 prefixes + scale and bias per output of every linear + every norm parameter."""
    v1 = (cfg.n_layer - start_layer) * (prompt_length * cfg.n_embd + cfg.n_head)
    mlp = 2 * cfg.intermediate_size + cfg.n_embd if cfg.mlp_class == "swiglu" else cfg.intermediate_size + cfg.n_embd
    linears = cfg.n_layer * 2 * (sum(cfg.qkv_sizes) + cfg.n_embd + mlp) + 2 * cfg.padded_vocab_size
    per_norm = cfg.n_embd * (2 if cfg.norm_class == "layernorm" else 1)
    norms = (cfg.n_layer * (1 if cfg.shared_attention_norm else 2) + 1) * per_norm
    return v1 + linears + norms


@pytest.mark.parametrize("cfg,method,expected", [
    (FALCON_7B, "adapter", 1_365_330),  # seed: Falcon-7B Adapter
    (FALCON_7B, "adapter_v2", 3_839_186),  # seed: Falcon-7B Adapter v2
    (LLAMA_2_7B, "adapter", 1_229_760),  # 30 x (10 x 4096 + 32)
    (LLAMA_2_7B, "adapter_v2", 4_279_744),  # by the v2 rule (v2_count)
])
def test_trainable_counts(cfg, method, expected):
    with torch.device("meta"):
        model = GPT(Config(**cfg))
    names = transform(model, method)
    assert trainable_count(model, names) == expected
    if method == "adapter_v2":
        assert v2_count(model.config) == expected
    assert all(p.requires_grad == (n in names) for n, p in model.named_parameters())


def test_falcon_7b_preset_count():
    pytest.importorskip("leantune.models.decoder.presets")
    for method, expected in (("adapter", 1_365_330), ("adapter_v2", 3_839_186)):
        with torch.device("meta"):
            model = GPT(Config.from_name("falcon-7b"))
        assert trainable_count(model, transform(model, method)) == expected


def tiny(name: str, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(Config(**TINY, **CONFIGS[name]))


def tokens(B: int = 2, T: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (B, T), generator=torch.Generator().manual_seed(seed))


def prefixes(model: GPT) -> list[AdapterPrefix]:
    return [m for m in model.modules() if isinstance(m, AdapterPrefix)]


def perturb(model: GPT, names: list[str]) -> None:
    """Move every adapter tensor off its identity init so the adapted path is actually exercised."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n in names:
            params[n].add_(torch.randn_like(params[n]) * 0.3)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("method", METHODS)
def test_init_reproduces_base_exactly(name, method):
    model = tiny(name).eval()
    idx = tokens()
    with torch.no_grad():
        base = model(idx)
    names = transform(model, method, start_layer=1)
    assert len(prefixes(model)) == 2
    with torch.no_grad():
        assert torch.equal(model(idx), base)  # the no-grad (cached prefix) path
    assert torch.equal(model(idx).detach(), base)  # the autograd path
    assert names


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("method", METHODS)
def test_base_keys_and_tie_are_kept(name, method):
    model = tiny(name)
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    names = transform(model, method, start_layer=1)
    sd = model.state_dict()
    assert set(base_sd) <= set(sd)
    assert set(sd) - set(base_sd) == set(names) - set(base_sd)  # the only new keys are the adapter's own
    result = model.load_state_dict(base_sd, strict=False)  # a base checkpoint loads into the transformed model
    assert result.unexpected_keys == []
    if model.config.tie_embeddings:
        assert model.lm_head.weight is model.transformer.wte.weight
    if method == "adapter_v2":
        assert isinstance(model.lm_head, AdapterV2Linear)
        assert isinstance(model.transformer.h[0].attn.qkv, AdapterV2Linear)
        assert not any(type(m) is torch.nn.Linear for m in model.modules())


@pytest.mark.parametrize("name", CONFIGS)
def test_prefix_attention_matches_reference(name):
    """The adapter term is gate * softmax(q K_p^T / sqrt(hs)) V_p with K_p, V_p from the block's own qkv, unmasked,
    each query head reading its key/value group (GQA/MQA)."""
    model = tiny(name)
    names = transform(model, "adapter", start_layer=0)
    perturb(model, names)
    cfg = model.config
    attn = model.transformer.h[1].attn
    prefix = attn.adapter
    B, T, P = 2, 5, prefix.wte.num_embeddings
    q = torch.randn(B, cfg.n_head, T, cfg.head_size)
    _, k, v = attn.qkv(prefix.wte.weight).split(cfg.qkv_sizes, dim=-1)  # (P, ng*hs) each
    k = k.view(P, cfg.n_query_groups, cfg.head_size).transpose(0, 1)  # (ng, P, hs)
    v = v.view(P, cfg.n_query_groups, cfg.head_size).transpose(0, 1)  # (ng, P, hs)
    rep = cfg.n_head // cfg.n_query_groups
    k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)  # (nh, P, hs)
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(cfg.head_size), dim=-1)  # (B, nh, T, P)
    expected = (att @ v) * prefix.gating_factor  # (B, nh, T, hs)
    torch.testing.assert_close(prefix(attn, q), expected, atol=1e-5, rtol=1e-5)


def train_step(model: GPT, opt: torch.optim.Optimizer, idx: torch.Tensor, targets: torch.Tensor) -> None:
    model.train()
    opt.zero_grad()
    logits = model(idx)
    F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
    opt.step()


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("method", METHODS)
def test_trainability(name, method):
    """Two steps, because the gate starts at zero: at step 1 the prefix `wte` gets an exactly zero gradient (its
    only path to the loss is multiplied by the gate), as in LitGPT and the paper; step 1 moves the gate, so at step 2
    every trainable tensor must get a finite non-zero gradient and, after it, every one must have changed."""
    model = tiny(name)
    names = transform(model, method, start_layer=1)
    params = dict(model.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    idx, targets = tokens(seed=1), tokens(seed=2)
    model.eval()
    with torch.no_grad():
        model(idx)  # fills the inference prefix cache; training must not reuse it
    assert all(p._kv is not None for p in prefixes(model))
    opt = torch.optim.AdamW([params[n] for n in names], lr=1e-2)
    train_step(model, opt, idx, targets)
    wte = [n for n in names if n.endswith("adapter.wte.weight")]
    assert wte and all(not params[n].grad.any() for n in wte)  # zero at step 1 (zero gate), see docstring
    train_step(model, opt, idx, targets)
    for n in names:
        g = params[n].grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, n
        assert not torch.equal(params[n], before[n]), f"{n} did not change"
    for n, p in params.items():
        if n not in names:
            assert p.grad is None, n
            assert torch.equal(p, before[n]), f"frozen {n} changed"


@pytest.mark.parametrize("method", METHODS)
def test_inference_prefix_cache(method):
    model = tiny("llama-gqa")
    names = transform(model, method, start_layer=1)
    perturb(model, names)
    idx, targets = tokens(seed=1), tokens(seed=2)
    model.eval()
    fresh = model(idx).detach()  # grad enabled: computed without the cache
    with torch.no_grad():
        first = model(idx)
        cached = [p._kv[1] for p in prefixes(model)]
        second = model(idx)
    assert all(p._kv[1] is k for p, k in zip(prefixes(model), cached))  # reused, not recomputed
    assert torch.equal(first, fresh) and torch.equal(second, fresh)

    params = dict(model.named_parameters())
    opt = torch.optim.AdamW([params[n] for n in names], lr=1e-2)
    train_step(model, opt, idx, targets)  # changes the prefix (and, for v2, the qkv scale/bias)
    model.eval()
    with torch.no_grad():
        after = model(idx)
    assert not torch.equal(after, first)
    assert torch.equal(after, model(idx).detach())  # same as the uncached computation
    twin = tiny("llama-gqa")
    transform(twin, method, start_layer=1)
    twin.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(after, twin.eval()(idx))  # and as a fresh module with the same weights

    # The cache key alone must catch every change, with no mode switch or grad-enabled forward in between.
    wte = next(n for n in names if n.endswith("wte.weight"))

    def optimizer_step() -> None:  # an update with no forward in between
        for n in names:
            params[n].grad = torch.randn_like(params[n])
        opt.step()

    mutations = [
        optimizer_step,
        lambda: params[wte].mul_(2),  # an in-place write, e.g. loading an adapter into a live model
        lambda: model.double(),  # a dtype change
    ]
    for mutate in mutations:
        with torch.no_grad():
            stale = model(idx)  # fills the cache
            mutate()
            out = model(idx)
        assert not torch.equal(out, stale.to(out.dtype))
        assert torch.equal(out, fresh_forward(model, idx))


def fresh_forward(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    with torch.enable_grad():
        return model(idx).detach()


@pytest.mark.parametrize("method", METHODS)
def test_kv_cache_decoding_matches_full_forward(method):
    """The prefix needs no mask or positions, so token-by-token decoding sees the same prefix as a full pass."""
    model = tiny("falcon-mqa-parallel")
    perturb(model, transform(model, method, start_layer=0))
    model.eval()
    idx = tokens(B=2, T=8)
    with torch.no_grad():
        full = model(idx)
        model.set_kv_cache(batch_size=2, max_seq_length=16)
        steps = [model.decode(idx[:, :4], torch.arange(4))]
        steps += [model.decode(idx[:, t:t + 1], torch.tensor([t])) for t in range(4, 8)]
        model.clear_kv_cache()
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("method", METHODS)
def test_saved_trainable_state_loads_into_fresh_model(name, method):
    model = tiny(name)
    names = transform(model, method, start_layer=1)
    perturb(model, names)
    saved = {n: p.detach().clone() for n, p in model.named_parameters() if n in names}
    idx = tokens()
    with torch.no_grad():
        expected = model.eval()(idx)

    fresh = tiny(name)  # the same base weights, a new transform
    assert transform(fresh, method, start_layer=1) == names  # names are stable across applies
    result = fresh.load_state_dict(saved, strict=False)
    assert result.unexpected_keys == []
    with torch.no_grad():
        assert torch.equal(fresh.eval()(idx), expected)


def test_bad_args_and_double_apply():
    model = tiny("llama-gqa")
    with pytest.raises(ValueError, match="start_layer"):
        apply_adapter(model, AdapterArgs(start_layer=3))
    with pytest.raises(ValueError, match="prompt_length"):
        apply_adapter(model, AdapterArgs(prompt_length=0))
    apply_adapter(model, AdapterArgs(start_layer=1))
    with pytest.raises(ValueError, match="already"):
        apply_adapter_v2(model, AdapterV2Args(start_layer=1))
    with pytest.raises(TypeError, match="plain or quantized linear"):
        AdapterV2Linear(AdapterV2Linear(torch.nn.Linear(4, 4)))


def test_v2_linear_is_scale_and_bias_around_the_base():
    torch.manual_seed(0)
    base = torch.nn.Linear(8, 6)
    w, b = base.weight, base.bias
    layer = AdapterV2Linear(base)
    assert layer.weight is w and layer.bias is b  # moved, not copied
    x = torch.randn(3, 8)
    assert torch.equal(layer(x), F.linear(x, w, b))
    with torch.no_grad():
        layer.adapter_scale.uniform_(0.5, 1.5)
        layer.adapter_bias.normal_()
    torch.testing.assert_close(layer(x), layer.adapter_scale * (x @ w.T + b) + layer.adapter_bias)


def test_transform_on_meta_then_materialise():
    """A model transformed on the meta device (as `estimate` does) can be materialised and re-initialised."""
    with torch.device("meta"):
        model = GPT(Config(**TINY, **CONFIGS["llama-gqa"]))
    names = transform(model, "adapter_v2", start_layer=1)
    model.to_empty(device="cpu")
    for m in model.modules():
        if isinstance(m, AdapterPrefix | AdapterV2Linear):
            m.reset_parameters()
    params = dict(model.named_parameters())
    assert all(not params[n].is_meta for n in names)
    assert all(torch.equal(p.adapter_scale, torch.ones_like(p.adapter_scale))
               for p in model.modules() if isinstance(p, AdapterV2Linear))
    assert all(not p.gating_factor.any() for p in prefixes(model))
