"""Prefill, decode and sampling for one sequence.

`prefill(model, cache, ids, chunk)` runs the prompt in chunks (bounded activation memory, progress
callback); `sample(logits, params, gen, history)` picks the next token on the logits' device;
`generate(...)` streams token ids until a stop token or the budget.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

import torch


@dataclass
class SamplingParams:
    temperature: float = 0.6  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    repeat_penalty: float = 1.0  # 1 = off; applied to the last `repeat_last_n` tokens
    repeat_last_n: int = 64
    seed: int | None = None

    def validate(self) -> None:
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if not 0.0 <= self.min_p < 1.0:
            raise ValueError("min_p must be in [0, 1)")
        if self.repeat_penalty <= 0:
            raise ValueError("repeat_penalty must be > 0")

    def to_dict(self) -> dict:
        return asdict(self)


def apply_repeat_penalty(logits: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """llama.cpp-style: divide positive logits of seen tokens by the penalty, multiply negative ones."""
    if penalty == 1.0 or history.numel() == 0:
        return logits
    seen = logits[history]
    logits = logits.clone()
    logits[history] = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits


def filter_logits(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, top-p, min-p masks (excluded tokens get -inf). logits [V] fp32."""
    logits = logits / p.temperature
    if p.top_k and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, -1)
    if p.min_p > 0:
        logits = logits.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
    if p.top_p < 1.0:
        sp, idx = torch.sort(probs, descending=True)
        cum = torch.cumsum(sp, -1)
        drop_sorted = (cum - sp) >= p.top_p  # keep the smallest prefix whose mass reaches top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator | None,
           history: torch.Tensor | None = None) -> torch.Tensor:
    """One token id (a 0-d int64 tensor on the logits' device; no host sync)."""
    logits = logits.float().reshape(-1)
    if history is not None:
        logits = apply_repeat_penalty(logits, history[-p.repeat_last_n :], p.repeat_penalty)
    if p.temperature == 0:
        return torch.argmax(logits)
    probs = torch.softmax(filter_logits(logits, p), -1)
    return torch.multinomial(probs, 1, generator=gen)[0]


def make_generator(device, seed: int | None) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed if seed is not None else int(time.time_ns() % (2**63)))
    return g


@dataclass
class Stats:
    prefill_tokens: int = 0
    prefill_s: float = 0.0
    decode_tokens: int = 0
    decode_s: float = 0.0

    @property
    def prefill_tps(self) -> float:
        return self.prefill_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tps(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s else 0.0


def prefill(model, cache, ids: list[int], chunk: int | None = None,
            progress: Callable[[int, int], None] | None = None) -> torch.Tensor | None:
    """Feed ids through the model in chunks; returns the last position's logits [1, vocab].
    chunk None: the model's `prefill_chunk` (the engine: up to 8192, fitted to the GPU memory left; the
    CPU reference: 2048)."""
    if not ids:
        return None
    chunk = chunk or getattr(model, "prefill_chunk", 2048)
    cache.check_room(len(ids))
    t = torch.tensor(ids, dtype=torch.int64)
    logits = None
    for s in range(0, len(ids), chunk):
        last = s + chunk >= len(ids)
        logits = model.forward(t[s : s + chunk], cache, logits="last" if last else "none")
        if progress:
            progress(min(s + chunk, len(ids)), len(ids))
    return logits


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def generate(model, cache, prompt_ids: list[int], params: SamplingParams, max_tokens: int,
             stop_ids: set[int] = frozenset(), stats: Stats | None = None, chunk: int | None = None,
             progress: Callable[[int, int], None] | None = None) -> Iterator[int]:
    """Prefill prompt_ids (the new tokens only: earlier turns are in the cache), then yield sampled
    token ids one by one. Each token is fed to the cache before it is yielded, the stop token too,
    so the cache always holds the prompt plus exactly the tokens yielded so far; closing the
    generator early (e.g. on Ctrl-C between tokens) leaves it consistent."""
    params.validate()
    stats = stats if stats is not None else Stats()
    dev = model.device
    gen = make_generator(dev, params.seed)
    t0 = time.perf_counter()
    logits = prefill(model, cache, prompt_ids, chunk, progress)
    _sync(dev)
    stats.prefill_tokens += len(prompt_ids)
    stats.prefill_s += time.perf_counter() - t0
    if logits is None:
        raise ValueError("generate needs at least one prompt token")
    history = torch.tensor(cache.tokens[-params.repeat_last_n :] or [0], dtype=torch.int64, device=dev)
    t1 = time.perf_counter()
    for n in range(max_tokens):
        tok = int(sample(logits[-1], params, gen, history))  # the one host sync per token
        last = tok in stop_ids or n == max_tokens - 1
        cache.check_room(1)
        logits = model.forward(torch.tensor([tok]), cache, logits="none" if last else "last")
        stats.decode_tokens += 1
        stats.decode_s = time.perf_counter() - t1
        yield tok
        if last:
            return
        history = torch.cat([history, torch.tensor([tok], device=dev)])[-params.repeat_last_n :]
