"""Kimi tokenizer: tiktoken byte-level BPE, the 256-slot special-token table and the chat template
(docs/kimi_linear_spec.md section 4), loadable from an HF model dir or from GGUF tokenizer metadata.

Untrusted text stays data: `encode` never produces control tokens, and `encode_chat` lets only the
chat template's own markup produce them, never message contents. Chat templates are rendered in
jinja2's immutable sandbox.

Default system prompt: the built-in template inserts none when the conversation has no system
message (the K2 templates insert one; whether Kimi-Linear's does is unverified). A template shipped
with the model (`chat_template.jinja` or tokenizer_config's `chat_template`) is used as is, so it
decides.
"""

from __future__ import annotations

import base64
import codecs
import json
import re
from collections.abc import Mapping
from pathlib import Path

import gguf
import tiktoken
from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Kimi's pre-tokenisation regex, spec 4.2, exactly (`&&` is character-class intersection, which
# tiktoken's Rust regex and the `regex` module's V1 mode support).
PAT_STR = "|".join(
    [
        r"""[\p{Han}]+""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)

# Special ids start right after the BPE ranks and fill 256 slots (163584..163839 in the real model).
N_SPECIAL_SLOTS = 256
# Named special tokens by offset from the first special id (spec 4.3); other slots are reserved.
SPECIAL_TOKEN_OFFSETS = {
    0: "[BOS]",
    1: "[EOS]",
    2: "<|im_end|>",
    3: "<|im_user|>",
    4: "<|im_assistant|>",
    6: "<|start_header_id|>",
    7: "<|end_header_id|>",
    9: "[EOT]",
    10: "<|im_system|>",
    11: "<|tool_calls_section_begin|>",
    12: "<|tool_calls_section_end|>",
    13: "<|tool_call_begin|>",
    14: "<|tool_call_argument_begin|>",
    15: "<|tool_call_end|>",
    17: "<|im_middle|>",
    254: "[UNK]",
    255: "[PAD]",
}
GGUF_PRE = "kimi-k2"
BUILTIN_TEMPLATE_PATH = Path(__file__).with_name("chat_template.jinja")

# tiktoken can panic on huge inputs or very long runs of one character class (spec 4.1).
_MAX_PIECE_CHARS = 400_000
_MAX_RUN_CHARS = 25_000
# A whitespace or non-whitespace run longer than _MAX_RUN_CHARS; the lookbehinds make matches start
# only at run starts, which keeps the scan linear.
_LONG_RUN_RE = re.compile(r"(?<!\s)\s{%d,}|(?<!\S)\S{%d,}" % (_MAX_RUN_CHARS + 1, _MAX_RUN_CHARS + 1))

# Message strings are swapped for these while rendering, to tell template markup from contents.
_PLACEHOLDER_RE = re.compile("\ue000([0-9]+)\ue001")
# Dict keys whose values templates branch on, so they are rendered as they are.
_UNMASKED_KEYS = frozenset({"role", "type"})
# First turn rendered before a continuation and then cut off (see encode_chat_continuation).
_ANCHOR_TURN = {"role": "system", "content": "."}


def _gpt2_byte_chars() -> list[str]:
    """GPT-2's reversible byte -> printable character table, used by GGUF `gpt2` vocabularies:
    printable Latin-1 bytes stand for themselves, the others map to chr(256 + n) in byte order."""
    printable = {
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    }
    chars, n_shifted = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + n_shifted))
            n_shifted += 1
    return chars


_BYTE_TO_CHAR = _gpt2_byte_chars()
_CHAR_TO_BYTE = {c: b for b, c in enumerate(_BYTE_TO_CHAR)}


def _to_gpt2_chars(token: bytes) -> str:
    return "".join(_BYTE_TO_CHAR[b] for b in token)


def _from_gpt2_chars(text: str) -> bytes:
    return bytes(_CHAR_TO_BYTE[c] for c in text)


def _as_str(token: str | bytes) -> str:
    """GGUF readers may hand back token strings as raw UTF-8 bytes."""
    return token.decode("utf-8") if isinstance(token, bytes) else token


def bpe_split(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """Byte-level BPE of `token` as tiktoken does it (lowest-rank pair first), using only ranks
    below `max_rank`. For a token of rank r, max_rank=r gives the two parts it was merged from."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while True:
        best = None  # (rank, index of the left part)
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < max_rank and (best is None or rank < best[0]):
                best = (rank, i)
        if best is None:
            return parts
        i = best[1]
        parts[i : i + 2] = [parts[i] + parts[i + 1]]


def load_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """Read a tiktoken BPE file: one `base64(token_bytes) rank` pair per line."""
    ranks = {}
    for line in Path(path).read_text(encoding="ascii").splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _special_table(first_id: int, added_tokens_decoder: dict) -> dict[str, int]:
    """name -> id for the 256 special slots: names from tokenizer_config.json, the rest reserved.
    (The HF code builds 258 slots; the last two lie past the embedding rows and are left out.)"""
    names = {first_id + i: f"<|reserved_token_{first_id + i}|>" for i in range(N_SPECIAL_SLOTS)}
    for key, entry in added_tokens_decoder.items():
        if int(key) in names:
            names[int(key)] = entry["content"]
    return {name: i for i, name in names.items()}


def _token_name(value: str | dict | None, default: str) -> str:
    """A tokenizer_config token entry: a plain string, an AddedToken dict, or absent."""
    if value is None:
        return default
    return value["content"] if isinstance(value, dict) else value


def _dir_template(path: Path, config: dict) -> str | None:
    """The model dir's chat template: chat_template.jinja, else tokenizer_config's."""
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # HF's named-template form
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template


def _literal_alternation(names) -> re.Pattern:
    """A regex matching any of `names`, longer names first so none is shadowed by a prefix of it.
    Grouped by first character, which lets `re` skip most positions of long texts quickly."""
    by_first: dict[str, list[str]] = {}
    for name in sorted(names, key=len, reverse=True):
        by_first.setdefault(name[0], []).append(re.escape(name[1:]))
    return re.compile("|".join(f"{re.escape(c)}(?:{'|'.join(rests)})" for c, rests in by_first.items()))


def _tojson(value, indent=None, separators=None, sort_keys=False, ensure_ascii=False) -> str:
    """HF chat-template semantics for `tojson`: plain json.dumps, no HTML escaping."""
    return json.dumps(
        value, indent=indent, separators=separators, sort_keys=sort_keys, ensure_ascii=ensure_ascii
    )


def _raise_exception(message: str):
    raise TemplateError(message)


def _template_env() -> ImmutableSandboxedEnvironment:
    """A sandbox set up like transformers' chat-template environment."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    return env


def _split_for_tiktoken(text: str):
    """Yield pieces of `text` of <= 400k characters with no whitespace / non-whitespace run longer
    than 25k characters, cut inside such runs only (spec 4.1)."""
    for start in range(0, len(text), _MAX_PIECE_CHARS):
        piece = text[start : start + _MAX_PIECE_CHARS]
        begin = 0
        for run in _LONG_RUN_RE.finditer(piece):
            for cut in range(run.start() + _MAX_RUN_CHARS, run.end(), _MAX_RUN_CHARS):
                yield piece[begin:cut]
                begin = cut
        yield piece[begin:]


def _mask_strings(value, originals: list[str]):
    """Copy of `value` with each string (except role/type tags) replaced by a numbered placeholder;
    the replaced strings are appended to `originals`."""
    if isinstance(value, str):
        originals.append(value)
        return f"\ue000{len(originals) - 1}\ue001"
    if isinstance(value, Mapping):
        return {k: v if k in _UNMASKED_KEYS else _mask_strings(v, originals) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_mask_strings(v, originals) for v in value]
    return value


def _drop_prefix(pieces: list[tuple[str, bool]], prefix: str) -> list[tuple[str, bool]]:
    """`pieces` without the first len(prefix) characters, which must equal `prefix`."""
    if not "".join(text for text, _ in pieces).startswith(prefix):
        raise ValueError("the chat template renders the first turn differently when more turns follow")
    out, skip = [], len(prefix)
    for text, is_markup in pieces:
        if skip >= len(text):
            skip -= len(text)
            continue
        out.append((text[skip:], is_markup))
        skip = 0
    return out


class StreamDecoder:
    """Token ids -> text, one token at a time. `push` returns only complete characters: bytes of a
    UTF-8 sequence split across tokens are held back until it is complete. With skip_special,
    control and reserved tokens produce no text (what a user should see of a model's answer)."""

    def __init__(self, tokenizer: KimiTokenizer, skip_special: bool = True):
        self._token_bytes = tokenizer.token_bytes
        self._skip = frozenset(tokenizer.special_ids.values()) if skip_special else frozenset()
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        if token_id in self._skip:
            return ""
        return self._utf8.decode(self._token_bytes(token_id))

    def flush(self) -> str:
        """Text still held back (an incomplete sequence becomes U+FFFD); resets the decoder."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text


class KimiTokenizer:
    """Ids: 0..n_ranks-1 BPE tokens, then 256 special slots; vocab_size = n_ranks + 256 for a
    model dir (a GGUF may pad further). `special_ids` maps every special name (reserved slots are
    `<|reserved_token_{id}|>`) to its id; `stop_ids` ends an assistant turn."""

    def __init__(
        self,
        mergeable_ranks: dict[bytes, int],
        special_tokens: dict[str, int],
        vocab_size: int,
        *,
        bos_token: str = "[BOS]",
        eos_token: str = "[EOS]",
        pad_token: str = "[PAD]",
        chat_template: str | None = None,
    ):
        self._ranks = mergeable_ranks
        self._enc = tiktoken.Encoding(
            "kimi", pat_str=PAT_STR, mergeable_ranks=mergeable_ranks, special_tokens=special_tokens
        )
        self.vocab_size = vocab_size
        self.special_ids = dict(special_tokens)
        self.bos_id = special_tokens[bos_token]
        self.eos_id = special_tokens[eos_token]
        self.pad_id = special_tokens.get(pad_token)
        self.im_end_id = special_tokens["<|im_end|>"]
        self.stop_ids = frozenset({self.im_end_id, self.eos_id})
        self._names = {"bos_token": bos_token, "eos_token": eos_token, "pad_token": pad_token}
        self.chat_template = chat_template or BUILTIN_TEMPLATE_PATH.read_text(encoding="utf-8")
        self._template = _template_env().from_string(self.chat_template)
        self._special_re = _literal_alternation(special_tokens)

    # ---- loading

    @classmethod
    def from_dir(cls, path: str | Path) -> KimiTokenizer:
        """From an HF model dir: tiktoken.model, tokenizer_config.json, optional chat_template.jinja."""
        path = Path(path)
        ranks = load_tiktoken_ranks(path / "tiktoken.model")
        config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
        return cls(
            ranks,
            _special_table(len(ranks), config.get("added_tokens_decoder", {})),
            len(ranks) + N_SPECIAL_SLOTS,
            bos_token=_token_name(config.get("bos_token"), "[BOS]"),
            eos_token=_token_name(config.get("eos_token"), "[EOS]"),
            pad_token=_token_name(config.get("pad_token"), "[PAD]"),
            chat_template=_dir_template(path, config),
        )

    @classmethod
    def from_gguf_fields(
        cls,
        tokens: list[str | bytes],
        token_types: list[int],
        merges: list[str] | None,
        bos_id: int,
        eos_id: int,
        chat_template: str | None,
        pre: str,
    ) -> KimiTokenizer:
        """From GGUF `gpt2` tokenizer metadata as llama.cpp's converter writes it for Kimi: NORMAL
        tokens are byte-level BPE tokens whose id is their tiktoken rank, CONTROL (or USER_DEFINED)
        tokens are the special tokens, UNUSED ids are padding. tiktoken needs only the ranks, so
        `merges` (which the converter derives from them) is not read."""
        if pre != GGUF_PRE:
            raise ValueError(f"tokenizer.ggml.pre is {pre!r}; only {GGUF_PRE!r} (Kimi) is supported")
        ranks, specials = {}, {}
        for i, (token, kind) in enumerate(zip(tokens, token_types, strict=True)):
            text = _as_str(token)
            if kind == gguf.TokenType.NORMAL:
                ranks[_from_gpt2_chars(text)] = i
            elif kind in (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED):
                specials[text] = i
            elif kind != gguf.TokenType.UNUSED:
                raise ValueError(f"token {i} {text!r} has unsupported GGUF token type {kind}")
        return cls(
            ranks,
            specials,
            len(tokens),
            bos_token=_as_str(tokens[bos_id]),
            eos_token=_as_str(tokens[eos_id]),
            chat_template=chat_template,
        )

    def gguf_tokenizer_fields(self) -> dict:
        """What a GGUF writer needs, laid out like llama.cpp's Kimi converter output (spec 5.3)."""
        id_to_bytes = {rank: token for token, rank in self._ranks.items()}
        id_to_special = {i: name for name, i in self.special_ids.items()}
        tokens, token_types = [], []
        for i in range(self.vocab_size):
            if i in id_to_bytes:
                tokens.append(_to_gpt2_chars(id_to_bytes[i]))
                token_types.append(gguf.TokenType.NORMAL)
            elif i in id_to_special:
                tokens.append(id_to_special[i])
                token_types.append(gguf.TokenType.CONTROL)
            else:
                tokens.append(f"[PAD{i}]")
                token_types.append(gguf.TokenType.UNUSED)
        return {
            "tokens": tokens,
            "token_types": token_types,
            "merges": self._gguf_merges(),
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
            "pre": GGUF_PRE,
            "chat_template": self.chat_template,
        }

    def _gguf_merges(self) -> list[str]:
        """GGUF merges in priority order: each multi-byte token as the pair BPE builds it from."""
        merges = []
        for token, rank in sorted(self._ranks.items(), key=lambda item: item[1]):
            if len(token) > 1:
                parts = bpe_split(self._ranks, token, max_rank=rank)
                if len(parts) == 2:  # otherwise BPE can never produce this token
                    merges.append(" ".join(map(_to_gpt2_chars, parts)))
        return merges

    # ---- plain text

    def encode(self, text: str) -> list[int]:
        """User text -> ids. Special-token strings are ordinary text here (tiktoken's
        encode_ordinary = allowed_special=set(), disallowed_special=()). No BOS is added."""
        ids = []
        for piece in _split_for_tiktoken(text):
            ids += self._enc.encode_ordinary(piece)
        return ids

    def decode(self, ids: list[int]) -> str:
        return self._enc.decode(ids, errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        return self._enc.decode_single_token_bytes(token_id)

    def decode_stream(self, skip_special: bool = True) -> StreamDecoder:
        return StreamDecoder(self, skip_special)

    # ---- chat

    def render_chat(
        self, messages: list[dict], add_generation_prompt: bool = True, tools: list | None = None
    ) -> str:
        """The chat template's text for `messages` (OpenAI-style dicts)."""
        if tools:
            # As the HF tokenizer does: tool schemas are rendered with their keys deep-sorted.
            tools = json.loads(json.dumps(tools, sort_keys=True))
        return self._template.render(
            messages=messages, tools=tools, add_generation_prompt=add_generation_prompt, **self._names
        )

    def encode_chat(
        self, messages: list[dict], add_generation_prompt: bool = True, tools: list | None = None
    ) -> list[int]:
        """Ids of render_chat(...): template markers become control ids, message text never does."""
        return self._encode_pieces(self._chat_pieces(messages, add_generation_prompt, tools))

    def encode_chat_continuation(
        self, new_messages: list[dict], add_generation_prompt: bool = True
    ) -> list[int]:
        """Ids of `new_messages` as turns appended to a conversation whose last turn ended with
        <|im_end|>: encode_chat(history + new) == encode_chat(history, False) + this. Rendered after
        an anchor system turn that is then cut off, so a template's default system turn (inserted
        when a conversation does not start with a system message) is not repeated."""
        prefix = self.render_chat([_ANCHOR_TURN], add_generation_prompt=False)
        pieces = self._chat_pieces([_ANCHOR_TURN, *new_messages], add_generation_prompt, None)
        return self._encode_pieces(_drop_prefix(pieces, prefix))

    def _chat_pieces(self, messages: list[dict], add_generation_prompt: bool, tools: list | None):
        """The rendered chat as (text, is_markup) pieces; only markup may hold control tokens.
        Renders once with every caller string (messages and tools) replaced by a placeholder, to
        find where those strings land in the output."""
        originals: list[str] = []
        masked_messages = _mask_strings(messages, originals)
        masked = self.render_chat(masked_messages, add_generation_prompt, _mask_strings(tools, originals))
        # split() alternates markup text and captured placeholder numbers.
        parts = _PLACEHOLDER_RE.split(masked)
        pieces = [
            (part, True) if i % 2 == 0 else (originals[int(part)], False) for i, part in enumerate(parts)
        ]
        rendered = self.render_chat(messages, add_generation_prompt, tools)
        if "".join(text for text, _ in pieces) == rendered:
            return pieces
        # The template transformed some caller strings (e.g. trimmed them, or escaped them as JSON),
        # so they can't be located in its output. Treating the whole text as markup is then safe
        # only if no caller string names a special token.
        if any(self._special_re.search(s) for s in originals):
            raise ValueError("the chat template rewrites caller text that contains special-token strings")
        return [(rendered, True)]

    def _encode_pieces(self, pieces: list[tuple[str, bool]]) -> list[int]:
        """Like tiktoken's encode with all specials allowed, but specials are only looked for in
        markup pieces; the text between two control tokens is encoded as one run, as tiktoken does."""
        ids, run = [], []
        for text, is_markup in pieces:
            if not is_markup:
                run.append(text)
                continue
            start = 0
            for match in self._special_re.finditer(text):
                run.append(text[start : match.start()])
                ids += self.encode("".join(run))
                ids.append(self.special_ids[match.group()])
                run, start = [], match.end()
            run.append(text[start:])
        return ids + self.encode("".join(run))
