"""MoE router: the router GEMV and the selection (reference: naive.route).

router_logits: logits [T, E] fp32 = x [T, D] (bf16 or any float, read as is: no cast kernel) @ w [E, D]^T,
fp32 accumulation; a grid over blocks of experts (one program would take ~20 us for E x D = 256 x 2304),
used for few tokens (decode); prefill (many tokens) uses the fp32 GEMM.
route: per token, s = sigmoid(logits), pick the top-k of s + bias (bias for selection only), weights
= s (or s + bias, the HF variant) renormalised to sum 1, times the routed scaling factor.
One program per token; top-k by k successive arg-max passes over the E = 256 scores in registers (each pass
one reduction that carries the picked expert's weight along: norm + router + top-8 7.34 vs 8.12 us with a
second reduction per pass for the weight, H200, session 7).
router_route: both in one launch (the last program of a token to finish its logits does the top-k);
route_tokens uses it for decode.
norm_router_route: the MoE layer's add + RMSNorm (kernels/norm.rms_norm with a residual and x8 output)
fused in front of router_route: every program normalises the whole row itself (2304 values from L2), so the
norm is not a launch of its own in the decode chain.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import pdl
from .pdl import gdc_launch_dependents, gdc_wait
from .norm import _rms_scaled, _x8_row
from .quant_matmul import env_config, x8_words

_INTERP = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _logits_block(x, w, out, D, stride_x, stride_w, stride_o,
                  E: tl.constexpr, BE: tl.constexpr, BD: tl.constexpr, PDL: tl.constexpr):
    """Program (i_e, i_t): logits of experts i_e * BE .. + BE for token i_t, stored to out[i_t]."""
    i_e, i_t = tl.program_id(0), tl.program_id(1).to(tl.int64)
    o_e = i_e * BE + tl.arange(0, BE)
    m_e = o_e < E
    p_w = w + o_e.to(tl.int64)[:, None] * stride_w  # [BE, 1] row pointers
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    b_acc = tl.zeros([BE, BD], dtype=tl.float32)
    for d0 in range(0, D, BD):
        o_d = d0 + tl.arange(0, BD)
        m_d = o_d < D
        b_x = tl.load(x + i_t * stride_x + o_d, mask=m_d, other=0.0).to(tl.float32)  # [BD]
        b_w = tl.load(p_w + o_d[None, :], mask=m_e[:, None] & m_d[None, :], other=0.0).to(tl.float32)  # [BE, BD]
        b_acc += b_w * b_x[None, :]
    tl.store(out + i_t * stride_o + o_e, tl.sum(b_acc, 1), mask=m_e)


@triton.jit
def router_logits_kernel(x, w, out, D, stride_x, stride_w, stride_o,
                         E: tl.constexpr, BE: tl.constexpr, BD: tl.constexpr, PDL: tl.constexpr):
    _logits_block(x, w, out, D, stride_x, stride_w, stride_o, E, BE, BD, PDL)


@triton.jit
def _max_carry(v1, i1, w1, v2, i2, w2):
    """Combine of an arg-max that carries a second value: the larger v (the lower index on ties, as tl.argmax),
    with its index and w."""
    take2 = (v2 > v1) | ((v2 == v1) & (i2 < i1))
    return tl.where(take2, v2, v1), tl.where(take2, i2, i1), tl.where(take2, w2, w1)


@triton.jit
def _scores(logits_row, bias, E: tl.constexpr, BE: tl.constexpr, CG: tl.constexpr):
    """(o_e [BE], s = sigmoid(logits) [BE], selection scores s + bias [BE], -inf past E) of one token's E logits;
    CG: read the logits past L1, for logits another program or launch wrote."""
    o_e = tl.arange(0, BE)
    m_e = o_e < E
    if CG:
        b_l = tl.load(logits_row + o_e, mask=m_e, other=0.0, cache_modifier=".cg")
    else:
        b_l = tl.load(logits_row + o_e, mask=m_e, other=0.0)
    b_s = tl.sigmoid(b_l.to(tl.float32))
    return o_e, b_s, tl.where(m_e, b_s + tl.load(bias + o_e, mask=m_e, other=0.0), float("-inf"))


@triton.jit
def _topk(logits_row, bias, scale, E: tl.constexpr, BE: tl.constexpr, K: tl.constexpr, BK: tl.constexpr,
          BIASED: tl.constexpr, RENORM: tl.constexpr, CG: tl.constexpr):
    """Top-k of one token's E logits -> (ids [BK] int32, weights [BK] fp32 times scale; the first K are the
    picks; CG as _scores). Also the MoE kernels' own expert picks (moe._route_pick)."""
    o_e, b_s, b_sel = _scores(logits_row, bias, E, BE, CG)
    b_w = b_sel if BIASED else b_s
    o_k = tl.arange(0, BK)
    ids = tl.zeros([BK], dtype=tl.int32)
    wts = tl.zeros([BK], dtype=tl.float32)
    for j in tl.static_range(K):  # one reduction per pick: the arg-max carries the pick's weight along
        _, idx, w_j = tl.reduce((b_sel, o_e, b_w), 0, _max_carry)
        ids = tl.where(o_k == j, idx, ids)
        wts = tl.where(o_k == j, w_j, wts)
        b_sel = tl.where(o_e == idx, float("-inf"), b_sel)
    if RENORM:
        wts = wts / (tl.sum(wts, 0) + 1e-20)
    return ids, wts * scale


@triton.jit
def _route_row(logits_row, bias, ids_row, w_row, scale,
               E: tl.constexpr, BE: tl.constexpr, K: tl.constexpr, BK: tl.constexpr,
               BIASED: tl.constexpr, RENORM: tl.constexpr, CG: tl.constexpr):
    """_topk of one token's logits stored to ids_row [K] int32, w_row [K] fp32."""
    ids, wts = _topk(logits_row, bias, scale, E, BE, K, BK, BIASED, RENORM, CG)
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    tl.store(ids_row + o_k, ids, mask=m_k)
    tl.store(w_row + o_k, wts, mask=m_k)


@triton.jit
def route_kernel(logits, bias, ids_out, w_out, scale, stride_l,
                 E: tl.constexpr, BE: tl.constexpr, K: tl.constexpr, BK: tl.constexpr,
                 BIASED: tl.constexpr, RENORM: tl.constexpr, PDL: tl.constexpr):
    i_t = tl.program_id(0).to(tl.int64)
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    _route_row(logits + i_t * stride_l, bias, ids_out + i_t * K, w_out + i_t * K, scale,
               E, BE, K, BK, BIASED, RENORM, False)


@triton.jit
def router_route_kernel(x, w, logits, cnt, bias, ids_out, w_out, scale, D, stride_x, stride_w, stride_l,
                        E: tl.constexpr, BE: tl.constexpr, BD: tl.constexpr, BEF: tl.constexpr,
                        K: tl.constexpr, BK: tl.constexpr, BIASED: tl.constexpr, RENORM: tl.constexpr,
                        PDL: tl.constexpr):
    """router_logits_kernel, then the last of the cdiv(E, BE) programs of token i_t (arrival counter
    cnt[i_t], re-armed to 0 by it) runs the top-k over the token's E logits: one launch per decode token."""
    i_t = tl.program_id(1).to(tl.int64)
    _logits_block(x, w, logits, D, stride_x, stride_w, stride_l, E, BE, BD, PDL)
    tl.debug_barrier()  # every thread's logits stored before the (releasing) arrival
    c = tl.atomic_add(cnt + i_t, 1, sem="acq_rel", scope="gpu")
    if c == tl.num_programs(0) - 1:
        _route_row(logits + i_t * stride_l, bias, ids_out + i_t * K, w_out + i_t * K, scale,
                   E, BEF, K, BK, BIASED, RENORM, True)
        tl.atomic_xchg(cnt + i_t, 0, sem="relaxed", scope="gpu")


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
                       BIASED=biased_weights, RENORM=renormalize, PDL=pdl.enabled(),
                       num_warps=1 if _INTERP else 4, **pdl.launch_kw())
    return ids_out, w_out


GEMV_MAX_TOKENS = 8  # above this, the fp32 GEMM (weights read once, not once per token)
# E=256: 128 programs of 2 rows, 3 steps of 8 KB over D=2304. (BE=4, BD=256: 64 programs x 9 dependent
# 4 KB steps measured 11.0 us per call in the H200 decode profile, latency-bound.)
GEMV_DEFAULTS = dict(BE=2, BD=1024, num_warps=4)


def router_logits(x: torch.Tensor, w: torch.Tensor, out=None, BE: int | None = None, BD: int | None = None,
                  num_warps: int | None = None) -> torch.Tensor:
    """x [T, D] (any float dtype), w [E, D] (fp32 or bf16) -> logits [T, E] fp32, one launch.
    Graph-capturable when out is given (or allocated by the capture's pool)."""
    T, D = x.shape
    E = w.shape[0]
    assert w.shape[1] == D and x.stride(1) == 1 and w.stride(1) == 1
    out = torch.empty(T, E, dtype=torch.float32, device=x.device) if out is None else out
    assert out.shape == (T, E) and out.stride(1) == 1
    BE = BE or GEMV_DEFAULTS["BE"]
    BD = min(BD or GEMV_DEFAULTS["BD"], triton.next_power_of_2(D))
    router_logits_kernel[(triton.cdiv(E, BE), T)](x, w, out, D, x.stride(0), w.stride(0), out.stride(0),
                                                  E=E, BE=BE, BD=BD, PDL=pdl.enabled(), **pdl.launch_kw(),
                                                  num_warps=1 if _INTERP else (num_warps or GEMV_DEFAULTS["num_warps"]))
    return out


_CNT: dict = {}  # device -> int32 arrival counters [GEMV_MAX_TOKENS], zero between launches


def _counters(device) -> torch.Tensor:
    """The device's arrival counters (allocated on first use: outside graph capture)."""
    key = str(device)
    if key not in _CNT:
        _CNT[key] = torch.zeros(GEMV_MAX_TOKENS, dtype=torch.int32, device=device)
    return _CNT[key]


def router_route(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor, k: int, scale: float,
                 biased_weights: bool = False, renormalize: bool = True, BE: int | None = None,
                 BD: int | None = None, num_warps: int | None = None):
    """router_logits + route in one launch for T <= GEMV_MAX_TOKENS tokens: (ids [T, k] int32,
    weights [T, k] fp32). Graph-capturable after the first call on a device (counter allocation)."""
    T, D = x.shape
    E = w.shape[0]
    assert T <= GEMV_MAX_TOKENS and w.shape[1] == D and x.stride(1) == 1 and w.stride(1) == 1
    assert bias.is_contiguous()
    cnt = _counters(x.device)
    logits = torch.empty(T, E, dtype=torch.float32, device=x.device)
    ids = torch.empty(T, k, dtype=torch.int32, device=x.device)
    wts = torch.empty(T, k, dtype=torch.float32, device=x.device)
    BE = BE or GEMV_DEFAULTS["BE"]
    BD = min(BD or GEMV_DEFAULTS["BD"], triton.next_power_of_2(D))
    router_route_kernel[(triton.cdiv(E, BE), T)](
        x, w, logits, cnt, bias, ids, wts, float(scale), D, x.stride(0), w.stride(0), logits.stride(0),
        E=E, BE=BE, BD=BD, BEF=triton.next_power_of_2(E), K=k, BK=triton.next_power_of_2(k),
        BIASED=biased_weights, RENORM=renormalize, PDL=pdl.enabled(), **pdl.launch_kw(),
        num_warps=1 if _INTERP else (num_warps or GEMV_DEFAULTS["num_warps"]))
    return ids, wts


def route_tokens(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor, k: int, scale: float,
                 biased_weights: bool = False, renormalize: bool = True):
    """naive.route's contract on the device: x [T, D], router w [E, D], bias [E] ->
    (ids [T, k] int32, weights [T, k] fp32). Decode (T <= GEMV_MAX_TOKENS): one launch (router_route;
    KIMI_LOCAL_ROUTE_FUSED=0: the two launches router_logits + route)."""
    if x.shape[0] <= GEMV_MAX_TOKENS:
        if os.environ.get("KIMI_LOCAL_ROUTE_FUSED", "1") != "0":
            return router_route(x, w, bias, k, scale, biased_weights, renormalize)
        logits = router_logits(x, w)
    else:
        logits = x.float() @ w.float().t()
    return route(logits, bias, k, scale, biased_weights, renormalize)


@triton.jit
def norm_router_route_kernel(v, res, nw, h, h8, w, logits, cnt, bias, ids_out, w_out, eps, scale, stride_w,
                             D: tl.constexpr, BDN: tl.constexpr, E: tl.constexpr, BE: tl.constexpr,
                             BEF: tl.constexpr, K: tl.constexpr, BK: tl.constexpr, BIASED: tl.constexpr,
                             RENORM: tl.constexpr, X8: tl.constexpr, PDL: tl.constexpr, TOPK: tl.constexpr):
    """One token. Program i_e: x = res + v, h = rms_norm(x) * nw (norm.rms_norm_kernel's roundings), logits of
    experts i_e * BE .. + BE from h; the last program to arrive (counter cnt, re-armed by it) runs the top-k
    and stores x (to res: every other program has read res before its releasing arrival), h and h's x8."""
    i_e = tl.program_id(0)
    o_e = i_e * BE + tl.arange(0, BE)
    m_e = o_e < E
    o_d = tl.arange(0, BDN)
    m_d = o_d < D
    xdt = v.dtype.element_ty
    # weights first (no kernel writes them): their DRAM latency overlaps the previous kernel under PDL
    b_w = tl.load(w + o_e.to(tl.int64)[:, None] * stride_w + o_d[None, :], mask=m_e[:, None] & m_d[None, :],
                  other=0.0).to(tl.float32)  # [BE, BDN]
    b_nw = tl.load(nw + o_d, mask=m_d, other=0).to(xdt).to(tl.float32)
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    b_x = (tl.load(v + o_d, mask=m_d, other=0).to(tl.float32)
           + tl.load(res + o_d, mask=m_d, other=0).to(tl.float32)).to(xdt)
    b_h = _rms_scaled(b_x.to(tl.float32), b_nw, D, eps, xdt).to(h.dtype.element_ty)
    b_l = tl.sum(b_w * b_h.to(tl.float32)[None, :], 1)  # [BE]
    tl.store(logits + o_e, b_l, mask=m_e)
    tl.debug_barrier()  # every thread's logits and reads of res before the (releasing) arrival
    c = tl.atomic_add(cnt, 1, sem="acq_rel", scope="gpu")
    if c == tl.num_programs(0) - 1:
        if TOPK:  # else the MoE kernels pick the experts from the logits themselves (moe.moe_decode(route=...))
            _route_row(logits, bias, ids_out, w_out, scale, E, BEF, K, BK, BIASED, RENORM, True)
        tl.store(res + o_d, b_x, mask=m_d)
        tl.store(h + o_d, b_h, mask=m_d)
        if X8:
            _x8_row(h8, D, b_h, BDN)
        tl.atomic_xchg(cnt, 0, sem="relaxed", scope="gpu")


NORM_ROUTE_DEFAULTS = dict(BE=2, num_warps=8)  # 8 warps: 620.8 vs 616.8 tok/s at 4K (H200, session 13 run 5)


def norm_router_route(v, residual, norm_w, eps: float, w, bias, k: int, scale: float, h=None, x8_out=None,
                      biased_weights: bool = False, renormalize: bool = True, BE: int | None = None,
                      num_warps: int | None = None, topk: bool = True):
    """One token: residual += v; h = naive.rms_norm(residual, norm_w, eps) (x8_out, if given: h's int8
    activations, as norm.rms_norm writes them); then router_route(h, w, bias, k, scale): all in one launch.
    v, residual [1, D] or [D] (residual updated in place); w [E, D] fp32; returns (h, ids [1, k] int32,
    weights [1, k] fp32). Graph-capturable after the first call on a device (counter allocation).
    topk=False: no top-k here; returns (h, logits [1, E] fp32, None) for moe.moe_decode(route=...), whose
    programs pick their experts from the logits (the router's last program then only stores x, h, h8)."""
    D = v.shape[-1]
    E = w.shape[0]
    assert v.numel() == D and residual.numel() == D and v.is_contiguous() and residual.is_contiguous()
    assert w.shape[1] == D and w.stride(1) == 1 and bias.is_contiguous() and norm_w.numel() == D
    h = torch.empty_like(v) if h is None else h
    if x8_out is not None:
        assert x8_out.dtype == torch.int32 and x8_out.numel() == x8_words(D) and x8_out.is_contiguous()
    cnt = _counters(v.device)
    logits = torch.empty(1, E, dtype=torch.float32, device=v.device)
    ids = torch.empty(1, k, dtype=torch.int32, device=v.device)
    wts = torch.empty(1, k, dtype=torch.float32, device=v.device)
    over = env_config("KIMI_LOCAL_ROUTE_CFG", 2)  # "BE,warps" (A/B runs)
    BE = BE or (over[0] if over else NORM_ROUTE_DEFAULTS["BE"])
    num_warps = num_warps or (over[1] if over else None)
    BDN = max(16, triton.next_power_of_2(D))
    norm_router_route_kernel[(triton.cdiv(E, BE),)](
        v, residual, norm_w, h, x8_out if x8_out is not None else h, w, logits, cnt, bias, ids, wts,
        eps, float(scale), w.stride(0), D=D, BDN=BDN, E=E, BE=BE, BEF=triton.next_power_of_2(E), K=k,
        BK=triton.next_power_of_2(k), BIASED=biased_weights, RENORM=renormalize, X8=x8_out is not None,
        PDL=pdl.enabled(), TOPK=topk, **pdl.launch_kw(),
        num_warps=1 if _INTERP else (num_warps or NORM_ROUTE_DEFAULTS["num_warps"]))
    return (h, ids, wts) if topk else (h, logits, None)
