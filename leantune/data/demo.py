"""The built-in demo task set: small, verifiable instruction tasks with short exact answers.

It is the default data of `leantune finetune`: generated (no download), deterministic for a seed, with fixed
train/val/test splits whose prompts never overlap, and an exact-match scorer. A small instruct model learns the
answer formats within minutes on a CPU, so held-out accuracy visibly improves.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

from leantune.data.base import InstructionDataModule
from leantune.data.sft import Example

WORDS = (
    "apple banana cherry grape lemon mango melon peach pear plum berry olive onion carrot potato tomato pepper "
    "garlic bread butter cheese honey sugar salt water coffee tea milk juice soup rice pasta pizza cake cookie "
    "candy river ocean lake pond island desert forest jungle valley canyon mountain hill beach coast field garden "
    "meadow cloud storm rain snow wind thunder sunset sunrise morning evening night winter summer spring autumn "
    "planet comet star moon galaxy rocket engine motor wheel bridge tunnel tower castle palace temple church "
    "school library museum market office hotel airport station harbor village city street road avenue window "
    "door table chair sofa lamp mirror pillow blanket carpet curtain kitchen bottle glass plate spoon fork knife "
    "basket bucket ladder hammer shovel rope chain anchor compass camera guitar piano violin drum flute trumpet "
    "music poem story novel letter pencil marker paper notebook folder ticket wallet pocket button zipper jacket "
    "shirt skirt dress scarf glove boot sandal helmet tiger lion zebra horse donkey rabbit monkey turtle dolphin "
    "whale shark eagle falcon parrot pigeon penguin spider beetle butterfly dragon wizard knight pirate doctor "
    "farmer pilot sailor artist singer dancer writer friend family mother father sister brother cousin number "
    "circle square triangle silver golden purple orange yellow violet crimson marble copper iron stone crystal"
).split()


def _sort(r: random.Random) -> tuple[str, str]:
    nums = r.sample(range(1, 100), r.randint(3, 5))
    return (f"Sort these numbers from smallest to largest. Answer with the numbers separated by spaces: "
            f"{' '.join(map(str, nums))}", " ".join(map(str, sorted(nums))))


def _reverse(r: random.Random) -> tuple[str, str]:
    words = r.sample(WORDS, r.randint(3, 4))
    return (f"Reverse the order of these words. Answer with the words separated by spaces: {' '.join(words)}",
            " ".join(reversed(words)))


def _count(r: random.Random) -> tuple[str, str]:
    word = r.choice(WORDS)
    letter = r.choice(sorted(set(word)))
    return (f'How many times does the letter "{letter}" appear in the word "{word}"? Answer with a number.',
            str(word.count(letter)))


def _add(r: random.Random) -> tuple[str, str]:
    a, b = r.randint(10, 99), r.randint(10, 99)
    return f"What is {a} + {b}? Answer with the number only.", str(a + b)


def _subtract(r: random.Random) -> tuple[str, str]:
    a, b = sorted((r.randint(10, 99), r.randint(10, 99)), reverse=True)
    return f"What is {a} - {b}? Answer with the number only.", str(a - b)


def _convert(r: random.Random) -> tuple[str, str]:
    src, dst, factor, top = r.choice((("kilometers", "meters", 1000, 999), ("kilograms", "grams", 1000, 999),
                                      ("hours", "minutes", 60, 24)))
    n = r.randint(2, top)
    return f"Convert {n} {src} to {dst}. Answer with the number only.", str(n * factor)


def _upper(r: random.Random) -> tuple[str, str]:
    word = r.choice(WORDS)
    return f'Write the word "{word}" in uppercase letters. Answer with the word only.', word.upper()


TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "sort": _sort, "reverse": _reverse, "count": _count, "add": _add, "subtract": _subtract, "convert": _convert,
    "uppercase": _upper,
}


def normalize(text: str) -> str:
    """Whitespace collapsed, trailing period dropped: the only slack the exact-match scorer gives."""
    return re.sub(r"\s+", " ", text).strip().rstrip(".").strip()


def generate(seed: int, sizes: tuple[int, ...], tasks: tuple[str, ...] = tuple(TASKS)) -> list[list[dict]]:
    """Disjoint splits of unique prompts, tasks round-robin; the same seed and sizes give the same records.

    Splits are generated in order (test first), so the test set does not depend on the training size.
    """
    r = random.Random(seed)
    seen: set[str] = set()
    splits: list[list[dict]] = []
    k = 0
    for size in sizes:
        split: list[dict] = []
        misses = 0
        while len(split) < size:
            name = tasks[k % len(tasks)]
            k += 1
            instruction, answer = TASKS[name](r)
            if instruction in seen:
                misses += 1
                if misses > 100 * size + 1000:
                    raise ValueError(f"cannot generate {size} unique demo prompts from tasks {tasks}")
                continue
            seen.add(instruction)
            split.append({"instruction": instruction, "input": "", "output": answer, "task": name})
        splits.append(split)
    return splits


@dataclass
class Demo(InstructionDataModule):
    """Built-in verifiable tasks (sort, reverse, count letters, add, subtract, convert units, uppercase)."""

    num_train: int = 800
    """Training prompts."""
    num_val: int = 100
    """Validation prompts (for the validation loss)."""
    num_test: int = 100
    """Held-out test prompts (for exact-match accuracy before/after finetuning)."""
    task_seed: int = 0
    """Seed of the task generator (fixes every split)."""
    tasks: str | None = None
    """Comma-separated subset of tasks: sort, reverse, count, add, subtract, convert, uppercase (default: all)."""

    def task_names(self) -> tuple[str, ...]:
        if not self.tasks:
            return tuple(TASKS)
        names = tuple(t.strip() for t in self.tasks.split(",") if t.strip())
        unknown = [t for t in names if t not in TASKS]
        if unknown or not names:
            raise ValueError(f"unknown demo task(s) {unknown}; known: {', '.join(TASKS)}")
        return names

    def _splits(self) -> list[list[dict]]:
        key = (self.task_seed, self.num_test, self.num_val, self.num_train, self.task_names())
        if getattr(self, "_cache_key", None) != key:
            self._cache_key = key
            self._cache = generate(self.task_seed, (self.num_test, self.num_val, self.num_train), self.task_names())
        return self._cache

    def test_set(self) -> list[dict]:
        """Held-out records {instruction, input, output, task}; never in the training or validation split."""
        return [dict(r) for r in self._splits()[0]]

    @staticmethod
    def score(prediction: str, answer: str) -> bool:
        """Exact match after normalising whitespace and a trailing period."""
        return normalize(prediction) == normalize(answer)

    def load_examples(self) -> tuple[list[Example], list[Example] | None]:
        _, val, train = self._splits()
        return ([Example(r, "demo:train", i + 1, i) for i, r in enumerate(train)],
                [Example(r, "demo:val", i + 1, i) for i, r in enumerate(val)])
