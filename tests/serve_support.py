"""Shared by the serve tests (a helper module, not a test module): a tiny random Llama checkpoint with the default
model's tokenizer, adapters of several methods with non-zero weights, leantune's own `generate` path for the
expected texts, and a uvicorn server on a loopback port inside the test process."""

from __future__ import annotations

import contextlib
import io
import shutil
import socket
import threading
import time
from pathlib import Path

import torch

from leantune.checkpoint.hf import TOKENIZER_FILES, load_hf_checkpoint
from leantune.decode.generate import Sampling, encode_prompt, stream_text
from leantune.inference import load_for_inference
from leantune.methods import apply_method, build_manifest, method_args_class, save_checkpoint
from leantune.models.decoder.config import Config
from leantune.models.decoder.model import GPT
from leantune.serve.app import ServeSettings, create_app
from leantune.serve.engine import Engine
from leantune.tokenizer import Tokenizer


def one_thread():
    """Module fixture body: torch on one thread while the module runs (the server, its engine thread and the
    references share the process; on a loaded 2-core machine two threads each ran ~10x slower), restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class StubTokenizer:
    """Token i decodes to "<i>": the engine's tokenizer for random tiny models, which have no vocabulary. `eos_ids`
    end a row (none: rows run to their max_tokens)."""

    def __init__(self, eos_ids=()) -> None:
        self.eos_ids = list(eos_ids)

    def text(self, ids) -> str:
        return "".join(f"<{i}>" for i in ids if i not in self.eos_ids)

    def stream_decoder(self):
        class Decoder:
            def push(self, token):
                return f"<{token}>"

            def flush(self):
                return ""
        return Decoder()


def sliding_window_model() -> GPT:
    """A Mistral-style tiny GPT (vocab 97, window 6) with large random weights, so rows of different prompts differ;
    the caller seeds torch first."""
    model = GPT(Config(vocab_size=97, block_size=64, n_layer=2, n_embd=32, n_head=4, n_query_groups=2,
                       norm_class="rmsnorm", mlp_class="swiglu", intermediate_size=64, sliding_window=6)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.5)
    return model


def tiny_checkpoint(default_checkpoint: Path, out: Path, block_size: int = 256) -> Path:
    """A 2-layer random Llama (vocab of the default tokenizer) whose weights are spread wide enough that greedy
    choices are decided by clear margins, not by rounding; tokenizer and chat template from the default model."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=block_size,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (default_checkpoint / name).is_file() and name != "generation_config.json":
            shutil.copy(default_checkpoint / name, out / name)
    return out


def make_adapter(checkpoint: Path, out: Path, method: str, seed: int, scale: float = 0.5, **args) -> Path:
    """A leantune adapter folder of `method` whose trained tensors are perturbed away from their (often identity)
    initial values, so it changes the model's greedy text."""
    model = load_hf_checkpoint(checkpoint, dtype=torch.float32)
    method_args = method_args_class(method)(**args) if method_args_class(method) else None
    trainable = apply_method(model, method, method_args)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in trainable:
                p.add_(torch.randn_like(p) * scale)
    manifest = build_manifest(method, method_args, checkpoint, Tokenizer(checkpoint), None, "32-true", model=model)
    out.mkdir(parents=True)
    save_checkpoint(out, model, method, trainable, manifest, checkpoint)
    return out


class Reference:
    """leantune's `generate` path (load_for_inference + stream_text, what `leantune generate` runs) for one adapter,
    loaded once: the text each served request must equal."""

    def __init__(self, checkpoint: Path, adapter: Path | None = None) -> None:
        self.model, self.tokenizer, _, self.device = load_for_inference(checkpoint, "32-true", adapter)

    def text(self, prompt: str, max_new_tokens: int, raw: bool = False, stop: list[str] | None = None,
             sampling: Sampling | None = None, seed: int = 0) -> str:
        ids = torch.tensor(encode_prompt(self.tokenizer, prompt, raw=raw), dtype=torch.long)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        with contextlib.redirect_stdout(io.StringIO()):
            text, _, _ = stream_text(self.model, self.tokenizer, ids, max_new_tokens, sampling or Sampling(), stop,
                                     generator)
        return text


class LoopbackServer:
    """uvicorn serving `app` on 127.0.0.1 with a port the OS picks, in a thread; stops on close()."""

    def __init__(self, app) -> None:
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)
        self.sock.close()


def build_world(default_checkpoint: Path, root: Path) -> dict:
    """The tiny checkpoint, a leantune LoRA `a`, a PEFT LoRA folder `b` (exported from a leantune one), a prefix-tuning
    adapter `c`, and the `generate` reference of each (and of the base, `tiny`)."""
    from leantune.commands.export import export

    ckpt = tiny_checkpoint(default_checkpoint, root / "tiny")
    a = make_adapter(ckpt, root / "lora-a", "lora", seed=1, r=4, alpha=8, targets="all")
    b_lt = make_adapter(ckpt, root / "lora-b", "lora", seed=2, r=2, alpha=4, targets="query,value,mlp")
    b = export(adapter=b_lt, checkpoint_dir=ckpt, format="peft", out_dir=root / "lora-b-peft")
    c = make_adapter(ckpt, root / "prefix", "prefix_tuning", seed=3)
    refs = {"tiny": Reference(ckpt), "a": Reference(ckpt, a), "b": Reference(ckpt, b), "c": Reference(ckpt, c)}
    return {"ckpt": ckpt, "a": a, "b": b, "c": c, "refs": refs}


def start_server(world: dict, max_batch: int, max_queue: int, default_max_tokens: int, adapters=("a", "b"),
                 api_key: str | None = None, **settings):
    """(engine, LoopbackServer) over the world's base, named `tiny`, with `adapters` loaded; `settings` are more
    ServeSettings fields."""
    model, tokenizer, _, _ = load_for_inference(world["ckpt"], "32-true")
    engine = Engine(model, tokenizer, world["ckpt"], "tiny", max_batch=max_batch, max_queue=max_queue)
    for name in adapters:
        engine.add_adapter(name, world[name])
    app = create_app(engine, ServeSettings(api_key=api_key, default_max_tokens=default_max_tokens, **settings))
    return engine, LoopbackServer(app)
