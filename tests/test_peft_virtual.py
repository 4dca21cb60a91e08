"""Prompt tuning, P-tuning and prefix tuning against peft's implementation: trainable counts (also via estimate),
logits with the same weights on tiny random models of four families, one optimizer step, PEFT folders both ways,
KV-cached and batched left-padded decoding, greedy text equal to peft's generate, merge refused, the inits, a
quantized base, and the commands end to end."""

import json

import peft
import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from tiny_families import TINY, V, load_hf, random_hf

from leantune.checkpoint.hf import load_hf_checkpoint
from leantune.commands.export import export as export_command
from leantune.data import JSON
from leantune.decode.generate import generate_tokens, greedy_batch
from leantune.estimate import estimate, resolve_config
from leantune.finetune import finetune
from leantune.merge import merge_adapters
from leantune.methods import apply_method, get_method, load_any_adapter
from leantune.models.decoder.config import Config
from leantune.models.decoder.families import config_from_hf
from leantune.models.quantize import quantize_model
from leantune.peft.p_tuning import PTuningArgs
from leantune.peft.prefix_tuning import PrefixTuningArgs
from leantune.peft.prompt_tuning import PromptTuningArgs, init_prompt_text
from leantune.tokenizer import Tokenizer
from leantune.train.args import EvalArgs, TrainArgs
from leantune.train.optim import OptimizerArgs

P = 5
# (id, our method, our args, peft config): each variant peft has (encoders, projection on/off)
CASES = [
    ("prompt", "prompt_tuning", PromptTuningArgs(num_virtual_tokens=P, init="random"),
     lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)),
    ("p-mlp", "p_tuning", PTuningArgs(num_virtual_tokens=P),
     lambda: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)),
    ("p-lstm", "p_tuning", PTuningArgs(num_virtual_tokens=P, encoder="lstm", encoder_hidden_size=16),
     lambda: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, encoder_hidden_size=16,
                                      encoder_reparameterization_type="LSTM")),
    ("prefix-mlp", "prefix_tuning", PrefixTuningArgs(num_virtual_tokens=P, hidden_size=32),
     lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=True,
                                     encoder_hidden_size=32)),
    ("prefix", "prefix_tuning", PrefixTuningArgs(num_virtual_tokens=P, projection=False),
     lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)),
]
IDS = [c[0] for c in CASES]
FAMILIES = ["llama-gqa", "gpt2", "pythia-partial-rotary", "qwen2-qkv-bias", "falcon-40b-gqa"]


def family_cases():
    """Every case on every family, except prefix tuning on Falcon: FalconConfig names its key/value heads
    `num_kv_heads`, so peft sizes the prefix by the 8 query heads and its own prefix does not fit Falcon's cache."""
    return [pytest.param(name, case, id=f"{case[0]}-{name}") for name in FAMILIES for case in CASES
            if not (name.startswith("falcon") and case[1] == "prefix_tuning")]


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def twins(name, tmp_path, method, args, peft_config):
    """peft's model and ours on the same random base, our virtual tokens copied from peft's (names match)."""
    hf, folder = random_hf(name, tmp_path)
    pm = peft.get_peft_model(hf, peft_config())
    ours = load_hf_checkpoint(folder, dtype=torch.float32)
    apply_method(ours, method, args)
    theirs = {k.split("prompt_encoder.default.")[1]: v for k, v in pm.named_parameters() if "prompt_encoder" in k}
    mine = dict(ours.virtual.named_parameters())
    assert set(theirs) == set(mine)
    with torch.no_grad():
        for k, v in theirs.items():
            v.add_(torch.randn_like(v) * 0.1)  # away from the init, so a missed tensor shows
            mine[k].copy_(v)
    return pm, ours, folder


@pytest.mark.parametrize("name", ["llama-gqa", "gpt2"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_trainable_count_equals_peft_and_estimate(name, case):
    _, method, args, peft_config = case
    pm = peft.get_peft_model(tf.AutoModelForCausalLM.from_config(TINY[name]()), peft_config())
    expected, _ = pm.get_nb_trainable_parameters()
    assert estimate(config_from_hf(TINY[name]().to_dict()), method, args, "32-true")["trainable_params"] == expected


@pytest.mark.slow
def test_default_model_counts_equal_peft(default_checkpoint):
    """SmolLM2-135M with the defaults: prompt tuning 20 x 576 = 11,520; P-tuning adds the 576-wide MLP (997,056);
    prefix tuning 20 x 192 plus the 192 -> 512 -> 30 x 2 x 192 projection (kv heads: 3 x 64 = 192)."""
    hf_cfg = tf.AutoConfig.from_pretrained(default_checkpoint)
    config = resolve_config(str(default_checkpoint))
    peft_defaults = {"prompt_tuning": peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20),
                     "p_tuning": peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=20),
                     "prefix_tuning": peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20,
                                                              prefix_projection=True, encoder_hidden_size=512)}
    counts = {}
    for method, pc in peft_defaults.items():
        with torch.device("meta"):
            pm = peft.get_peft_model(tf.AutoModelForCausalLM.from_config(hf_cfg), pc)
        counts[method] = pm.get_nb_trainable_parameters()[0]
        assert estimate(config, method, None, "32-true")["trainable_params"] == counts[method]
    assert counts == {"prompt_tuning": 11_520, "p_tuning": 1_008_576, "prefix_tuning": 6_012_416}


@pytest.mark.parametrize("name,case", family_cases())
def test_logits_equal_peft(tmp_path, name, case):
    _, method, args, peft_config = case
    pm, ours, _ = twins(name, tmp_path, method, args, peft_config)
    idx = torch.randint(0, V, (2, 9))
    with torch.no_grad():
        ref = pm(input_ids=idx, attention_mask=torch.ones_like(idx)).logits[:, -idx.shape[1]:]
        torch.testing.assert_close(ours(idx)[..., :V], ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_one_optimizer_step_equals_peft(tmp_path, case):
    _, method, args, peft_config = case
    pm, ours, _ = twins("llama-gqa", tmp_path, method, args, peft_config)
    idx = torch.randint(0, V, (2, 9))
    ref_params = [p for p in pm.parameters() if p.requires_grad]
    our_params = [p for p in ours.parameters() if p.requires_grad]
    assert sum(p.numel() for p in ref_params) == sum(p.numel() for p in our_params)

    def step(model_logits, params):
        opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
        logits = model_logits()  # (2, 9, V) over the real tokens
        F.cross_entropy(logits[:, :-1].reshape(-1, V), idx[:, 1:].reshape(-1)).backward()
        opt.step()

    step(lambda: pm(input_ids=idx, attention_mask=torch.ones_like(idx)).logits[:, -idx.shape[1]:], ref_params)
    step(lambda: ours(idx)[..., :V], our_params)
    theirs = {k.split("prompt_encoder.default.")[1]: v for k, v in pm.named_parameters() if "prompt_encoder" in k}
    for k, p in ours.virtual.named_parameters():
        torch.testing.assert_close(p.grad, theirs[k].grad, atol=1e-7, rtol=1e-4, msg=k)
        # AdamW's first step is lr * g / (|g| + eps): where |g| is near eps (1e-8) a rounding-level difference in g
        # moves the update by up to lr, so the updates are compared where the gradient is well above rounding (one
        # element of an LSTM's 2048 differed by 4e-6 on one CPU for that reason).
        sure = theirs[k].grad.abs() > 1e-6
        torch.testing.assert_close(p[sure], theirs[k][sure], atol=1e-6, rtol=1e-5, msg=k)
        torch.testing.assert_close(p[~sure], theirs[k][~sure], atol=2e-2, rtol=0, msg=k)  # within 2 lr steps


@pytest.mark.parametrize("name", ["llama-gqa", "gpt2"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_export_loads_in_peft_and_peft_folders_import(tmp_path, name, case):
    """Ours -> PEFT folder -> PeftModel.from_pretrained: equal logits; and a folder the real peft library saved
    (non-zero weights, encoder output included) -> load_any_adapter: equal logits."""
    _, method, args, peft_config = case
    pm, ours, folder = twins(name, tmp_path, method, args, peft_config)
    idx = torch.randint(0, V, (2, 9))
    m = get_method(method)
    out = m.peft.export(ours, tmp_path / "ours-peft", str(folder), args)
    loaded = peft.PeftModel.from_pretrained(load_hf(folder), out).eval()
    with torch.no_grad():
        expected = ours(idx)[..., :V]
        torch.testing.assert_close(loaded(input_ids=idx).logits[:, -idx.shape[1]:], expected, atol=1e-5, rtol=0)
    pm.eval().save_pretrained(tmp_path / "made-by-peft")
    again = load_hf_checkpoint(folder, dtype=torch.float32)
    manifest = load_any_adapter(again, tmp_path / "made-by-peft")
    assert manifest["method"] == method
    with torch.no_grad():
        ref = pm(input_ids=idx, attention_mask=torch.ones_like(idx)).logits[:, -idx.shape[1]:]
        torch.testing.assert_close(again(idx)[..., :V], ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["llama-gqa", "gpt2"])
@pytest.mark.parametrize("method,args", [(c[1], c[2]) for c in CASES if c[0] in ("prompt", "p-mlp", "prefix-mlp")])
def test_cached_decoding_and_left_padded_batches_equal_recompute(tmp_path, name, method, args):
    """The virtual positions are computed once (they live in the KV cache after the prompt's forward) and batched
    left padding shifts each row's positions past them: both equal decoding every prompt alone without a cache."""
    _, folder = random_hf(name, tmp_path)
    model = load_hf_checkpoint(folder, dtype=torch.float32)
    apply_method(model, method, args)
    model.eval()
    calls = []
    model.virtual.register_forward_hook(lambda *a: calls.append(1))  # counts prefix/prompt computations
    torch.manual_seed(1)
    prompts = [torch.randint(0, V, (n,)) for n in (3, 8, 5)]
    uncached = [list(generate_tokens(model, p, 10, use_cache=False)) for p in prompts]
    calls.clear()
    cached = [list(generate_tokens(model, p, 10)) for p in prompts]
    assert cached == uncached
    assert len(calls) == 0  # the virtual module's forward is never called: the model reads embeddings()/layer_kv()
    counted = []
    original = type(model.virtual).embeddings if method != "prefix_tuning" else type(model.virtual).layer_kv

    def counting(self):
        counted.append(1)
        return original(self)

    attr = "embeddings" if method != "prefix_tuning" else "layer_kv"
    setattr(model.virtual, attr, counting.__get__(model.virtual))
    assert greedy_batch(model, [p.tolist() for p in prompts], 10, stop_ids=[]) == uncached
    assert len(counted) == 1  # once for the whole batched generation, not per step


@pytest.mark.parametrize("case", [c for c in CASES if c[0] in ("prompt", "p-mlp", "prefix")],
                         ids=["prompt", "p-mlp", "prefix"])
def test_greedy_text_equals_peft(tmp_path, case):
    """Our cached greedy decoding against peft's model recomputing the whole sequence each step. (Not against
    `PeftModel.generate`: with peft 0.21 on transformers 5.24 it disagrees with peft's own forward from the second
    new token on, for all three methods.)"""
    _, method, args, peft_config = case
    pm, ours, _ = twins("llama-gqa", tmp_path, method, args, peft_config)
    pm.eval()
    ours.eval()
    ids = torch.randint(0, V, (1, 6))
    seq = ids
    with torch.no_grad():
        for _ in range(8):
            nxt = pm(input_ids=seq, attention_mask=torch.ones_like(seq)).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert list(generate_tokens(ours, ids[0], 8)) == seq[0, -8:].tolist()


def test_merge_is_refused_with_a_clear_message(tiny_checkpoint, json_data, tmp_path):
    finetune("prefix_tuning", checkpoint_dir=tiny_checkpoint, out_dir=tmp_path / "run", data=JSON(json_path=json_data),
             method_args=PrefixTuningArgs(num_virtual_tokens=4, hidden_size=16),
             train=TrainArgs(micro_batch_size=2, global_batch_size=2, max_steps=1, max_seq_length=64),
             eval=EvalArgs(max_batches=1, sample_new_tokens=0, exact_match=False), threads=2)
    model = load_hf_checkpoint(tiny_checkpoint)
    with pytest.raises(ValueError, match="prefix_tuning adapters cannot be merged"):
        merge_adapters(model, [tmp_path / "run" / "final"])


def test_prompt_inits(tiny_checkpoint):
    """vocab: rows of the embedding table; text: the text's token embeddings cycled to P; random: N(0, 1)."""
    tok = Tokenizer(tiny_checkpoint)
    base = load_hf_checkpoint(tiny_checkpoint)
    wte = base.transformer.wte.weight.detach().clone()
    model = load_hf_checkpoint(tiny_checkpoint)
    apply_method(model, "prompt_tuning", PromptTuningArgs(num_virtual_tokens=7))
    rows = model.virtual.embedding.weight.detach()
    assert all(bool((wte == r).all(-1).any()) for r in rows)
    args = PromptTuningArgs(num_virtual_tokens=7, init_text="Sort the numbers")
    assert args.init == "text"
    model = load_hf_checkpoint(tiny_checkpoint)
    apply_method(model, "prompt_tuning", args)
    init_prompt_text(model, args, tok)
    ids = tok.encode("Sort the numbers", bos=False)
    expected = wte[torch.tensor((ids * 7)[:7])]
    torch.testing.assert_close(model.virtual.embedding.weight.detach(), expected, atol=0, rtol=0)
    for bad in (dict(init="text"), dict(init="vocab", init_text="x"), dict(init="nope"), dict(num_virtual_tokens=0)):
        with pytest.raises(ValueError, match="prompt_tuning"):
            PromptTuningArgs(**bad)
    with pytest.raises(ValueError, match="encoder"):
        PTuningArgs(encoder="gru")


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_quantized_base_trains_only_the_virtual_tokens(tiny_checkpoint, method):
    model = quantize_model(load_hf_checkpoint(tiny_checkpoint), "bnb.nf4", torch.float32)
    names = apply_method(model, method, None)
    assert names and all(n.startswith("virtual.") for n in names)
    idx = torch.randint(0, 1000, (2, 12))
    model(idx).float().logsumexp(-1).mean().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == set(names)


def test_commands_train_export_generate_and_resume_from_a_peft_folder(tiny_checkpoint, json_data, tmp_path):
    def run(out, **kw):
        return finetune("p_tuning", checkpoint_dir=tiny_checkpoint, out_dir=out, data=JSON(json_path=json_data),
                        method_args=PTuningArgs(num_virtual_tokens=4, encoder_hidden_size=32),
                        train=TrainArgs(micro_batch_size=2, global_batch_size=2, max_steps=2, max_seq_length=64),
                        eval=EvalArgs(max_batches=1, sample_new_tokens=0, exact_match=False),
                        optimizer=OptimizerArgs(lr=1e-2), threads=2, **kw)

    run(tmp_path / "a")
    exported = export_command(adapter=tmp_path / "a" / "final", checkpoint_dir=tiny_checkpoint, format="peft",
                              out_dir=tmp_path / "p")
    cfg = json.loads((exported / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["num_virtual_tokens"], cfg["encoder_hidden_size"]) == ("P_TUNING", 4, 32)
    idx = torch.randint(0, 1000, (1, 12))
    ours = load_hf_checkpoint(tiny_checkpoint).eval()
    load_any_adapter(ours, tmp_path / "a" / "final")
    pm = peft.PeftModel.from_pretrained(load_hf(tiny_checkpoint), exported).eval()
    with torch.no_grad():
        expected = ours(idx)
        torch.testing.assert_close(pm(input_ids=idx).logits[:, -12:], expected, atol=1e-5, rtol=0)
    # the exported folder holds the encoder's output: resuming from it trains those embeddings directly
    second = run(tmp_path / "b", resume_adapter=exported)
    manifest = json.loads((tmp_path / "b" / "final" / "leantune.json").read_text())
    assert manifest["method_args"]["encoder"] == "none" and second["trainable_params"] == 4 * ours.config.n_embd


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning", "prefix_tuning"])
def test_estimate_counts_activations_through_every_block(method):
    """Virtual tokens feed every block, so backward keeps every block's activations like LoRA on layer 0 (the
    estimate once found no block holding a trained tensor and counted none); prompt and P-tuning add P positions."""
    config = Config.from_name("SmolLM2-135M-Instruct")
    kw = dict(precision="32-true", micro_batch_size=8, max_seq_length=256, device="cpu")
    lora = estimate(config, "lora", None, **kw)["activations_gb"]  # q/v of every block, from block 0
    ours = estimate(config, method, {"num_virtual_tokens": 64}, **kw)["activations_gb"]
    if method == "prefix_tuning":
        assert 0.8 * lora < ours <= lora
    else:
        assert 0.8 * lora * (256 + 64) / 256 < ours < 1.3 * lora * (256 + 64) / 256
