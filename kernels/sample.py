"""Sampling noise on the GPU: logits + Gumbel(0, 1) noise in one launch (naive.gumbel_ref's integer hash,
bit for bit up to the two logs), so that generate's sampler (kimi_local/generate.py) draws a token with one
argmax: argmax(filtered logits + g) picks token i with probability softmax(filtered logits)_i. The torch
reference takes ~30 elementwise launches on [vocab] int64 tensors; this is one (read once, write once).
greedy_next: the greedy pick and the position update of a device-side decode loop in one launch (engine.DecodeGraph).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import pdl
from .naive import GOLDEN, M32
from .pdl import gdc_launch_dependents, gdc_wait

_INTERP = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _mix32(x):
    """naive.mix32 on int64 values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = (x * 0x45D9F3B) & 0xFFFFFFFF
    x = x ^ (x >> 16)
    x = (x * 0x45D9F3B) & 0xFFFFFFFF
    return x ^ (x >> 16)


@triton.jit(do_not_specialize=["seed"])
def _gumbel_add_kernel(logits, out, step_ptr, seed, n, GOLD: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    step = tl.load(step_ptr).to(tl.int64) & 0xFFFFFFFF
    base = _mix32(_mix32(seed.to(tl.int64) & 0xFFFFFFFF) ^ step)
    x = _mix32(_mix32((i.to(tl.int64) * GOLD + base) & 0xFFFFFFFF) ^ base)
    u = ((x >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
    g = -tl.log(-tl.log(u))
    b_l = tl.load(logits + i, mask=m, other=0.0).to(tl.float32)
    tl.store(out + i, b_l + g, mask=m)


def gumbel_add(logits: torch.Tensor, seed: int, step: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """logits [n] (fp32, contiguous) + naive.gumbel_ref(seed, step, n) -> out [n] fp32. step: int64 [1] on the
    logits' device (read, not advanced). No host sync; CUDA-graph capturable."""
    assert logits.dim() == 1 and logits.is_contiguous() and step.dtype == torch.int64
    n = logits.numel()
    out = torch.empty(n, dtype=torch.float32, device=logits.device) if out is None else out
    BLOCK = 1024
    _gumbel_add_kernel[(triton.cdiv(n, BLOCK),)](logits, out, step, seed & M32, n, GOLD=GOLDEN, BLOCK=BLOCK,
                                                num_warps=4)
    return out


@triton.jit
def _greedy_next_kernel(logits, n, part_v, part_i, cnt, tok_out, pos, length, host,
                        BLOCK: tl.constexpr, G: tl.constexpr, BG: tl.constexpr, PDL: tl.constexpr,
                        RING: tl.constexpr):
    """Program p: the maximum of logits[p * BLOCK .. + BLOCK] and its first index, into the partials; the last of
    the G programs to arrive (counter cnt, re-armed by it) picks the first maximum of the partials (torch.argmax's
    tie rule: blocks are in index order), stores it to tok_out[0] (and, RING > 0, to host[pos[0] % RING]: pinned
    host memory) and adds 1 to pos[0] and length[0]."""
    pid = tl.program_id(0)
    o = pid * BLOCK + tl.arange(0, BLOCK)
    if PDL:  # the logits come from the kernel before (lm_head)
        gdc_wait()
        gdc_launch_dependents()
    v = tl.load(logits + o, mask=o < n, other=float("-inf")).to(tl.float32)
    m = tl.max(v, 0)
    tl.store(part_v + pid, m)
    tl.store(part_i + pid, tl.min(tl.where(v == m, o, n), 0))
    tl.debug_barrier()  # every thread's partial before the (releasing) arrival
    c = tl.atomic_add(cnt, 1, sem="acq_rel", scope="gpu")
    if c == G - 1:
        og = tl.arange(0, BG)
        pv = tl.load(part_v + og, mask=og < G, other=float("-inf"), cache_modifier=".cg")
        pi = tl.load(part_i + og, mask=og < G, other=n, cache_modifier=".cg")
        t = tl.minimum(tl.min(tl.where(pv == tl.max(pv, 0), pi, n), 0), n - 1)  # n - 1: all NaN (no maximum)
        tl.store(tok_out, t.to(tok_out.dtype.element_ty))
        p = tl.load(pos)
        if RING > 0:
            tl.store(host + p % RING, t.to(host.dtype.element_ty))
        tl.store(pos, p + 1)
        tl.store(length, tl.load(length) + 1)
        tl.atomic_xchg(cnt, 0, sem="relaxed", scope="gpu")


_GREEDY_WS: dict = {}
GREEDY_BLOCK = 2048  # 80 programs for the 163,840 logits: 16 values a thread at 4 warps


def greedy_next(logits: torch.Tensor, tok_out: torch.Tensor, pos: torch.Tensor, length: torch.Tensor,
                host: torch.Tensor | None = None) -> torch.Tensor:
    """The greedy step of a device-side decode loop in one launch: tok_out[0] = argmax(logits) (torch.argmax's
    index: the first maximum), pos[0] += 1, length[0] += 1 (the next step's cache position and length).
    logits [n] (contiguous), tok_out [1] (any integer dtype), pos / length [1] integer device tensors. host: a
    ring [R] in pinned host memory (contiguous integers) that also gets the id, in slot pos[0] % R (pos before the
    + 1): the host reads it after the launch's completion without a device-to-host copy. No host sync;
    CUDA-graph capturable after the first call on a device (its workspace); PDL-aware (kernels/pdl.py)."""
    assert logits.dim() == 1 and logits.is_contiguous() and tok_out.numel() == pos.numel() == length.numel() == 1
    assert host is None or (host.dim() == 1 and host.is_contiguous() and (host.is_pinned() or _INTERP))
    n = logits.numel()
    G = triton.cdiv(n, GREEDY_BLOCK)
    key = (str(logits.device), G)
    if key not in _GREEDY_WS:
        _GREEDY_WS[key] = (torch.empty(G, dtype=torch.float32, device=logits.device),
                           torch.empty(G, dtype=torch.int32, device=logits.device),
                           torch.zeros(1, dtype=torch.int32, device=logits.device))
    part_v, part_i, cnt = _GREEDY_WS[key]
    ring = tok_out if host is None else host
    _greedy_next_kernel[(G,)](logits, n, part_v, part_i, cnt, tok_out, pos, length, ring, BLOCK=GREEDY_BLOCK, G=G,
                              BG=triton.next_power_of_2(G), PDL=pdl.enabled(), RING=0 if host is None else host.numel(),
                              num_warps=1 if _INTERP else 4, **pdl.launch_kw())
    return tok_out
