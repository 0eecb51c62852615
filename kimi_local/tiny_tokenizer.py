"""A small but real Kimi-style tokenizer for the tiny random-weight test model: a tiktoken BPE file
whose merges are learned (deterministically, in well under a second) from a built-in English,
Chinese and code text, plus a tokenizer_config.json with the real special-token names at the real
offsets after the BPE ranks (spec 4.3).
"""

from __future__ import annotations

import base64
import json
from collections import Counter
from pathlib import Path

import regex

from kimi_local.tokenizer import N_SPECIAL_SLOTS, PAT_STR, SPECIAL_TOKEN_OFFSETS, bpe_split

# Marked "special": false in the K2-family tokenizer_config.json (spec 4.3).
_NON_SPECIAL_NAMES = frozenset(
    {
        "<|tool_calls_section_begin|>",
        "<|tool_calls_section_end|>",
        "<|tool_call_begin|>",
        "<|tool_call_argument_begin|>",
        "<|tool_call_end|>",
    }
)

_CORPUS = """\
The quick brown fox jumps over the lazy dog. This is a small text that we use to learn the
merges of a tiny tokenizer, so that the most common English words become single tokens.
When you run the model on your own machine, the tokens of the prompt are fed to the network
one chunk at a time, and the answer is streamed back to the terminal as it is generated.
There is no magic in it: the model reads what you write and predicts what comes next.
She said that they would be there in the morning, but it was late in the evening when
they finally arrived, tired and hungry, with all of their bags and none of their patience.
What are you doing today? I am reading a book about the history of the world and the people
who lived in it. It is long, but it is interesting, and I have time for it this week.
Please summarise the report in three sentences and list the main points as bullet items.
You are a helpful assistant. Answer the question of the user as well as you can.

今天天气很好，我们一起去公园散步吧。这是一个用于测试的小模型，它的权重是随机的。
我们的程序可以在一张显卡上运行大模型，并且把生成的文字实时输出到终端。
请用中文回答下面的问题：什么是线性注意力？它和普通的注意力有什么不同？
人工智能正在改变世界，很多人每天都在使用语言模型来学习、写作和编程。

def generate(model, tokens, max_new_tokens=32):
    \"\"\"Greedy decoding: return the prompt followed by the new tokens.\"\"\"
    for _ in range(max_new_tokens):
        logits = model(tokens)
        next_token = int(logits[-1].argmax())
        tokens.append(next_token)
        if next_token == model.config.eos_token_id:
            break
    return tokens


class Cache:
    def __init__(self, size: int) -> None:
        self.size = size
        self.items = {}

    def get(self, key, default=None):
        return self.items.get(key, default)

for (int i = 0; i < n; i++) {
    sum += values[i] * weights[i];
}
return sum;

{"name": "get_weather", "arguments": {"city": "Beijing", "unit": "celsius"}}
1, 2, 3, 10, 20, 30, 100, 200, 300, 1000, 2024, 3.14159, 0.5, -1
"""


def _merge_pair(word: tuple[bytes, ...], pair: tuple[bytes, bytes]) -> tuple[bytes, ...]:
    """`word` with every non-overlapping occurrence of `pair`, left to right, joined into one part."""
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def _best_pair(words: Counter, rejected: set) -> tuple[bytes, bytes]:
    """Most frequent adjacent pair over the corpus words; ties go to the smallest bytes."""
    counts = Counter()
    for word, freq in words.items():
        for pair in zip(word, word[1:]):
            if pair not in rejected:
                counts[pair] += freq
    if not counts:
        raise ValueError("the built-in corpus is too small for this many BPE ranks")
    return min(counts, key=lambda pair: (-counts[pair], pair))


def train_ranks(corpus: str, n_ranks: int) -> dict[bytes, int]:
    """Byte-level BPE training: the 256 single bytes, then learned merges up to n_ranks tokens.
    A merge is skipped if its token already exists or tiktoken-style BPE could never produce it
    (its bytes would not split into exactly two lower-rank tokens), so every rank has a GGUF merge."""
    if n_ranks < 256:
        raise ValueError("n_ranks must be at least 256 (the single bytes)")
    ranks = {bytes([b]): b for b in range(256)}
    pieces = regex.findall(PAT_STR, corpus, flags=regex.V1)
    words = Counter(tuple(bytes([b]) for b in piece.encode("utf-8")) for piece in pieces)
    rejected = set()
    while len(ranks) < n_ranks:
        pair = _best_pair(words, rejected)
        token = pair[0] + pair[1]
        if token in ranks or len(bpe_split(ranks, token, max_rank=len(ranks))) != 2:
            rejected.add(pair)
            continue
        ranks[token] = len(ranks)
        words = Counter({_merge_pair(word, pair): freq for word, freq in words.items()})
    return ranks


def tokenizer_config(n_ranks: int) -> dict:
    """tokenizer_config.json shaped like Kimi's, special ids placed right after the BPE ranks."""
    decoder = {
        str(n_ranks + offset): {
            "content": name,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": name not in _NON_SPECIAL_NAMES,
        }
        for offset, name in SPECIAL_TOKEN_OFFSETS.items()
    }
    return {
        "added_tokens_decoder": decoder,
        "bos_token": "[BOS]",
        "eos_token": "[EOS]",
        "pad_token": "[PAD]",
        "unk_token": "[UNK]",
        "model_max_length": 1048576,
        "clean_up_tokenization_spaces": False,
        "tokenizer_class": "TikTokenTokenizer",
    }


def write_tiny_tokenizer(out_dir: Path, n_ranks: int = 512) -> int:
    """Write tiktoken.model and tokenizer_config.json into out_dir; returns the vocab size."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ranks = train_ranks(_CORPUS, n_ranks)
    lines = [f"{base64.b64encode(token).decode('ascii')} {rank}\n" for token, rank in ranks.items()]
    (out_dir / "tiktoken.model").write_text("".join(lines), encoding="ascii")
    config = json.dumps(tokenizer_config(n_ranks), indent=2, ensure_ascii=False)
    (out_dir / "tokenizer_config.json").write_text(config + "\n", encoding="utf-8")
    return n_ranks + N_SPECIAL_SLOTS
