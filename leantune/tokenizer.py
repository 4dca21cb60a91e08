"""The tokenizer of a checkpoint folder: `tokenizer.json` (tokenizers) or `tokenizer.model` / T5's `spiece.model`
(sentencepiece).

Special tokens are never left to the backend: `encode` asks it for plain ids and adds BOS/EOS itself, so a
prompt gets exactly one BOS whatever the post-processor would do. Whether a model wants BOS or EOS around every
input is detected once (T5 appends `</s>` to every input, decoder-only models do not). Chat templates are rendered
with jinja2 in the same sandbox and with the same helpers as transformers, so the text equals `apply_chat_template`.

T5 folders follow transformers' `T5Tokenizer` (what `AutoTokenizer` returns for them, transformers 5): it splits
the text at every whitespace character (tokenizers' WhitespaceSplit) before sentencepiece's Metaspace, so leading,
trailing and repeated whitespace gives no token of its own, like T5's original sentencepiece tokenization.
- a T5 tokenizer.json is run through that same pipeline whatever the file says: files written by transformers 4
  (flan-t5's) have no WhitespaceSplit, and their text "Summary: " would end in an extra "▁" token;
- a spiece.model folder gets `extra_ids` (default 100) sentinel tokens `<extra_id_N>` after the sentencepiece
  vocabulary in reverse order (`<extra_id_0>` is the last id), every whitespace character WhitespaceSplit knows
  counts as a space (sentencepiece's T5 normalizer keeps U+0085), and decoding is tokenizers' Metaspace decoder,
  which keeps the space before a word that follows a special token.
tests/test_tokenizer_parity.py checks these as properties over random text against transformers.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import torch


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as e:  # name the file: a bare "Expecting value" says nothing about where
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from e


def _token_str(value: Any) -> str | None:
    """A special token as written in tokenizer_config.json: a string or a serialized AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


# Tokenizer classes / model types that use T5's sentencepiece layout (pad 0, EOS 1, unk 2, sentinels on top).
_T5_TOKENIZER_CLASSES = {"T5Tokenizer", "MT5Tokenizer", "UMT5Tokenizer"}
_T5_MODEL_TYPES = {"t5", "mt5", "umt5"}
# Sentencepiece model file names, in the order they are tried (after tokenizer.json).
_SP_FILES = ("tokenizer.model", "spiece.model")
# Model types AutoTokenizer gives a T5Tokenizer when tokenizer_config.json names no class (umt5 gets a plain one).
_T5_JSON_MODEL_TYPES = {"t5", "mt5"}
# Every character tokenizers' WhitespaceSplit splits at (Rust's char::is_whitespace: Unicode White_Space).
_WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + "\u2028\u2029\u202f\u205f\u3000"


def _t5_layout(tok_cfg: dict[str, Any], model_cfg: dict[str, Any], sp_file: str) -> bool:
    """Whether a sentencepiece folder is a T5 tokenizer: tokenizer_config's class says so, else config.json's model
    type, else the file name (`spiece.model` is what T5 repos ship; Llama-style ones ship `tokenizer.model`)."""
    cls = tok_cfg.get("tokenizer_class")
    if isinstance(cls, str):
        return cls.removesuffix("Fast") in _T5_TOKENIZER_CLASSES
    if isinstance(model_cfg.get("model_type"), str):
        return model_cfg["model_type"] in _T5_MODEL_TYPES
    return sp_file == "spiece.model"


def _t5_tokenizer_json(tok_cfg: dict[str, Any], model_cfg: dict[str, Any], backend: Any) -> bool:
    """Whether transformers loads a tokenizer.json as its T5Tokenizer (which rebuilds the pipeline, see
    `_t5_pipeline`): a Unigram model, and tokenizer_config's class, else config.json's model type, says T5."""
    from tokenizers.models import Unigram

    if not isinstance(backend.model, Unigram):
        return False
    cls = tok_cfg.get("tokenizer_class")
    if isinstance(cls, str):
        return cls.removesuffix("Fast") in _T5_TOKENIZER_CLASSES
    return model_cfg.get("model_type") in _T5_JSON_MODEL_TYPES


def _t5_pipeline(backend: Any) -> None:
    """Give a T5 tokenizer.json the pipeline transformers' T5Tokenizer builds: the file's sentencepiece charsmap
    (its only normalizer; a transformers-4 file's `Replace(" {2,}", " ")` goes), WhitespaceSplit then Metaspace, and
    the Metaspace decoder. Without WhitespaceSplit a trailing or doubled space became a "▁" token of its own."""
    import base64

    from tokenizers import decoders, normalizers, pre_tokenizers

    state = json.loads(backend.normalizer.__getstate__()) if backend.normalizer is not None else {}
    parts = state.get("normalizers", [state]) if state.get("type") == "Sequence" else [state]
    charsmap = next((n["precompiled_charsmap"] for n in parts if n.get("type") == "Precompiled"
                     and n.get("precompiled_charsmap")), None)
    backend.normalizer = normalizers.Precompiled(base64.b64decode(charsmap)) if charsmap else None
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)])
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)


def _t5_added_tokens(tok_cfg: dict[str, Any], sp_size: int) -> dict[str, int]:
    """Tokens past the sentencepiece vocabulary of a T5 folder: tokenizer_config's `added_tokens_decoder` when it
    lists any (it is what transformers wrote), else T5Tokenizer's `extra_ids` sentinels, `<extra_id_0>` last."""
    listed = tok_cfg.get("added_tokens_decoder")
    if isinstance(listed, dict):
        added = {str(e["content"]): int(tid) for tid, e in listed.items()
                 if isinstance(e, dict) and e.get("content") and int(tid) >= sp_size}
        if added:
            return added
    n = int(tok_cfg.get("extra_ids", 100))
    return {f"<extra_id_{i}>": sp_size + n - 1 - i for i in range(n)}


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


class Tokenizer:
    """Encode/decode and chat templates for a checkpoint folder; special-token ids resolved once at load."""

    def __init__(self, checkpoint_dir: str | Path) -> None:
        self.checkpoint_dir = d = Path(checkpoint_dir)
        self._config = cfg = _read_json(d / "tokenizer_config.json")
        special_map = _read_json(d / "special_tokens_map.json")
        gen, model_cfg = _read_json(d / "generation_config.json"), _read_json(d / "config.json")
        if (d / "tokenizer.json").is_file():
            from tokenizers import Tokenizer as HFTokenizer

            self.backend = "tokenizers"
            self._hf = HFTokenizer.from_file(str(d / "tokenizer.json"))
            if _t5_tokenizer_json(cfg, model_cfg, self._hf):
                _t5_pipeline(self._hf)
            self.vocab_size = self._hf.get_vocab_size(with_added_tokens=True)
        elif sp_file := next((n for n in _SP_FILES if (d / n).is_file()), None):
            import sentencepiece as spm

            self.backend = "sentencepiece"
            self._sp = spm.SentencePieceProcessor(model_file=str(d / sp_file))
            self.vocab_size = self._sp.get_piece_size()
        else:
            raise FileNotFoundError(f"{d}: no tokenizer.json or tokenizer.model (or T5's spiece.model) found")
        # T5 sentencepiece only: sentinels past the sentencepiece vocabulary, and Metaspace-style decoding.
        self._t5 = self.backend == "sentencepiece" and _t5_layout(cfg, model_cfg, sp_file)
        self._added: dict[str, int] = _t5_added_tokens(cfg, self.vocab_size) if self._t5 else {}
        self._added_ids: dict[int, str] = {tid: s for s, tid in self._added.items()}
        if self._added:
            self.vocab_size = max(self.vocab_size, max(self._added_ids) + 1)

        def special(name: str) -> str | None:
            return _token_str(cfg.get(name)) or _token_str(special_map.get(name))

        def resolve(name: str, fallbacks: list[int]) -> int | None:
            token = special(name)
            tid = self.token_to_id(token) if token is not None else None
            return tid if tid is not None else (fallbacks[0] if fallbacks else None)

        sp_ids: dict[str, int] = {}
        if self.backend == "sentencepiece":
            for key, get_id in (("bos", self._sp.bos_id), ("eos", self._sp.eos_id), ("pad", self._sp.pad_id)):
                if get_id() >= 0:
                    sp_ids[key] = get_id()

        def ids_from(key: str) -> list[int]:
            ids = _as_list(gen.get(f"{key}_token_id")) + _as_list(model_cfg.get(f"{key}_token_id"))
            return ids + ([sp_ids[key]] if key in sp_ids else [])

        self.bos_id: int | None = resolve("bos_token", ids_from("bos"))
        self.eos_id: int | None = resolve("eos_token", ids_from("eos"))
        self.pad_id: int | None = resolve("pad_token", ids_from("pad"))
        self.eos_ids: list[int] = list(dict.fromkeys(
            ([self.eos_id] if self.eos_id is not None else []) + ids_from("eos")))
        self.special_tokens = {k: special(k) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
        for key, tid in (("bos_token", self.bos_id), ("eos_token", self.eos_id), ("pad_token", self.pad_id)):
            if self.special_tokens[key] is None and tid is not None:
                self.special_tokens[key] = self.id_to_token(tid)
        self.use_bos: bool = self._detect_use_bos()
        self.use_eos: bool = self._detect_use_eos()
        self.chat_template: str | None = self._load_chat_template()
        self._special_split = self._special_pattern() if self.backend == "sentencepiece" else None
        self._kept_spaces = self._whitespace_kept_by_normalizer() if self._t5 else None

    # ---- special tokens ------------------------------------------------------------------------------------
    def _detect_use_bos(self) -> bool:
        """tokenizer_config's `add_bos_token` wins (transformers applies it too); else what the backend does."""
        if self.bos_id is None:
            return False
        if "add_bos_token" in self._config:
            return bool(self._config["add_bos_token"])
        if self.backend == "tokenizers":
            with_special = self._hf.encode("a", add_special_tokens=True).ids
            return bool(with_special) and with_special[0] == self.bos_id
        return True  # sentencepiece models with a BOS piece (Llama 1/2, Mistral, Gemma) prepend it by default

    def _detect_use_eos(self) -> bool:
        """Whether every input ends with EOS (T5): tokenizer_config's `add_eos_token` wins; else the tokenizer.json
        post-processor (T5's appends `</s>`, decoder-only ones do not); else T5's sentencepiece layout."""
        if self.eos_id is None:
            return False
        if "add_eos_token" in self._config:
            return bool(self._config["add_eos_token"])
        if self.backend == "tokenizers":
            with_special = self._hf.encode("a", add_special_tokens=True).ids
            return bool(with_special) and with_special[-1] == self.eos_id
        return self._t5

    def token_to_id(self, token: str) -> int | None:
        if self.backend == "tokenizers":
            return self._hf.token_to_id(token)
        if token in self._added:
            return self._added[token]
        tid = self._sp.piece_to_id(token)
        return tid if (tid != self._sp.unk_id() or token == self._sp.id_to_piece(tid)) else None

    def id_to_token(self, tid: int) -> str | None:
        if self.backend == "tokenizers":
            return self._hf.id_to_token(tid)
        if tid in self._added_ids:
            return self._added_ids[tid]
        return self._sp.id_to_piece(tid) if 0 <= tid < self._sp.get_piece_size() else None

    def _special_pattern(self) -> re.Pattern | None:
        """Sentencepiece does not know added/special token strings; split them out of the text ourselves."""
        strings = {s for s in self.special_tokens.values() if s} | set(self._added)
        if self._t5:  # transformers' T5 splits out all three of <pad>, </s> and <unk>, named in its config or not
            strings |= {self._sp.id_to_piece(t) for t in (self._sp.pad_id(), self._sp.eos_id(), self._sp.unk_id())
                        if t >= 0}
        for entry in self._config.get("added_tokens_decoder", {}).values():
            if isinstance(entry, dict) and entry.get("content"):
                strings.add(entry["content"])
        strings = {s for s in strings if self.token_to_id(s) is not None}
        if not strings:
            return None
        return re.compile("(" + "|".join(re.escape(s) for s in sorted(strings, key=len, reverse=True)) + ")")

    def _whitespace_kept_by_normalizer(self) -> re.Pattern | None:
        """The whitespace characters T5Tokenizer splits at but sentencepiece's normalizer leaves in a word (U+0085
        under T5's nmt_nfkc): `encode` makes them spaces. Those the normalizer maps or removes it handles itself,
        as transformers' charsmap does before splitting."""
        kept = [c for c in _WHITESPACE if c in self._sp.normalize(f"a{c}b")]
        return re.compile("|".join(map(re.escape, kept))) if kept else None

    # ---- encode / decode -----------------------------------------------------------------------------------
    def encode(self, text: str, bos: bool | None = None, eos: bool | None = None, max_length: int = -1) -> list[int]:
        """Token ids of `text`; `bos=None` / `eos=None` follow the model's convention (`use_bos`, `use_eos`: T5
        appends EOS to every input). Never two BOS. `max_length` cuts the result, an added EOS included."""
        if self.backend == "tokenizers":
            ids = self._hf.encode(text, add_special_tokens=False).ids
        else:
            ids = self._encode_sp(text)
        if (self.use_bos if bos is None else bos) and self.bos_id is not None and not (ids and ids[0] == self.bos_id):
            ids = [self.bos_id, *ids]
        if (self.use_eos if eos is None else eos) and self.eos_id is not None:
            ids.append(self.eos_id)
        if max_length > 0:
            ids = ids[:max_length]
        return ids

    def _encode_sp(self, text: str) -> list[int]:
        if self._kept_spaces is not None:
            text = self._kept_spaces.sub(" ", text)
        if self._special_split is None:
            return list(self._sp.encode(text))
        ids: list[int] = []
        for i, part in enumerate(self._special_split.split(text)):
            if i % 2:
                ids.append(self.token_to_id(part))  # type: ignore[arg-type]
            elif part:
                ids.extend(self._sp.encode(part))
        return ids

    def decode(self, ids: list[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        """Text of `ids` (no clean-up of spaces: the model's text exactly)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        ids = [int(i) for i in ids]
        if self.backend == "tokenizers":
            return self._hf.decode(ids, skip_special_tokens=skip_special_tokens)
        if self._t5:
            return self._decode_metaspace(ids, skip_special_tokens)
        # sentencepiece decodes control pieces to "": keep them as text unless asked to skip, like transformers.
        out, run = [], []
        for tid in ids:
            if self._sp.is_control(tid) or self._sp.is_unknown(tid):
                out.append(self._sp.decode(run))
                run = []
                if not skip_special_tokens:
                    out.append(self._sp.id_to_piece(tid))
            else:
                run.append(tid)
        out.append(self._sp.decode(run))
        return "".join(out)

    def _decode_metaspace(self, ids: list[int], skip_special_tokens: bool) -> str:
        """T5 sentencepiece ids decoded as transformers' T5 tokenizer does (tokenizers' Metaspace decoder): pieces
        joined with "▁" as space, only the first token losing its leading one. sentencepiece's own decode differs:
        it drops every leading space and the space of a word after a sentinel."""
        n = self._sp.get_piece_size()
        pieces = [self.id_to_token(t) for t in ids if not (skip_special_tokens and (
            t in self._added_ids or (0 <= t < n and (self._sp.is_control(t) or self._sp.is_unknown(t)))))]
        pieces = [p for p in pieces if p is not None]  # ids outside the vocabulary: dropped, as tokenizers does
        text = "".join(pieces).replace("\u2581", " ")
        return text[1:] if pieces and pieces[0].startswith("\u2581") else text

    def stream_decoder(self, skip_special_tokens: bool = False) -> IncrementalDecoder:
        return IncrementalDecoder(self, skip_special_tokens)

    # ---- chat templates ------------------------------------------------------------------------------------
    def _load_chat_template(self) -> str | None:
        jinja = self.checkpoint_dir / "chat_template.jinja"
        if jinja.is_file():
            return jinja.read_text(encoding="utf-8")
        tmpl = self._config.get("chat_template")
        if isinstance(tmpl, list):  # named templates: [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in tmpl if isinstance(t, dict)}
            tmpl = named.get("default") or next(iter(named.values()), None)
        return tmpl if isinstance(tmpl, str) else None

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """Render `messages` with the checkpoint's chat template (same text as transformers, tokenize=False)."""
        if not self.chat_template:
            raise ValueError(f"{self.checkpoint_dir}: the tokenizer has no chat template")
        context = {k: v for k, v in self.special_tokens.items() if v is not None}
        context.update(kwargs)
        try:
            return _compile(self.chat_template).render(
                messages=json.loads(json.dumps(messages)), add_generation_prompt=add_generation_prompt, **context)
        except Exception as e:
            if type(e).__name__ != "SecurityError":  # jinja2's sandbox refusal; jinja2 is imported lazily
                raise
            raise ChatTemplateError(f"{self.chat_template_source}: the chat template tried something the sandbox "
                                    f"forbids ({e}); nothing it does is executed. Use a template from a source you "
                                    "trust (replace chat_template.jinja or tokenizer_config.json's chat_template)"
                                    ) from None

    @property
    def chat_template_source(self) -> Path:
        """The file the chat template was read from (named in errors)."""
        jinja = self.checkpoint_dir / "chat_template.jinja"
        return jinja if jinja.is_file() else self.checkpoint_dir / "tokenizer_config.json"


class ChatTemplateError(ValueError):
    """A checkpoint's chat template that cannot render (its sandbox refused an operation): one line naming its file."""


_TEMPLATE_CACHE: dict[str, Any] = {}


def _compile(template: str) -> Any:
    """A jinja2 template in an immutable sandbox with transformers' helpers (tojson, raise_exception, ...)."""
    if template in _TEMPLATE_CACHE:
        return _TEMPLATE_CACHE[template]
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text for masks; rendering passes it through."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller: Any) -> str:
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    compiled = _TEMPLATE_CACHE[template] = env.from_string(template)
    return compiled


class IncrementalDecoder:
    """Streaming detokenization: push ids one at a time, get the newly completed text.

    Decodes a short window ending at the newest token and emits only the part past the already-emitted prefix,
    holding back while the window ends in an incomplete UTF-8 sequence (U+FFFD), so multi-byte characters split
    over several byte-fallback/byte-level tokens come out whole. The concatenated output equals `decode(all ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self.tokenizer, self.skip_special_tokens = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # window start: tokens before it are never re-decoded
        self._read = 0  # tokens up to here are already emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        prefix_text = self._decode(self.ids[self._prefix:self._read])
        text = self._decode(self.ids[self._prefix:])
        if len(text) > len(prefix_text) and not text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return text[len(prefix_text):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (e.g. a truncated multi-byte character at the end)."""
        prefix_text = self._decode(self.ids[self._prefix:self._read])
        text = self._decode(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        return text[len(prefix_text):]
