"""The MoE decode gate/up kernel in Gluon (sm_90): the word-path kernel of kernels/moe.py with a cp.async copy ring,
for Q4_K or Q8_0 experts and x8 activations (the Q4_K_M and Q4_K recipes' gate/up). The default on Hopper.

Why: the Triton gate/up kernel (1,728 one-warp programs: 16 rows x a third of D each, loads straight into
registers, split-K partials and an arrival counter) reads at 36 % of HBM bandwidth (17.4 us for 26.8 MB, H200,
session 11). scripts/bench_stream.py timed kernels that only read the same bytes: with that grid and direct loads
14.3 us; with a Gluon cp.async ring in this kernel's stage pattern (16 rows x 128 bytes per stage) 10.8 us, in the
same run. Loads into registers bound the bytes a warp keeps in flight by its registers; the ring keeps NS stages in
flight per CTA in shared memory. Each CTA owns 16 rows of one expert and runs gate and up over the whole of D, so
there are no partials and no counters.

Layout: CTA (16-row f-tile, expert e), W warps; thread (lane // 8, lane % 8) of warp w owns 16 / (4 W) rows and the
16-byte chunk lane % 8 of every stage. A stage is 8 chunks of every row: one Q4_K block (256 weights), or 128 Q8_0
weights. Per stage a thread copies its rows' chunks and the 4-byte words holding their scales (Q4_K: sub-scales,
mins, d / dmin; Q8_0: d) into the ring and later reads back exactly what it copied; its rows share the x loads.
The arithmetic is the x8 word path's (quant_matmul._i8dot_q45k / _i8dot_q8_0): dp4a of the weight nibbles / bytes
with the x8 words, the group scales dx, the mins through sq. The 8 threads of a row sum their partials at the end;
act = silu(gate) * up of the 16 rows is quantized to one x8 group as the Triton kernel's _act_store does, for the
down kernel (still kernels/moe.py's Triton kernel). The shared expert's CTAs come first in the grid and, with PDL,
issue their first copies before the grid-dependency wait. Routed CTAs pick their expert from the router's logits
(ROUTE) as moe._route_id does (pick j = j + 1 arg-max passes, ties to the lower index), or read slot_ids.

The shared-memory carveout matters more than the kernel (H200, session 11, interleaved engine A/B, tok/s at 4K):
an SM changes its L1 / shared split only when idle, and the Triton kernels around this one (router, MoE down,
GEMVs) run in the 64 KB configuration. Left to the driver, this kernel asked for ~200 KB (its occupancy limit), so
under PDL it could not overlap its neighbours: 515 vs 558 tok/s for the Triton kernel, although alone it was as
fast (no PDL: 530 vs 532). With the carveout pinned to 64 KB (DEFAULT_CARVEOUT) and a ring that lets every CTA be
resident in it (3 stages x 3.5 KB, 2 warps: 5 CTAs per SM >= 576 / 132): 578.1 vs 558.0, and 578.8 vs 559.0 in the
final run (128K: 505.3 vs 490.1). 4 warps x 4 stages in 64 KB (4 CTAs per SM: a second wave) 510.7.
Alone (graph-replayed, cold weights, scripts/sweep_gemv.py --only halves): 16.9 us against 17.4 for the Triton
kernel; 4 warps x 4 stages 18.0, 2 warps x 6 stages 15.7 (but 21.5 KB of ring: it does not fit the 64 KB carveout).
"""
from __future__ import annotations

import os

import torch

from . import carveout
from .quant_matmul import QT_ID

try:  # Gluon ships with Triton >= 3.5; the CPU interpreter cannot run it
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
    _async_load = getattr(cp, "async_load", None) or cp.async_copy_global_to_shared  # 3.9 / 3.6 names
    HAVE_GLUON = True
except (ImportError, AttributeError):  # pragma: no cover
    HAVE_GLUON = False

GLUON_QTYPES = ("Q4_K", "Q8_0")
BF = 16  # rows per CTA: one x8 group of act
DEFAULT_NS = 3  # H200, session 11: see the module doc
DEFAULT_W = 2
DEFAULT_CARVEOUT = 28  # percent of 228 KB: the 64 KB configuration the Triton decode kernels run with


def enabled() -> bool:
    """KIMI_LOCAL_MOE_GLUON (default on): "0" keeps the Triton gate/up kernel (A/B runs). KIMI_LOCAL_MOE_GLUON_NS / _W:
    ring stages / warps per CTA; KIMI_LOCAL_MOE_GLUON_CARVEOUT: the kernel's preferred shared-memory carveout in
    percent (0: the driver's choice)."""
    return HAVE_GLUON and os.environ.get("KIMI_LOCAL_MOE_GLUON", "1") != "0"


def supported(device, qg, qu, qsg, qsu, D: int, F: int) -> bool:
    """The Gluon gate/up applies: Gluon, a Hopper GPU, gate and up of one type in GLUON_QTYPES (routed and shared
    each), D a multiple of 256, F a multiple of 16."""
    dev = torch.device(device)
    return (HAVE_GLUON and dev.type == "cuda" and qg == qu and qsg == qsu and qg in GLUON_QTYPES
            and qsg in GLUON_QTYPES and D % 256 == 0 and F % BF == 0
            and torch.cuda.get_device_capability(dev)[0] == 9)


if HAVE_GLUON:

    @gluon.jit
    def _gdc_wait():
        gl.inline_asm_elementwise("griddepcontrol.wait; // dummy $0", "=r", [], dtype=gl.int32, is_pure=False,
                                  pack=1)

    @gluon.jit
    def _gdc_launch_dependents():
        gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // dummy $0", "=r", [], dtype=gl.int32,
                                  is_pure=False, pack=1)

    @gluon.jit
    def _dp4a(a, b):
        return gl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, gl.zeros_like(a)],
                                         dtype=gl.int32, is_pure=True, pack=1)

    @gluon.jit
    def _h16(v):
        """fp16 bits (the low 16 bits of an int32) -> fp32."""
        return (v & 0xFFFF).to(gl.uint16).to(gl.float16, bitcast=True).to(gl.float32)

    @gluon.jit
    def _idx(L3: gl.constexpr):
        """Index tensors r [16, 1, 1], c [1, 8, 1], ii [1, 1, 4] of the stage tile's layout, and r2 [16, 1], c2 [1, 8]
        of its [16, 8] slice."""
        L2: gl.constexpr = gl.SliceLayout(2, L3)
        r = gl.arange(0, 16, layout=gl.SliceLayout(1, L2))
        c = gl.arange(0, 8, layout=gl.SliceLayout(0, L2))
        ii = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, L3)))
        return (gl.expand_dims(gl.expand_dims(r, 1), 2), gl.expand_dims(gl.expand_dims(c, 0), 2),
                gl.expand_dims(gl.expand_dims(ii, 0), 1), gl.expand_dims(r, 1), gl.expand_dims(c, 0))

    @gluon.jit
    def _issue(qr, sr0, sr1, sr2, i, w, blk, f0, F: gl.constexpr, D: gl.constexpr, QT: gl.constexpr,
               L3: gl.constexpr):
        """Copies of block column blk (8 chunks of every row) of the matrix at w, rows f0 .. f0 + 15, into ring slot i:
        the chunks [16, 8, 4] and the words of their scales (Q4_K: sub-scale, min, d / dmin words; Q8_0: d words)."""
        r3, c3, i3, r2, c2 = _idx(L3)
        CPR: gl.constexpr = D // 32 if QT == 3 else D // 16  # 16-byte chunks per row
        _async_load(qr.index(i), w.to(gl.pointer_type(gl.int32)) + ((f0 + r3) * CPR + blk * 8 + c3) * 4 + i3)
        if QT == 3:  # Q4_K planes: qs 128, sc 8, m 8, dd 4 bytes per block (quant_matmul.repack)
            NB: gl.constexpr = D // 256
            NBT: gl.constexpr = F * NB
            rb = (f0 + r2) * NB + blk
            jw = (c2 // 2) // 2  # the word of the sub-scale pair c // 2
            _async_load(sr0.index(i), (w + NBT * 128).to(gl.pointer_type(gl.int32)) + rb * 2 + jw)
            _async_load(sr1.index(i), (w + NBT * 136).to(gl.pointer_type(gl.int32)) + rb * 2 + jw)
            _async_load(sr2.index(i), (w + NBT * 144).to(gl.pointer_type(gl.int32)) + rb + c2 * 0)
        else:  # Q8_0: qs [F, D] int8, then d [F, D / 32] fp16
            _async_load(sr0.index(i), (w + F * D).to(gl.pointer_type(gl.int32))
                        + ((f0 + r2) * (D // 32) + blk * 4 + c2 // 2) // 2)

    @gluon.jit
    def _issue_stage(qr, sr0, sr1, sr2, t, wg, wu, f0, F: gl.constexpr, D: gl.constexpr, QT: gl.constexpr,
                     NS: gl.constexpr, L3: gl.constexpr):
        """Stage t of the CTA (gate's block columns, then up's; none past the last) into slot t % NS, as a group."""
        SPM: gl.constexpr = D // 256 if QT == 3 else D // 128  # stages per matrix
        if t < SPM:
            _issue(qr, sr0, sr1, sr2, t % NS, wg, t, f0, F, D, QT, L3)
        elif t < 2 * SPM:
            _issue(qr, sr0, sr1, sr2, t % NS, wu, t - SPM, f0, F, D, QT, L3)
        cp.commit_group()

    @gluon.jit
    def _stage_dot(qr, sr0, sr1, sr2, i, blk, xw, dxp, sqp, QT: gl.constexpr, L3: gl.constexpr):
        """[16, 8] fp32: each thread's chunk of block column blk (in ring slot i) times x (the x8 word path's sums)."""
        r3, c3, i3, r2, c2 = _idx(L3)
        L2: gl.constexpr = gl.SliceLayout(2, L3)
        q = qr.index(i).load(L3)  # [16, 8, 4] int32
        if QT == 3:
            # chunk c of block blk: 16 low nibbles = x group gl, 16 high nibbles = group gl + 2 (_i8dot_q45k)
            g3 = 2 * (blk * 8 + c3) - c3 % 2
            g2 = 2 * (blk * 8 + c2) - c2 % 2
            x_lo = gl.load(xw + g3 * 4 + i3)  # [1, 8, 4]: once per thread, whatever its rows
            x_hi = gl.load(xw + (g3 + 2) * 4 + i3)
            i_lo = gl.sum(_dp4a(q & 0x0F0F0F0F, x_lo), axis=2).to(gl.float32)
            i_hi = gl.sum(_dp4a((q >> 4) & 0x0F0F0F0F, x_hi), axis=2).to(gl.float32)
            sh = 16 * ((c2 // 2) % 2)
            scp = (sr0.index(i).load(L2) >> sh) & 0xFFFF
            mp = (sr1.index(i).load(L2) >> sh) & 0xFFFF
            dd = sr2.index(i).load(L2)
            s_lo = (scp & 0xFF).to(gl.float32) * gl.load(dxp + g2) * i_lo
            s_hi = (scp >> 8).to(gl.float32) * gl.load(dxp + g2 + 2) * i_hi
            m_lo = (mp & 0xFF).to(gl.float32) * gl.load(sqp + g2)
            m_hi = (mp >> 8).to(gl.float32) * gl.load(sqp + g2 + 2)
            part = _h16(dd) * (s_lo + s_hi) - _h16(dd >> 16) * (m_lo + m_hi)
        else:
            g3 = blk * 8 + c3
            g2 = blk * 8 + c2
            xg = gl.load(xw + g3 * 4 + i3)
            isum = gl.sum(_dp4a(q, xg), axis=2).to(gl.float32)
            dw = sr0.index(i).load(L2) >> (16 * ((g2 // 2) % 2))
            part = _h16(dw) * gl.load(dxp + g2) * isum
        return part

    @gluon.jit
    def _prologue(qr, sr0, sr1, sr2, wg, wu, f0, F: gl.constexpr, D: gl.constexpr, QT: gl.constexpr,
                  NS: gl.constexpr, L3: gl.constexpr):
        for t in gl.static_range(NS - 1):
            _issue_stage(qr, sr0, sr1, sr2, t, wg, wu, f0, F, D, QT, NS, L3)

    @gluon.jit
    def _matrix(qr, sr0, sr1, sr2, t0, wg, wu, f0, xw, dxp, sqp, F: gl.constexpr, D: gl.constexpr, QT: gl.constexpr,
                NS: gl.constexpr, L3: gl.constexpr):
        """[16] fp32: the rows' dot products over stages t0 .. t0 + SPM - 1 (one matrix), issuing NS - 1 stages ahead.
        A loop, not unrolled: unrolled, ptxas hoists the x loads of many stages (146 registers offline)."""
        SPM: gl.constexpr = D // 256 if QT == 3 else D // 128
        acc = gl.zeros([16, 8], gl.float32, layout=gl.SliceLayout(2, L3))
        for t in range(t0, t0 + SPM):
            _issue_stage(qr, sr0, sr1, sr2, t + NS - 1, wg, wu, f0, F, D, QT, NS, L3)
            cp.wait_group(NS - 1)  # stage t has landed; the NS - 1 newer ones may still be in flight
            acc += _stage_dot(qr, sr0, sr1, sr2, t % NS, t - t0, xw, dxp, sqp, QT, L3)
        return gl.sum(acc, axis=1)

    @gluon.jit
    def _gate_up(qr, sr0, sr1, sr2, wg, wu, f0, xw, dxp, sqp, F: gl.constexpr, D: gl.constexpr, QT: gl.constexpr,
                 NS: gl.constexpr, L3: gl.constexpr):
        """(gate, up) [16] fp32 of rows f0 .. f0 + 15 (after _prologue)."""
        SPM: gl.constexpr = D // 256 if QT == 3 else D // 128
        yg = _matrix(qr, sr0, sr1, sr2, 0, wg, wu, f0, xw, dxp, sqp, F, D, QT, NS, L3)
        yu = _matrix(qr, sr0, sr1, sr2, SPM, wg, wu, f0, xw, dxp, sqp, F, D, QT, NS, L3)
        cp.wait_group(0)
        return yg, yu

    @gluon.jit
    def _pick(logits, rbias, j, NR: gl.constexpr, W: gl.constexpr):
        """Expert id of pick j of the top-k over logits [NR] fp32 (+ rbias for the selection): j + 1 arg-max
        passes, ties to the lower index (moe._route_id). Every warp holds the whole row: reductions stay in a warp."""
        LR: gl.constexpr = gl.BlockedLayout([1, NR // 32], [1, 32], [W, 1], [1, 0])
        o = gl.expand_dims(gl.arange(0, NR, layout=gl.SliceLayout(0, LR)), 0)  # [1, NR]
        lg = gl.load(logits + o, cache_modifier=".cg")
        sel = 1.0 / (1.0 + gl.exp(-lg)) + gl.load(rbias + o)
        idx = gl.zeros([1], gl.int32, layout=gl.SliceLayout(1, LR))
        for p in range(j + 1):
            _, idx = gl.reduce((sel, o), 1, _max_idx)
            sel = gl.where(o == gl.expand_dims(idx, 1), float("-inf"), sel)
        return gl.max(idx, 0)

    @gluon.jit
    def _max_idx(v1, i1, v2, i2):
        take2 = (v2 > v1) | ((v2 == v1) & (i2 < i1))
        return gl.where(take2, v2, v1), gl.where(take2, i2, i1)

    @gluon.jit
    def _routed(qr, sr0, sr1, sr2, q, slot_ids, rbias, gate, up, mat_g, mat_u, xw, dxp, sqp, F: gl.constexpr,
                D: gl.constexpr, QT: gl.constexpr, ROUTE: gl.constexpr, NR: gl.constexpr, NS: gl.constexpr,
                PDL: gl.constexpr, L3: gl.constexpr, W: gl.constexpr):
        """Routed CTA q (pick e = q // (F / 16), f-tile q % (F / 16)): (gate, up, e, f0)."""
        NT: gl.constexpr = F // 16
        e = q // NT
        f0 = (q % NT) * 16
        if PDL:
            _gdc_wait()
            _gdc_launch_dependents()
        if ROUTE:
            slot = _pick(slot_ids, rbias, e, NR, W).to(gl.int64)
        else:
            slot = gl.load(slot_ids + e).to(gl.int64)
        wg = gate + slot * mat_g
        wu = up + slot * mat_u
        _prologue(qr, sr0, sr1, sr2, wg, wu, f0, F, D, QT, NS, L3)
        yg, yu = _gate_up(qr, sr0, sr1, sr2, wg, wu, f0, xw, dxp, sqp, F, D, QT, NS, L3)
        return yg, yu, e, f0

    @gluon.jit
    def moe_gate_up_gluon_kernel(x8, slot_ids, rbias, gate, up, sgate, sup, act, mat_g, mat_u,
                                 F: gl.constexpr, D: gl.constexpr, KTOP: gl.constexpr, QT: gl.constexpr,
                                 QTS: gl.constexpr, HAS_SHARED: gl.constexpr, ROUTE: gl.constexpr,
                                 NR: gl.constexpr, NS: gl.constexpr, PDL: gl.constexpr, W: gl.constexpr):
        """Grid (F / 16 * (KTOP + HAS_SHARED),): the shared expert's f-tiles first, then pick j's. x8: the x8 buffer of
        x [D]; act: [KTOP + 1, x8_words(F)] int32 (the shared expert's row is KTOP, as in moe.py)."""
        # W warps; thread (lane // 8, lane % 8) of warp w: rows RPT * (4 * w + lane // 8) + 0 .. RPT - 1, chunk lane % 8
        L3: gl.constexpr = gl.BlockedLayout([16 // (4 * W), 1, 4], [4, 8, 1], [W, 1, 1], [2, 1, 0])
        SL3: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [2, 1, 0])  # per ring slot (the leading dim)
        SL4: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
        NT: gl.constexpr = F // 16
        pid = gl.program_id(0)
        qr = gl.allocate_shared_memory(gl.int32, [NS, 16, 8, 4], SL3)
        sr0 = gl.allocate_shared_memory(gl.int32, [NS, 16, 8], SL4)  # Q4_K sub-scale words (Q8_0: d words)
        sr1 = gl.allocate_shared_memory(gl.int32, [NS, 16, 8], SL4)  # Q4_K min words
        sr2 = gl.allocate_shared_memory(gl.int32, [NS, 16, 8], SL4)  # Q4_K d / dmin words
        xw = x8
        dxp = (x8 + D // 4).to(gl.pointer_type(gl.float32))
        sqp = dxp + D // 16
        if HAS_SHARED:
            if pid < NT:  # the shared expert: only weights are read before the wait
                e = pid * 0 + KTOP
                f0 = pid * 16
                _prologue(qr, sr0, sr1, sr2, sgate, sup, f0, F, D, QTS, NS, L3)
                if PDL:
                    _gdc_wait()
                    _gdc_launch_dependents()
                yg, yu = _gate_up(qr, sr0, sr1, sr2, sgate, sup, f0, xw, dxp, sqp, F, D, QTS, NS, L3)
            else:
                yg, yu, e, f0 = _routed(qr, sr0, sr1, sr2, pid - NT, slot_ids, rbias, gate, up, mat_g, mat_u, xw, dxp,
                                        sqp, F, D, QT, ROUTE, NR, NS, PDL, L3, W)
        else:
            yg, yu, e, f0 = _routed(qr, sr0, sr1, sr2, pid, slot_ids, rbias, gate, up, mat_g, mat_u, xw, dxp, sqp,
                                    F, D, QT, ROUTE, NR, NS, PDL, L3, W)
        # act = silu(gate) * up of the 16 rows, as one x8 group (quant_matmul._x8_quant)
        h = yg / (1.0 + gl.exp(-yg)) * yu
        amax = gl.max(gl.abs(h), 0)
        inv = gl.where(amax > 0, 127.0 / gl.maximum(amax, 1e-30), 0.0)
        qv = gl.floor(h * inv + 0.5)
        dx = amax / 127.0
        sq = dx * gl.sum(qv, 0)
        o = gl.arange(0, 16, layout=gl.SliceLayout(1, gl.SliceLayout(2, L3)))
        b = (qv.to(gl.int32) & 0xFF) << (8 * (o % 4))
        a_e = act + e * (F // 4 + F // 8)
        g = f0 // 16
        for wd in gl.static_range(4):
            gl.store(a_e + g * 4 + wd, gl.sum(gl.where(o // 4 == wd, b, 0), 0))
        fa = (a_e + F // 4).to(gl.pointer_type(gl.float32))
        gl.store(fa + g, dx)
        gl.store(fa + F // 16 + g, sq)


def gate_up(x8, slot_ids, rbias, gate_pool, up_pool, shared, act, D: int, qt: str, qts: str | None, ktop: int,
            route: bool, pdl_on: bool, NS: int | None = None):
    """Launch the Gluon gate/up kernel (see the module doc): x8 [x8_words(D)] int32; slot_ids [ktop] int32, or with
    route the router's logits [NR] fp32 (rbias [NR] the selection bias); pools uint8 [S, F, row bytes]; shared
    (gate, up) packed or None; act int32 [ktop + 1, x8_words(F)] (written). Graph-capturable."""
    F = gate_pool.shape[1]
    has_shared = shared is not None
    sg, su = shared if has_shared else (gate_pool[0], up_pool[0])
    nr = slot_ids.numel() if route else 32
    if route:
        assert nr >= 32 and (nr & (nr - 1)) == 0, "the Gluon gate/up routes over a power of 2 (>= 32) experts"
    grid = (F // BF * (ktop + int(has_shared)),)
    w = int(os.environ.get("KIMI_LOCAL_MOE_GLUON_W", DEFAULT_W))  # warps per CTA: 4, 2 or 1 (1, 2 or 4 rows per thread)
    k = moe_gate_up_gluon_kernel[grid](
        x8, slot_ids, rbias if route else slot_ids, gate_pool, up_pool, sg, su, act,
        gate_pool[0].numel(), up_pool[0].numel(), F=F, D=D, KTOP=ktop, QT=QT_ID[qt], QTS=QT_ID[qts or qt],
        HAS_SHARED=has_shared, ROUTE=bool(route), NR=nr,
        NS=NS or int(os.environ.get("KIMI_LOCAL_MOE_GLUON_NS", DEFAULT_NS)), PDL=bool(pdl_on), W=w, num_warps=w,
        **({"launch_pdl": True} if pdl_on else {}))
    if not carveout.percent():  # else every kernel already has the global carveout (kernels/carveout.py)
        carveout.set_kernel(k, int(os.environ.get("KIMI_LOCAL_MOE_GLUON_CARVEOUT", DEFAULT_CARVEOUT)))
    return act
