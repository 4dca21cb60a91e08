"""leantune: finetune open LLMs with LoRA, adapters and full finetuning; outputs load in transformers, PEFT and llama.cpp."""

__version__ = "0.1.0"
