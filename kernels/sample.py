"""Sampling noise on the GPU: logits + Gumbel(0, 1) noise in one launch (naive.gumbel_ref's integer hash,
bit for bit up to the two logs), so that generate's sampler (kimi_local/generate.py) draws a token with one
argmax: argmax(filtered logits + g) picks token i with probability softmax(filtered logits)_i. The torch
reference takes ~30 elementwise launches on [vocab] int64 tensors; this is one (read once, write once).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .naive import GOLDEN, M32


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
