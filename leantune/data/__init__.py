"""Data: prompt styles, dataset modules, SFT tokenization (masking, packing) and previews.

Every dataset module is a dataclass `DataModule` subclass, so the CLI builds it from
`--data ClassName --data.field value`. This package never imports the model or the training loop.
"""

from leantune.data.alpaca import Alpaca
from leantune.data.base import DEFAULT_MAX_SEQ_LENGTH, DataModule, InstructionDataModule
from leantune.data.chat import Chat
from leantune.data.demo import Demo
from leantune.data.dolly import Dolly
from leantune.data.errors import DataError
from leantune.data.flan import FLAN
from leantune.data.json_data import JSON
from leantune.data.lima import LIMA
from leantune.data.longform import LongForm
from leantune.data.preference import DemoPreference, Preference, PreferenceDataModule
from leantune.data.prompts import PromptStyle, prompt_style_for_checkpoint
from leantune.data.summarization import Summarization
from leantune.data.text import Text

DATA_MODULES: dict[str, type[DataModule]] = {
    cls.__name__.lower(): cls for cls in (Alpaca, Dolly, LIMA, LongForm, FLAN, JSON, Chat, Summarization, Text, Demo,
                                                  Preference, DemoPreference)
}


def get_data_module(name: str, **kwargs) -> DataModule:
    """A data module by (case-insensitive) class name, e.g. get_data_module("json", json_path="data.jsonl")."""
    cls = DATA_MODULES.get(name.lower())
    if cls is None:
        raise ValueError(f"unknown data module {name!r}; known: {', '.join(DATA_MODULES)}")
    return cls(**kwargs)


__all__ = [
    "DATA_MODULES", "DEFAULT_MAX_SEQ_LENGTH", "FLAN", "JSON", "LIMA", "Alpaca", "Chat", "DataError", "DataModule", "Demo", "DemoPreference", "Dolly",
    "InstructionDataModule", "LongForm", "Preference", "PreferenceDataModule", "PromptStyle", "Summarization", "Text", "get_data_module",
    "prompt_style_for_checkpoint",
]
