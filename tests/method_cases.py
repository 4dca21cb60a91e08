"""Every method of the table, for the suites that must hold for all of them (trainability, resume, the one loop):
new methods join these suites by registering, with their default args unless a tiny model needs others."""

from leantune.methods import METHODS
from leantune.peft.adapter import AdapterArgs
from leantune.peft.adapter_v2 import AdapterV2Args
from leantune.peft.lora import LoRAArgs

# Method args for the tiny 2-layer test models (LLaMA-Adapter's default start_layer 2 needs 3 layers); LoRA with
# dropout on, so exactness is tested where randomness is.
TINY_ARGS = {"lora": LoRAArgs(r=4, dropout=0.1), "adapter": AdapterArgs(start_layer=1),
             "adapter_v2": AdapterV2Args(start_layer=1)}

# Variants (qlora = lora on a quantized base) share their base method's checkpoints and are tested with it.
EVERY_METHOD = sorted(name for name, m in METHODS.items() if m.variant_of is None)


def tiny_args(method: str):
    return TINY_ARGS.get(method)
