"""GPU-side expert cache decisions for offloaded MoE decode (reference: naive.resolve_experts).

Why on the GPU: with the cache tables on the host, every MoE layer of every decode token had to bring
the router's expert ids back to the host (a sync), decide hits and victims in Python, and issue copies:
the GPU idled between layers and the decode step could not be one CUDA graph (measured: the loader with
twice the hit rate decoded no faster than naive load-on-miss). Here the tables live in device memory and
two small kernels run inside the captured decode step:

  resolve (one program, <= 16 ids): hits, victims (lowest score among unpinned slots, empty slots
      first), table updates, slots for the MoE kernel, a miss list, policy scores, statistics.
  copy (grid [n, C]): for each miss (expert e -> slot s) copy the expert's bytes of the three
      projections from the pinned host store into the slot pools; the host store is read directly
      over PCIe (pinned memory is mapped into the GPU's address space), so no host involvement.

Tables per MoE layer (int32 unless noted): expert_slot [E] (-1 = not resident), slot_expert [S]
(-1 = empty), score [E] fp32 (LFU: decayed use count; LRU: time of last use), flag [S] (slot filled
by a prefetch since the last demand), guess [BK] (the last prefetch's ids, for precision / recall),
stats int64 [9] (see STAT), counts [E] fp32 (routing counts for expert profiles), clock [1] fp32.

Within one call the ids are distinct (top-k), so a slot's table entries are never read after being
written in the same call: no intra-program ordering hazards.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERP = os.environ.get("TRITON_INTERPRET") == "1"

# stats columns (the names of the kimi_local.offload.ExpertStats fields they add to; "demands" = tokens)
STAT = ("demands", "lookups", "hits", "misses", "prefetched", "prefetch_hits", "guessed", "guess_right",
        "guess_needed")


@triton.jit
def _resolve_kernel(ids, n, expert_slot, slot_expert, score, flag, guess, miss_e, miss_s, slots_out,
                    stats, counts, clock, S, E, decay,
                    PREFETCH: tl.constexpr, LRU: tl.constexpr, BK: tl.constexpr, BS: tl.constexpr,
                    BE: tl.constexpr):
    # One program, one warp. Gathers of a table happen before any store to it (barriers between),
    # and the ids are distinct, so no entry is read after this program wrote it.
    o_k = tl.arange(0, BK)
    m_k = o_k < n
    o_s = tl.arange(0, BS)
    m_s = o_s < S
    o_e = tl.arange(0, BE)
    m_e = o_e < E
    b_ids = tl.load(ids + o_k, mask=m_k, other=-1)
    b_res = tl.load(expert_slot + tl.maximum(b_ids, 0), mask=m_k, other=-1)  # [BK] slot or -1
    hit = m_k & (b_res >= 0)
    # victim key per slot: its expert's score; empty slots first; slots this call needs: never
    b_se = tl.load(slot_expert + o_s, mask=m_s, other=-1)
    b_key = tl.load(score + tl.maximum(b_se, 0), mask=m_s, other=0.0)
    b_key = tl.where(b_se < 0, float("-inf"), b_key)
    pinned = tl.sum((o_s[:, None] == b_res[None, :]).to(tl.int32), 1) > 0  # [BS]
    b_key = tl.where(pinned | (o_s >= S), float("inf"), b_key)
    b_flag = tl.load(flag + tl.maximum(b_res, 0), mask=hit, other=0)
    b_g = tl.load(guess + o_k)  # the last prefetch's ids, -1 where none
    tl.debug_barrier()
    b_me = tl.full([BK], -1, tl.int32)  # miss list: expert, slot
    b_ms = tl.full([BK], -1, tl.int32)
    b_slot = tl.where(hit, b_res, -1)
    for j in range(n):
        e = tl.sum(tl.where(o_k == j, b_ids, 0), 0)
        s = tl.sum(tl.where(o_k == j, b_res, 0), 0)
        v = tl.argmin(b_key, 0).to(tl.int32)
        take = (s < 0) & (tl.min(b_key, 0) < float("inf"))  # a miss with a free victim
        old = tl.sum(tl.where(o_s == v, b_se, 0), 0)  # slot_expert[v] (unchanged since the load)
        tl.store(expert_slot + old, -1, mask=take & (old >= 0))
        tl.store(expert_slot + e, v, mask=take)
        tl.store(slot_expert + v, e, mask=take)
        b_key = tl.where((o_s == v) & take, float("inf"), b_key)
        sel = (o_k == j) & take
        b_me = tl.where(sel, e, b_me)
        b_ms = tl.where(sel, v, b_ms)
        b_slot = tl.where(sel, v, b_slot)
    tl.store(miss_e + o_k, b_me)
    tl.store(miss_s + o_k, b_ms)
    tl.store(slots_out + o_k, b_slot)
    n_miss = tl.sum((b_ms >= 0).to(tl.int64), 0)
    if PREFETCH:
        tl.store(guess + o_k, b_ids)  # for precision / recall at the next demand
        tl.store(flag + b_ms, 1, mask=b_ms >= 0)
        tl.atomic_add(stats + 4, n_miss)
        tl.atomic_add(stats + 6, tl.sum(m_k.to(tl.int64), 0))
    else:
        n_pf = tl.sum(tl.where(hit, b_flag, 0).to(tl.int64), 0)
        tl.store(flag + o_s, tl.zeros([BS], dtype=tl.int32), mask=m_s)
        right = tl.sum(tl.sum(((b_g[:, None] == b_ids[None, :]) & (b_g[:, None] >= 0)
                               & m_k[None, :]).to(tl.int64), 1), 0)
        had_guess = tl.max(b_g, 0) >= 0
        tl.store(guess + o_k, tl.full([BK], -1, tl.int32))
        # policy scores and profile counts
        used = tl.sum((o_e[:, None] == b_ids[None, :]).to(tl.float32), 1)  # [BE]
        b_sc = tl.load(score + o_e, mask=m_e, other=0.0)
        now = tl.load(clock)
        if LRU:
            b_sc = tl.where(used > 0, now, b_sc)
        else:
            b_sc = b_sc * decay + used
        tl.store(score + o_e, b_sc, mask=m_e)
        tl.store(clock, now + 1.0)
        b_c = tl.load(counts + o_e, mask=m_e, other=0.0)
        tl.store(counts + o_e, b_c + used, mask=m_e)
        tl.atomic_add(stats + 0, 1)
        tl.atomic_add(stats + 1, tl.sum(m_k.to(tl.int64), 0))
        tl.atomic_add(stats + 2, tl.sum(hit.to(tl.int64), 0))
        tl.atomic_add(stats + 3, n_miss)
        tl.atomic_add(stats + 5, n_pf)
        tl.atomic_add(stats + 7, tl.where(had_guess, right, 0))
        tl.atomic_add(stats + 8, tl.where(had_guess, tl.sum(m_k.to(tl.int64), 0), 0))


@triton.jit
def _copy_kernel(miss_e, miss_s, src0, dst0, n0, src1, dst1, n1, src2, dst2, n2,
                 C: tl.constexpr, BLOCK: tl.constexpr):
    j = tl.program_id(0)
    c = tl.program_id(1)
    e = tl.load(miss_e + j).to(tl.int64)
    s = tl.load(miss_s + j).to(tl.int64)
    if e >= 0:
        o = tl.arange(0, BLOCK)
        for off in range(c * BLOCK, n0, C * BLOCK):
            m = off + o < n0
            tl.store(dst0 + s * n0 + off + o, tl.load(src0 + e * n0 + off + o, mask=m), mask=m)
        for off in range(c * BLOCK, n1, C * BLOCK):
            m = off + o < n1
            tl.store(dst1 + s * n1 + off + o, tl.load(src1 + e * n1 + off + o, mask=m), mask=m)
        for off in range(c * BLOCK, n2, C * BLOCK):
            m = off + o < n2
            tl.store(dst2 + s * n2 + off + o, tl.load(src2 + e * n2 + off + o, mask=m), mask=m)


class LayerTables:
    """One MoE layer's device-side cache state (module docstring). `policy`: "lfu" or "lru"."""

    def __init__(self, S: int, E: int, k: int, device, policy: str = "lfu", half_life: float = 64.0):
        i32 = dict(dtype=torch.int32, device=device)
        self.S, self.E, self.k = S, E, k
        self.BK = max(2, triton.next_power_of_2(k))
        self.lru = policy == "lru"
        self.decay = 0.5 ** (1.0 / half_life)
        self.expert_slot = torch.full((E,), -1, **i32)
        self.slot_expert = torch.full((S,), -1, **i32)
        self.score = torch.zeros(E, dtype=torch.float32, device=device)
        self.flag = torch.zeros(S, **i32)
        self.guess = torch.full((self.BK,), -1, **i32)
        self.stats = torch.zeros(len(STAT), dtype=torch.int64, device=device)
        self.counts = torch.zeros(E, dtype=torch.float32, device=device)
        self.clock = torch.zeros(1, dtype=torch.float32, device=device)
        # per-call outputs (static buffers: graph-capturable); prefetch has its own miss list
        self.slots = torch.zeros(self.BK, **i32)
        self.miss = torch.full((2, self.BK), -1, **i32)
        self.pf_slots = torch.zeros(self.BK, **i32)
        self.pf_miss = torch.full((2, self.BK), -1, **i32)


def resolve(t: LayerTables, ids: torch.Tensor, prefetch: bool = False) -> torch.Tensor:
    """ids [n] distinct expert ids (int32, device; n <= k) -> slots [n] (a view of a static buffer).
    Demand (prefetch=False): every id resident afterwards, misses listed in t.miss for copy_misses;
    scores / counts / stats updated. Prefetch: the same for the guessed ids, into t.pf_miss, slots
    flagged; scores untouched. When no slot is free (all pinned) an id stays missing (slot -1)."""
    n = ids.numel()
    assert n <= t.BK and ids.dtype == torch.int32
    slots, miss = (t.pf_slots, t.pf_miss) if prefetch else (t.slots, t.miss)  # all BK entries written
    _resolve_kernel[(1,)](ids, n, t.expert_slot, t.slot_expert, t.score, t.flag, t.guess, miss[0], miss[1],
                          slots, t.stats, t.counts, t.clock, t.S, t.E, t.decay,
                          PREFETCH=prefetch, LRU=t.lru, BK=t.BK, BS=triton.next_power_of_2(t.S),
                          BE=triton.next_power_of_2(t.E), num_warps=1)
    return slots[:n]


def _words(t: torch.Tensor) -> torch.Tensor:
    """A pool [X, ...] as flat 4-byte words when each entry's bytes allow (wider copies), else bytes."""
    b = t.view(torch.uint8).reshape(t.shape[0], -1) if t.dtype != torch.uint8 else t.reshape(t.shape[0], -1)
    return b.view(torch.int32) if b.shape[1] % 4 == 0 else b


def copy_misses(miss: torch.Tensor, host: list[torch.Tensor], pools: list[torch.Tensor], C: int = 16) -> None:
    """Copy the experts listed in miss [2, n] (expert, slot; -1 = none) from the host stores
    [E, ...] into the slot pools [S, ...] (3 projections). Host stores must be pinned (GPU) or CPU
    tensors (interpreter)."""
    src = [_words(h) for h in host]
    dst = [_words(p) for p in pools]
    for a, b in zip(src, dst):
        assert a.dtype == b.dtype and a.shape[1] == b.shape[1]
    n = miss.shape[1]
    _copy_kernel[(n, 1 if _INTERP else C)](miss[0], miss[1], src[0], dst[0], src[0].shape[1], src[1], dst[1],
                                           src[1].shape[1], src[2], dst[2], src[2].shape[1],
                                           C=1 if _INTERP else C, BLOCK=256 if _INTERP else 1024,
                                           num_warps=1 if _INTERP else 4)
