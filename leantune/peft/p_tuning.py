"""P-tuning (Liu et al. 2021): virtual token embeddings produced by a small prompt encoder (an MLP, or a
bidirectional LSTM and an MLP) over learned inputs; the base is untouched.

The encoder only helps optimisation: an exported PEFT folder holds its output (P, n_embd), as PEFT saves it, and such
a folder imports as `--p_tuning.encoder none` (the embeddings trained directly from there on). Not mergeable.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from leantune.models.decoder.model import GPT
from leantune.peft.base import Method, PeftFormat, mark_trainable
from leantune.peft.peft_format import export_p_tuning, load_into, read_virtual
from leantune.peft.virtual import PromptEmbeddings, input_embedding, install, placement, virtual_params

ENCODERS = ("mlp", "lstm", "none")


@dataclass
class PTuningArgs:
    num_virtual_tokens: int = 20
    """Virtual tokens prepended to every sequence."""
    encoder: str = "mlp"
    """Prompt encoder: mlp (three linear layers with ReLU), lstm (bidirectional LSTM then an MLP) or none (train
    the embeddings directly, as after importing a PEFT folder)."""
    encoder_hidden_size: int | None = None
    """Hidden width of the encoder (default: the model's embedding width)."""
    encoder_num_layers: int = 2
    """LSTM layers (lstm encoder only)."""
    encoder_dropout: float = 0.0
    """Dropout between LSTM layers (lstm encoder only)."""

    def __post_init__(self) -> None:
        if self.num_virtual_tokens < 1:
            raise ValueError(f"--p_tuning.num_virtual_tokens must be >= 1, got {self.num_virtual_tokens}")
        if self.encoder not in ENCODERS:
            raise ValueError(f"--p_tuning.encoder must be one of {', '.join(ENCODERS)}, got {self.encoder!r}")
        if self.encoder_hidden_size is not None and self.encoder_hidden_size < 1:
            raise ValueError(f"--p_tuning.encoder_hidden_size must be >= 1, got {self.encoder_hidden_size}")
        if self.encoder_num_layers < 1:
            raise ValueError(f"--p_tuning.encoder_num_layers must be >= 1, got {self.encoder_num_layers}")
        if not 0 <= self.encoder_dropout < 1:
            raise ValueError(f"--p_tuning.encoder_dropout must be in [0, 1), got {self.encoder_dropout}")


def apply_p_tuning(model: GPT, args: PTuningArgs) -> list[str]:
    prompt = PromptEmbeddings(args.num_virtual_tokens, input_embedding(model).embedding_dim, encoder=args.encoder,
                              hidden_size=args.encoder_hidden_size, num_layers=args.encoder_num_layers,
                              dropout=args.encoder_dropout, **placement(model))
    return mark_trainable(model, install(model, prompt))


def import_p_tuning(model: GPT, peft_dir: str | Path) -> PTuningArgs:
    """Apply a PEFT P_TUNING folder: it holds the encoder's output, so the encoder is gone (`encoder none`)."""
    _cfg, t = read_virtual(peft_dir, "P_TUNING", model)
    args = PTuningArgs(num_virtual_tokens=t.shape[0], encoder="none")
    apply_p_tuning(model, args)
    load_into(model.virtual, t, peft_dir)
    return args


METHOD = Method(
    name="p_tuning",
    summary="P-tuning: virtual token embeddings from a trained prompt encoder (MLP or LSTM), PEFT-exportable",
    args_class=PTuningArgs,
    apply=apply_p_tuning,
    adapter_params=virtual_params,
    default_lr=3e-3,
    peft=PeftFormat(peft_type="P_TUNING", export=export_p_tuning, load=import_p_tuning),
)
