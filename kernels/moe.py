"""Routed-expert SwiGLU MoE on quantized expert pools: y = sum_i w_i * down_i(silu(gate_i x) * up_i x) (+ shared).

Pools are uint8 [S, rows, packed_row_bytes] in the packed layout of `quant_matmul.repack` (S slots;
slot = expert id when all experts are resident). gate/up: [F, D] per slot, down: [D, F].

Decode (one token, k experts + shared), two launches, no host sync, no atomics (deterministic):
  1. gate/up: grid (F / BF, k + shared): each program reads BF rows of gate_i and up_i (full D),
     writes act[i, f] = silu(g) * u (fp32 workspace [k + 1, F], 36 KB).
  2. down: grid (D / BD): each program reads BD rows of every selected down_i (full F) and writes
     out[d] = sum_i w_i * down_i[d] . act[i] (+ shared) directly: no zeroing, no atomics.
  Why not one launch: the down projection needs all of act[i] (F=1024 values from 1024/BF programs);
  a single launch must either split F into slices of >= 16 (each program then atomically adds a full
  D=2304-wide partial: (k+1) * F / BF * D fp32 atomics, ~0.3-0.6 M per layer, several us on H100,
  against a ~13 us floor) or keep F whole per program (only k+1 programs: far too few for 132 SMs).
  Two launches cost one extra graph-node gap (~1-2 us) and read act (36 KB) from L2.
Floor per layer (H100, ~3.0 TB/s measured copy), k = 8 routed of [1024 x 2304] x 3 plus shared:
  Q4_K routed (0.578 B/w) 32.7 MB + Q8_0 shared 7.5 MB = 40 MB -> 13.4 us
  Q3_K routed (0.445 B/w) 25.2 MB + Q8_0 shared 7.5 MB = 33 MB -> 10.9 us
A variant with one row tile over all selected experts per program and a pipelined K loop (no split-K, no
arrival counters) was tried and measured 1.6-2.7x slower than these kernels (H100: 79-135 vs 49.7 us
Q4_K/Q4_K/Q6_K, 85-130 vs 47.4 us Q3_K/Q3_K/Q4_K), so it was removed.

Prefill (T tokens): assignments (token, j) are sorted by slot on the device (torch.sort + scatter_add
counts + searchsorted tile table: no host sync); grouped GEMMs over BM-row tiles (16-256) of one expert each, an
expert's last tile of at most BM / 4 rows in a second launch of BM / 4-row tiles (moe_route_tiles' small, from BM = 64),
in-kernel dequant + tl.dot with the weight tile as the first (register) operand, as in quant_matmul._qgemm_kernel:
gate/up fused with SiLU*up -> H [T*k, F] bf16 (sorted order), then down
with the routing weight in the epilogue -> Y [T*k, D] in (token, j) order, summed over j in fp32.
Floor: 2 * T * k * 3 * F * D flops (T=8192: 928 GFLOP -> ~1.2 ms at ~780 TFLOP/s); compute bound
from T ~ 1k on; at T=512 the expert weights (all 256 experts touched: 1.3 GB in Q4_K... per layer
256 * 3 * 2.36 M * 0.578 B = 1.05 GB -> 350 us) dominate.
On Hopper, Q4_K / Q5_K halves run the Gluon kernels of moe_prefill_gluon instead (same tiles, same H and Y; its
module doc): they spend ~2.3 instructions per weight on the dequantization where these spend ~15.
"""
import os

import torch
import triton
import triton.language as tl

from . import moe_gluon, moe_prefill_gluon, pdl
from .pdl import gdc_launch_dependents, gdc_wait
from .router import _max_carry, _scores, _topk, route as _route
from .quant_matmul import (INTERPRET, QT_ID, WORD_QTYPES, X8_GROUP, _dot_wt, _dq_ab, _dq_dot_rows, _dq_q, _i8dot,
                           _prefetch_rows,
                           _res_norm_x8n, _wdot, _x8_put, env_config, packed_row_bytes, qlinear, quantize_x8,
                           split_workspace, word_c, x8_default, x8_words, x8n_words)
from .norm import add_norm_x8n


def _cfgs(opts, names):
    if INTERPRET:  # one config; wide tiles = few interpreted programs
        return [triton.Config(dict(zip(names, (32, 16))), num_warps=4)]
    return [triton.Config(dict(zip(names, o[:-1])), num_warps=o[-1]) for o in opts]


@triton.autotune(configs=_cfgs([(8, 16, 4), (4, 16, 4), (16, 16, 4), (16, 8, 4), (32, 8, 8), (16, 16, 8)],
                               ["BF", "G"]), key=["F", "D", "KTOP", "QTG", "QTU", "QTSG", "QTSU"])
@triton.jit
def _moe_gate_up_kernel(x, slot_ids, gate, up, sgate, sup, act, F, D, mat_g, mat_u,
                        KTOP: tl.constexpr, QTG: tl.constexpr, QTU: tl.constexpr,
                        QTSG: tl.constexpr, QTSU: tl.constexpr, BF: tl.constexpr, G: tl.constexpr):
    i_f, i_e = tl.program_id(0), tl.program_id(1)
    f = i_f * BF + tl.arange(0, BF).to(tl.int64)
    f_mask = f < F
    if i_e < KTOP:
        slot = tl.load(slot_ids + i_e).to(tl.int64)
        b_g = _dq_dot_rows(x, 1, gate + slot * mat_g, f, f_mask, F, D, QTG, BF, G)
        b_u = _dq_dot_rows(x, 1, up + slot * mat_u, f, f_mask, F, D, QTU, BF, G)
    else:
        b_g = _dq_dot_rows(x, 1, sgate, f, f_mask, F, D, QTSG, BF, G)
        b_u = _dq_dot_rows(x, 1, sup, f, f_mask, F, D, QTSU, BF, G)
    h = b_g * tl.sigmoid(b_g) * b_u
    tl.store(act + i_e * F + f, h, mask=f_mask)


@triton.autotune(configs=_cfgs([(8, 16, 4), (4, 16, 4), (16, 16, 4), (16, 8, 4), (32, 8, 8), (16, 16, 8)],
                               ["BD", "G"]), key=["F", "D", "KTOP", "QTD", "QTSD", "HAS_SHARED"])
@triton.jit
def _moe_down_kernel(act, slot_ids, weights, down, sdown, out, F, D, mat_d,
                     KTOP: tl.constexpr, QTD: tl.constexpr, QTSD: tl.constexpr, HAS_SHARED: tl.constexpr,
                     BD: tl.constexpr, G: tl.constexpr):
    i_d = tl.program_id(0)
    d = i_d * BD + tl.arange(0, BD).to(tl.int64)
    d_mask = d < D
    acc = tl.zeros([BD], tl.float32)
    for i in range(KTOP):
        slot = tl.load(slot_ids + i).to(tl.int64)
        wt = tl.load(weights + i).to(tl.float32)
        acc += wt * _dq_dot_rows(act + i * F, 1, down + slot * mat_d, d, d_mask, D, F, QTD, BD, G)
    if HAS_SHARED:
        acc += _dq_dot_rows(act + KTOP * F, 1, sdown, d, d_mask, D, F, QTSD, BD, G)
    tl.store(out + d, acc.to(out.dtype.element_ty), mask=d_mask)


_WS = {}


def _workspace(n, device):
    key = (str(device), n)
    if key not in _WS:
        _WS[key] = torch.empty(n, dtype=torch.float32, device=device)
    return _WS[key]


# ----------------------------------------------------------------------------------------------
# Decode on the word path (quant_matmul._wdot): split-K partials + last-arriver reductions.
#   1. grid (F / BF, E = k + shared, S1): program (f-tile, e, s) dots BF rows of gate_e and up_e with x over
#      the s-th slice of D. S1 == 1: act[e, f] = silu(g) * u directly. S1 > 1: partials to a workspace;
#      the last of the S1 programs of (e, f-tile) (atomic counter, re-armed to 0 by it) sums them in order.
#   2. grid (D / BD, E, S2): program (d-tile, e, s) dots BD rows of down_e with act[e] over the s-th slice
#      of F, times w_e (1 for shared), into partial (e, s); the last of the E * S2 programs of the d-tile
#      sums the partials in a fixed order and writes out (deterministic; no zeroing, no float atomics).
# Why: 8 experts' gate/up are 2 x 1.3 MB each at Q4_K; one program per 16-32 rows over the whole K left
# ~300-600 programs each with a long serial loop (few loads in flight). Splitting K gives every program
# one or two 16-byte loads per thread per row step, issued at once.


@triton.jit
def _eblocks(e0, e1, K, QT: tl.constexpr):
    """The ggml blocks [b0, b1) of elements [e0, e1) of a row of K (e1 clipped to K; Q8_0 blocks of 32, the
    K-quants' of 256)."""
    if QT == 0:
        return e0 // 32, tl.minimum(e1, K) // 32
    return e0 // 256, tl.minimum(e1, K) // 256


@triton.jit
def _wdot_e(x, w, n, N, K, e0, e1, QT: tl.constexpr, BN: tl.constexpr, C: tl.constexpr, EVEN: tl.constexpr,
            X8: tl.constexpr):
    """_wdot (X8: _i8dot, x an x8 buffer) over elements [e0, e1) of K (multiples of the type's block)."""
    b0, b1 = _eblocks(e0, e1, K, QT)
    if X8:
        return _i8dot(x, w, n, N, K, b0, b1, QT, BN, C, EVEN)
    return _wdot(x, 1, w, n, N, K, b0, b1, QT, BN, C, EVEN)


@triton.jit
def _route_id(logits, bias, j, NR: tl.constexpr, BNR: tl.constexpr):
    """Expert id of pick j (runtime) of the router's top-k over logits [NR] fp32: j + 1 arg-max passes, the
    selection order and ties of router._route_row (the gate/up programs need no weight)."""
    o_e, _s, b_sel = _scores(logits, bias, NR, BNR, True)  # (not `_`: the loop below rebinds it to scalars)
    idx = tl.full([], 0, tl.int32)
    for p in range(j + 1):
        _, idx, _ = tl.reduce((b_sel, o_e, b_sel), 0, _max_carry)
        b_sel = tl.where(o_e == idx, float("-inf"), b_sel)
    return idx


@triton.jit
def _route_pick(logits, bias, j, scale, NR: tl.constexpr, BNR: tl.constexpr, K: tl.constexpr, BK: tl.constexpr,
                BIASED: tl.constexpr, RENORM: tl.constexpr):
    """(expert id, routing weight) of pick j (runtime, < K) of the router's top-K over logits [NR] fp32
    (router._topk, in this program: one warp, shuffles only; the logits come from another launch)."""
    ids, wts = _topk(logits, bias, scale, NR, BNR, K, BK, BIASED, RENORM, True)
    o_k = tl.arange(0, BK)
    return tl.sum(tl.where(o_k == j, ids, 0), 0), tl.sum(tl.where(o_k == j, wts, 0.0), 0)


@triton.jit
def _prefetch_e(w, n, N, K, e0, e1, QT: tl.constexpr):
    """L2-prefetch rows n of the packed [N, K] matrix at w over elements [e0, e1) (quant_matmul._prefetch_rows)."""
    b0, b1 = _eblocks(e0, e1, K, QT)
    _prefetch_rows(w, n, N, K, b0, b1, QT)


@triton.jit
def _act_store(act, i_e, i_f, f, f_mask, F, h, BF: tl.constexpr, X8: tl.constexpr):
    """act[e, f] = h ([BF] fp32); X8: act is [E, x8_words(F)] int32 and BF a multiple of 16: each 16-group
    of h is quantized to int8 here, once, for the down kernel's dp4a."""
    if X8:
        G: tl.constexpr = BF // 16
        _x8_put(act + i_e * (F // 4 + F // 8), F, i_f * G, F // 16 - i_f * G, h, G)
    else:
        tl.store(act + i_e * F + f, h, mask=f_mask)


@triton.jit
def _moe_w_gate_up_kernel(x, slot_ids, gate, up, sgate, sup, act, part, cnt, F, D, mat_g, mat_u, EPS, rbias, rscale,
                          KTOP: tl.constexpr, E: tl.constexpr, S1: tl.constexpr, BF: tl.constexpr, GT: tl.constexpr,
                          QTG: tl.constexpr, CG: tl.constexpr, EVG: tl.constexpr,
                          QTU: tl.constexpr, CU: tl.constexpr, EVU: tl.constexpr,
                          QTSG: tl.constexpr, CSG: tl.constexpr, EVSG: tl.constexpr,
                          QTSU: tl.constexpr, CSU: tl.constexpr, EVSU: tl.constexpr, PDL: tl.constexpr,
                          X8: tl.constexpr, PREFETCH: tl.constexpr, ROUTE: tl.constexpr, NR: tl.constexpr,
                          BNR: tl.constexpr, BK: tl.constexpr, BIASED: tl.constexpr, RENORM: tl.constexpr):
    # X8: x is an x8 buffer and act gets x8 rows (see _act_store). ROUTE: slot_ids are the router's logits [NR]
    # (resident experts: slot = expert id) and each program picks its expert itself (_route_pick)
    i_f, i_e, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    f = i_f * BF + tl.arange(0, BF)
    fl = tl.minimum(f, F - 1)
    f_mask = f < F
    e0 = i_s * EPS
    e1 = e0 + EPS
    if PREFETCH:  # the shared expert's rows (constants) into L2 while the router still runs
        if i_e >= KTOP:
            _prefetch_e(sgate, fl, F, D, e0, e1, QTSG)
            _prefetch_e(sup, fl, F, D, e0, e1, QTSU)
    if PDL:  # x and slot_ids come from the previous kernels
        gdc_wait()
        gdc_launch_dependents()
    if i_e < KTOP:
        if ROUTE:
            slot = _route_id(slot_ids, rbias, i_e, NR, BNR).to(tl.int64)
        else:
            slot = tl.load(slot_ids + i_e).to(tl.int64)
        b_g = _wdot_e(x, gate + slot * mat_g, fl, F, D, e0, e1, QTG, BF, CG, EVG, X8)
        b_u = _wdot_e(x, up + slot * mat_u, fl, F, D, e0, e1, QTU, BF, CU, EVU, X8)
    else:
        b_g = _wdot_e(x, sgate, fl, F, D, e0, e1, QTSG, BF, CSG, EVSG, X8)
        b_u = _wdot_e(x, sup, fl, F, D, e0, e1, QTSU, BF, CSU, EVSU, X8)
    # GT rows share an arrival counter (moe_decode: the f-tile, or the 16-row x8 group of smaller f-tiles)
    NA: tl.constexpr = S1 * (GT // BF)  # arrivals per counter
    if NA == 1:
        _act_store(act, i_e, i_f, f, f_mask, F, b_g * tl.sigmoid(b_g) * b_u, BF, X8)
    else:
        pg = part + (i_s * E + i_e) * 2 * F
        tl.store(pg + f, b_g, mask=f_mask)
        tl.store(pg + F + f, b_u, mask=f_mask)
        tl.debug_barrier()
        nt = tl.cdiv(F, GT)
        i_g = (i_f * BF) // GT
        c = tl.atomic_add(cnt + i_e * nt + i_g, 1, sem="acq_rel", scope="gpu")
        if c == NA - 1:
            fg = i_g * GT + tl.arange(0, GT)
            fg_mask = fg < F
            g = tl.zeros([GT], tl.float32)
            u = tl.zeros([GT], tl.float32)
            for s in range(S1):
                ps = part + (s * E + i_e) * 2 * F
                g += tl.load(ps + fg, mask=fg_mask, other=0.0, cache_modifier=".cg")
                u += tl.load(ps + F + fg, mask=fg_mask, other=0.0, cache_modifier=".cg")
            _act_store(act, i_e, i_g, fg, fg_mask, F, g * tl.sigmoid(g) * u, GT, X8)
            tl.atomic_xchg(cnt + i_e * nt + i_g, 0, sem="relaxed", scope="gpu")


@triton.jit
def _moe_w_down_kernel(act, slot_ids, weights, down, sdown, out, part, cnt, F, D, mat_d, FPS, rscale, res, nw, x8n,
                       KTOP: tl.constexpr, E: tl.constexpr, S2: tl.constexpr, BD: tl.constexpr,
                       QTD: tl.constexpr, CD: tl.constexpr, EVD: tl.constexpr,
                       QTSD: tl.constexpr, CSD: tl.constexpr, EVSD: tl.constexpr, PDL: tl.constexpr,
                       X8: tl.constexpr, PREFETCH: tl.constexpr, ROUTE: tl.constexpr, NR: tl.constexpr,
                       BNR: tl.constexpr, BK: tl.constexpr, BIASED: tl.constexpr, RENORM: tl.constexpr,
                       NORM: tl.constexpr):
    # ROUTE: slot_ids / weights are the router's logits [NR] / selection bias, see _moe_w_gate_up_kernel.
    # NORM: the output rows go into the residual res and the next RMSNorm's normed x8 buffer x8n (weight nw)
    # instead of out (quant_matmul._res_norm_x8n; BD a multiple of 16)
    i_d, i_e, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if X8:
        a_e = act + i_e * (F // 4 + F // 8)  # expert e's x8 row of act
    else:
        a_e = act + i_e * F
    d = i_d * BD + tl.arange(0, BD)
    dl = tl.minimum(d, D - 1)
    d_mask = d < D
    e0 = i_s * FPS
    e1 = e0 + FPS
    # The routing (slot_ids / weights, or ROUTE: the logits) is read before gdc_wait(): the router wrote it two
    # launches back, and this grid only starts once every gate/up program has passed its own gdc_wait() (router
    # complete and visible) and then called gdc_launch_dependents(). So the top-k of ROUTE overlaps gate/up.
    slot = tl.full([], 0, tl.int64)
    wt = tl.full([], 1.0, tl.float32)
    if i_e < KTOP:
        if ROUTE:
            pick, wt = _route_pick(slot_ids, weights, i_e, rscale, NR, BNR, KTOP, BK, BIASED, RENORM)
            slot = pick.to(tl.int64)
        else:
            slot = tl.load(slot_ids + i_e).to(tl.int64)
            wt = tl.load(weights + i_e).to(tl.float32)
    if PREFETCH:  # this program's down rows into L2 while the gate/up kernel still runs
        if i_e < KTOP:
            _prefetch_e(down + slot * mat_d, dl, D, F, e0, e1, QTD)
        else:
            _prefetch_e(sdown, dl, D, F, e0, e1, QTSD)
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    if i_e < KTOP:
        y = wt * _wdot_e(a_e, down + slot * mat_d, dl, D, F, e0, e1, QTD, BD, CD, EVD, X8)
    else:
        y = _wdot_e(a_e, sdown, dl, D, F, e0, e1, QTSD, BD, CSD, EVSD, X8)
    NP: tl.constexpr = E * S2
    if NP == 1:
        _down_store(out, d, d_mask, y, res, nw, x8n, D, i_d * BD, BD, NORM)
    else:
        tl.store(part + (i_e * S2 + i_s) * D + d, y, mask=d_mask)
        tl.debug_barrier()
        c = tl.atomic_add(cnt + i_d, 1, sem="acq_rel", scope="gpu")
        if c == NP - 1:
            tot = tl.zeros([BD], tl.float32)
            for p in range(NP):
                tot += tl.load(part + p * D + d, mask=d_mask, other=0.0, cache_modifier=".cg")
            _down_store(out, d, d_mask, tot, res, nw, x8n, D, i_d * BD, BD, NORM)
            tl.atomic_xchg(cnt + i_d, 0, sem="relaxed", scope="gpu")


@triton.jit
def _down_store(out, d, d_mask, y, res, nw, x8n, D, d0, BD: tl.constexpr, NORM: tl.constexpr):
    """The down kernel's finished rows d = d0 + [0, BD) (fp32 y): to out, or with NORM into res and x8n."""
    if NORM:
        _res_norm_x8n(res, nw, x8n, D, d0, y, BD // 16)
    else:
        tl.store(out + d, y.to(out.dtype.element_ty), mask=d_mask)


_DOWN_PARTS = 18  # down programs per d-tile (E * S2) of the routed layout: 8 experts + shared, S2 = 2


def moe_decode_config(qtypes, shared_qtypes, D, F, x8=False, E=9):
    """Default (BF, S1, BD, S2, num_warps) of the word-path decode (see scripts/sweep_gemv.py) for E experts
    (routed + shared) per token."""
    if INTERPRET:  # few, wide programs: the interpreter's cost is per operation
        return 128, 1, 128, 1, 4
    over = env_config("KIMI_LOCAL_MOE_CFG", 5)  # "BF,S1,BD,S2,warps" (A/B runs)
    if over:
        return over
    if E < 9 and os.environ.get("KIMI_LOCAL_DENSE_S2", "1") != "0":
        # few experts (the dense layer 0 runs as one "shared" expert, F = 9216): as many down programs per d-tile
        # as the routed layout has (E * S2 = 18), else each of the few programs walks a long slice of F
        # (H200, session 8 profile: 60.7 us for layer 0's down with E = 1, S2 = 2, against 13.6 us routed)
        bf, s1, bd, s2, w = moe_decode_config(qtypes, shared_qtypes, D, F, x8)
        return bf, s1, bd, max(s2, -(-_DOWN_PARTS // E)), w
    if x8:  # session 4 sweep (H200, --x8): 27.9 vs 32.4 us (16, 9, 16, 4) for Q4_K/Q4_K/Q5_K, 23.3 vs 26.8 Q2_K/Q2_K/Q3_K,
        # 28.9 vs 34.4 Q4_K/Q4_K/Q6_K (+Q8_0 shared); the fp path's default measured 38.7 / 40.9 / 42.8 us
        return 16, 3, 16, 2, 1
    # session 3 sweep (H200, scripts/sweep_gemv.py --only moe): 1 warp per program instead of 2: 38.8 vs 47.0 us
    # Q4_K/Q4_K/Q5_K (the Q4_K_M recipe), 40.8 vs 47.8 us Q2_K/Q2_K/Q3_K (+Q8_0 shared)
    return 16, 9, 16, 4, 1


def moe_prefetch() -> set:
    """KIMI_LOCAL_MOE_PREFETCH (only with PDL): "down" (default) = the down kernel's programs L2-prefetch their
    rows before the PDL wait (they are launched while the gate/up kernel runs); "shared" = the gate/up
    kernel's shared-expert programs do so (during the router); comma-separated; "none" = off. With the decode
    stream (the GPU never waits for the host) "down" measured +2.6 % decode at 4K and +2.1 % at 128K (H200,
    session 9, run 4, interleaved: 552.5 vs 538.5 and 455.4 vs 446.1 tok/s); "down,shared" with the GEMVs'
    prefetch (KIMI_LOCAL_PREFETCH=1) 554.8 / 457.0, within noise of "down". Before the stream (session 8,
    host gaps between steps) "down" was within noise."""
    if not pdl.enabled() or INTERPRET:
        return set()
    return {v.strip() for v in os.environ.get("KIMI_LOCAL_MOE_PREFETCH", "down").split(",")
            if v.strip() and v.strip() != "none"}


def moe_decode(x, slot_ids, weights, gate_pool, up_pool, down_pool, qtypes, out, shared=None,
               shared_qtypes=None, workspace=None, impl="word", BF=None, S1=None, BD=None, S2=None,
               num_warps=None, num_stages=1, C=None, x8=None, route=None, gluon=None, gluon_down=None,
               res_norm=None):
    """One token. x [D] (any float dtype); slot_ids [k] int32 and weights [k] fp32 on the device;
    pools uint8 [S, rows, packed_row_bytes] (packed layout); qtypes (gate, up, down);
    shared: (gate [F, ...], up, down [D, ...]) packed, unweighted, with shared_qtypes.
    Writes out [D]. impl "word" (default): split-K word-path kernels, knobs BF/S1 (rows per program and
    D-splits of gate/up), BD/S2 (rows and F-splits of down), num_warps, num_stages, C (chunks per step);
    "tile": the older tile kernels. Workspaces are cached per device and size (graph-capturable after
    the first call). x8 (word path): int8 activations and dp4a (quant_matmul's x8 section): None =
    x8_default(), True = quantize x here (one more launch), an int32 tensor = x's x8 buffer, False = fp;
    the gate/up kernel then also writes act as int8 for the down kernel.
    route = (bias [E], k, scale, biased_weights, renormalize): slot_ids is then the router's logits [E] fp32
    (router.norm_router_route(topk=False)), weights is ignored, and the experts must be resident (slot =
    expert id): every program picks its expert (and the down programs its weight) from the logits itself, as
    router.route would (the word path; the other paths run router.route first).
    gluon: the gate/up half as kernels/moe_gluon.py's kernel (x8, Q4_K / Q8_0 gate and up, Hopper) where it applies:
    None = unless KIMI_LOCAL_MOE_GLUON=0 or a gate/up knob (BF, S1, C, KIMI_LOCAL_MOE_CFG) is given.
    gluon_down: the down half as moe_gluon's down kernel (x8; Q4_K / Q5_K / Q8_0 down, Hopper) where it applies:
    None = with the Gluon gate/up, unless KIMI_LOCAL_MOE_GLUON_DOWN=0 or a down knob (BD, S2) is given.
    res_norm = (residual [D], norm weight [D], x8n int32 [x8n_words(D)]): the layer's output goes into the residual
    stream (residual += out) and x8n receives the normed x8 buffer of the next RMSNorm (quant_matmul.NormedX8), from
    the down kernel's last arrival per d-tile (word path with x8; elsewhere a norm.add_norm_x8n launch after it);
    out is then not written."""
    if route is not None and (impl == "tile" or not all(q in WORD_QTYPES for q in tuple(qtypes) + tuple(
            shared_qtypes or ()))):
        rb, rk, rs, rbw, rrn = route
        ids, wts = _route(slot_ids.reshape(1, -1), rb, rk, rs, rbw, rrn)
        return moe_decode(x, ids[0], wts[0], gate_pool, up_pool, down_pool, qtypes, out, shared, shared_qtypes,
                          workspace, impl, BF, S1, BD, S2, num_warps, num_stages, C, x8, res_norm=res_norm)
    if res_norm is not None:
        assert res_norm[2].dtype == torch.int32 and res_norm[2].numel() == x8n_words(x.shape[-1])
        assert res_norm[0].is_contiguous() and res_norm[1].is_contiguous() and res_norm[2].is_contiguous()
    if impl == "tile":
        moe_decode_tile(x, slot_ids, weights, gate_pool, up_pool, down_pool, qtypes, out, shared=shared,
                        shared_qtypes=shared_qtypes, workspace=workspace)
        return out if res_norm is None else add_norm_x8n(out, *res_norm)
    D = x.shape[-1]
    F = gate_pool.shape[1]
    K = slot_ids.shape[0] if route is None else route[1]
    qg, qu, qd = qtypes
    assert gate_pool.shape[2] == packed_row_bytes(qg, D) and down_pool.shape[2] == packed_row_bytes(qd, F)
    assert x.is_contiguous() and out.is_contiguous()
    has_shared = shared is not None
    if has_shared:
        sg, su, sd = shared
        qsg, qsu, qsd = shared_qtypes
        assert sg.shape[0] == F, "shared expert width must equal routed width"
    else:
        sg, su, sd = gate_pool, up_pool, down_pool
        qsg, qsu, qsd = qg, qu, qd
    E = K + int(has_shared)
    if x8 is None:
        x8 = x8_default()
    gu_knobs = BF is not None or S1 is not None or C is not None  # a gate/up config asked for: the Triton kernel
    down_knobs = BD is not None or S2 is not None  # likewise for the down half
    dBF, dS1, dBD, dS2, dW = moe_decode_config(qtypes, shared_qtypes, D, F, x8=x8 is not False, E=E)
    BF, S1, BD, S2 = BF or dBF, S1 or dS1, BD or dBD, S2 or dS2
    num_warps = num_warps or dW
    all_word = all(q in WORD_QTYPES for q in (qg, qu, qd, qsg, qsu, qsd))
    for t in (gate_pool, up_pool, down_pool, sg, su, sd):
        assert t.data_ptr() % 16 == 0
    assert gate_pool[0].numel() % 16 == 0 and up_pool[0].numel() % 16 == 0 and down_pool[0].numel() % 16 == 0
    if not all_word:  # the word path has no BF16 reader: use the tile kernels
        moe_decode_tile(x, slot_ids, weights, gate_pool, up_pool, down_pool, qtypes, out, shared=shared,
                        shared_qtypes=shared_qtypes, workspace=workspace)
        return out if res_norm is None else add_norm_x8n(out, *res_norm)
    # K slices in elements, multiples of 256 (a K below 256, Q8_0 only, is one slice)
    S1 = max(1, min(S1, D // 256))
    eps = triton.cdiv(D // 256, S1) * 256 if D >= 256 else D
    S1 = triton.cdiv(D, eps)
    S2 = max(1, min(S2, F // 256))
    fps = triton.cdiv(F // 256, S2) * 256 if F >= 256 else F
    S2 = triton.cdiv(F, fps)
    ntf, ntd = triton.cdiv(F, BF), triton.cdiv(D, BD)

    def ce(q, elems, total):
        c, even = word_c(q, elems, C)
        return c, even and total % elems == 0

    CG, EVG = ce(qg, eps, D)
    CU, EVU = ce(qu, eps, D)
    CSG, EVSG = ce(qsg, eps, D)
    CSU, EVSU = ce(qsu, eps, D)
    CD, EVD = ce(qd, fps, F)
    CSD, EVSD = ce(qsd, fps, F)
    x8_bf = BF % X8_GROUP == 0 or X8_GROUP % BF == 0  # f-tiles of whole 16-groups, or parts of one
    use_x8 = isinstance(x8, torch.Tensor) or (bool(x8) and x8_bf and F % X8_GROUP == 0 and D % X8_GROUP == 0)
    act = workspace if workspace is not None else _workspace(E * F, x.device)
    xin = x
    if use_x8:  # act's fp32 [E, F] workspace holds the [E, x8_words(F)] int32 rows (3/8 of the size)
        assert x8_bf and act.numel() >= E * x8_words(F)
        act = act.view(torch.int32)
        xin = x8 if isinstance(x8, torch.Tensor) else quantize_x8(x)
        assert xin.dtype == torch.int32 and xin.numel() == x8_words(D)
    # rows per arrival counter: the f-tile, or with x8 the 16-row group that f-tiles below 16 rows share
    gt = X8_GROUP if use_x8 and BF < X8_GROUP else BF
    na = S1 * (gt // BF)
    part1, cnt1 = split_workspace(x.device, S1 * E * 2 * F if na > 1 else 0, E * triton.cdiv(F, gt) if na > 1 else 0)
    pre = moe_prefetch()
    rbias, rscale, rkw = weights, 1.0, dict(ROUTE=False, NR=1, BNR=1, BK=1, BIASED=False, RENORM=False)
    if route is not None:  # the kernels pick the experts: slot_ids = the router's logits [NR] fp32
        rbias, _, rscale, biased, renorm = route
        NR = slot_ids.numel()
        assert slot_ids.dtype == torch.float32 and rbias.numel() == NR and rbias.is_contiguous()
        rkw = dict(ROUTE=True, NR=NR, BNR=triton.next_power_of_2(NR), BK=triton.next_power_of_2(max(K, 1)),
                   BIASED=bool(biased), RENORM=bool(renorm))
        rscale = float(rscale)
    if gluon is None:
        gluon = moe_gluon.enabled() and not gu_knobs and not os.environ.get("KIMI_LOCAL_MOE_CFG")
    if gluon and use_x8 and not INTERPRET and moe_gluon.supported(x.device, qg, qu, qsg, qsu, D, F):
        moe_gluon.gate_up(xin, slot_ids, rbias, gate_pool, up_pool, (sg, su) if has_shared else None, act, D, qg,
                          qsg if has_shared else None, K, route is not None, pdl.enabled())
    else:
        _moe_w_gate_up_kernel[(ntf, E, S1)](
            xin, slot_ids, gate_pool, up_pool, sg, su, act, part1, cnt1, F, D, gate_pool[0].numel(), up_pool[0].numel(),
            eps, rbias, rscale, KTOP=K, E=E, S1=S1, BF=BF, GT=gt, QTG=QT_ID[qg], CG=CG, EVG=EVG, QTU=QT_ID[qu],
            CU=CU, EVU=EVU, QTSG=QT_ID[qsg], CSG=CSG, EVSG=EVSG, QTSU=QT_ID[qsu], CSU=CSU, EVSU=EVSU,
            PDL=pdl.enabled(), X8=use_x8, PREFETCH="shared" in pre and has_shared, **rkw, num_warps=num_warps,
            num_stages=num_stages, **pdl.launch_kw())
    if gluon_down is None:
        gluon_down = gluon and moe_gluon.down_enabled() and not down_knobs
    if gluon_down and use_x8 and not INTERPRET \
            and moe_gluon.down_supported(x.device, qd, qsd if has_shared else None, D, F, K):
        part2, cnt2 = split_workspace(x.device, E * D, D // 16)
        moe_gluon.down(act, slot_ids, weights, None, down_pool, sd if has_shared else None, out, part2, cnt2,
                       D, F, qd, qsd if has_shared else None, K, route, pdl.enabled(), res_norm=res_norm)
        return out
    # a dense FFN (no routed expert): the Gluon down kernel in column slices of the down matrix
    fs = moe_gluon.dense_slices(x.device, qsd, D, F) if gluon_down and use_x8 and not INTERPRET and K == 0 \
        and has_shared else 0
    if fs:
        part2, cnt2 = split_workspace(x.device, fs * D, D // 16)
        moe_gluon.down(act, slot_ids, weights, None, down_pool, sd, out, part2, cnt2, D, F, qsd, qsd, 0, None,
                       pdl.enabled(), res_norm=res_norm, fs=fs)
        return out
    NP = E * S2
    part2, cnt2 = split_workspace(x.device, NP * D if NP > 1 else 0, ntd if NP > 1 else 0)
    fuse = res_norm is not None and BD % X8_GROUP == 0
    rn = res_norm if fuse else (out, out, out)
    _moe_w_down_kernel[(ntd, E, S2)](
        act, slot_ids, weights if route is None else rbias, down_pool, sd, out, part2, cnt2, F, D,
        down_pool[0].numel(), fps, rscale, *rn, KTOP=K, E=E, S2=S2, BD=BD, QTD=QT_ID[qd], CD=CD, EVD=EVD,
        QTSD=QT_ID[qsd], CSD=CSD, EVSD=EVSD, PDL=pdl.enabled(), X8=use_x8, PREFETCH="down" in pre, **rkw,
        NORM=fuse, num_warps=num_warps, num_stages=num_stages, **pdl.launch_kw())
    return out if res_norm is None or fuse else add_norm_x8n(out, *res_norm)


def moe_decode_tile(x, slot_ids, weights, gate_pool, up_pool, down_pool, qtypes, out, shared=None,
                    shared_qtypes=None, workspace=None):
    """One token. x [D] (any float dtype); slot_ids [k] int32 and weights [k] fp32 on the device;
    pools uint8 [S, rows, packed_row_bytes] (packed layout); qtypes (gate, up, down);
    shared: (gate [F, ...], up, down [D, ...]) packed, unweighted, with shared_qtypes.
    Writes out [D]. workspace: fp32 >= (k + 1) * F (cached per device if None; graph-capturable
    after the first call, which also runs the autotuner)."""
    D = x.shape[-1]
    F = gate_pool.shape[1]
    K = slot_ids.shape[0]
    qg, qu, qd = qtypes
    assert gate_pool.shape[2] == packed_row_bytes(qg, D) and down_pool.shape[2] == packed_row_bytes(qd, F)
    assert x.is_contiguous() and out.is_contiguous()
    has_shared = shared is not None
    if has_shared:
        sg, su, sd = shared
        qsg, qsu, qsd = shared_qtypes
        assert sg.shape[0] == F, "shared expert width must equal routed width"
    else:
        sg, su, sd = gate_pool, up_pool, down_pool
        qsg, qsu, qsd = qg, qu, qd
    ws = workspace if workspace is not None else _workspace((K + 1) * F, x.device)
    grid1 = lambda meta: (triton.cdiv(F, meta["BF"]), K + int(has_shared))  # noqa: E731
    _moe_gate_up_kernel[grid1](x, slot_ids, gate_pool, up_pool, sg, su, ws, F, D,
                               gate_pool[0].numel(), up_pool[0].numel(), KTOP=K, QTG=QT_ID[qg],
                               QTU=QT_ID[qu], QTSG=QT_ID[qsg], QTSU=QT_ID[qsu])
    grid2 = lambda meta: (triton.cdiv(D, meta["BD"]),)  # noqa: E731
    _moe_down_kernel[grid2](ws, slot_ids, weights, down_pool, sd, out, F, D, down_pool[0].numel(),
                            KTOP=K, QTD=QT_ID[qd], QTSD=QT_ID[qsd], HAS_SHARED=has_shared)
    return out


# ----------------------------------------------------------------------------------------------
# Prefill: grouped GEMMs over slot-sorted assignments


def _gemm_cfgs():
    if INTERPRET:
        return [triton.Config({"BN": 64, "G": 16}, num_warps=4)]
    return [triton.Config({"BN": bn, "G": g}, num_warps=nw, num_stages=ns)
            for bn, g, nw, ns in [(64, 4, 4, 3), (128, 4, 8, 3), (64, 8, 4, 2), (128, 8, 8, 2), (32, 8, 4, 3),
                                  (64, 4, 8, 3)]]


def _acc_prune(n_acc):
    """Autotuner pre-filter: drop configurations whose fp32 accumulators ([BN, BM] x n_acc) would take more than
    128 registers per thread (they spill: BM = 256 with gate and up accumulated together)."""
    def prune(configs, nargs, **kw):
        bm = kw.get("BM", nargs.get("BM"))
        ok = [c for c in configs if n_acc * c.kwargs["BN"] * bm <= 128 * 32 * c.num_warps]
        return ok or configs
    return {"early_config_prune": prune}


@triton.autotune(configs=_gemm_cfgs(), key=["F", "D", "BM", "QTG", "QTU"], prune_configs_by=_acc_prune(2))
@triton.jit
def _moe_gate_up_grouped_kernel(x, stride_xt, tok, tile_slot, tile_row0, tile_row1, gate, up, h, F, D,
                                mat_g, mat_u, S, QTG: tl.constexpr, QTU: tl.constexpr, BM: tl.constexpr,
                                BN: tl.constexpr, G: tl.constexpr, DOT_F32: tl.constexpr):
    i_t, i_n = tl.program_id(0), tl.program_id(1)
    slot = tl.load(tile_slot + i_t).to(tl.int64)
    if slot >= S:
        return
    r = tl.load(tile_row0 + i_t) + tl.arange(0, BM)
    r_mask = r < tl.load(tile_row1 + i_t)
    t = tl.load(tok + r, mask=r_mask, other=0).to(tl.int64)  # token of each sorted row
    n = i_n * BN + tl.arange(0, BN).to(tl.int64)
    n_mask = n < F
    wg, wu = gate + slot * mat_g, up + slot * mat_u
    acc_g = tl.zeros([BN, BM], tl.float32)  # transposed (see quant_matmul._qgemm_kernel)
    acc_u = tl.zeros([BN, BM], tl.float32)
    Ag, Bg = _dq_ab(wg, n, n_mask, tl.arange(0, G), F, D, QTG)
    Au, Bu = _dq_ab(wu, n, n_mask, tl.arange(0, G), F, D, QTU)
    for g0 in range(0, tl.cdiv(D, 16), G):
        gg = g0 + tl.arange(0, G)
        Ag_next, Bg_next = _dq_ab(wg, n, n_mask, gg + G, F, D, QTG)
        Au_next, Bu_next = _dq_ab(wu, n, n_mask, gg + G, F, D, QTU)
        k = g0 * 16 + tl.arange(0, G * 16)
        b_x = tl.load(x + t[:, None] * stride_xt + k[None, :], mask=r_mask[:, None] & (k < D)[None, :],
                      other=0.0)
        acc_g = _dot_wt(_dq_q(wg, n, n_mask, gg, F, D, QTG), Ag, Bg, b_x, acc_g, DOT_F32)
        acc_u = _dot_wt(_dq_q(wu, n, n_mask, gg, F, D, QTU), Au, Bu, b_x, acc_u, DOT_F32)
        Ag, Bg, Au, Bu = Ag_next, Bg_next, Au_next, Bu_next
    b_h = acc_g * tl.sigmoid(acc_g) * acc_u
    tl.store(h + r[None, :].to(tl.int64) * F + n[:, None], b_h.to(h.dtype.element_ty),
             mask=r_mask[None, :] & n_mask[:, None])


@triton.autotune(configs=_gemm_cfgs(), key=["F", "D", "BM", "QTD"], prune_configs_by=_acc_prune(1))
@triton.jit
def _moe_down_grouped_kernel(h, asg, topk_w, tile_slot, tile_row0, tile_row1, down, y, F, D, mat_d, S,
                             QTD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, G: tl.constexpr,
                             DOT_F32: tl.constexpr):
    i_t, i_n = tl.program_id(0), tl.program_id(1)
    slot = tl.load(tile_slot + i_t).to(tl.int64)
    if slot >= S:
        return
    r = (tl.load(tile_row0 + i_t) + tl.arange(0, BM)).to(tl.int64)
    r_mask = r < tl.load(tile_row1 + i_t)
    a = tl.load(asg + r, mask=r_mask, other=0).to(tl.int64)  # assignment index token * k + j
    wt = tl.load(topk_w + a, mask=r_mask, other=0.0).to(tl.float32)
    n = i_n * BN + tl.arange(0, BN).to(tl.int64)
    n_mask = n < D
    wd = down + slot * mat_d
    acc = tl.zeros([BN, BM], tl.float32)  # transposed (see quant_matmul._qgemm_kernel)
    A, B = _dq_ab(wd, n, n_mask, tl.arange(0, G), D, F, QTD)
    for g0 in range(0, tl.cdiv(F, 16), G):
        gg = g0 + tl.arange(0, G)
        A_next, B_next = _dq_ab(wd, n, n_mask, gg + G, D, F, QTD)
        k = g0 * 16 + tl.arange(0, G * 16)
        b_h = tl.load(h + r[:, None] * F + k[None, :], mask=r_mask[:, None] & (k < F)[None, :], other=0.0)
        acc = _dot_wt(_dq_q(wd, n, n_mask, gg, D, F, QTD), A, B, b_h, acc, DOT_F32)
        A, B = A_next, B_next
    acc = acc * wt[None, :]
    tl.store(y + a[None, :] * D + n[:, None], acc.to(y.dtype.element_ty), mask=r_mask[None, :] & n_mask[:, None])


def _cut_tiles(counts, row_end, rows, BM: int, max_tiles: int):
    """BM-row tiles over the first rows[s] of each slot s's sorted rows (rows <= counts), on the device:
    (tile_slot, tile_row0, tile_row1) [max_tiles] int32; tiles past the real count carry slot = S (programs exit)."""
    S = counts.numel()
    tiles = (rows + BM - 1) // BM
    tile_end = torch.cumsum(tiles, 0, dtype=torch.int32)  # [S]
    p = torch.arange(max_tiles, dtype=torch.int32, device=counts.device)
    tile_slot = torch.searchsorted(tile_end, p, right=True).to(torch.int32)  # S past the end
    e = tile_slot.clamp(max=S - 1).long()
    start = row_end[e] - counts[e]
    tile_row0 = start + (p - (tile_end[e] - tiles[e])) * BM
    return tile_slot, tile_row0.to(torch.int32), (start + rows[e]).to(torch.int32)


def moe_route_sort(topk_ids, S):
    """Sort assignments by slot on the device: (asg [A] int32 sorted assignment indices, counts [S] int32 rows a
    slot, row_end [S] int32 their cumulative sum)."""
    flat = topk_ids.reshape(-1)
    srt, asg = torch.sort(flat.to(torch.int32), stable=True)
    counts = torch.zeros(S, dtype=torch.int32, device=flat.device)
    counts.scatter_add_(0, srt.long(), torch.ones_like(srt))
    return asg.to(torch.int32), counts, torch.cumsum(counts, 0, dtype=torch.int32)


def moe_route_tiles(topk_ids, S, BM, small: int = 0, sort=None):
    """Sort assignments by slot and cut them into BM-row tiles of one slot each, on the device.
    Returns (asg [A] sorted assignment indices, tile_slot, tile_row0, tile_row1 [max_tiles] int32);
    tiles past the real count carry slot = S (programs exit).
    small (0 < small <= BM): a slot's last partial tile of at most `small` rows is cut off the BM tiles and returned
    apart, as one tile per slot for a second launch with small-row tiles: (asg, big (tile_slot, row0, row1),
    small (tile_slot [S] = s or S when slot s has none, row0, row1)). Why: every tile dequantizes its expert's
    weights again and its MMA is BM rows wide however few are real, so at T = 8192 (~256 +- 16 rows per expert)
    half the experts paid a second 256-row tile for ~13 rows.
    sort: moe_route_sort(topk_ids, S) if already made (one sort for several tile sizes)."""
    A = topk_ids.numel()
    asg, counts, row_end = sort if sort is not None else moe_route_sort(topk_ids, S)
    max_tiles = triton.cdiv(A, BM) + min(S, A)
    if not small:
        return (asg, *_cut_tiles(counts, row_end, counts, BM, max_tiles))
    assert 0 < small <= BM
    rem = counts % BM
    cut = (rem > 0) & (rem <= small)  # [S] slots whose last tile goes to the small launch
    rows = counts - torch.where(cut, rem, 0)
    s = torch.arange(S, dtype=torch.int32, device=counts.device)
    small_tiles = (torch.where(cut, s, S).to(torch.int32), (row_end - rem).to(torch.int32), row_end)
    return asg, _cut_tiles(counts, row_end, rows, BM, max_tiles), small_tiles


def prefill_tiles(topk_ids, S, BM: int, small: int = 0, sort=None):
    """The tile tables of one half's prefill launches: [(rows per tile, (tile_slot, row0, row1))], the BM tiles, then
    (small > 0) the small ones (moe_route_tiles)."""
    t = moe_route_tiles(topk_ids, S, BM, small, sort)
    return [(BM, t[1:])] if not small else [(BM, t[1]), (small, t[2])]


def prefill_split(BM: int) -> int:
    """Rows of the small tiles that take a slot's last partial tile of at most that many rows (moe_route_tiles'
    small), 0 for none: BM / KIMI_LOCAL_MOE_PREFILL_SPLIT (default 4; 0 = off), if at least 16 (the MMA's N)."""
    div = int(os.environ.get("KIMI_LOCAL_MOE_PREFILL_SPLIT", "4"))
    return BM // div if div and BM // div >= 16 else 0


def prefill_tile_rows(A: int, S: int) -> int:
    """Rows per expert tile of the prefill GEMMs for A assignments over S slots: from the mean rows per slot (every
    tile dequantizes its expert's weights again), 16..256; 256 = the wgmma N limit (T=8192, H200: 5.81 ms vs 6.10
    with 128-row tiles, session 14)."""
    return max(16, min(256, triton.next_power_of_2(max(1, A // S))))


def moe_prefill(x, topk_ids, topk_w, gate_pool, up_pool, down_pool, qtypes, out, shared=None,
                shared_qtypes=None, BM=None, small=None):
    """x [T, D]; topk_ids [T, k] slot ids (int); topk_w [T, k]; pools as in moe_decode. Writes out [T, D].
    BM: rows per expert tile (None: prefill_tile_rows); small: rows of the tiles that take each expert's last
    partial tile when it is that short (None: prefill_split of each half's BM; 0: none), in a second launch."""
    T, D = x.shape
    k = topk_ids.shape[1]
    S, F = gate_pool.shape[0], gate_pool.shape[1]
    qg, qu, qd = qtypes
    A = T * k
    if BM is None:
        BM = 16 if INTERPRET else prefill_tile_rows(A, S)
    # Q4_K / Q5_K halves on Hopper: the Gluon kernels (moe_prefill_gluon; down tiles of at most 128 rows)
    g_gu = (qg == qu and x.dtype == torch.bfloat16 and x.stride(1) == 1 and x.stride(0) % 8 == 0
            and x.data_ptr() % 16 == 0 and moe_prefill_gluon.enabled()  # (16-byte rows for its copies)
            and moe_prefill_gluon.supported(x.device, qg, F, D))
    g_dn = moe_prefill_gluon.enabled() and moe_prefill_gluon.supported(x.device, qd, D, F)
    bm_gu = max(16, BM) if g_gu else BM
    bm_dn = max(16, min(moe_prefill_gluon.DOWN_MAX_BM, BM)) if g_dn else BM
    cuts = {bm: prefill_split(bm) if small is None else min(small, bm) for bm in {bm_gu, bm_dn}}
    srt = moe_route_sort(topk_ids, S)  # one sort, cut into each half's tiles
    tiles = {bm: prefill_tiles(topk_ids, S, bm, cuts[bm], srt) for bm in {bm_gu, bm_dn}}
    asg = srt[0]

    def launches(bm):  # (BM, (tile_slot, row0, row1), ring stages): the small tiles' launch second
        return [(b, t, moe_prefill_gluon.small_ns() if i else 0) for i, (b, t) in enumerate(tiles[bm])]

    tok = asg // k
    h = torch.empty(A, F, dtype=torch.bfloat16, device=x.device)
    y = torch.empty(A, D, dtype=torch.float32, device=x.device)
    w_flat = topk_w.reshape(-1).contiguous()
    for bm, (tile_slot, row0, row1), ns in launches(bm_gu):
        if g_gu:
            moe_prefill_gluon.gate_up(x, tok, tile_slot, row0, row1, gate_pool, up_pool, h, qg, bm, ns)
        else:
            nt = tile_slot.numel()
            _moe_gate_up_grouped_kernel[lambda m: (nt, triton.cdiv(F, m["BN"]))](
                x, x.stride(0), tok, tile_slot, row0, row1, gate_pool, up_pool, h, F, D,
                gate_pool[0].numel(), up_pool[0].numel(), S, QTG=QT_ID[qg], QTU=QT_ID[qu], BM=bm, DOT_F32=INTERPRET)
    for bm, (tile_slot, row0, row1), ns in launches(bm_dn):
        if g_dn:
            moe_prefill_gluon.down(h, asg, w_flat, tile_slot, row0, row1, down_pool, y, qd, bm, ns)
        else:
            nt = tile_slot.numel()
            _moe_down_grouped_kernel[lambda m: (nt, triton.cdiv(D, m["BN"]))](
                h, asg, w_flat, tile_slot, row0, row1, down_pool, y, F, D, down_pool[0].numel(), S,
                QTD=QT_ID[qd], BM=bm, DOT_F32=INTERPRET)
    res = y.view(T, k, D).sum(1)
    if shared is not None:
        sg, su, sd = shared
        qsg, qsu, qsd = shared_qtypes
        g = qlinear(x, sg, qsg, F)
        u = qlinear(x, su, qsu, F)
        res += qlinear(torch.nn.functional.silu(g.float()).mul_(u.float()).to(x.dtype), sd, qsd, D).float()
    out.copy_(res)
    return out
