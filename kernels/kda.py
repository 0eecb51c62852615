"""Triton kernels for Kimi Delta Attention (spec 3.3): the fused decode step, the causal short conv for
prefill, and the chunked prefill through fla-core's chunk_kda (pure-torch fallback without fla).

Layouts (kimi_local/cache.py): state [H, K, V] fp32 K-major, decay on the key axis; conv tails [P, W-1]
per projection (last W-1 raw inputs, oldest first); channel c = h * d + j (head-major).

Decode step: one kernel, the third design tried (kda_decode_step_kernel's docstring says how it differs).
scripts/sweep_kda_mla.py on an H100 (Kimi-Linear shapes H=32, K=V=128, W=4; time per layer, CUDA graph
over 64 layers' states): this kernel at BV=16 / 1 warp 5.36 us, the second design (tap-wise conv, four chained
reductions, tails re-read after the arrival) at its best configuration 6.68 us, the first ([C, W] conv
window tiles, masked state) 8.28 us, fla-core's fused_recurrent_kda 5.54 us, in the same run; with
pdl=True, chained layers 3.83 us. The two older kernels were removed. Those timings take f and z as
inputs; the engine now passes fg_a = [f_a(h) | g_a(h)] with the bf16 f_b / g_b instead, and the step
computes f = f_b f_a and z = g_b g_a itself (one launch fewer per layer; item 4 of the kernel's docstring).
Offline sm_90 compile (Triton 3.9, bf16, x8 and PDL on), SASS instructions per thread unfused -> fused:
BV=16 / 1 warp 1440 -> 3880 (255 registers, 3 spilled; the K x 128 MACs of f_h run in every program of the
head), BV=16 / 4 warps 712 -> 1736, BV=128 / 8 warps 2776 -> 2520. Timed in the whole decode step (H200,
session 8): FUSED_DEFAULTS below. The step's critical-path time per layer went 3.95 -> 5.5 us, and the
removed f / z GEMV had taken 4.45 us.
On sm_90 a head's V blocks run as one thread-block cluster that exchanges through distributed shared memory (kernel
item 5; sessions 25-26, H200, PDL, graph over 64 layers, one run): the unfused step 2.91 us against 3.73 with the
arrival counter (fla 5.14); the engine's step 4.48 against 5.68 us, followed by its o-projection 8.76 against
9.96 us; decode +1.7 % at 4K.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import naive

_INTERP = os.environ.get("TRITON_INTERPRET", "0") == "1"
_WS: dict = {}  # (device, H, V) -> (o [H*V] fp32, arrival counters [H] int32), shared by all layers


from . import carveout as _carveout
from . import pdl as _pdl
from .pdl import gdc_launch_dependents, gdc_wait
from .quant_matmul import X8_GROUP, _x8_put, env_config, x8_words


@triton.jit
def _load_taps(t_ptr, w_ptr, ch, m, W: tl.constexpr):
    """The tail side of one token's depthwise conv for channels ch, as 1D vectors in the layout their
    consumer uses (no [C, W] tile to convert): old tail columns (t0, t1, t2) in the tail's dtype and fp32
    weights (w0, w1, w2) for them, then wx = w[:, W-1] for the new input. Columns past W-2 repeat t0 / w0
    (never used: the users branch on W). 2 <= W <= 4 (Kimi-Linear: 4)."""
    p_t = t_ptr + ch * (W - 1)
    p_w = w_ptr + ch * W
    b_t0 = tl.load(p_t, mask=m, other=0)
    b_w0 = tl.load(p_w, mask=m, other=0).to(tl.float32)
    b_t1, b_w1, b_t2, b_w2 = b_t0, b_w0, b_t0, b_w0
    if W > 2:
        b_t1 = tl.load(p_t + 1, mask=m, other=0)
        b_w1 = tl.load(p_w + 1, mask=m, other=0).to(tl.float32)
    if W > 3:
        b_t2 = tl.load(p_t + 2, mask=m, other=0)
        b_w2 = tl.load(p_w + 2, mask=m, other=0).to(tl.float32)
    b_wx = tl.load(p_w + (W - 1), mask=m, other=0).to(tl.float32)
    return b_t0, b_t1, b_t2, b_w0, b_w1, b_w2, b_wx


@triton.jit
def _conv_silu(b_x, b_t0, b_t1, b_t2, b_w0, b_w1, b_w2, b_wx, W: tl.constexpr):
    """SiLU(conv) [C] fp32 from _load_taps' registers and the new raw input b_x."""
    b_y = b_x.to(tl.float32) * b_wx + b_t0.to(tl.float32) * b_w0
    if W > 2:
        b_y += b_t1.to(tl.float32) * b_w1
    if W > 3:
        b_y += b_t2.to(tl.float32) * b_w2
    return b_y * tl.sigmoid(b_y)


@triton.jit
def _store_taps(t_ptr, b_x, b_t1, b_t2, ch, m, W: tl.constexpr):
    """tail <- [old tail[1:], x] from registers (no second read of the old tail). Call only after every
    reader of the old tail is done (a barrier in this program; the arrival counter across programs)."""
    p_t = t_ptr + ch * (W - 1)
    if W == 2:
        tl.store(p_t, b_x.to(t_ptr.dtype.element_ty), mask=m)
    if W == 3:
        tl.store(p_t, b_t1, mask=m)
        tl.store(p_t + 1, b_x.to(t_ptr.dtype.element_ty), mask=m)
    if W == 4:
        tl.store(p_t, b_t1, mask=m)
        tl.store(p_t + 1, b_t2, mask=m)
        tl.store(p_t + 2, b_x.to(t_ptr.dtype.element_ty), mask=m)


@triton.jit
def _add2(a0, b0, a1, b1):
    return a0 + a1, b0 + b1


@triton.jit
def _add3(a0, b0, c0, a1, b1, c1):
    return a0 + a1, b0 + b1, c0 + c1


@triton.jit
def _head_x8(out8, y, i_h, H: tl.constexpr, V: tl.constexpr, BVF: tl.constexpr):
    """Head i_h's output y ([BVF], zero past V; V % 16 == 0) into the x8 buffer of the [H*V] output: its V/16
    groups quantized as quantize_x8 does, from the values as stored (out's dtype)."""
    _x8_put(out8, H * V, i_h * (V // 16), V // 16, y, BVF // 16)


# ---- thread-block cluster primitives (sm_90, inline PTX; kernel item 5) ----
# At the kernel's start every thread arrives (relaxed) on the cluster barrier (_cluster_bar); before its first remote
# store it waits for that phase: every CTA of the cluster has started and initialised its mbarriers (_nbar_init), so
# its shared memory exists. NBAR (the default): each exchange then goes by st.async into the peers' fx arrays, each
# store completing bytes of the receiver's mbarrier, and each CTA waits on its own mbarriers. NBAR off: puts ->
# arrive.release -> independent work -> wait.acquire -> reads of the own fx array (the release waits for no global
# store issued after it, and the work between the halves hides the barrier). No remote access follows a CTA's last
# wait, so it may exit right after it. The asm is predicated; its only loops (the mbarrier waits) sit inside { }
# scopes, whose labels stay local where a statement is inlined twice. Every thread runs each of them (.aligned).
_CLUSTER_MOST = 8  # the portable cluster size limit
_FX_N = 256  # K at most: fx[0, K) holds the f exchange, fx[256 + rank] the norm's partial sums (_fx_alloc)
_FX_MOST = tl.constexpr(_FX_N)
# PTX: s (holding slot 0) plus slots 1 .. nr - 1 of the fp32 array at shared address t, in rank order (so every CTA
# of the cluster gets the same bits); registers nr, t, q, s, a are the including statement's
_RANK_SUM = "\n".join(f"setp.gt.u32 q, nr, {j};\n@q ld.shared.f32 a, [t+{4 * j}];\n@q add.f32 s, s, a;"
                      for j in range(1, _CLUSTER_MOST))
_FX_PUT = tl.constexpr("""{
.reg .b32 nr, t, ra;
.reg .pred q;
mov.u32 nr, %cluster_nctarank;
mad.lo.u32 t, $2, 4, $1;
""" + "\n".join(f"setp.gt.u32 q, nr, {j};\n@q mapa.shared::cluster.u32 ra, t, {j};\n@q st.shared::cluster.f32 [ra], $3;"
                for j in range(_CLUSTER_MOST)) + """
mov.u32 $0, 0;
}""")  # val ($3) at element idx ($2) of the fx array ($1) of every CTA of the cluster
_FX_PUT_RANK = tl.constexpr("""{
.reg .b32 nr, tid, t, ra;
.reg .pred p, q;
mov.u32 nr, %cluster_nctarank;
mov.u32 tid, %tid.x;
setp.eq.u32 p, tid, 0;
mov.u32 t, %cluster_ctarank;
mad.lo.u32 t, t, 4, $1;
""" + "\n".join(f"setp.gt.and.u32 q, nr, {j}, p;\n@q mapa.shared::cluster.u32 ra, t, {j};\n"
                f"@q st.shared::cluster.f32 [ra], $2;" for j in range(_CLUSTER_MOST)) + """
mov.u32 $0, 0;
}""")  # thread 0: val ($2) at element rank of the array at shared address $1, in every CTA
_FX_SUM = tl.constexpr("""{
.reg .b32 nr, t;
.reg .pred q;
.reg .f32 s, a;
mov.u32 nr, %cluster_nctarank;
mov.u32 t, $1;
ld.shared.f32 s, [t];
""" + _RANK_SUM + """
mov.f32 $0, s;
}""")  # elements 0 .. nctarank - 1 of the own array at shared address $1, summed in rank order


_NBAR_PUT = tl.constexpr("""{
.reg .b32 nr, tid, t, bar, ra, rb;
.reg .pred p, q;
mov.u32 tid, %tid.x;
setp.eq.u32 p, tid, 0;
mov.u32 nr, %cluster_nctarank;
mov.u32 t, %cluster_ctarank;
add.u32 t, t, 256;
mad.lo.u32 t, t, 4, $1;
sub.u32 bar, $1, 16;
""" + "\n".join(f"""setp.gt.and.u32 q, nr, {j}, p;
@q mapa.shared::cluster.u32 ra, t, {j};
@q mapa.shared::cluster.u32 rb, bar, {j};
@q st.async.shared::cluster.mbarrier::complete_tx::bytes.b32 [ra], $2, [rb];""" for j in range(_CLUSTER_MOST)) + """
mov.u32 $0, 0;
}""")  # _nbar_put's: thread 0, x ($2) to fx[256 + rank] of every CTA ($1: fx), completing its mbarrier
_NBAR_WAIT_SUM = tl.constexpr("""{
.reg .b32 nr, t, bar;
.reg .pred P1, q;
.reg .f32 s, a;
sub.u32 bar, $1, 16;
NBAR_WAIT:
mbarrier.try_wait.parity.shared::cta.b64 P1, [bar], 0;
@!P1 bra NBAR_WAIT;
mov.u32 nr, %cluster_nctarank;
add.u32 t, $1, 1024;
ld.shared.f32 s, [t];
""" + _RANK_SUM + """
mov.f32 $0, s;
}""")  # _nbar_wait_sum's: wait for the mbarrier at fx - 16 ($1: fx), sum fx[256 ..] in rank order


_NBAR_INIT = tl.constexpr("""{
.reg .b32 nr, tid, bar, tx;
.reg .b64 st;
.reg .pred p, q;
mov.u32 tid, %tid.x;
setp.eq.u32 p, tid, 0;
setp.ne.and.u32 q, $2, 0, p;
sub.u32 bar, $1, 16;
mov.u32 nr, %cluster_nctarank;
shl.b32 tx, nr, 2;
@p mbarrier.init.shared::cta.b64 [bar], 1;
@p mbarrier.arrive.expect_tx.shared::cta.b64 st, [bar], tx;
add.u32 bar, bar, 8;
@q mbarrier.init.shared::cta.b64 [bar], 1;
@q mbarrier.arrive.expect_tx.shared::cta.b64 st, [bar], $2;
@p fence.mbarrier_init.release.cluster;
mov.u32 $0, 0;
}""")  # _nbar_init's: $1 fx, $2 the f mbarrier's bytes (0: left alone)
_FX_BCAST = tl.constexpr("""{
.reg .b32 nr, tid, nt, i, t, bar, ra, rb, a;
.reg .pred p, q;
mov.u32 tid, %tid.x;
mov.u32 nt, %ntid.x;
mov.u32 nr, %cluster_nctarank;
sub.u32 bar, $1, 8;
""" + "\n".join(f"""mad.lo.u32 i, nt, {r}, tid;
setp.lt.u32 p, i, $3;
add.u32 t, i, $2;
mad.lo.u32 t, t, 4, $1;
@p ld.shared.b32 a, [t];
""" + "\n".join(f"""setp.gt.and.u32 q, nr, {j}, p;
@q mapa.shared::cluster.u32 ra, t, {j};
@q mapa.shared::cluster.u32 rb, bar, {j};
@q st.async.shared::cluster.mbarrier::complete_tx::bytes.b32 [ra], a, [rb];""" for j in range(_CLUSTER_MOST))
                  for r in range(4)) + """
mov.u32 $0, 0;
}""")  # _fx_bcast's: $1 fx, $2 off, $3 n


@triton.jit
def _cluster_bar(op: tl.constexpr):
    """One cluster-barrier instruction, run by every thread (.aligned). The kernel uses four:
    barrier.cluster.arrive.relaxed (opens a phase, no memory ordering), barrier.cluster.wait (completes it),
    barrier.cluster.arrive.release (this thread's earlier stores, the remote puts, become visible to every CTA of the
    cluster that has passed the phase's barrier.cluster.wait.acquire) and barrier.cluster.wait.acquire."""
    tl.inline_asm_elementwise(op + ".aligned;\nmov.u32 $0, 0;", "=r", [], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _fx_alloc():
    """The shared address (int32) of this CTA's fx array (_FX_MOST + 8 fp32), 16 bytes past the norm exchange's
    mbarrier (_nbar_*). A .shared variable is static storage whatever block declares it, so the later asm
    statements use its address."""
    return tl.inline_asm_elementwise(".shared .align 16 .b8 fxb[1072];\nmov.u32 $0, fxb;\nadd.u32 $0, $0, 16;", "=r",
                                     [], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _nbar_init(fx, ftx):
    """Thread 0 initializes the exchanges' mbarriers for one arrival each and arrives on them expecting their bytes:
    the norm's (fx - 16) 4 from every CTA of the cluster (_nbar_put), the f split's (fx - 8) ftx (4 K; 0: not
    used); then fences the inits for the cluster. Before the start's cluster arrive: a peer's first st.async to
    them comes after its wait for that phase."""
    return tl.inline_asm_elementwise(_NBAR_INIT, "=r,r,r", [fx, ftx], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _fx_put_local(fx, idx, val):
    """val (fp32 tensor) at elements idx of this CTA's own fx array (replicated elements: the same value twice)."""
    return tl.inline_asm_elementwise("{\n.reg .b32 t;\nmad.lo.u32 t, $2, 4, $1;\nst.shared.f32 [t], $3;\n"
                                     "mov.u32 $0, 0;\n}", "=r,r,r,f", [fx, idx, val], dtype=tl.int32, is_pure=False,
                                     pack=1)


@triton.jit
def _fx_bcast(fx, off, n):
    """Threads 0 .. n - 1 (n <= 4 x the CTA's threads) each send element off + tid of the own fx array (written by
    _fx_put_local, then a CTA barrier) to the same element of every cluster CTA's fx by st.async, completing 4
    bytes of that CTA's f mbarrier (fx - 8): every element once, so the bytes add up to 4 K per CTA."""
    return tl.inline_asm_elementwise(_FX_BCAST, "=r,r,r,r", [fx, off, n], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _fbar_wait(fx):
    """Waits until every block's _fx_bcast has landed in this CTA's fx (the f mbarrier's phase 0)."""
    return tl.inline_asm_elementwise("""{
.reg .b32 bar;
.reg .pred P1;
sub.u32 bar, $1, 8;
FBAR_WAIT:
mbarrier.try_wait.parity.shared::cta.b64 P1, [bar], 0;
@!P1 bra FBAR_WAIT;
mov.u32 $0, 0;
}""", "=r,r", [fx], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _nbar_put(fx, x):
    """Thread 0 sends x (an fp32 scalar) to element 256 + rank of every cluster CTA's fx with st.async, which
    completes 4 bytes of that CTA's mbarrier transaction: no fence, no cluster barrier."""
    return tl.inline_asm_elementwise(_NBAR_PUT, "=r,r,r", [fx, x], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _nbar_wait_sum(fx):
    """Waits until every CTA's _nbar_put has landed here (the mbarrier's phase 0), then sums fx[256 ..] in rank
    order (the same bits in every CTA)."""
    return tl.inline_asm_elementwise(_NBAR_WAIT_SUM, "=f,r", [fx], dtype=tl.float32, is_pure=False, pack=1)


@triton.jit
def _fx_put(fx, idx, val):
    """val (fp32 tensor) at elements idx (int32, same shape) of every cluster CTA's fx array (replicated elements
    store the same value twice: harmless)."""
    return tl.inline_asm_elementwise(_FX_PUT, "=r,r,r,f", [fx, idx, val], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _fx_put_rank(slots, x):
    """x (an fp32 scalar, the same in every thread) at element `rank` of the fp32 array at shared address `slots`
    in every CTA of the cluster (thread 0 stores)."""
    return tl.inline_asm_elementwise(_FX_PUT_RANK, "=r,r,f", [slots, x], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _fx_get(fx, idx):
    """Elements idx (int32 tensor) of this CTA's fx array (fp32)."""
    return tl.inline_asm_elementwise("{\n.reg .b32 t;\nmad.lo.u32 t, $2, 4, $1;\nld.shared.f32 $0, [t];\n}",
                                     "=f,r,r", [fx, idx], dtype=tl.float32, is_pure=False, pack=1)


@triton.jit
def _fx_sum(slots):
    """The sum of the cluster-size fp32 at shared address `slots` of this CTA, in rank order (so every CTA of the
    cluster gets the same bits)."""
    return tl.inline_asm_elementwise(_FX_SUM, "=f,r", [slots], dtype=tl.float32, is_pure=False, pack=1)


@triton.jit
def _lr_chunk(w_ptr, rows, m_rows, c: tl.constexpr, R: tl.constexpr, RC: tl.constexpr):
    """Columns c*RC .. c*RC+RC-1 of the rows `rows` of a row-major [N, R] low-rank up-projection (f_b, g_b):
    [ROWS, RC] in the weight's dtype, 0 past R and outside m_rows."""
    o_c = c * RC + tl.arange(0, RC)
    return tl.load(w_ptr + rows[:, None] * R + o_c[None, :], mask=m_rows[:, None] & (o_c < R)[None, :], other=0)


@triton.jit
def _lr_rows(w_ptr, rows, m_rows, x_ptr, b_w0, R: tl.constexpr, RC: tl.constexpr):
    """(W[rows, :] @ x) [ROWS] fp32, rounded to x's dtype as a GEMV writing that dtype stores it (so the fused
    step sees the values the f / z inputs would hold). fp32 products accumulate in a [ROWS, RC] tile over the
    column chunks (registers bounded by RC; unrolled, so the chunks' weight loads can be issued together) and
    are reduced once at the end. b_w0: chunk 0, loaded by the caller before its grid-dependency wait."""
    o_c = tl.arange(0, RC)
    b_acc = b_w0.to(tl.float32) * tl.load(x_ptr + o_c, mask=o_c < R, other=0).to(tl.float32)[None, :]
    for c in tl.static_range(1, (R + RC - 1) // RC):
        b_x = tl.load(x_ptr + c * RC + o_c, mask=c * RC + o_c < R, other=0).to(tl.float32)
        b_acc += _lr_chunk(w_ptr, rows, m_rows, c, R, RC).to(tl.float32) * b_x[None, :]
    return tl.sum(b_acc, 1).to(x_ptr.dtype.element_ty).to(tl.float32)


@triton.jit
def kda_decode_step_kernel(
    q_raw, k_raw, v_raw, f, beta_logit, z,  # [H*K], [H*K], [H*V], [H*K], [H], [H*V] (f, z: unused if FUSED)
    fg_a, f_b, g_b,  # FUSED: [RF + RG] = [f_a(h) | g_a(h)], [H*K, RF], [H*V, RG] (f = f_b f_a, z = g_b g_a here)
    wq, wk, wv,  # conv weights [H*K, W], [H*K, W], [H*V, W]
    tq, tk, tv,  # conv tails [H*K, W-1], [H*K, W-1], [H*V, W-1] (updated in place)
    a, dt_bias, norm_w,  # [H] (= -exp(A_log)), [H*K], [V]
    state, out,  # [H, K, V] fp32 (updated in place), [H*V]
    out8,  # X8: [x8_words(H*V)] int32, the output also as int8 activations (the o-projection's dp4a GEMV)
    ws_o, ws_cnt, ws_z,  # [H*V] fp32, [H] int32 (zero between launches), [H*V] fp32 (FUSED: z by V block)
    scale, eps,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, W: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, BVF: tl.constexpr, NV: tl.constexpr, EVEN: tl.constexpr,
    PDL: tl.constexpr, X8: tl.constexpr, CLUSTER: tl.constexpr, FSPLIT: tl.constexpr, NBAR: tl.constexpr,
    FUSED: tl.constexpr, RF: tl.constexpr, RG: tl.constexpr, RCF: tl.constexpr, RCG: tl.constexpr,
):
    """Grid (NV, H): one program per (V block, head), the K axis whole in every program; with NV > 1 the
    last V block of a head to arrive (arrival counter) applies the gated RMSNorm over the whole head.

    Why this design (v3) beat the previous one (v2: 6.68 vs 5.36 us per layer, H100): the step is latency-
    bound, not byte-bound. Per program it moves only 2 * BK * BV * 4 B (16 KiB at BV=16), but v2 walked the
    dependent chain  state load -> conv -> L2-norm reductions -> S^T k reduction -> u -> S update -> S^T q
    reduction -> ws_o store + fence + atomic -> (last block) z / norm_w / ws_o loads -> norm -> q/k tail
    re-loads -> barrier -> stores. Each reduction over K ends in a cross-warp shared-memory round trip
    with a barrier, and each global round trip after the arrival is L2/DRAM latency (0.3-0.8 us).
    This kernel cuts the chain:

    1. Two independent reductions instead of four chained ones. The L2 norms are applied after them, using
       S_new^T q^ = S_d^T q^ + (k^.q^) u and S_d^T k^ = rk S_d^T k (q^ = rq q, k^ = rk k, S_d = decayed S):
       the column sums S_d^T k and S_d^T q are one tuple reduction, and sum q^2, sum k^2, q.k another,
       independent of it. The state update S_d + (rk k) u^T is off the path to o.
    2. Nothing is loaded after the arrival except the other blocks' o: z and norm_w of the whole head
       (2 x 128 values) are loaded by every program at the start, beside the state, and the new conv
       tails are stored from the registers the conv read (v2 re-read the old tails, then barriered).
       The conv is computed tap by tap on 1D vectors (no [C, W] window tile and its layout conversions,
       v1's), the state block is loaded/stored unmasked when the blocks tile [K, V] exactly (EVEN: 16-byte
       accesses), and with NV > 1 the state is stored after the arrival, so the release fence before the
       counter does not wait for the state writes.
    3. Optional programmatic dependent launch (PDL=True, launch_pdl): the state block, conv weights and
       tails, A, dt_bias and norm_w (nothing the kernel right before this one writes) are requested
       before griddepcontrol.wait, so the state's DRAM latency and this launch overlap the previous
       kernel; the projections (q, k, v, f, beta, z) are read and everything is written after the wait.
       The kernel then lets its own successor launch (it is past its wait, so a successor can only
       overlap this kernel, never an older one). Measured: 3.83 us per layer chained (H100).
    4. FUSED: the low-rank up-projections f = f_b f_a(h) and z = g_b g_a(h) are computed here from fg_a =
       [f_a(h) | g_a(h)] (the projection GEMV's output) and the bf16 f_b [H*K, RF] / g_b [H*V, RG], instead of
       by a GEMV launch before this one (~4.4 us per layer on an H200, mostly fixed latency). The decay needs
       all K values of f_h in every program of the head, so each program computes f_h = f_b[head rows] f_a
       itself (K x RF MACs, in column chunks of RCF; the head's f_b rows come from L2 after the first
       program). z is needed whole only by the program that applies the gated norm: each program computes its
       own BV rows of z and, with NV > 1, stores them to ws_z before its releasing arrival; the last one reads
       the head's z back with the other blocks' o (.cg), so no program runs the whole z GEMV. Chunk 0 of the
       weight tiles is loaded before griddepcontrol.wait (constants); fg_a after it. Both products are rounded
       to fg_a's dtype, as the GEMV's output would be. Bytes: + f_b and g_b once from DRAM (1 MiB each per
       layer at H=32, K=V=128, rank 128, bf16) and NV x 32 KiB of f_b rows per head from L2.

    5. CLUSTER (sm_90, launched by kda_decode_step(cluster=...)): the NV blocks of a head are one thread-block
       cluster (their CUfunction's required cluster width is set to NV when it loads). The output norm's sum of
       o^2 goes through distributed shared memory (_fx_put_rank: NV remote 4-byte stores; one cluster barrier;
       _fx_sum), and every block normalizes and stores its own BV columns (x8 groups included); block 0 stores
       the q / k tails after the exchange. That replaces the arrival's path (ws_o stores, release fence, atomic,
       the last block's L2 read of the head's o, its serial norm). NBAR (the default): the partial sums go by
       st.async into every CTA's slots and complete its mbarrier (_nbar_put / _nbar_wait_sum), with no fence and
       no cluster barrier (a barrier.cluster.arrive.release is a MEMBAR.ALL.GPU in SASS); the state and v tails
       are stored before the wait. KIMI_LOCAL_KDA_NBAR=0: a cluster barrier (_fx_put_rank, split arrive / wait).
       FSPLIT (FUSED with a cluster, K % NV == 0): each block computes only its K / NV rows of the head's f, whose
       f_b rows (K / NV x RF) are all loaded before the wait, and shares them: NBAR, into the own fx, a CTA
       barrier, then each value once to every block by st.async on its f mbarrier (_fx_put_local, _fx_bcast,
       _fbar_wait); else _fx_put and a cluster barrier. The q / k / v conv and the L2 norms' sums run before the
       wait, then _fx_get. Without it every block computed all K rows, with 3 of 4 f_b chunks loaded from L2
       after the wait. KIMI_LOCAL_KDA_FSPLIT=0 turns it off (A/B).

    Bytes: state read + written once (2 MiB + 2 MiB per layer at H=32, K=V=128) plus ~70 KiB of
    projections, taps and tails; the instruction count per state element stays ~4 FMA-class ops (decay,
    two products into the reductions, the rank-1 update). The cross-block norm still costs the arrival
    (fence + atomic) and one L2 read of the head's o (NV > 1); BV = V (NV = 1) has no arrival but only
    H = 32 programs, each streaming 64 KiB (slower: per-SM bandwidth). Offline sm_90 compile (Triton 3.9,
    H=32, K=V=128, bf16 inputs), v2 -> v3 per program: BV=16 / 2 warps 1008 -> 880 SASS instructions,
    71 -> 53 global loads, 2 -> 1 fences and atomics; BV=32 / 4 warps 784 -> 704, 34 -> 24 barriers.
    Still left: Triton loads the [BK] vectors (taps, q, k, decay) in their own layout and converts each
    to the state tile's row slice through shared memory (3 conversions + v and o). 2 <= W <= 4.
    """
    i_v, i_h = tl.program_id(0), tl.program_id(1)
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    ch_k = i_h * K + o_k
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    ch_v = i_h * V + o_v
    o_f = tl.arange(0, BVF)  # the whole head's V, for the output norm
    m_f = o_f < V

    # ---- before the grid-dependency wait: data no recent kernel writes ----
    if CLUSTER:
        fx = _fx_alloc()  # [264] fp32 in shared memory: f exchange at [0, K), the norm's partials at [256, 264)
        if NBAR:  # the f split's mbarrier expects 4 bytes for each of the K values of f
            _nbar_init(fx, tl.full([], 4 * K if FSPLIT else 0, tl.int32))
        _cluster_bar("barrier.cluster.arrive.relaxed")
    if FSPLIT:  # this block's K / NV rows of the head's f (KC = K // NV, one chunk of RCF = RF)
        KC: tl.constexpr = K // NV
        o_c = i_v * KC + tl.arange(0, KC)
        ch_c = i_h * K + o_c
    p_s = state + i_h * K * V + o_k[:, None] * V + o_v[None, :]
    m_s = m_k[:, None] & m_v[None, :]
    if EVEN:
        b_s = tl.load(p_s)  # [BK, BV] fp32, 16-byte accesses
    else:
        b_s = tl.load(p_s, mask=m_s, other=0)
    tq0, tq1, tq2, wq0, wq1, wq2, wqx = _load_taps(tq, wq, ch_k, m_k, W)  # [BK] each
    tk0, tk1, tk2, wk0, wk1, wk2, wkx = _load_taps(tk, wk, ch_k, m_k, W)  # [BK] each
    tv0, tv1, tv2, wv0, wv1, wv2, wvx = _load_taps(tv, wv, ch_v, m_v, W)  # [BV] each
    b_dtb = tl.load(dt_bias + ch_k, mask=m_k, other=0).to(tl.float32)
    b_a = tl.load(a + i_h).to(tl.float32)
    if CLUSTER:  # this block's columns of the output norm only
        b_wf = tl.load(norm_w + o_v).to(tl.float32)  # [BV]
    else:
        b_wf = tl.load(norm_w + o_f, mask=m_f, other=0).to(tl.float32)  # [BVF]
    if FUSED:  # chunk 0 of the head's f_b rows and of this block's g_b rows (weights: no kernel writes them)
        if FSPLIT:
            b_fw0 = _lr_chunk(f_b, ch_c, o_c < K, 0, RF, RCF)  # [KC, RCF]
        else:
            b_fw0 = _lr_chunk(f_b, ch_k, m_k, 0, RF, RCF)  # [BK, RCF]
        b_gw0 = _lr_chunk(g_b, ch_v, m_v, 0, RG, RCG)  # [BV, RCG]
    if PDL:
        gdc_wait()  # the projections below come from the previous kernel; all writes come after this
        gdc_launch_dependents()

    # ---- projections (all loads issued together), conv + SiLU, gate ----
    x_q = tl.load(q_raw + ch_k, mask=m_k, other=0)
    x_k = tl.load(k_raw + ch_k, mask=m_k, other=0)
    x_v = tl.load(v_raw + ch_v, mask=m_v, other=0)
    if FUSED:  # f and z from fg_a (the previous GEMV's output): every K value of f, this block's BV of z
        if FSPLIT:  # this block's KC rows of f into every block's fx; the conv runs before the barrier's wait
            b_fc = _lr_rows(f_b, ch_c, o_c < K, fg_a, b_fw0, RF, RCF)  # [KC]
            if NBAR:  # into the own fx, then each value once to every block by st.async (its f mbarrier)
                _fx_put_local(fx, o_c, b_fc)
                tl.debug_barrier()
                _cluster_bar("barrier.cluster.wait")
                _fx_bcast(fx, tl.full([], KC, tl.int32) * i_v, tl.full([], KC, tl.int32))
            else:
                _cluster_bar("barrier.cluster.wait")
                _fx_put(fx, o_c, b_fc)
                _cluster_bar("barrier.cluster.arrive.release")
        else:
            b_f = _lr_rows(f_b, ch_k, m_k, fg_a, b_fw0, RF, RCF) + b_dtb  # [BK]
        b_z = _lr_rows(g_b, ch_v, m_v, fg_a + RF, b_gw0, RG, RCG)  # [BV]
        b_zf = b_z  # NV == 1: the whole head (BV == BVF); NV > 1: the last block reads ws_z instead
    else:
        b_f = tl.load(f + ch_k, mask=m_k, other=0).to(tl.float32) + b_dtb
        if CLUSTER:
            b_zf = tl.load(z + ch_v).to(tl.float32)  # [BV]
        else:
            b_zf = tl.load(z + i_h * V + o_f, mask=m_f, other=0).to(tl.float32)  # [BVF]
    b_beta = tl.sigmoid(tl.load(beta_logit + i_h).to(tl.float32))
    b_q = _conv_silu(x_q, tq0, tq1, tq2, wq0, wq1, wq2, wqx, W)
    b_k = _conv_silu(x_k, tk0, tk1, tk2, wk0, wk1, wk2, wkx, W)
    b_v = _conv_silu(x_v, tv0, tv1, tv2, wv0, wv1, wv2, wvx, W)
    if FSPLIT:  # the norms' sums do not need f: before the wait, then every K value of f from the own fx
        b_qq, b_kk, b_qk = tl.reduce((b_q * b_q, b_k * b_k, b_q * b_k), 0, _add3)  # scalars
        if NBAR:
            _fbar_wait(fx)
        else:
            _cluster_bar("barrier.cluster.wait.acquire")
        b_f = _fx_get(fx, o_k) + b_dtb  # [BK]
    b_sp = tl.maximum(b_f, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(b_f)))  # softplus without overflow
    b_sp = tl.where(b_f > 20.0, b_f, b_sp)
    b_s = b_s * tl.exp(b_a * b_sp)[:, None]  # S_d: decay the key axis

    # ---- the two independent reduction rounds over K ----
    b_sk, b_sq = tl.reduce((b_s * b_k[:, None], b_s * b_q[:, None]), 0, _add2)  # [BV] S_d^T k, S_d^T q
    if not FSPLIT:
        b_qq, b_kk, b_qk = tl.reduce((b_q * b_q, b_k * b_k, b_q * b_k), 0, _add3)  # scalars
    b_rq = tl.rsqrt(b_qq + 1e-6) * scale
    b_rk = tl.rsqrt(b_kk + 1e-6)
    b_u = b_beta * (b_v - b_rk * b_sk)  # [BV] beta * (v - S_d^T k^)
    b_o = b_rq * (b_sq + (b_rk * b_qk) * b_u)  # [BV] S_new^T q^ (scale included)
    b_s += (b_rk * b_k)[:, None] * b_u[None, :]  # S_new = S_d + k^ u^T

    if NV == 1:
        # whole head here (BV == BVF, so o_v == o_f): gated RMSNorm inline, no workspace
        b_y = b_o * tl.rsqrt(tl.sum(b_o * b_o, 0) / V + eps) * b_wf * tl.sigmoid(b_zf)  # masked columns are 0
        tl.store(out + ch_v, b_y.to(out.dtype.element_ty), mask=m_v)
        if X8:
            _head_x8(out8, b_y.to(out.dtype.element_ty).to(tl.float32), i_h, H, V, BVF)
        if EVEN:
            tl.store(p_s, b_s)
        else:
            tl.store(p_s, b_s, mask=m_s)
        tl.debug_barrier()  # every thread has read the old tails (replicated channels included)
        _store_taps(tq, x_q, tq1, tq2, ch_k, m_k, W)
        _store_taps(tk, x_k, tk1, tk2, ch_k, m_k, W)
        _store_taps(tv, x_v, tv1, tv2, ch_v, m_v, W)
    elif CLUSTER:
        # the head's NV blocks are one thread-block cluster: the norm's sum of o^2 is summed through distributed
        # shared memory, and every block normalizes its own columns; no workspace, no arrival. The state and v
        # tails are stored between this block's put and its wait for the others' partials (NBAR off: between the
        # barrier's release and its wait, so the release waits for none of them), so their stores overlap it.
        if not FSPLIT:
            _cluster_bar("barrier.cluster.wait")  # the start's phase: every block of the cluster has started
        if NBAR:  # st.async into the peers' slots, completing their mbarriers: no fence, no cluster barrier
            _nbar_put(fx, tl.sum(b_o * b_o, 0))
            tl.store(p_s, b_s)
            _store_taps(tv, x_v, tv1, tv2, ch_v, m_v, W)
            b_ss = _nbar_wait_sum(fx)
        else:
            _fx_put_rank(fx + 4 * _FX_MOST, tl.sum(b_o * b_o, 0))
            _cluster_bar("barrier.cluster.arrive.release")
            tl.store(p_s, b_s)
            _store_taps(tv, x_v, tv1, tv2, ch_v, m_v, W)
            _cluster_bar("barrier.cluster.wait.acquire")
            b_ss = _fx_sum(fx + 4 * _FX_MOST)
        b_y = b_o * tl.rsqrt(b_ss / V + eps) * b_wf * tl.sigmoid(b_zf)
        tl.store(out + ch_v, b_y.to(out.dtype.element_ty))
        if X8:
            _x8_put(out8, H * V, (i_h * V + i_v * BV) // 16, BV // 16, b_y.to(out.dtype.element_ty).to(tl.float32),
                    BV // 16)
        if i_v == 0:  # every block of the head read the old q / k tails before its partial reached this block
            _store_taps(tq, x_q, tq1, tq2, ch_k, m_k, W)
            _store_taps(tk, x_k, tk1, tk2, ch_k, m_k, W)
    else:
        tl.store(ws_o + ch_v, b_o, mask=m_v)
        if FUSED:
            tl.store(ws_z + ch_v, b_z, mask=m_v)
        # the barrier orders this program's ws_o (ws_z) stores and old-tail reads before the release below, so
        # the last block of the head reads every o (z) and may overwrite the q/k tails all blocks read
        tl.debug_barrier()
        n_arrived = tl.atomic_add(ws_cnt + i_h, 1, sem="acq_rel")
        if EVEN:  # after the arrival: the release fence does not wait for 8+ KiB of state stores
            tl.store(p_s, b_s)
        else:
            tl.store(p_s, b_s, mask=m_s)
        _store_taps(tv, x_v, tv1, tv2, ch_v, m_v, W)  # this block's channels: read only here
        if n_arrived == NV - 1:
            b_of = tl.load(ws_o + i_h * V + o_f, mask=m_f, other=0, cache_modifier=".cg")  # [BVF], from L2
            if FUSED:  # the head's z, from every block's ws_z stores
                b_zl = tl.load(ws_z + i_h * V + o_f, mask=m_f, other=0, cache_modifier=".cg")  # [BVF]
            else:
                b_zl = b_zf
            b_y = b_of * tl.rsqrt(tl.sum(b_of * b_of, 0) / V + eps) * b_wf * tl.sigmoid(b_zl)
            tl.store(out + i_h * V + o_f, b_y.to(out.dtype.element_ty), mask=m_f)
            if X8:
                _head_x8(out8, b_y.to(out.dtype.element_ty).to(tl.float32), i_h, H, V, BVF)
            _store_taps(tq, x_q, tq1, tq2, ch_k, m_k, W)
            _store_taps(tk, x_k, tk1, tk2, ch_k, m_k, W)
            tl.store(ws_cnt + i_h, 0)  # the next launch sees it after this kernel's end



_CLUSTER_PENDING = [0]  # the cluster width of the kda_decode_step_kernel launch in progress (0: none)
_CLUSTER_FUNCS: dict = {}  # CUfunction handle -> the cluster width _on_load gave it


def _on_load(module, function, name, metadata_group, hash):  # triton.knobs.runtime.kernel_load_end_hook
    """A CLUSTER variant of the step kernel is only ever compiled and loaded inside a clustered launch (CLUSTER and
    BV are constexprs), so its cluster width is set once, here, before its first launch."""
    if _CLUSTER_PENDING[0] and name == "kda_decode_step_kernel":
        _carveout.set_cluster_width(function, _CLUSTER_PENDING[0])
        _CLUSTER_FUNCS[function] = _CLUSTER_PENDING[0]


def _install_load_hook() -> bool:
    """Register _on_load with Triton (idempotent); False where Triton has no load hook (< 3.4)."""
    try:
        from triton import knobs
    except ImportError:  # pragma: no cover (Triton < 3.4)
        return False
    knobs.runtime.kernel_load_end_hook.add(_on_load)
    return True


def cluster_enabled(device) -> bool:
    """The step may run a head's V blocks as one thread-block cluster: sm_90+, not interpreting, Triton's load
    hook present, and KIMI_LOCAL_KDA_CLUSTER is not "0"."""
    if _INTERP or os.environ.get("KIMI_LOCAL_KDA_CLUSTER", "1") == "0":
        return False
    dev = torch.device(device)
    if dev.type != "cuda" or torch.cuda.get_device_capability(dev)[0] < 9:
        return False
    return _install_load_hook()


def _workspace(device, H: int, V: int):
    """(ws [2 * H*V] fp32: o then z (the fused f / z path) by V block, arrival counters [H] int32)."""
    key = (str(device), H, V)
    if key not in _WS:
        _WS[key] = (torch.empty(2 * H * V, dtype=torch.float32, device=device),
                    torch.zeros(H, dtype=torch.int32, device=device))
    return _WS[key]


DEFAULTS = dict(BV=16, num_warps=1)  # H100 sweep (scripts/sweep_kda_mla.py): 5.36 us per layer
# with the fused f / z products (fg_a given): 1 warp spills at BV=16 (offline sm_90 compile: 255 registers).
# Whole decode step, H200 (session 8, runs 3 and 6, graph-interleaved, tok/s at 4K / 128K): BV=16 4 warps
# 503.1 / 421.8 and 507.2 / 421.9; BV=32 4 warps 505.4 / 422.6 and 509.7 / 423.8; BV=16 1 warp 458.0 / 390.6;
# BV=16 2 warps 502.8 / 418.6; BV=128 8 warps 442.6 / 382.5. KIMI_LOCAL_KDA_CFG="BV,warps" overrides (A/B runs)
FUSED_DEFAULTS = dict(BV=32, num_warps=4)  # with the cluster and f split (H200, session 25, tok/s at 4K): BV=16 4 warps
# 742.0 vs 753.2, 16 / 2 740.7 and 16 / 1 713.6 vs 753.0


def kda_decode_step(q_raw, k_raw, v_raw, f, beta_logit, z, conv_w, conv_tail, a, dt_bias, norm_w, state, out,
                    eps: float = 1e-5, scale: float | None = None, BV: int | None = None, num_warps: int | None = None,
                    workspace=None, pdl: bool | None = None, out8: torch.Tensor | None = None,
                    fg_a: torch.Tensor | None = None, f_b: torch.Tensor | None = None, g_b: torch.Tensor | None = None,
                    rank_chunk: int | None = None, cluster: bool | None = None):
    """One KDA token for one layer, in one launch (graph-capturable: no allocation after the first call
    for a given (device, H, V), no host sync).

    q_raw, k_raw [H*K], v_raw [H*V]: projected inputs (pre-conv); f [H*K]: f_b_proj output (pre-gate);
    beta_logit [H]: b_proj output; z [H*V]: g_b_proj output (output gate); conv_w: [3, P, W] or three
    [P_i, W] tensors (q, k, v), 2 <= W <= 4; conv_tail: [3, P, W-1] or three [P_i, W-1] tensors, updated
    in place; a [H] = -exp(A_log); dt_bias [H*K]; norm_w [V]; state [H, K, V] fp32, updated in place;
    out [H*V] (any float dtype) receives the gated-normed output. eps is the output norm's (rms_norm_eps).
    BV: value-block width (V = one program per head; smaller = more programs, cross-block norm via
    an arrival counter). None knobs: DEFAULTS (num_warps: DEFAULTS' at the default BV, else 16-64 state
    values per thread).
    pdl (sm_90+): programmatic dependent launch; the state, conv weights / tails and gate parameters are
    read before waiting for the previous kernel, so that kernel must not write them (in the engine the
    projection GEMVs come right before). None: kernels.pdl.enabled(). Ignored under the interpreter.
    out8: an int32 [x8_words(H*V)] buffer (V % 16 == 0) that also receives the output as int8 activations
    (quant_matmul's x8 format, quantized from the values as stored in `out`), for the o-projection's dp4a GEMV.
    Fused low-rank gates (f and z None): fg_a [RF + RG] = [f_a(h) | g_a(h)] (the f_a / g_a projections' output,
    read after the PDL wait), f_b [H*K, RF] and g_b [H*V, RG] (weights, bf16 in the engine; read before the
    wait): the kernel computes f = f_b f_a and z = g_b g_a itself, each rounded to fg_a's dtype (as a GEMV
    writing that dtype would), instead of taking them from a GEMV launched before it. rank_chunk: columns of
    f_b / g_b per step of those products (a power of 2); None: [rows, chunk] tiles of 32 weights per thread.
    cluster: a head's NV V blocks run as one thread-block cluster and sum the output norm's o^2 through distributed
    shared memory instead of the arrival counter (kernel docstring, item 5). Only where the blocks tile [K, V]
    exactly, 2 <= NV <= 8 and (with out8) BV % 16 == 0; None: cluster_enabled(device)."""
    H, K, V = state.shape
    wq, wk, wv = conv_w
    tq, tk, tv = conv_tail
    W = wq.shape[-1]
    assert state.dtype == torch.float32 and state.is_contiguous()
    fused = fg_a is not None
    if fused:
        assert f is None and z is None and f_b is not None and g_b is not None, "fg_a replaces f and z"
        RF, RG = f_b.shape[1], g_b.shape[1]
        assert f_b.shape == (H * K, RF) and g_b.shape == (H * V, RG) and fg_a.numel() == RF + RG
        f = z = q_raw  # unused pointers
    else:
        assert f is not None and z is not None and f_b is None and g_b is None
        RF = RG = 1
        fg_a = f_b = g_b = q_raw  # unused pointers
    for t in (q_raw, k_raw, v_raw, f, z, fg_a, f_b, g_b, wq, wk, wv, tq, tk, tv, dt_bias, out):
        assert t.is_contiguous()
    assert wq.shape == (H * K, W) and wv.shape == (H * V, W) and tq.shape == (H * K, W - 1) and tv.shape == (H * V, W - 1)
    if not 2 <= W <= 4:
        raise ValueError(f"kda_decode_step takes conv widths 2..4, not {W}")
    scale = K**-0.5 if scale is None else scale
    BK, BVF = triton.next_power_of_2(K), triton.next_power_of_2(V)
    pdl = (_pdl.enabled() if pdl is None else pdl) and not _INTERP
    if pdl and not _pdl.AVAILABLE:
        raise ValueError("pdl=True needs Triton's gdc_wait (Triton >= 3.4)")
    d = FUSED_DEFAULTS if fused else DEFAULTS
    over = env_config("KIMI_LOCAL_KDA_CFG", 2) if BV is None and num_warps is None else None  # "BV,warps" (A/B)
    if over:
        BV, num_warps = over
    BV = min(BVF, d["BV"] if BV is None else BV)  # BV = BVF: one program per head (NV = 1)
    if num_warps is None:
        num_warps = d["num_warps"] if BV == d["BV"] else max(1, min(8, BK * BV // 1024))
    if _INTERP:
        num_warps = 1
    NV = triton.cdiv(V, BV)
    even = (K == BK) and (V % BV == 0)
    cl = (cluster_enabled(state.device) if cluster is None else cluster) and even and 2 <= NV <= _CLUSTER_MOST \
        and (out8 is None or BV % X8_GROUP == 0) and not _INTERP and _install_load_hook()  # cluster=True too
    ws_o, ws_cnt = workspace if workspace is not None else _workspace(state.device, H, V)
    assert ws_o.numel() >= (2 if fused else 1) * H * V
    if out8 is not None:
        assert V % X8_GROUP == 0 and out8.dtype == torch.int32 and out8.numel() == x8_words(H * V)

    def chunk(R: int, rows: int) -> int:  # columns per [rows, chunk] weight tile of the fused products
        c = rank_chunk if rank_chunk is not None else max(8, 1024 * num_warps // rows)  # 32 weights per thread
        assert c & (c - 1) == 0, f"rank_chunk must be a power of 2, not {c}"
        return min(c, triton.next_power_of_2(R))

    # fused with a cluster: each block computes K / NV rows of f (preloaded whole) and the cluster shares them
    fsplit = cl and fused and K % NV == 0 and (K // NV) & (K // NV - 1) == 0 and K <= _FX_N \
        and K // NV <= 4 * 32 * num_warps \
        and os.environ.get("KIMI_LOCAL_KDA_FSPLIT", "1") != "0"
    _CLUSTER_PENDING[0] = NV if cl else 0  # _on_load gives a CLUSTER kernel loaded by this launch its cluster width
    try:
        kern = kda_decode_step_kernel[(NV, H)](
            q_raw, k_raw, v_raw, f, beta_logit, z, fg_a, f_b, g_b, wq, wk, wv, tq, tk, tv, a, dt_bias, norm_w, state,
            out, out if out8 is None else out8, ws_o, ws_cnt, ws_o[H * V:] if fused else ws_o, scale, eps,
            H=H, K=K, V=V, W=W, BK=BK, BV=BV, BVF=BVF, NV=NV, EVEN=even, PDL=pdl, X8=out8 is not None, CLUSTER=cl,
            FSPLIT=fsplit, NBAR=cl and os.environ.get("KIMI_LOCAL_KDA_NBAR", "1") != "0", FUSED=fused, RF=RF, RG=RG,
            RCF=triton.next_power_of_2(RF) if fsplit else chunk(RF, BK),
            RCG=chunk(RG, BV), num_warps=num_warps,
            **({"launch_pdl": True} if pdl else {}))
    finally:
        _CLUSTER_PENDING[0] = 0
    fn = getattr(kern, "function", None)
    if cl and fn is not None and _CLUSTER_FUNCS.get(fn) != NV:  # a silent non-cluster launch computes garbage
        raise RuntimeError(f"kda_decode_step: the cluster kernel (width {NV}) was loaded without its cluster width")
    return out


@triton.jit(do_not_specialize=["T"])
def causal_conv_prefill_kernel(
    x, w, tail, out,  # [T, C] (row stride stride_x), [C, W], [C, W-1] (updated in place), [T, C]
    T, C, stride_x, stride_o,
    W: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BW: tl.constexpr,
):
    i_t, i_c = tl.program_id(0), tl.program_id(1)
    o_t = i_t * BT + tl.arange(0, BT)
    o_c = i_c * BC + tl.arange(0, BC)
    m_c = o_c < C
    b_acc = tl.zeros([BT, BC], dtype=tl.float32)
    for j in tl.static_range(W):
        o_s = o_t + j - (W - 1)  # tap j reads token t + j - (W-1); rows before 0 are the tail's (below)
        b_x = tl.load(x + o_s[:, None] * stride_x + o_c[None, :],
                      mask=((o_s >= 0) & (o_s < T))[:, None] & m_c[None, :], other=0).to(tl.float32)
        b_acc += b_x * tl.load(w + o_c * W + j, mask=m_c, other=0).to(tl.float32)[None, :]
    if i_t == 0:
        # the old tail feeds rows r < W-1: y[r] += sum_{j < W-1-r} w[j] * tail[r + j]
        for r in tl.static_range(W - 1):
            b_r = tl.zeros([BC], dtype=tl.float32)
            for j in tl.static_range(W - 1 - r):
                b_r += (tl.load(w + o_c * W + j, mask=m_c, other=0).to(tl.float32)
                        * tl.load(tail + o_c * (W - 1) + r + j, mask=m_c, other=0).to(tl.float32))
            b_acc += tl.where(o_t[:, None] == r, b_r[None, :], 0.0)
    b_y = b_acc * tl.sigmoid(b_acc)
    tl.store(out + o_t[:, None] * stride_o + o_c[None, :], b_y.to(out.dtype.element_ty),
             mask=(o_t < T)[:, None] & m_c[None, :])
    if i_t == 0:
        # the only program that read the old tail writes the new one: new[c, i] = [old tail ; x][T + i]
        o_i = tl.arange(0, BW)
        m_i = o_i < W - 1
        o_n = T + o_i - (W - 1)
        n_in_x = o_n >= 0
        b_nx = tl.load(x + o_n[None, :] * stride_x + o_c[:, None], mask=m_c[:, None] & (m_i & n_in_x)[None, :], other=0)
        b_nt = tl.load(tail + o_c[:, None] * (W - 1) + (T + o_i)[None, :], mask=m_c[:, None] & (m_i & (o_n < 0))[None, :], other=0)
        b_new = tl.where(n_in_x[None, :], b_nx.to(tail.dtype.element_ty), b_nt)
        tl.debug_barrier()
        tl.store(tail + o_c[:, None] * (W - 1) + o_i[None, :], b_new, mask=m_c[:, None] & m_i[None, :])


def causal_conv_prefill(x, w, tail, out=None, BT: int = 64, BC: int = 64):
    """SiLU(depthwise causal conv) over T tokens continuing from tail (naive.short_conv's contract).
    x [T, C] (rows may be strided), w [C, W], tail [C, W-1] (updated in place to the last W-1 raw inputs),
    out [T, C] (default fp32). Returns out."""
    T, C = x.shape
    W = w.shape[1]
    assert x.stride(1) == 1 and w.is_contiguous() and tail.is_contiguous() and tail.shape == (C, W - 1)
    assert T * max(x.stride(0), C) < 2**31  # int32 offsets (prefill runs in chunks)
    out = torch.empty(T, C, dtype=torch.float32, device=x.device) if out is None else out
    assert out.stride(1) == 1
    BT = max(BT, triton.next_power_of_2(W))
    if _INTERP:
        BT, BC = min(BT, 16), min(BC, 16)
    grid = (triton.cdiv(T, BT), triton.cdiv(C, BC))
    causal_conv_prefill_kernel[grid](x, w, tail, out, T, C, x.stride(0), out.stride(0),
                                     W=W, BT=BT, BC=BC, BW=triton.next_power_of_2(W), num_warps=1 if _INTERP else 8)
    return out


def _fla_chunk_kda():
    try:
        from fla.ops.kda import chunk_kda
    except Exception:  # fla-core absent (or without a usable Triton backend)
        return None
    return chunk_kda


def kda_prefill(q, k, v, g, beta, state=None, scale=None, use_fla: bool | None = None):
    """Chunked KDA over T tokens (naive.kda_chunked's contract): q, k [T, H, K] already L2-normalised
    (q NOT yet scaled), v [T, H, V], g [T, H, K] log decay (post gate), beta [T, H] post-sigmoid,
    state [H, K, V] fp32 (updated in place) or None (zero start). Returns (o [T, H, V], state):
    o in q's dtype with fla, fp32 from the fallback. use_fla=None: fla's chunk_kda on CUDA when
    importable, else the pure-torch chunked form."""
    T, H, K = q.shape
    chunk_kda = None
    if use_fla is not False and q.is_cuda:
        chunk_kda = _fla_chunk_kda()
    if use_fla and chunk_kda is None:
        raise RuntimeError("fla-core's chunk_kda is not available")
    if chunk_kda is None:
        o, s = naive.kda_chunked(q, k, v, g, beta, state, scale)
    else:
        h0 = None if state is None else state[None]
        o, s = chunk_kda(q[None].contiguous(), k[None].contiguous(), v[None].contiguous(),
                         g[None].float().contiguous(), beta[None].contiguous(), scale=scale,
                         initial_state=h0, output_final_state=True)
        o, s = o[0], s[0]
    if state is None:
        return o, s
    state.copy_(s)
    return o, state
