"""MoE router selection in one launch (reference: naive.route, after the router GEMV).

Per token: s = sigmoid(logits), pick the top-k of s + bias (bias for selection only), weights
= s (or s + bias, the HF variant) renormalised to sum 1, times the routed scaling factor.
One program per token; top-k by k successive arg-max passes over the E = 256 scores in registers.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERP = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def route_kernel(logits, bias, ids_out, w_out, scale, stride_l,
                 E: tl.constexpr, BE: tl.constexpr, K: tl.constexpr, BK: tl.constexpr,
                 BIASED: tl.constexpr, RENORM: tl.constexpr):
    i_t = tl.program_id(0).to(tl.int64)
    o_e = tl.arange(0, BE)
    m_e = o_e < E
    b_s = tl.sigmoid(tl.load(logits + i_t * stride_l + o_e, mask=m_e, other=0.0).to(tl.float32))
    b_sel = tl.where(m_e, b_s + tl.load(bias + o_e, mask=m_e, other=0.0), float("-inf"))  # [BE]
    b_w = b_sel if BIASED else b_s
    o_k = tl.arange(0, BK)
    ids = tl.zeros([BK], dtype=tl.int32)
    wts = tl.zeros([BK], dtype=tl.float32)
    for j in tl.static_range(K):
        idx = tl.argmax(b_sel, 0)
        ids = tl.where(o_k == j, idx, ids)
        wts = tl.where(o_k == j, tl.sum(tl.where(o_e == idx, b_w, 0.0), 0), wts)
        b_sel = tl.where(o_e == idx, float("-inf"), b_sel)
    if RENORM:
        wts = wts / (tl.sum(wts, 0) + 1e-20)
    m_k = o_k < K
    tl.store(ids_out + i_t * K + o_k, ids, mask=m_k)
    tl.store(w_out + i_t * K + o_k, wts * scale, mask=m_k)


def route(logits: torch.Tensor, bias: torch.Tensor, k: int, scale: float, biased_weights: bool = False,
          renormalize: bool = True, ids_out=None, w_out=None):
    """logits [T, E] (router GEMV output) -> (ids [T, k] int32, weights [T, k] fp32).
    Graph-capturable when ids_out / w_out are given."""
    T, E = logits.shape
    assert logits.stride(1) == 1 and bias.is_contiguous()
    ids_out = torch.empty(T, k, dtype=torch.int32, device=logits.device) if ids_out is None else ids_out
    w_out = torch.empty(T, k, dtype=torch.float32, device=logits.device) if w_out is None else w_out
    route_kernel[(T,)](logits, bias, ids_out, w_out, float(scale), logits.stride(0),
                       E=E, BE=triton.next_power_of_2(E), K=k, BK=triton.next_power_of_2(k),
                       BIASED=biased_weights, RENORM=renormalize, num_warps=1 if _INTERP else 4)
    return ids_out, w_out
