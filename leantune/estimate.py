"""`leantune estimate`: trainable/total parameters and a training memory estimate, on the meta device.

Memory model (bytes), checked against a measured CPU training step by bench/estimate_memory.py:
  weights      = parameters x weight bytes + the fp32 RoPE cache; with --quantize the block linears take what
                 bitsandbytes stores (leantune.models.quantize.quantized_nbytes: 4-bit 0.5 byte + a 4-byte scale per 64,
                 or with -dq a 1-byte scale + 4 bytes per 64 x 256; int8 1 byte + 4 per row)
  gradients    = trainable x weight bytes (-true) or 4 (-mixed: fp32 master weights)
  optimizer    = trainable x state bytes: torch Adam/AdamW keep two moments in the parameter dtype (2 x weight
                 bytes), bnb 8-bit 2, bnb 32-bit 8, SGD 0 (leantune's default momentum is 0)
  activations  = what backward keeps, per token and layer that gradient flows through, counted tensor by tensor
                 (`_block_bytes`: the norms' fp32 inputs, q/k after RoPE, the qkv output, the attention output and
                 log-sum-exp, the MLP intermediates; plus the inputs of trained linears, LoRA's dropout output and
                 mask, adapter-v2's pre-scale outputs), plus the larger of the loss's working set (one 1024-token
                 chunk of fp32 logits; leantune never materialises all logits) and, with activation checkpointing,
                 the one block that backward recomputes.
                 A trained plain LM head adds its fp32 gradient here: the fused loss builds it during the forward.
  total        = the peak, not the sum: weights + optimizer + max(activations, gradients + the optimizer step's
                 temporaries). A full finetune's gradients grow while activations are freed, so the two never peak
                 together.
Preference objectives (--objective dpo|ipo|orpo|simpo): a micro-batch of b pairs is 2b rows (chosen and rejected);
the response log-probs run through an unfused head (a chunk's logits in the activation dtype plus two fp32 copies);
dpo/ipo with the adapter switched off add the reference pass, a no-grad forward over the same rows taken while the
policy's activations are held: one block's working set for every row plus its head chunk. A precomputed reference
(full finetuning, --preference.reference precomputed) costs 8 bytes per pair instead.
Not included: the CUDA context and caching-allocator slack (typically 0.3-1 GB on a GPU).
"""

from __future__ import annotations

from pathlib import Path

import torch

from leantune.methods import apply_method, get_method
from leantune.models.decoder.config import Config
from leantune.models.decoder.model import GPT
from leantune.models.kinds import kind_of_folder
from leantune.models.quantize import check_mode, is_quantizable, quantize_model, quantized_nbytes, storage_tensors
from leantune.models.t5.model import T5, T5Config
from leantune.models.t5.presets import T5_PRESETS
from leantune.peft.adapter_v2 import AdapterV2Linear
from leantune.peft.lora import LoRALinear
from leantune.runtime import compute_dtype, weight_dtype
from leantune.train.loop import enable_activation_checkpointing
from leantune.train.optim import OptimizerArgs, build_optimizer
from leantune.train.step import train_step

DTYPE_BYTES = {"32-true": 4, "bf16-true": 2, "16-true": 2, "bf16-mixed": 4, "16-mixed": 4}
CE_CHUNK = 1024  # tokens per logits chunk in leantune.train.loss.supervised_ce_sum


def resolve_config(model: str) -> Config | T5Config:
    """The architecture of a checkpoint folder or a preset name, decoder (`Config`) or T5 (`T5Config`)."""
    path = Path(model)
    if (path / "config.json").is_file():
        return kind_of_folder(path).config_of(path)
    if model.strip().lower().split("/", 1)[-1] in {n.lower().split("/", 1)[-1] for n in T5_PRESETS}:
        return T5Config.from_name(model)
    return Config.from_name(model)


def _counted(model_class: type, config, method: str, method_args):
    """Build the model on the meta device with the method applied: (model, trainable names, {id: (name, tensor)}
    of unique tensors (a tied head once), total count, trainable count)."""
    method_args = get_method(method).make_args(method_args)
    with torch.device("meta"):
        model = model_class(config)
        trainable_names = set(apply_method(model, method, method_args))
    unique = {}
    for n, p in model.named_parameters():
        unique.setdefault(id(p), (n, p))
    total = sum(p.numel() for _, p in unique.values())
    trainable = sum(p.numel() for n, p in unique.values() if n in trainable_names)
    return model, trainable_names, unique, total, trainable


def _frozen_matrices_in_half(model, unique: dict, trainable_names: set, precision: str, quantized: list) -> int:
    """Elements that a -mixed run stores in 2 bytes instead of 4: the frozen float matrices other than embedding
    tables and packed quantized weights (leantune.runtime.cast_frozen_matrices)."""
    if not precision.endswith("mixed"):
        return 0
    skip = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)} | {id(p) for p in quantized}
    return sum(p.numel() for i, (n, p) in unique.items() if p.ndim >= 2 and n not in trainable_names and i not in skip)


def estimate_t5(config: T5Config, method: str, method_args=None, precision: str = "bf16-true",
                optimizer: str = "AdamW") -> dict:
    """Parameter counts and the parameter-sized memory (weights, gradients, optimizer state) of a T5 finetune, in
    GiB, built on the meta device. Activations are not modelled for T5 yet, so `total_gb` excludes them."""
    _, _, _, total, trainable = _counted(T5, config, method, method_args)
    wbytes = DTYPE_BYTES[precision] if precision.endswith("true") else 4
    weights = total * wbytes
    grads = trainable * (4 if precision.endswith("mixed") else wbytes)
    adam = 2 * wbytes if precision.endswith("true") else 8
    optim = trainable * {"SGD": 0, "bnb.AdamW8bit": 2, "bnb.PagedAdamW8bit": 2}.get(optimizer, adam)
    gib = 2**30
    return dict(trainable_params=trainable, total_params=total, trainable_percent=round(100 * trainable / total, 4),
                weights_gb=round(weights / gib, 3), gradients_gb=round(grads / gib, 3),
                optimizer_gb=round(optim / gib, 3), total_gb=round((weights + grads + optim) / gib, 3))


def estimate(config: Config, method: str, method_args=None, precision: str = "bf16-true", quantize: str | None = None,
             micro_batch_size: int = 1, max_seq_length: int = 2048, optimizer: str = "AdamW",
             activation_checkpointing: bool = False, device: str = "cuda", objective: str = "sft",
             reference: str = "adapter_off") -> dict:
    """Parameter counts and the memory model above, in GiB. `device` ("cuda" or "cpu") selects two kernel details
    that differ: CPU dropout keeps its mask in the activation dtype (CUDA: 1 byte), and CUDA's AdamW updates all
    tensors at once (foreach: one trainable-sized temporary) where CPU loops tensor by tensor."""
    model, trainable_names, unique, total, trainable = _counted(GPT, config, method, method_args)
    wbytes = DTYPE_BYTES[precision] if precision.endswith("true") else 4
    c = config
    rope_cache = 2 * c.block_size * c.rope_n_elem * 4  # cos and sin, fp32, built at the first forward
    if quantize:
        check_mode(quantize)
        # the block linears are stored by bitsandbytes; everything else stays in the weight dtype
        quantized = [p for n, p in unique.values() if is_quantizable(n) and n not in trainable_names]
        weights = sum(quantized_nbytes(*p.shape, quantize) for p in quantized)
        weights += (total - sum(p.numel() for p in quantized)) * wbytes
        dequant_temp = max((p.numel() for p in quantized), default=0) * (2 if precision != "32-true" else 4)
    else:
        quantized = []
        weights = total * wbytes
        dequant_temp = 0
    weights -= 2 * _frozen_matrices_in_half(model, unique, trainable_names, precision, quantized)
    weights += rope_cache
    grads = trainable * (4 if precision.endswith("mixed") else wbytes)
    adam = 2 * wbytes if precision.endswith("true") else 8  # torch keeps the moments in the parameter dtype
    state = {"AdamW": adam, "Adam": adam, "SGD": 0, "bnb.AdamW8bit": 2, "bnb.PagedAdamW8bit": 2,
             "bnb.PagedAdamW": 8, "bnb.AdamW": 8}
    optim = trainable * state.get(optimizer, adam)
    largest = max((p.numel() for n, p in unique.values() if n in trainable_names), default=0)
    if optimizer.startswith(("Adam", "bnb.")):
        # CUDA foreach: sqrt of every second moment at once; CPU: per tensor (sqrt, divide and clipping temporaries
        # of the largest tensor: 3x measured)
        step_temp = trainable * wbytes if device == "cuda" else 3 * largest * wbytes
    else:
        step_temp = 0

    act = 2 if precision != "32-true" else 4
    # virtual embeddings (prompt/P-tuning) run through the model as extra positions of every sequence
    run_through = model.virtual is not None and model.virtual.injects == "embeddings"
    rows = micro_batch_size * (2 if objective != "sft" else 1)  # a pair is a chosen and a rejected row
    tokens = rows * (max_seq_length + (model.n_virtual if run_through else 0))
    first = _first_block_with_gradient(model, trainable_names)
    grad_layers = c.n_layer - first
    block = _block_bytes(model.transformer.h[-1], c, act)
    if quantize == "bnb.int8":
        # bitsandbytes' int8 matmul keeps its input for backward even with a frozen weight: the qkv, attention
        # projection, MLP input and MLP projection inputs of each block (4-bit matmuls keep none)
        block += act * (3 * c.n_embd + c.intermediate_size)
    prefix = sum(_block_constant_bytes(b, c, act) for b in model.transformer.h[first:])
    head = model.lm_head
    head_trains = any(p.requires_grad for p in head.parameters())
    final_norm = _norm_bytes(model.transformer.ln_f, c, act)
    # each checkpointed block keeps only its input; backward recomputes one block at a time (after the loss)
    recompute = block * tokens if activation_checkpointing and grad_layers else 0
    saved = grad_layers * (act * c.n_embd if activation_checkpointing else block) * tokens
    saved += prefix + (final_norm * tokens if grad_layers else 0)
    chunk = min(tokens, CE_CHUNK)
    V, C = c.padded_vocab_size, c.n_embd
    if type(head) is torch.nn.Linear:
        # fused linear + CE: keeps d loss / d hidden and works on one chunk of fp32 logits at a time. Its largest
        # moments: the logits in both dtypes (a CPU without native bf16 matmuls adds an fp32 copy), and, when the
        # head trains, softmax + its act-dtype copy + the chunk's (V, C) weight-gradient product and its fp32 copy.
        saved += act * tokens * C
        low = 0 if act == 4 else act + (4 if device == "cpu" else 0)
        ce_work = (4 + low) * chunk * V
        head_grad = 4 * V * C if head_trains else 0  # fp32 gradient built during the forward
        if head_trains:
            ce_work = max(ce_work, (4 + (0 if act == 4 else act)) * chunk * V + (4 + (0 if act == 4 else act)) * V * C)
    else:
        # a PEFT-wrapped head runs as a module: one chunk keeps its logits (act) and fp32 log-softmax, more chunks
        # are recomputed in backward and keep only the hidden states
        saved += (act + 4) * tokens * V if tokens <= CE_CHUNK else act * tokens * C
        ce_work = 8 * chunk * V
        head_grad = 0
    reference_pass = 0
    if objective != "sft":
        ce_work = (act + 8) * chunk * V  # log-probs: the chunk's logits, their fp32 copy and log-softmax
        if objective in ("dpo", "ipo") and reference == "adapter_off" and not get_method(method).saves_full_model:
            reference_pass = block * tokens + ce_work
    # a quantized layer's matmul dequantizes its weight into a temporary, one layer at a time
    activations = saved + max(ce_work, recompute, dequant_temp, reference_pass) + head_grad
    peak = weights + optim + max(activations, grads + step_temp)
    gib = 2**30
    return dict(
        trainable_params=trainable, total_params=total, trainable_percent=round(100 * trainable / total, 4),
        weights_gb=round(weights / gib, 3), gradients_gb=round(grads / gib, 3), optimizer_gb=round(optim / gib, 3),
        activations_gb=round(activations / gib, 3), total_gb=round(peak / gib, 3),
        **({"reference_pass_gb": round(reference_pass / gib, 3)} if objective != "sft" else {}),
    )


def _first_block_with_gradient(model: GPT, trainable: set[str]) -> int:
    """Blocks below the first one holding a trainable tensor get no gradient and keep nothing for backward (virtual
    tokens feed every block: the gradient flows through all of them)."""
    if any(n.startswith(("transformer.wte", "transformer.wpe", "virtual.")) for n in trainable):
        return 0
    for i in range(model.config.n_layer):
        if any(n.startswith(f"transformer.h.{i}.") for n in trainable):
            return i
    return model.config.n_layer


def _norm_bytes(norm: torch.nn.Module, c: Config, act: int) -> int:
    """Per token: RMSNorm keeps its fp32 input and 1/rms (+ the normalised input if its weight trains, except in
    fp32, where leantune.models.ops' fused RMSNorm recomputes it); LayerNorm keeps its input, mean and 1/std."""
    trains = any(p.requires_grad for p in norm.parameters())
    if c.norm_class == "rmsnorm":
        return 4 * c.n_embd + 4 + (act * c.n_embd if trains and act != 4 else 0)
    return act * c.n_embd + 8


def _block_bytes(block: torch.nn.Module, c: Config, act: int) -> int:
    """Bytes per token one block keeps for backward (counted against torch's saved tensors; see the tests)."""
    C, inter = c.n_embd, c.intermediate_size
    q, k, v = c.qkv_sizes
    attn, mlp = block.attn, block.mlp
    norms = [n for n in (block.norm_1, block.norm_2) if n is not None]
    b = sum(_norm_bytes(n, c, act) for n in norms)
    linears_train = attn.qkv.weight.requires_grad
    if linears_train:
        b += act * C * len(norms)  # the norm outputs, inputs of trained linears
        if act == 4:  # fp32: leantune.models.ops' fused RoPE leaves SDPA's output (B, nh, T, hs)-contiguous, so proj's
            b += act * q  # reshape of it is a copy that proj keeps (in bf16 it is a view of the output)
    # SDPA keeps q and k after RoPE, v (a view: the whole qkv output), its output (also proj's input) and lse
    b += act * (q + k + v) + (act * (q + k) if c.rope_n_elem else 0) + act * q + 4 * c.n_head
    if attn.adapter is not None:
        b += act * q + 4 * c.n_head  # the prefix attention's output and lse
    if c.mlp_class == "swiglu":
        b += 3 * act * inter + (act * inter if linears_train else 0)  # fc_1 out, silu out, fc_2 out (+ proj's input)
    else:
        b += act * inter + (act * inter if linears_train else 0)
    for m in [*attn.children(), *mlp.children()]:
        if isinstance(m, LoRALinear):
            p = m.dropout.p if isinstance(m.dropout, torch.nn.Dropout) else 0.0
            # dropout output (A's input) and its bool mask, 1 byte a value (leantune.models.ops.dropout on the CPU,
            # the fused kernel on CUDA)
            b += (act + 1) * m.in_features if p > 0 else 0
            b += act * len(m.parts) * m.r  # x A^T, the input of B
        elif isinstance(m, AdapterV2Linear):
            b += act * m.out_features  # x W^T before the trainable scale
    return b


def _block_constant_bytes(block: torch.nn.Module, c: Config, act: int) -> int:
    """Per block, independent of tokens, kept for backward: LLaMA-Adapter's projected prefix (P x qkv) and each
    LoRA layer's (out, parts * r) update matrix scaling * B."""
    b = sum(act * m.out_features * len(m.parts) * m.r for m in block.modules() if isinstance(m, LoRALinear))
    if block.attn.adapter is None:
        return b
    P = block.attn.adapter.wte.weight.shape[0]
    return b + act * P * sum(c.qkv_sizes) * (2 if isinstance(block.attn.qkv, AdapterV2Linear) else 1)


# ---- measurement: what one real training step holds, to check `estimate` against ---------------------------------


def build_random_model(config: Config, method: str, method_args, precision: str, quantize: str | None = None):
    """A random-weight GPT in the precision's weight dtype, its block linears quantized with `quantize` (pass it
    with functools.partial), with `method` applied; returns (model, trainable names). The model builder of
    `measure_training_memory`."""
    method_args = get_method(method).make_args(method_args)
    torch.manual_seed(0)
    model = GPT(config).to(weight_dtype(precision))
    if quantize:
        quantize_model(model, quantize, compute_dtype(precision))
    return model, apply_method(model, method, method_args)


def measure_training_memory(config: Config, method: str, method_args=None, precision: str = "32-true",
                            micro_batch_size: int = 1, max_seq_length: int = 512, optimizer: str = "AdamW",
                            activation_checkpointing: bool = False, build_model=build_random_model) -> dict:
    """Peak bytes of live tensors during a real training step on CPU, measured in a fresh subprocess.

    `build_model(config, method, method_args, precision) -> (model, trainable_names)` must be picklable (a
    module-level function or a functools.partial of one). Returns the measured components in GiB (see `_measure`).
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    spec = dict(config=config, method=method, method_args=method_args, precision=precision,
                micro_batch_size=micro_batch_size, max_seq_length=max_seq_length, optimizer=optimizer,
                activation_checkpointing=activation_checkpointing, build_model=build_model)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_measure, spec).result()


def _tensors(tree):
    """Every tensor in a nested dict (bitsandbytes nests its 8-bit optimizer state one level deeper)."""
    for v in tree.values():
        if isinstance(v, dict):
            yield from _tensors(v)
        elif isinstance(v, torch.Tensor):
            yield v


def _measure(spec: dict) -> dict:
    """A warm-up step on 8 tokens, then one profiled step of exactly fit's inner loop (forward with return_hidden, the
    chunked supervised cross-entropy, backward, clip_grad_norm_, optimizer step, zero_grad(set_to_none)).

    Method, and why it is sound: every CPU tensor's memory comes from c10's CPU allocator, and under
    `torch.profiler(profile_memory=True)` that allocator reports each allocation and free together with its running
    total of live bytes (`total_allocated`, updated under a lock, so its maximum is the true peak whatever the event
    order; it counts kernel-internal temporaries and autograd's saved tensors alike). This process is fresh and
    profiles once, so the running total starts at 0 and counts exactly the bytes allocated during the profiled step
    that are still alive; the bytes alive before it (parameters, buffers, the optimizer state created by the
    warm-up step, the batch) are summed from the tensors themselves. Peak = that baseline + the running total's
    maximum. The second step is measured because from then on the optimizer state is resident, as in a real run
    (its size does not depend on the batch, so a tiny warm-up batch creates all of it).
    Not counted: allocator caching/fragmentation and the Python/torch runtime (CPU has no caching allocator; on a
    GPU, add the CUDA context and the caching allocator's slack). Peak RSS would not do: glibc keeps freed
    blocks of the warm-up step and reuses them, so an RSS delta under-counts, and the runtime's own pages blur it.
    """
    from torch._C._profiler import _ExtraFields_Allocation
    from torch.profiler import ProfilerActivity, profile, record_function

    torch.set_num_threads(2)
    model, trainable = spec["build_model"](spec["config"], spec["method"], spec["method_args"], spec["precision"])
    model.train()
    if spec["activation_checkpointing"]:
        enable_activation_checkpointing(model)
    named = dict(model.named_parameters())
    params = [named[n] for n in trainable]
    opt = build_optimizer(params, OptimizerArgs(name=spec["optimizer"], lr=1e-4))
    g = torch.Generator().manual_seed(0)
    B, T = spec["micro_batch_size"], spec["max_seq_length"]
    ids = torch.randint(0, spec["config"].vocab_size, (B, T + 1), generator=g)
    x, y = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()  # every token supervised: the CE's worst case
    # the training loop's own step (leantune.train.step.train_step) on one micro-batch; the warm-up on a few tokens
    # creates the optimizer state and the RoPE cache
    train_step(model, [{"input_ids": x[:1, :8], "labels": y[:1, :8]}], opt, params, max_norm=1.0)

    def nbytes(tensors) -> int:
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors
                    if isinstance(t, torch.Tensor) and t.device.type == "cpu"}
        return sum(storages.values())

    resident = [t for p in model.parameters() for t in storage_tensors(p)]  # quantized: packed data + scales
    resident += [*model.buffers(), *(model._rope or ())]
    state_tensors = list(_tensors(opt.state))
    weights = nbytes(resident)
    optim_state = nbytes(state_tensors)
    baseline = nbytes([*resident, x, y, *state_tensors])
    grads = 0

    def mark_phase(name: str):
        nonlocal grads
        if name == "step":  # backward is done: every gradient is there
            grads = nbytes(p.grad for p in params if p.grad is not None)
        return record_function(f"phase:{name}")

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        train_step(model, [{"input_ids": x, "labels": y}], opt, params, max_norm=1.0, phase=mark_phase)

    phases = {"phase:forward": [], "phase:backward": [], "phase:step": []}

    def walk(nodes, phase):
        for n in nodes:
            phase = n.name if n.name in phases else phase
            if isinstance(n.extra_fields, _ExtraFields_Allocation) and n.extra_fields.device.type == "cpu":
                phases[phase or "phase:forward"].append(n.extra_fields)
            walk(n.children, phase)

    walk(prof.profiler.kineto_results.experimental_event_tree(), None)
    gib = 2**30
    out = dict(weights_gb=weights / gib, gradients_gb=grads / gib, optimizer_gb=optim_state / gib)
    live = 0  # bytes allocated in the profiled step and still alive, at the start of each phase
    for name, events in phases.items():
        short = name.split(":")[1]
        out[f"{short}_peak_gb"] = (baseline + max([e.total_allocated for e in events], default=live)) / gib
        live += sum(e.alloc_size for e in events)
        if short == "forward":
            out["activations_gb"] = live / gib  # what the forward left for backward (incl. the fused CE's grads)
    out["total_gb"] = max(out[f"{p}_peak_gb"] for p in ("forward", "backward", "step"))
    out["baseline_gb"] = baseline / gib
    return out

