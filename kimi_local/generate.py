"""Prefill, decode and sampling for one sequence.

`prefill(model, cache, ids, chunk)` runs the prompt in chunks (bounded activation memory, progress
callback); `sample(logits, params, gen, history)` picks the next token on the logits' device, `Sampler`
does so with its state (random counter, repeat-penalty ring) on the device, CUDA-graph capturable;
`generate(...)` streams token ids until a stop token or the budget.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

import torch

from kimi_local.kernels import naive


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
    if p.min_p <= 0 and p.top_p >= 1.0:
        return logits
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


# ---- random numbers: a counter-based hash, the same bits on every device ---------------------------------
# u_i = hash(seed, step, i) in (0, 1) for vocabulary entry i at sampling step `step` (a device counter, so the
# draw can run inside a CUDA graph and repeat exactly); token = argmax(filtered logits + Gumbel(u)), which
# picks i with probability softmax(filtered logits)_i (the Gumbel-max trick). The hash is kernels/naive.py's
# gumbel_ref (torch, the CPU path) and kernels/sample.py's gumbel_add (one Triton launch, the CUDA path).


class Rng:
    """Seeded counter-based generator on a device: `add_gumbel(logits)` returns logits + Gumbel(0, 1) noise
    and advances the step counter (a device tensor) in place: no host sync, CUDA-graph capturable."""

    def __init__(self, device, seed: int | None = None):
        self.seed = (seed if seed is not None else time.time_ns()) & naive.M32
        self.step = torch.zeros(1, dtype=torch.int64, device=device)

    def add_gumbel(self, logits: torch.Tensor) -> torch.Tensor:
        if logits.is_cuda:
            from kimi_local.kernels.sample import gumbel_add

            out = gumbel_add(logits.contiguous(), self.seed, self.step)
        else:
            out = logits + naive.gumbel_ref(self.seed, self.step, logits.numel())
        self.step.add_(1)
        return out


def make_generator(device, seed: int | None) -> Rng:
    return Rng(device, seed)


def sample(logits: torch.Tensor, p: SamplingParams, gen: Rng | None,
           history: torch.Tensor | None = None) -> torch.Tensor:
    """One token id (a 0-d int64 tensor on the logits' device; no host sync). history: token ids the repeat
    penalty applies to (ids >= the vocabulary size are ignored: padding)."""
    logits = logits.float().reshape(-1)
    if history is not None and p.repeat_penalty != 1.0:
        logits = _penalize(logits, history[-p.repeat_last_n :], p.repeat_penalty)
    if p.temperature == 0:
        return torch.argmax(logits)
    return torch.argmax(gen.add_gumbel(filter_logits(logits, p)))


def _penalize(logits: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """apply_repeat_penalty without indexing by history (a device tensor whose padding entries are >= V):
    a seen-mask through index_fill, then one where (graph-capturable)."""
    V = logits.numel()
    seen = torch.zeros(V + 1, dtype=torch.bool, device=logits.device)
    seen = seen.index_fill_(0, history.clamp(max=V), True)[:V]
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


class Sampler:
    """Sampling with its state on the device: the Rng counter and a ring of the last `repeat_last_n` token ids
    (for the repeat penalty). `sampler(logits)` -> the next id [1] int64, pushed into the ring: no host sync,
    so it can be captured in a CUDA graph after the decode step (engine.DecodeGraph.stream)."""

    def __init__(self, params: SamplingParams, vocab: int, device, history: list[int] = ()):
        self.params, self.vocab = params, vocab
        self.rng = Rng(device, params.seed)
        n = max(1, params.repeat_last_n)
        ring = [t for t in history[-n:] if 0 <= t < vocab]
        self.ring = torch.full((n,), vocab, dtype=torch.int64, device=device)  # vocab = empty slot
        if ring:
            self.ring[: len(ring)] = torch.tensor(ring, dtype=torch.int64)
        self.head = torch.full((1,), len(ring) % n, dtype=torch.int64, device=device)  # next slot to write

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        tok = sample(logits, self.params, self.rng, self.ring).reshape(1)
        if self.params.repeat_penalty != 1.0:  # the ring is only read by the penalty
            self.ring.index_copy_(0, self.head, tok)
            self.head.copy_((self.head + 1) % self.ring.numel())
        return tok

    @property
    def greedy(self) -> bool:
        """The pick is argmax(logits) alone (no noise, no penalty): kernels.sample.greedy_next can do it."""
        return self.params.temperature == 0 and self.params.repeat_penalty == 1.0

    def state(self) -> tuple:
        return self.rng.step.clone(), self.ring.clone(), self.head.clone()

    def load_state(self, st: tuple) -> None:
        for t, v in zip((self.rng.step, self.ring, self.head), st):
            t.copy_(v)


@dataclass
class Stats:
    prefill_tokens: int = 0
    prefill_s: float = 0.0
    decode_tokens: int = 0
    decode_s: float = 0.0
    unyielded: list = field(default_factory=list)  # fed to the cache ahead but never yielded (see generate)

    @property
    def prefill_tps(self) -> float:
        return self.prefill_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tps(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s else 0.0


def prefill(model, cache, ids: list[int], chunk: int | None = None,
            progress: Callable[[int, int], None] | None = None) -> torch.Tensor | None:
    """Feed ids through the model in chunks; returns the last position's logits [1, vocab].
    chunk None: the model's `prefill_chunk` (the engine: up to 16384, fitted to the GPU memory left; the
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
    so the cache holds the prompt plus the tokens yielded so far. On CUDA with a decode graph the
    model may already be feeding the next token while one is yielded (`model.decode_stream`): if the
    consumer closes the generator early (e.g. Ctrl-C between tokens) that token stays in the cache and
    is listed in stats.unyielded (the cache and its token list always agree)."""
    params.validate()
    stats = stats if stats is not None else Stats()
    dev = model.device
    t0 = time.perf_counter()
    logits = prefill(model, cache, prompt_ids, chunk, progress)
    _sync(dev)
    stats.prefill_tokens += len(prompt_ids)
    stats.prefill_s += time.perf_counter() - t0
    if logits is None:
        raise ValueError("generate needs at least one prompt token")
    start = len(cache.tokens)
    sampler = Sampler(params, logits.shape[-1], dev, cache.tokens)
    t1 = time.perf_counter()
    tok = int(sampler(logits[-1]))  # the one host sync per token (later tokens: inside the stream)
    steps = decode_steps(model, cache, sampler, tok, max_tokens, stop_ids)
    n = 0
    try:
        for tok in steps:
            n += 1
            stats.decode_tokens += 1
            stats.decode_s = time.perf_counter() - t1
            yield tok
    finally:
        steps.close()  # a token fed ahead is recorded in the cache here
        stats.unyielded = cache.tokens[start + n :]


def decode_steps(model, cache, sampler: Sampler, tok: int, max_tokens: int, stop_ids=frozenset()) -> Iterator[int]:
    """Feed tok and yield it, then the tokens sampled after it, until a stop token (yielded) or max_tokens:
    the model's device-side stream (GpuKimi.decode_stream) where it has one, else one forward() per token."""
    stream = getattr(model, "decode_stream", None)
    steps = stream(cache, sampler, tok, max_tokens, stop_ids) if stream is not None else None
    return steps if steps is not None else eager_steps(model, cache, sampler, tok, max_tokens, stop_ids)


def eager_steps(model, cache, sampler: Sampler, tok: int, max_tokens: int, stop_ids) -> Iterator[int]:
    """Feed tok, yield it, sample the next from its logits; until a stop token or max_tokens (the last
    token is fed without computing logits)."""
    for n in range(max_tokens):
        last = tok in stop_ids or n == max_tokens - 1
        cache.check_room(1)
        logits = model.forward(torch.tensor([tok]), cache, logits="none" if last else "last")
        yield tok
        if last:
            return
        tok = int(sampler(logits[-1]))


def lookahead_steps(cache, tok: int, max_tokens: int, stop_ids, launch: Callable[[int], None],
                    read: Callable[[int], int]) -> Iterator[int]:
    """decode_steps for a device that feeds and samples by itself: launch(m) enqueues step m (m = 0, 1, ...:
    feeds token m, the one step m - 1 sampled; token 0 = tok, already in place), read(m) waits for step m and
    returns the token it sampled. Step n + 1 is launched before the host waits for token n + 1 to yield
    token n, so the device never waits for the host. The cache's host side (positions, token ids) follows
    each fed token before it is yielded. Closed early (or on an error), the steps already launched are
    waited for and their tokens recorded, so the cache stays equal to the device's state."""
    fed, launched, pos0 = [tok], 0, cache.pos

    def go():
        nonlocal launched
        launch(launched)
        launched += 1

    go()
    try:
        for n in range(max_tokens):
            last = fed[n] in stop_ids or n == max_tokens - 1
            if not last and cache.pos + 2 <= cache.max_ctx:
                go()  # feeds token n + 1 while the host waits for it below
            fed.append(read(n))
            cache.advance(fed[n : n + 1])
            yield fed[n]
            if last:
                return
            if launched == n + 1:  # no room was left for token n + 1: this raises ContextOverflow
                cache.check_room(1)
                go()
    finally:
        for m in range(cache.pos - pos0, launched):
            if m >= len(fed):
                fed.append(read(m - 1))
            cache.advance(fed[m : m + 1])
