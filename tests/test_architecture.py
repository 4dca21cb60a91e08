"""The import contract, checked from the source: layers import downwards only, no cycles, no function-local imports
of leantune modules (they only ever hide a cycle), and no runtime import of the test-only references.

Layers, bottom to top (a module may import its own layer and the ones below; a dotted name matches its package and
everything under it, the longest match wins):
  0 facts       runtime, the decoder's config, presets and families, T5 presets
  1 model       models (the two model kinds, fused ops, quantized layers), the decode kernels (compile, woq, gemv)
  2 parts       checkpoint, data, tokenizer, peft, decode (generate, seq2seq), download, and the kind records
                (models.kinds: each kind's load/save and decoding entry points live in checkpoint and decode)
  3 library     methods, train, inference, merge, export, estimate, serve, upload
  4 evaluation  evaluation (evaluate, harness, tasks, rouge): it scores with train's loss
  5 use cases   finetune (the recipe: data, model, loop, evaluation), experiments (sweeps of finetune runs),
                report (run comparison pages)
  6 commands    commands, cli
Plus narrower rules from the design: data never imports the model or training; a PEFT method never imports the
registry, the loop or the commands; checkpoint formats know no loop and no method.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "leantune"

LAYERS = [
    ("runtime", "cpu_threads", "models.decoder.config", "models.decoder.presets", "models.decoder.families", "models.t5.presets"),
    ("models", "decode.compile", "decode.woq", "decode.gemv", "decode.packed"),
    ("checkpoint", "data", "tokenizer", "peft", "decode", "download", "models.kinds"),
    ("methods", "train", "inference", "merge", "export", "estimate", "serve", "upload"),
    ("evaluation",),
    ("finetune", "experiments", "report"),
    ("commands", "cli"),
]
FORBIDDEN = {  # importer prefix -> imported prefixes it must never reach directly
    "data": ("models.decoder.model", "models.t5.model", "models.kinds", "models.quantize", "decode", "train", "peft", "methods", "checkpoint.hf", "evaluation", "finetune"),
    "peft": ("methods", "train", "evaluation", "finetune", "commands", "cli"),
    "checkpoint": ("train", "methods", "peft", "evaluation", "finetune", "commands", "cli"),
}
REFERENCE_ONLY = ("transformers", "peft")  # test-time references: never imported by runtime code at module level
# Function-local imports of these optional packages are fine (the feature that needs them says which extra to add).
OPTIONAL_LOCAL_OK = {("leantune.checkpoint.gguf", "transformers")}


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    line: int
    local: bool  # inside a function body


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def collect_imports(root: Path) -> tuple[set[str], list[Import]]:
    modules = {module_name(p, root): p for p in root.rglob("*.py")}
    found: list[Import] = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        is_pkg = path.name == "__init__.py"

        def visit(node: ast.AST, local: bool, _name=name, _is_pkg=is_pkg) -> None:
            for child in ast.iter_child_nodes(node):
                inner = local or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
                if isinstance(child, ast.Import):
                    found.extend(Import(_name, a.name, child.lineno, local) for a in child.names)
                elif isinstance(child, ast.ImportFrom):
                    base = child.module or ""
                    if child.level:  # relative import
                        pkg = _name.split(".") if _is_pkg else _name.split(".")[:-1]
                        base = ".".join(pkg[:len(pkg) - child.level + 1] + ([base] if base else []))
                    for a in child.names:  # `from pkg import submodule` imports the submodule
                        sub = f"{base}.{a.name}"
                        found.append(Import(_name, sub if sub in modules else base, child.lineno, local))
                visit(child, inner)

        visit(tree, False)
    return set(modules), found


def layer_index(rel: str, layers=LAYERS) -> int:
    """The layer of a module path relative to the package: its longest listed prefix decides (0 for the package)."""
    best, depth = 0, -1
    for n, names in enumerate(layers):
        for name in names:
            if (rel == name or rel.startswith(name + ".")) and name.count(".") > depth:
                best, depth = n, name.count(".")
    return best


def violations(root: Path, layers=LAYERS, forbidden=FORBIDDEN) -> list[str]:
    pkg = root.name
    modules, imports = collect_imports(root)
    internal = [i for i in imports if i.imported == pkg or i.imported.startswith(pkg + ".")]
    out = []
    rel = lambda m: m.removeprefix(pkg + ".")  # noqa: E731

    def layer(m: str) -> int:
        return layer_index(rel(m), layers)

    for i in internal:
        where = f"{i.importer}:{i.line} imports {i.imported}"
        if i.local:
            out.append(f"{where} inside a function (move it to the top; a local import only hides a cycle)")
        if layer(i.imported) > layer(i.importer):
            out.append(f"{where}, a higher layer ({layer(i.importer)} -> {layer(i.imported)})")
        for src, targets in forbidden.items():
            if rel(i.importer).startswith(src) and any(rel(i.imported).startswith(t) for t in targets):
                out.append(f"{where}, which {src} must not import")
    for i in imports:
        top = i.imported.split(".")[0]
        if top in REFERENCE_ONLY and not (i.local and (i.importer, top) in OPTIONAL_LOCAL_OK):
            out.append(f"{i.importer}:{i.line} imports {i.imported}, a test-only reference")
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for i in internal:
        if i.imported in graph and i.imported != i.importer:
            graph[i.importer].add(i.imported)
    out += [f"import cycle: {' -> '.join(c)}" for c in cycles(graph)]
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One representative cycle per strongly connected component larger than one module (Tarjan)."""
    index, low, stack, on, comps = {}, {}, [], set(), []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in graph:
        if v not in index:
            strong(v)
    return comps


def test_leantune_keeps_the_import_contract():
    problems = violations(PACKAGE)
    assert not problems, "\n".join(problems)


def test_the_checker_catches_cycles_layers_and_hidden_imports(tmp_path):
    """The contract test can fail: a package that breaks each rule once is reported for each."""
    pkg = tmp_path / "leantune"
    (pkg / "data").mkdir(parents=True)
    (pkg / "train").mkdir()
    files = {
        "__init__.py": "",
        "runtime.py": "from leantune import models\n",  # layer 0 -> 1
        "models.py": "import leantune.runtime\n",  # with runtime.py: a cycle
        "data/__init__.py": "",
        "data/sft.py": "def f():\n    from leantune.train import loop\n",  # local, upward, forbidden
        "train/__init__.py": "",
        "train/loop.py": "import transformers\n",  # a test-only reference at runtime
    }
    for name, text in files.items():
        (pkg / name).write_text(textwrap.dedent(text))
    problems = "\n".join(violations(pkg))
    assert "leantune.runtime:1 imports leantune.models, a higher layer" in problems
    assert "import cycle: leantune.models -> leantune.runtime" in problems
    assert "leantune.data.sft:2 imports leantune.train.loop inside a function" in problems
    assert "which data must not import" in problems
    assert "leantune.train.loop:1 imports transformers, a test-only reference" in problems


BLOCKER = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"transformers", "peft", "tensorboard"}:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
sys.meta_path.insert(0, Block())
"""


@pytest.mark.parametrize("argv", [["--help"], ["finetune", "lora", "--help"], ["export", "--help"]])
def test_commands_import_without_the_optional_references(argv):
    """The runtime install has no transformers, peft or tensorboard: every command module must import without them."""
    code = BLOCKER + f"from leantune.cli import main\nmain({argv!r})\n"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "usage:" in r.stdout
