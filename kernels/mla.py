"""Triton kernels for MLA decode over the shared latent cache (spec 3.5b): flash-decoding split along
the sequence (all heads in one program, so each latent row is read once) plus a combine kernel, and the
cache write (kv_a RMSNorm fused, bf16 or fp8 e4m3 with a per-token scale).

Latent cache row = [c (R, normalised) || k_pe (Dr, raw)]; score = (q_abs.c + q_pe.k_pe) * scale,
ctx = softmax(score) @ c, with q_abs = W_UK^T q_nope and o = W_UV ctx. A decode token takes three launches:
`mla_absorb_write` (q_abs per head and R tile, plus one program for the cache write), the split kernel,
and the combine kernel given v_b (`mla_decode(..., v_b=...)`: o = W_UV ctx from per-tile partials summed
by the last program of each head, and o's int8 activations for the o-projection). Without v_b,
`mla_decode` returns ctx and the caller does the GEMMs (mla_cache_write for prefill and other callers).
seq_len may be a device int32 tensor [1] so one captured CUDA graph replays at growing lengths.
"""
from __future__ import annotations

import os
import warnings

import torch
import triton
import triton.language as tl

from . import mla_gluon, pdl
from .pdl import gdc_launch_dependents, gdc_wait
from .quant_matmul import X8_GROUP, _x8_put, x8_words

_INTERP = os.environ.get("TRITON_INTERPRET", "0") == "1"
_LOG2E = 1.4426950408889634
FP8_MAX = 448.0  # float8_e4m3fn
_WS: dict = {}  # (device, NS, H, R) -> (m [NS, H], l [NS, H], acc [NS, H, R]) fp32
_WS_VO: dict = {}  # (device, H, NR, DV) -> (o partials [H, NR, DV] fp32, arrival counters [H] int32 zeros)


@triton.jit
def _split_range(seq_ptr, seq_int, i_s, LEN_IN_PTR: tl.constexpr, NS: tl.constexpr, BS: tl.constexpr,
                 MIN_CHUNK: tl.constexpr):
    """Rows [s0, s1) of split i_s and the number of non-empty splits, for the current length."""
    if LEN_IN_PTR:
        n = tl.load(seq_ptr).to(tl.int32)
    else:
        n = seq_int
    chunk = tl.maximum(tl.cdiv(tl.cdiv(n, NS), BS) * BS, MIN_CHUNK)
    s0 = i_s * chunk
    return n, chunk, s0, tl.minimum(s0 + chunk, n), tl.cdiv(n, chunk)


@triton.jit
def _lat_tile(lat, lat_scale, s, s1, stride_lat, R: tl.constexpr, DR: tl.constexpr, BS: tl.constexpr,
              BDR: tl.constexpr, FP8: tl.constexpr):
    """Cache rows s .. s+BS-1 as stored: c [BS, R], k_pe [BS, BDR] (columns past DR undefined) and, FP8, the row scales
    [BS] (else a dummy). Rows past s1 re-read row s1 - 1 (their p is 0): no row mask on the wide loads."""
    o_sc = tl.minimum(s + tl.arange(0, BS), s1 - 1).to(tl.int64)
    p_row = lat + o_sc[:, None] * stride_lat
    o_d = tl.arange(0, BDR)
    b_c = tl.load(p_row + tl.arange(0, R)[None, :])
    if BDR == DR:
        b_kp = tl.load(p_row + R + o_d[None, :])
    else:
        b_kp = tl.load(p_row + R + o_d[None, :], mask=o_d[None, :] < DR)  # (the caller zeroes columns >= DR)
    if FP8:
        b_rs = tl.load(lat_scale + o_sc)
    else:
        b_rs = tl.zeros([BS], tl.float32)
    return b_c, b_kp, b_rs


@triton.jit(do_not_specialize=["seq_int"])
def mla_decode_split_kernel(
    q_abs, q_pe, lat, lat_scale,  # [H, R], [H, DR], [S_cap, R+DR], [S_cap] fp32 (FP8 only)
    seq_ptr, seq_int, ws_m, ws_l, ws_acc, qk_scale,  # qk_scale = softmax scale * log2(e)
    stride_lat, stride_qp,
    H: tl.constexpr, R: tl.constexpr, DR: tl.constexpr, BH: tl.constexpr, BDR: tl.constexpr,
    BS: tl.constexpr, NS: tl.constexpr, MIN_CHUNK: tl.constexpr,
    LEN_IN_PTR: tl.constexpr, FP8: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, PDL: tl.constexpr,
):
    """Heads as the MMA's M axis (mma.sync on sm_90: M = 32 heads is below a warpgroup MMA's 64)."""
    i_s = tl.program_id(0)
    if PDL:  # the length, q and the newest cache row come from earlier kernels (see kernels/pdl.py)
        gdc_wait()
        gdc_launch_dependents()
    n, chunk, s0, s1, n_used = _split_range(seq_ptr, seq_int, i_s, LEN_IN_PTR, NS, BS, MIN_CHUNK)
    if s0 < n:
        o_h = tl.arange(0, BH)
        m_h = o_h < H
        o_r = tl.arange(0, R)
        o_d = tl.arange(0, BDR)
        m_d = o_d < DR
        b_qa = tl.load(q_abs + o_h[:, None] * R + o_r[None, :], mask=m_h[:, None], other=0)  # [BH, R]
        b_qp = tl.load(q_pe + o_h[:, None] * stride_qp + o_d[None, :], mask=m_h[:, None] & m_d[None, :], other=0)
        cdt = tl.float32 if UPCAST else (tl.bfloat16 if FP8 else lat.dtype.element_ty)
        b_qa = b_qa.to(cdt)
        b_qp = b_qp.to(cdt)
        b_m = tl.full([BH], float("-inf"), dtype=tl.float32)
        b_l = tl.zeros([BH], dtype=tl.float32)
        b_acc = tl.zeros([BH, R], dtype=tl.float32)
        for s in range(s0, s1, BS):
            o_s = s + tl.arange(0, BS)
            m_s = o_s < s1
            r_c, r_kp, b_rs = _lat_tile(lat, lat_scale, s, s1, stride_lat, R, DR, BS, BDR, FP8)
            b_c = r_c.to(cdt)  # [BS, R]
            b_kp = tl.where(m_d[None, :], r_kp.to(cdt), 0)
            b_sc = (tl.dot(b_qa, tl.trans(b_c), input_precision=PREC)
                    + tl.dot(b_qp, tl.trans(b_kp), input_precision=PREC))  # [BH, BS] fp32
            if FP8:
                b_sc = b_sc * b_rs[None, :]
            b_sc = tl.where(m_s[None, :], b_sc * qk_scale, float("-inf"))
            b_mn = tl.maximum(b_m, tl.max(b_sc, 1))
            b_alpha = tl.exp2(b_m - b_mn)
            b_p = tl.exp2(b_sc - b_mn[:, None])
            b_l = b_l * b_alpha + tl.sum(b_p, 1)
            if FP8:
                b_p = b_p * b_rs[None, :]
            b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(cdt), b_c, input_precision=PREC)
            b_m = b_mn
        tl.store(ws_m + i_s * H + o_h, b_m, mask=m_h)
        tl.store(ws_l + i_s * H + o_h, b_l, mask=m_h)
        tl.store(ws_acc + (i_s * H + o_h)[:, None] * R + o_r[None, :], b_acc, mask=m_h[:, None])


@triton.jit(do_not_specialize=["seq_int"])
def mla_decode_split_t_kernel(
    q_abs, q_pe, lat, lat_scale,  # [H, R], [H, DR], [S_cap, R+DR], [S_cap] fp32 (FP8 only)
    seq_ptr, seq_int, ws_m, ws_l, ws_acc, qk_scale,  # qk_scale = softmax scale * log2(e)
    stride_lat, stride_qp,
    H: tl.constexpr, R: tl.constexpr, DR: tl.constexpr, BH: tl.constexpr, BDR: tl.constexpr,
    BS: tl.constexpr, NS: tl.constexpr, MIN_CHUNK: tl.constexpr,
    LEN_IN_PTR: tl.constexpr, FP8: tl.constexpr, UPCAST: tl.constexpr, CDT: tl.constexpr, PREC: tl.constexpr,
    PDL: tl.constexpr,
):
    """Same contract as mla_decode_split_kernel, with the products transposed ("swap AB"): cache rows are the
    M axis (scores^T [BS, BH] = C q^T; acc^T [R, BH] += C^T p^T), so a 64-row tile fills a Hopper
    warpgroup MMA with 32 heads and no padding, both operands read from the pipelined shared tile.
    Note (sm_90 TTGIR, Triton 3.6): with num_stages=2 the pipeliner issues the next tile's async copies at the
    end of the loop body, after this tile's three products, so load and compute do not overlap; 3 stages of
    a 64-row tile do not fit in shared memory, and num_stages=1 (or the next tile carried in registers)
    miscompiles here (illegal shared-memory reads / wrong results on an H200, session 10)."""
    i_s = tl.program_id(0)
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    n, chunk, s0, s1, n_used = _split_range(seq_ptr, seq_int, i_s, LEN_IN_PTR, NS, BS, MIN_CHUNK)
    if s0 < n:
        o_h = tl.arange(0, BH)
        m_h = o_h < H
        o_r = tl.arange(0, R)
        o_d = tl.arange(0, BDR)
        m_d = o_d < DR
        cdt = tl.float32 if UPCAST else CDT
        b_qa = tl.load(q_abs + o_h[:, None] * R + o_r[None, :], mask=m_h[:, None], other=0).to(cdt)  # [BH, R]
        b_qp = tl.load(q_pe + o_h[:, None] * stride_qp + o_d[None, :], mask=m_h[:, None] & m_d[None, :], other=0).to(cdt)
        b_qaT = tl.trans(b_qa)  # [R, BH]
        b_qpT = tl.trans(b_qp)
        b_m = tl.full([BH], float("-inf"), dtype=tl.float32)
        b_l = tl.zeros([BH], dtype=tl.float32)
        b_acc = tl.zeros([R, BH], dtype=tl.float32)
        for s in range(s0, s1, BS):
            o_s = s + tl.arange(0, BS)
            m_s = o_s < s1
            r_c, r_kp, b_rs = _lat_tile(lat, lat_scale, s, s1, stride_lat, R, DR, BS, BDR, FP8)
            b_c = r_c.to(cdt)  # [BS, R]
            b_kp = r_kp.to(cdt)
            if BDR != DR:
                b_kp = tl.where(m_d[None, :], b_kp, 0)
            b_sc = (tl.dot(b_c, b_qaT, input_precision=PREC)
                    + tl.dot(b_kp, b_qpT, input_precision=PREC))  # [BS, BH] fp32
            if FP8:
                b_sc = b_sc * b_rs[:, None]
            b_sc = tl.where(m_s[:, None], b_sc * qk_scale, float("-inf"))
            b_mn = tl.maximum(b_m, tl.max(b_sc, 0))
            b_alpha = tl.exp2(b_m - b_mn)
            b_p = tl.exp2(b_sc - b_mn[None, :])
            b_l = b_l * b_alpha + tl.sum(b_p, 0)
            if FP8:
                b_p = b_p * b_rs[:, None]
            b_acc = b_acc * b_alpha[None, :] + tl.dot(tl.trans(b_c), b_p.to(cdt), input_precision=PREC)
            b_m = b_mn
        tl.store(ws_m + i_s * H + o_h, b_m, mask=m_h)
        tl.store(ws_l + i_s * H + o_h, b_l, mask=m_h)
        tl.store(ws_acc + (i_s * H + o_h)[None, :] * R + o_r[:, None], b_acc, mask=m_h[None, :])


@triton.jit(do_not_specialize=["seq_int"])
def mla_decode_combine_kernel(
    ws_m, ws_l, ws_acc, seq_ptr, seq_int, out,  # out [H, R]
    H: tl.constexpr, R: tl.constexpr, BR: tl.constexpr, BN: tl.constexpr, BNS: tl.constexpr,
    BS: tl.constexpr, NS: tl.constexpr, MIN_CHUNK: tl.constexpr, LEN_IN_PTR: tl.constexpr, PDL: tl.constexpr,
    ONEPASS: tl.constexpr,
):
    i_h, i_r = tl.program_id(0), tl.program_id(1)
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    n, chunk, s0, s1, n_used = _split_range(seq_ptr, seq_int, 0, LEN_IN_PTR, NS, BS, MIN_CHUNK)
    o_r = i_r * BR + tl.arange(0, BR)
    b_ctx = _combine_tile(ws_m, ws_l, ws_acc, n_used, i_h, o_r, H, R, BR, BN, BNS, ONEPASS)
    tl.store(out + i_h * R + o_r, b_ctx.to(out.dtype.element_ty))


@triton.jit
def _combine_tile(ws_m, ws_l, ws_acc, n_used, i_h, o_r, H: tl.constexpr, R: tl.constexpr, BR: tl.constexpr,
                  BN: tl.constexpr, BNS: tl.constexpr, ONEPASS: tl.constexpr):
    """ctx[i_h, o_r] fp32 [BR]: the n_used splits' partial softmax sums merged (log-sum-exp weights), BN splits a
    step with a running maximum, so a step's loads (m, l and the partials) are issued together: one round trip when
    n_used <= BN (the same sums, in the same order, as a first pass for the maximum would give). Not ONEPASS: that
    first pass (A/B: KIMI_LOCAL_MLA_COMBINE_ONEPASS=0)."""
    if ONEPASS:
        b_o = tl.zeros([BR], dtype=tl.float32)
        b_l = tl.full([], 0.0, tl.float32)
        b_mx = tl.full([], float("-inf"), tl.float32)
        for n0 in range(0, n_used, BN):
            o_b = n0 + tl.arange(0, BN)
            m_b = o_b < n_used
            b_m = tl.load(ws_m + o_b * H + i_h, mask=m_b, other=float("-inf"))
            b_lp = tl.load(ws_l + o_b * H + i_h, mask=m_b, other=0)
            b_acc = tl.load(ws_acc + (o_b * H + i_h)[:, None] * R + o_r[None, :], mask=m_b[:, None], other=0)
            b_new = tl.maximum(b_mx, tl.max(b_m, 0))
            b_alpha = tl.exp2(b_mx - b_new)  # 0 at the first step
            b_w = tl.where(m_b, tl.exp2(b_m - b_new), 0.0)
            b_o = b_o * b_alpha + tl.sum(b_acc * b_w[:, None], 0)
            b_l = b_l * b_alpha + tl.sum(b_lp * b_w, 0)
            b_mx = b_new
        out = b_o / b_l
    else:
        out = _combine_tile_2pass(ws_m, ws_l, ws_acc, n_used, i_h, o_r, H, R, BR, BN, BNS)
    return out


@triton.jit
def _combine_tile_2pass(ws_m, ws_l, ws_acc, n_used, i_h, o_r, H: tl.constexpr, R: tl.constexpr, BR: tl.constexpr,
                        BN: tl.constexpr, BNS: tl.constexpr):
    """_combine_tile with a first pass for the maximum (the session-10 code)."""
    o_n = tl.arange(0, BNS)
    b_mx = tl.max(tl.load(ws_m + o_n * H + i_h, mask=o_n < n_used, other=float("-inf")), 0)
    b_o = tl.zeros([BR], dtype=tl.float32)
    b_l = tl.zeros([BN], dtype=tl.float32)
    for n0 in range(0, n_used, BN):
        o_b = n0 + tl.arange(0, BN)
        m_b = o_b < n_used
        b_w = tl.where(m_b, tl.exp2(tl.load(ws_m + o_b * H + i_h, mask=m_b, other=0) - b_mx), 0.0)
        b_l += tl.load(ws_l + o_b * H + i_h, mask=m_b, other=0) * b_w
        b_acc = tl.load(ws_acc + (o_b * H + i_h)[:, None] * R + o_r[None, :], mask=m_b[:, None], other=0)
        b_o += tl.sum(b_acc * b_w[:, None], 0)
    return b_o / tl.sum(b_l, 0)


@triton.jit
def _o_head_store(o, o8, b_o, i_h, H: tl.constexpr, DV: tl.constexpr, BDV: tl.constexpr, X8: tl.constexpr):
    """Head i_h's o = b_o (fp32 [BDV], zero past DV) rounded to o's dtype; X8: also its DV/16 groups of the
    x8 buffer of the [H*DV] vector, quantized from the values as stored (as quantize_x8 of o does)."""
    o_v = tl.arange(0, BDV)
    b_y = b_o.to(o.dtype.element_ty)
    tl.store(o + i_h * DV + o_v, b_y, mask=o_v < DV)
    if X8:
        _x8_put(o8, H * DV, i_h * (DV // 16), DV // 16, tl.where(o_v < DV, b_y.to(tl.float32), 0.0), BDV // 16)


@triton.jit(do_not_specialize=["seq_int"])
def mla_decode_combine_vo_kernel(
    ws_m, ws_l, ws_acc, seq_ptr, seq_int, ctx, v_b, o, o8, ws_o, ws_cnt,
    # ctx [H, R] (STORE_CTX), v_b [H, DV, R], o [H*DV], o8 int32 [x8_words(H*DV)] (X8),
    # ws_o [H, R // BR, DV] fp32 partials, ws_cnt [H] int32 arrival counters (zero between launches)
    H: tl.constexpr, R: tl.constexpr, DV: tl.constexpr, BDV: tl.constexpr, BR: tl.constexpr, BN: tl.constexpr,
    BNS: tl.constexpr, BS: tl.constexpr, NS: tl.constexpr, MIN_CHUNK: tl.constexpr, LEN_IN_PTR: tl.constexpr,
    CDT: tl.constexpr, STORE_CTX: tl.constexpr, X8: tl.constexpr, PDL: tl.constexpr, ONEPASS: tl.constexpr,
):
    """The combine kernel (program (head, R tile)) followed by o[h] = v_b[h] ctx[h]: the ctx tile, rounded to
    CDT (what the combine kernel stores into a CDT out), times v_b[h][:, tile] gives a partial o_h (fp32);
    the last of the head's R // BR programs to arrive (counter, re-armed to 0 by it) sums the partials in
    tile order (deterministic), rounds to o's dtype, stores o_h and (X8) its x8 groups."""
    i_h, i_r = tl.program_id(0), tl.program_id(1)
    NR: tl.constexpr = R // BR
    o_r = i_r * BR + tl.arange(0, BR)
    o_v = tl.arange(0, BDV)
    m_v = o_v < DV
    b_v = tl.load(v_b + (i_h * DV + o_v)[:, None] * R + o_r[None, :], mask=m_v[:, None], other=0)  # constant
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    n, chunk, s0, s1, n_used = _split_range(seq_ptr, seq_int, 0, LEN_IN_PTR, NS, BS, MIN_CHUNK)
    b_c = _combine_tile(ws_m, ws_l, ws_acc, n_used, i_h, o_r, H, R, BR, BN, BNS, ONEPASS).to(CDT)
    if STORE_CTX:
        tl.store(ctx + i_h * R + o_r, b_c)
    b_p = tl.sum(b_v.to(tl.float32) * b_c.to(tl.float32)[None, :], 1)  # [BDV] fp32, zero past DV
    if NR == 1:
        _o_head_store(o, o8, b_p, i_h, H, DV, BDV, X8)
    else:
        tl.store(ws_o + (i_h * NR + i_r) * DV + o_v, b_p, mask=m_v)
        tl.debug_barrier()  # every thread's partial store is issued before the release below
        c = tl.atomic_add(ws_cnt + i_h, 1, sem="acq_rel", scope="gpu")
        if c == NR - 1:
            b_o = tl.zeros([BDV], dtype=tl.float32)
            for j in range(NR):
                b_o += tl.load(ws_o + (i_h * NR + j) * DV + o_v, mask=m_v, other=0, cache_modifier=".cg")
            _o_head_store(o, o8, b_o, i_h, H, DV, BDV, X8)
            tl.atomic_xchg(ws_cnt + i_h, 0, sem="relaxed", scope="gpu")


def _workspace(device, NS: int, H: int, R: int):
    key = (str(device), NS, H, R)
    if key not in _WS:
        _WS[key] = (torch.empty(NS, H, dtype=torch.float32, device=device),
                    torch.empty(NS, H, dtype=torch.float32, device=device),
                    torch.empty(NS, H, R, dtype=torch.float32, device=device))
    return _WS[key]


def _pdl_kw() -> dict:
    """PDL arguments of the MLA decode launches (cache write / absorb, split, combine): on while the rest of the step
    uses PDL (kernels/pdl.py), unless KIMI_LOCAL_MLA_PDL=0. Since the o-projection after the combine preloads its
    weights before its PDL wait (quant_matmul.preload_default), which needs the combine under PDL, it pays: H200,
    session 23, run 4 (interleaved, tok/s at 4K / 128K / 1M): 708.8 / 600.8 / 297.4 with it, 691.1 / 589.0 / 292.4
    without. Before, it was off by default: H200 (session 8,
    run 1, interleaved graphs, tok/s): 4K 492.1 without vs 492.5 with, 128K 407.4 without vs 382.3 with
    (+6.6 %; PDL everywhere off: 484.9 / 402.9). Likely why: the dependents' programs, launched early, hold
    SM slots while they wait, and at long context the split kernel is the one that needs them. Session 20 (H200,
    the Gluon split kernel now under PDL too): 622.7 vs 621.9 at 4K, 534.6 vs 537.3 at 128K; with the unrolled MoE
    kernels 633.8 vs 632.9, 545.7 vs 545.7: no gain then."""
    on = pdl.enabled() and os.environ.get("KIMI_LOCAL_MLA_PDL", "1") != "0"
    return dict(PDL=on, **(pdl.launch_kw() if on else {}))


def default_splits(device) -> int:
    if _INTERP or not torch.cuda.is_available():
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


DEFAULTS = {  # per cache dtype: variant and launch parameters (scripts/sweep_kda_mla.py measures the choices)
    # run 3 sweep (H200): bf16 "t" 4 warps 77 us at 128K (46 % of HBM), 429 us at 1M (66 %);
    # fp8 "t" with fp16 compute 125 us at 128K, 802 us at 1M (hm: 163 / 1120 us)
    # session 10 (H200, split + combine): Gluon "g" 13.0 / 62.9 / 313.5 us at 4K / 128K / 1M against "t" 15.6 /
    # 77.4 / 433.0 (1M: 90.7 % of the copy bandwidth); fp8 "g" 14.7 / 67.4 / 410.5 against "t" 21.8 / 123.8 / 819.2
    # t_warps: the "t" kernel's warps where "g" does not apply (see mla_decode). bf16 min_chunk 64 (64 splits at 4K,
    # was 128): H200, session 23, run 4 (engine, interleaved, MLA under PDL): 712.4 / 600.7 / 295.7 tok/s at 4K /
    # 128K / 1M against 708.8 / 600.8 / 297.4 (run 3: 711.7 / 601.3 against 709.5 / 601.2); with the norm in the down
    # kernel 717.6 / 606.7 / 294.0 against 713.4 / 605.5 / 292.1. fp8 not measured: 128 kept
    "bf16": dict(variant="g", BS=64, num_warps=4, num_stages=2, min_chunk=64, splits_per_sm=1, t_warps=4),
    "fp8": dict(variant="g", BS=64, num_warps=4, num_stages=2, min_chunk=128, splits_per_sm=1, fp8_compute="fp16",
                t_warps=8),
    "fp32": dict(variant="hm", BS=32, num_warps=8, num_stages=2, min_chunk=128, splits_per_sm=1),
}
_FALLBACK: set = set()  # configs whose launch failed for resources (e.g. shared memory): use "hm" instead
_GLUON_FAILED: dict = {}  # cache kind -> why its Gluon kernel did not build here: "t" instead


def mla_decode(q_abs, q_pe, latent, seq_len, scale: float, out=None, latent_scale=None, num_splits: int | None = None,
               min_chunk: int | None = None, BS: int | None = None, num_warps: int | None = None,
               num_stages: int | None = None, workspace=None, variant: str | None = None, fp8_compute: str | None = None,
               v_b=None, o=None, o8=None, combine_BR: int | None = None):
    """ctx [H, R] = softmax((q_abs c^T + q_pe k_pe^T) * scale) c over latent rows 0..seq_len-1.

    q_abs [H, R], q_pe [H, Dr] (bf16 or fp32; q_pe's rows may be strided: a slice of q, no copy);
    latent [S_cap, R+Dr] bf16/fp32, or float8_e4m3fn with latent_scale [S_cap] fp32 (row = stored * scale);
    seq_len: int, or a device int tensor [1] (>= 1) read by the kernels (graph replay at growing lengths;
    the grid is fixed at num_splits programs and each covers max(min_chunk, ceil(seq_len / num_splits))
    rows). out [H, R] (default fp32; a bf16 out saves the caller a cast).

    variant: "t" (cache rows as the MMA's M axis: warpgroup MMA on Hopper at BS >= 64), "g" ("t" in Gluon with
    the next tile's copies issued before this tile's products, kernels/mla_gluon.py: bf16 or fp8 cache on sm_90
    with seq_len a device tensor, else "t" with DEFAULTS' t_warps; a Gluon build failure warns once and uses "t"
    from then on) or "hm" (heads as M, the first kernel); None/other
    knobs: DEFAULTS for the cache dtype (KIMI_LOCAL_MLA_CFG="variant,BS,warps,stages" replaces them). fp8_compute
    ("t" / "hm"): dtype the fp8 rows are widened to for the products ("bf16" or "fp16"; q and p are cast to it
    too); "g" widens to fp16.

    v_b [H, Dv, R] (W_UV): the combine launch also does o[h] = v_b[h] ctx[h] (ctx rounded to out's dtype if
    out is given, else to v_b's, as a bmm on that ctx sees it; fp32 products, o rounded once) and returns o
    (any contiguous buffer of H*Dv values, default [H*Dv] of v_b's dtype) instead of ctx, which is then
    stored only when out is given. o8: an int32 [x8_words(H*Dv)] buffer (Dv % 16 == 0) that also receives o
    as int8 activations (quant_matmul.quantize_x8 of o as stored), for the o-projection's dp4a GEMV.
    combine_BR: the combine programs' R tile (default 128, 64 with v_b); with v_b, a head's R // combine_BR
    partial products meet through an arrival counter (workspace per device: _vo_workspace)."""
    H, R = q_abs.shape
    kind = {torch.float8_e4m3fn: "fp8", torch.float32: "fp32"}.get(latent.dtype, "bf16")
    d = DEFAULTS[kind]
    if os.environ.get("KIMI_LOCAL_MLA_CFG"):  # A/B runs: "variant,BS,num_warps,num_stages" replaces the default
        v, bs, nw, st = os.environ["KIMI_LOCAL_MLA_CFG"].split(",")
        d = dict(d, variant=v, BS=int(bs), num_warps=int(nw), num_stages=int(st))
    variant = variant or d["variant"]
    BS = d["BS"] if BS is None else BS
    num_warps = d["num_warps"] if num_warps is None else num_warps
    num_stages = d["num_stages"] if num_stages is None else num_stages
    if min_chunk is None:  # KIMI_LOCAL_MLA_MIN_CHUNK: rows per split at least (A/B runs)
        min_chunk = int(os.environ.get("KIMI_LOCAL_MLA_MIN_CHUNK", 0)) or d["min_chunk"]
    fp8_compute = fp8_compute or d.get("fp8_compute", "bf16")
    if num_splits is None and not _INTERP and torch.cuda.is_available():
        num_splits = d["splits_per_sm"] * default_splits(q_abs.device)
    key = (variant, kind, BS, num_warps, num_stages, fp8_compute)
    if key in _FALLBACK:
        variant, BS, num_warps, num_stages = "hm", 32, 8, 2
    DR = q_pe.shape[1]
    assert latent.shape[1] == R + DR and latent.stride(1) == 1 and R == triton.next_power_of_2(R)
    assert q_abs.is_contiguous() and q_pe.stride(1) == 1
    fp8 = latent.dtype == torch.float8_e4m3fn
    assert not fp8 or latent_scale is not None
    if out is None and v_b is None:
        out = torch.empty(H, R, dtype=torch.float32, device=q_abs.device)
    NS = num_splits or default_splits(q_abs.device)
    if _INTERP:
        num_warps, num_stages = 1, 1
    BS = max(16, BS)
    min_chunk = triton.cdiv(max(min_chunk, BS), BS) * BS
    ws_m, ws_l, ws_acc = workspace if workspace is not None else _workspace(q_abs.device, NS, H, R)
    in_ptr = isinstance(seq_len, torch.Tensor)
    seq_ptr, seq_int = (seq_len, 0) if in_ptr else (ws_m, int(seq_len))
    common = dict(BS=BS, NS=NS, MIN_CHUNK=min_chunk, LEN_IN_PTR=in_ptr)
    args = (q_abs, q_pe, latent, latent_scale if fp8 else ws_m, seq_ptr, seq_int, ws_m, ws_l, ws_acc,
            scale * _LOG2E, latent.stride(0), q_pe.stride(0))
    kw = dict(H=H, R=R, DR=DR, BH=max(16, triton.next_power_of_2(H)), BDR=max(16, triton.next_power_of_2(DR)),
              FP8=fp8, UPCAST=_INTERP, PREC="ieee" if latent.dtype == torch.float32 else "tf32",  # fp32 cache: exact
              num_warps=num_warps, num_stages=num_stages, **_pdl_kw(), **common)
    gluon_ok = in_ptr and BS == 64 and mla_gluon.supported(latent, H, R, DR)
    if variant == "g" and (kind in _GLUON_FAILED or not gluon_ok):
        variant = "t"  # the Gluon kernels: bf16 / fp8 cache on sm_90, length on the device (else "t")
        num_warps = d.get("t_warps", num_warps)
    if variant == "g":
        try:
            mla_gluon.mla_split_gluon(q_abs, q_pe, latent, seq_ptr, (ws_m, ws_l, ws_acc), scale * _LOG2E, NS, BS,
                                      min_chunk, latent_scale=latent_scale if fp8 else None, pdl_kw=_pdl_kw())
        except Exception as e:  # Gluon is experimental: a Triton whose Gluon this kernel does not compile with
            _GLUON_FAILED[kind] = f"{type(e).__name__}: {e}"
            warnings.warn(f"MLA decode: the Gluon kernel failed to build ({_GLUON_FAILED[kind][:200]}); "
                          "using the Triton kernel from now on", RuntimeWarning, stacklevel=2)
            return mla_decode(q_abs, q_pe, latent, seq_len, scale, out, latent_scale, num_splits, min_chunk, BS,
                              num_warps, num_stages, workspace, variant, fp8_compute, v_b, o, o8, combine_BR)
    elif variant == "t":
        cdt = tl.float32 if latent.dtype == torch.float32 else (
            tl.float16 if (fp8 and fp8_compute == "fp16") else tl.bfloat16)
        try:
            mla_decode_split_t_kernel[(NS,)](*args, CDT=cdt, **kw)
        except triton.runtime.errors.OutOfResources:  # e.g. the tile stages exceed this GPU's shared memory
            _FALLBACK.add(key)
            return mla_decode(q_abs, q_pe, latent, seq_len, scale, out, latent_scale, num_splits, min_chunk,
                              BS=32, num_warps=8, num_stages=2, workspace=workspace, variant="hm",
                              v_b=v_b, o=o, o8=o8, combine_BR=combine_BR)
    elif variant == "hm":
        mla_decode_split_kernel[(NS,)](*args, **kw)
    else:
        raise ValueError(f"unknown MLA decode variant {variant!r}")
    if v_b is not None:
        return _combine_vo(ws_m, ws_l, ws_acc, seq_ptr, seq_int, out, v_b, o, o8, combine_BR, NS, common)
    BR = min(R, combine_BR or 128)
    mla_decode_combine_kernel[(H, R // BR)](
        ws_m, ws_l, ws_acc, seq_ptr, seq_int, out, H=H, R=R, BR=BR, BN=_combine_bn(NS), BNS=triton.next_power_of_2(NS),
        num_warps=1 if _INTERP else 4, ONEPASS=_onepass(), **_pdl_kw(), **common,
    )
    return out


def _vo_workspace(device, H: int, NR: int, DV: int):
    """(o partials [H, NR, DV] fp32, arrival counters [H] int32) of the combine + v_b launch, per device and
    shape (shared by the layers: their launches are in sequence). The counters are zero between launches."""
    key = (str(device), H, NR, DV)
    if key not in _WS_VO:
        _WS_VO[key] = (torch.empty(H * NR * DV, dtype=torch.float32, device=device),
                       torch.zeros(H, dtype=torch.int32, device=device))
    return _WS_VO[key]


def _onepass() -> bool:
    """KIMI_LOCAL_MLA_COMBINE_ONEPASS (default 1): the combine's running-maximum merge (_combine_tile); 0: a first
    pass for the maximum. H200, session 21 (sweep_kda_mla, bf16 cache): the combine alone 7.78 -> 7.68 us at 4K (32
    splits), 9.86 -> 9.38 us at 128K (128 splits); engine 631.3 -> 632.3 tok/s at 4K, 544.6 -> 545.2 at 128K."""
    return os.environ.get("KIMI_LOCAL_MLA_COMBINE_ONEPASS", "1") != "0"


def _combine_bn(NS: int) -> int:
    """Splits a combine program merges per loop step (its loads of one step are issued together): all of them up
    to 128 (one round trip at 128K and 4K, two at 1M); KIMI_LOCAL_MLA_COMBINE_BN overrides (A/B runs; 16 was the
    session-9 value: 8 dependent steps at 128K)."""
    return int(os.environ.get("KIMI_LOCAL_MLA_COMBINE_BN", 0)) or min(128, triton.next_power_of_2(NS))


def _combine_vo(ws_m, ws_l, ws_acc, seq_ptr, seq_int, ctx, v_b, o, o8, BR, NS, common):
    """The combine launch with o = v_b ctx (and o's x8 groups): see mla_decode."""
    H, DV, R = v_b.shape
    assert v_b.is_contiguous() and tuple(ws_acc.shape[-2:]) == (H, R)
    BR = min(R, BR or 64)
    assert R % BR == 0 and BR == triton.next_power_of_2(BR)
    if o is None:
        o = torch.empty(H * DV, dtype=v_b.dtype, device=v_b.device)
    assert o.numel() == H * DV and o.is_contiguous()
    if ctx is not None:
        assert ctx.shape == (H, R) and ctx.is_contiguous()
    if o8 is not None:
        assert DV % X8_GROUP == 0 and o8.dtype == torch.int32 and o8.is_contiguous() and o8.numel() == x8_words(H * DV)
    ws_o, ws_cnt = _vo_workspace(v_b.device, H, R // BR, DV)
    cdt = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}[
        (v_b if ctx is None else ctx).dtype]
    mla_decode_combine_vo_kernel[(H, R // BR)](
        ws_m, ws_l, ws_acc, seq_ptr, seq_int, ws_m if ctx is None else ctx, v_b, o, ws_cnt if o8 is None else o8,
        ws_o, ws_cnt, H=H, R=R, DV=DV, BDV=max(16, triton.next_power_of_2(DV)), BR=BR, BN=_combine_bn(NS),
        BNS=triton.next_power_of_2(NS), CDT=cdt, STORE_CTX=ctx is not None, X8=o8 is not None,
        num_warps=1 if _INTERP else 4, ONEPASS=_onepass(), **_pdl_kw(), **common,
    )
    return o


@triton.jit
def _fp8_grid(x, ROUND: tl.constexpr):
    """Round to the e4m3 grid in fp32 first when ROUND (the interpreter's fp32->fp8 cast mis-rounds
    across binades: 124.8 -> 64); the cast is then exact."""
    if ROUND:
        ulp = tl.exp2(tl.floor(tl.log2(tl.maximum(tl.abs(x), 0.015625))) - 3)
        x = tl.floor(x / ulp + 0.5) * ulp
    return x


@triton.jit(do_not_specialize=["pos_int"])
def mla_cache_write_kernel(
    kv, norm_w, lat, lat_scale, pos_ptr, pos_int, eps,  # kv [T, R+DR] rows strided; lat [S_cap, R+DR]
    stride_kv, stride_lat,
    R: tl.constexpr, DR: tl.constexpr, BDR: tl.constexpr, POS_IN_PTR: tl.constexpr, FP8: tl.constexpr,
    FMAX: tl.constexpr, ROUND: tl.constexpr, PDL: tl.constexpr,
):
    i_t = tl.program_id(0)
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    _cache_write_row(kv + i_t * stride_kv, norm_w, lat, lat_scale, pos_ptr, pos_int, i_t, eps, stride_lat,
                     R, DR, BDR, POS_IN_PTR, FP8, FMAX, ROUND)


@triton.jit
def _cache_write_row(kv_row, norm_w, lat, lat_scale, pos_ptr, pos_int, i_t, eps, stride_lat,
                     R: tl.constexpr, DR: tl.constexpr, BDR: tl.constexpr, POS_IN_PTR: tl.constexpr,
                     FP8: tl.constexpr, FMAX: tl.constexpr, ROUND: tl.constexpr):
    """Latent row pos + i_t = [rms_norm(kv_row[:R]; norm_w) || kv_row[R:R+DR]] (fp8: scaled, scale stored)."""
    if POS_IN_PTR:
        p = tl.load(pos_ptr).to(tl.int64) + i_t
    else:
        p = (pos_int + i_t).to(tl.int64)
    xdt = kv_row.dtype.element_ty
    o_r = tl.arange(0, R)
    o_d = tl.arange(0, BDR)
    m_d = o_d < DR
    b_x = tl.load(kv_row + o_r).to(tl.float32)
    # naive.rms_norm: normalise in fp32, cast to the input dtype, multiply by the weight in that dtype
    b_n = (b_x * tl.rsqrt(tl.sum(b_x * b_x, 0) / R + eps)).to(xdt).to(tl.float32)
    b_c = (b_n * tl.load(norm_w + o_r).to(xdt).to(tl.float32)).to(xdt).to(tl.float32)
    b_kp = tl.load(kv_row + R + o_d, mask=m_d, other=0).to(tl.float32)
    p_row = lat + p * stride_lat
    if FP8:
        b_amax = tl.maximum(tl.max(tl.abs(b_c), 0), tl.max(tl.abs(b_kp), 0))
        b_s = tl.maximum(b_amax, 1e-30) / FMAX
        tl.store(lat_scale + p, b_s)
        b_c = _fp8_grid(b_c / b_s, ROUND)
        b_kp = _fp8_grid(b_kp / b_s, ROUND)
    tl.store(p_row + o_r, b_c.to(lat.dtype.element_ty))
    tl.store(p_row + R + o_d, b_kp.to(lat.dtype.element_ty), mask=m_d)


def mla_cache_write(kv, norm_w, eps: float, latent, pos, latent_scale=None):
    """Append T tokens to the latent cache: rows pos..pos+T-1 = [rms_norm(kv[:, :R]; norm_w) || kv[:, R:]].
    kv [T, R+Dr] (kv_a_proj_with_mqa output; rows may be strided), norm_w [R], latent [S_cap, R+Dr]
    (bf16/fp32, or float8_e4m3fn with latent_scale [S_cap] fp32: per-row amax / 448). pos: int or a
    device int tensor [1] (graph-capturable)."""
    if kv.dim() == 1:
        kv = kv[None]
    T = kv.shape[0]
    R = norm_w.shape[0]
    DR = kv.shape[1] - R
    assert kv.stride(1) == 1 and latent.stride(1) == 1 and latent.shape[1] == R + DR
    fp8 = latent.dtype == torch.float8_e4m3fn
    assert not fp8 or latent_scale is not None
    in_ptr = isinstance(pos, torch.Tensor)
    mla_cache_write_kernel[(T,)](
        kv, norm_w, latent, latent_scale if fp8 else norm_w, pos if in_ptr else norm_w, 0 if in_ptr else int(pos), eps,
        kv.stride(0), latent.stride(0),
        R=R, DR=DR, BDR=triton.next_power_of_2(DR), POS_IN_PTR=in_ptr, FP8=fp8, FMAX=FP8_MAX, ROUND=_INTERP,
        num_warps=1 if _INTERP else 4, **_pdl_kw(),
    )
    return latent


@triton.jit(do_not_specialize=["pos_int"])
def mla_absorb_write_kernel(
    q, k_b, q_abs,  # q [H, >= DN] rows strided (q_nope = q[h, :DN]), k_b [H, R, DN], q_abs [H, R]
    kv, norm_w, lat, lat_scale, pos_ptr, pos_int, eps,  # kv [R+DR]; lat [S_cap, R+DR] (see mla_cache_write)
    stride_q, stride_lat,
    H: tl.constexpr, R: tl.constexpr, DN: tl.constexpr, BDN: tl.constexpr, BR: tl.constexpr,
    DR: tl.constexpr, BDR: tl.constexpr, POS_IN_PTR: tl.constexpr, FP8: tl.constexpr, FMAX: tl.constexpr,
    ROUND: tl.constexpr, PDL: tl.constexpr,
):
    """Programs 0 .. H * R/BR - 1: q_abs[h, tile] = k_b[h, tile, :] q_nope[h] (fp32 products and sum, rounded
    to q_abs's dtype); the last program: the cache write of the token (mla_cache_write_kernel's body)."""
    pid = tl.program_id(0)
    NR: tl.constexpr = R // BR
    if pid < H * NR:
        i_h = pid // NR
        o_r = (pid % NR) * BR + tl.arange(0, BR)
        o_d = tl.arange(0, BDN)
        m_d = o_d < DN
        b_k = tl.load(k_b + (i_h * R + o_r)[:, None] * DN + o_d[None, :], mask=m_d[None, :], other=0)  # constant
        if PDL:
            gdc_wait()
            gdc_launch_dependents()
        b_q = tl.load(q + i_h * stride_q + o_d, mask=m_d, other=0).to(tl.float32)
        b_o = tl.sum(b_k.to(tl.float32) * b_q[None, :], 1)
        tl.store(q_abs + i_h * R + o_r, b_o.to(q_abs.dtype.element_ty))
    else:
        if PDL:
            gdc_wait()
            gdc_launch_dependents()
        _cache_write_row(kv, norm_w, lat, lat_scale, pos_ptr, pos_int, 0, eps, stride_lat,
                         R, DR, BDR, POS_IN_PTR, FP8, FMAX, ROUND)


def mla_absorb_write(q, k_b, kv, norm_w, eps: float, latent, pos, latent_scale=None, out=None,
                     BR: int | None = None, num_warps: int | None = None):
    """One decode token's MLA inputs in one launch: q_abs [H, R] = W_UK^T q_nope, i.e. torch.bmm(k_b, q_nope)
    (fp32 products and sum, rounded once to out's dtype, default k_b's), and the token's cache write
    (mla_cache_write of kv at pos). q [H, Dq >= Dn] (or [1, H, Dq]; q_nope = q[:, :Dn], rows may be strided:
    a slice of the q projection, no copy); k_b [H, R, Dn]; kv [R + Dr] (or [1, R + Dr]); norm_w, eps, latent,
    pos, latent_scale: as mla_cache_write. BR: the R tile of an absorb program (H * R / BR programs, plus one
    for the cache write). Graph-capturable; k_b is read before the PDL wait (a constant)."""
    if q.dim() == 3:
        q = q[0]
    if kv.dim() == 2:
        assert kv.shape[0] == 1
        kv = kv[0]
    H, R, DN = k_b.shape
    DR = kv.shape[0] - R
    assert k_b.is_contiguous() and q.shape[0] == H and q.shape[1] >= DN and q.stride(1) == 1 and kv.stride(0) == 1
    assert norm_w.shape[0] == R and latent.stride(1) == 1 and latent.shape[1] == R + DR and R == triton.next_power_of_2(R)
    fp8 = latent.dtype == torch.float8_e4m3fn
    assert not fp8 or latent_scale is not None
    if out is None:
        out = torch.empty(H, R, dtype=k_b.dtype, device=k_b.device)
    assert out.shape == (H, R) and out.is_contiguous()
    BR = min(R, BR or 64)
    assert R % BR == 0 and BR == triton.next_power_of_2(BR)
    in_ptr = isinstance(pos, torch.Tensor)
    mla_absorb_write_kernel[(H * (R // BR) + 1,)](
        q, k_b, out, kv, norm_w, latent, latent_scale if fp8 else norm_w, pos if in_ptr else norm_w,
        0 if in_ptr else int(pos), eps, q.stride(0), latent.stride(0),
        H=H, R=R, DN=DN, BDN=triton.next_power_of_2(DN), BR=BR, DR=DR, BDR=triton.next_power_of_2(DR),
        POS_IN_PTR=in_ptr, FP8=fp8, FMAX=FP8_MAX, ROUND=_INTERP,
        num_warps=1 if _INTERP else (num_warps or 4), **_pdl_kw(),
    )
    return out
