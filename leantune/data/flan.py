"""FLAN (the Muennighoff/flan release LitGPT uses): `{inputs, targets}` JSON Lines per subset and split."""

from __future__ import annotations

from dataclasses import dataclass

from leantune.data.readers import read_examples, require_text
from leantune.data.remote import DownloadedDataModule
from leantune.data.sft import Example

URL = "https://huggingface.co/datasets/Muennighoff/flan/resolve/main"
SUBSETS = tuple(f"{name}_10templates" for name in (
    "aeslc", "ag_news_subset", "anli_r1", "anli_r2", "anli_r3", "arc_challenge", "arc_easy", "bool_q", "cb",
    "cnn_dailymail", "cola", "common_gen", "copa", "coqa", "cosmos_qa", "dart", "definite_pronoun_resolution", "drop",
    "e2e_nlg", "fix_punct", "gigaword", "glue_mrpc", "glue_qqp", "hellaswag", "imdb_reviews", "math_dataset",
    "mnli_matched", "mnli_mismatched", "multi_news", "multirc", "natural_questions", "openbookqa",
    "opinion_abstracts_idebate", "opinion_abstracts_rotten_tomatoes", "para_crawl_enes", "paws_wiki", "piqa", "qnli",
    "quac", "record", "rte", "samsum", "sentiment140", "snli", "squad_v1", "squad_v2", "sst2", "story_cloze", "stsb",
    "trec", "trivia_qa", "true_case", "web_nlg_en", "wic", "wiki_lingua_english_en", "wmt14_enfr",
    "wmt16_translate_csen", "wmt16_translate_deen", "wmt16_translate_fien", "wmt16_translate_roen",
    "wmt16_translate_ruen", "wmt16_translate_tren", "wnli", "word_segment", "wsc", "yelp_polarity_reviews"))


def flan_row(row: dict) -> dict:
    return {"instruction": require_text(row, "inputs"), "input": "", "output": require_text(row, "targets")}


@dataclass
class FLAN(DownloadedDataModule):
    """FLAN collection (66 subsets x 10 templates): train files for training, test files for validation."""

    subsets: str | None = None
    """Comma-separated subsets, e.g. "samsum_10templates,trec_10templates" (default: all 66; a large download)."""

    def selected_subsets(self) -> list[str]:
        if not self.subsets:
            return list(SUBSETS)
        chosen = [s.strip() for s in self.subsets.split(",") if s.strip()]
        unknown = [s for s in chosen if s not in SUBSETS]
        if unknown:
            raise ValueError(f"unknown FLAN subset(s) {unknown}; known: {', '.join(SUBSETS)}")
        return chosen

    def load_examples(self) -> tuple[list[Example], list[Example] | None]:
        splits: dict[str, list[Example]] = {"train": [], "test": []}
        for subset in self.selected_subsets():
            for split, examples in splits.items():
                name = f"{subset}_{split}.jsonl"
                path = self.fetch(f"{URL}/{split}/{name}", "flan", name, folder=True)
                examples += read_examples(path, flan_row, self.skips, '{"inputs": ..., "targets": ...}')
        return splits["train"], splits["test"]
