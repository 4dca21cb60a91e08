"""Prompt tuning (Lester et al. 2021): P learned input embeddings prepended to every sequence; the base is untouched.

The virtual embeddings start as the embeddings of P random vocabulary tokens (`--prompt_tuning.init vocab`, PEFT's
SAMPLE_VOCAB), of a text cycled to P tokens (`init text` with `--prompt_tuning.init_text`, e.g. a task description),
or N(0, 1) (`random`, PEFT's default, far off the scale of real embeddings). Not mergeable: there is no weight to
fold the prompt into.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from leantune.models.decoder.model import GPT
from leantune.peft.base import Method, PeftFormat, mark_trainable
from leantune.peft.peft_format import export_prompt_tuning, load_into, read_virtual
from leantune.peft.virtual import (
    PromptEmbeddings,
    init_from_tokens,
    input_embedding,
    install,
    placement,
    sample_vocab_ids,
    virtual_params,
)

INITS = ("vocab", "text", "random")


@dataclass
class PromptTuningArgs:
    num_virtual_tokens: int = 20
    """Learned virtual tokens prepended to every sequence."""
    init: str | None = None
    """How the virtual embeddings start: vocab (random vocabulary tokens' embeddings), text (the embeddings of
    --prompt_tuning.init_text, cycled to num_virtual_tokens) or random (N(0, 1)). Default: text when init_text is
    given, else vocab."""
    init_text: str | None = None
    """Text whose token embeddings start the prompt (e.g. "Sort the numbers in ascending order:")."""

    def __post_init__(self) -> None:
        if self.num_virtual_tokens < 1:
            raise ValueError(f"--prompt_tuning.num_virtual_tokens must be >= 1, got {self.num_virtual_tokens}")
        if self.init is None:
            self.init = "text" if self.init_text else "vocab"
        if self.init not in INITS:
            raise ValueError(f"--prompt_tuning.init must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.init == "text" and not self.init_text:
            raise ValueError("--prompt_tuning.init text needs --prompt_tuning.init_text")
        if self.init_text and self.init != "text":
            raise ValueError(f"--prompt_tuning.init_text is only used with --prompt_tuning.init text, not {self.init}")


def apply_prompt_tuning(model: GPT, args: PromptTuningArgs) -> list[str]:
    prompt = PromptEmbeddings(args.num_virtual_tokens, input_embedding(model).embedding_dim, **placement(model))
    if args.init == "vocab":
        init_from_tokens(prompt, model, sample_vocab_ids(model, args.num_virtual_tokens))
    return mark_trainable(model, install(model, prompt))


def init_prompt_text(model: GPT, args: PromptTuningArgs, tokenizer) -> None:
    """`init text` needs the tokenizer, so it runs once the method is applied, before the first step."""
    if args.init == "text":
        init_from_tokens(model.virtual, model, tokenizer.encode(args.init_text, bos=False, eos=False))


def import_prompt(model: GPT, peft_dir: str | Path) -> PromptTuningArgs:
    """Apply a PEFT PROMPT_TUNING folder to `model`; returns the args it amounts to."""
    cfg, t = read_virtual(peft_dir, "PROMPT_TUNING", model)
    args = PromptTuningArgs(num_virtual_tokens=t.shape[0], init="random")
    apply_prompt_tuning(model, args)
    load_into(model.virtual, t, peft_dir)
    return args


METHOD = Method(
    name="prompt_tuning",
    summary="prompt tuning: learned virtual token embeddings prepended to the input, PEFT-exportable",
    args_class=PromptTuningArgs,
    apply=apply_prompt_tuning,
    adapter_params=virtual_params,
    default_lr=3e-2,
    peft=PeftFormat(peft_type="PROMPT_TUNING", export=export_prompt_tuning, load=import_prompt),
    prepare=init_prompt_text,
)
