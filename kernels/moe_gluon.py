"""The MoE decode kernels in Gluon (sm_90), both halves: the word-path kernels of kernels/moe.py with cp.async copy
rings, for x8 activations. gate/up: Q4_K or Q8_0 experts (the Q4_K_M and Q4_K recipes); down: Q4_K, Q5_K or Q8_0
(also the Q3_K_M and Q6_K recipes' down). The default on Hopper; other types and GPUs keep the Triton kernels.

Why: the Triton gate/up kernel (1,728 one-warp programs: 16 rows x a third of D each, loads straight into
registers, split-K partials and an arrival counter) reads at 36 % of HBM bandwidth (17.4 us for 26.8 MB, H200,
session 11). scripts/bench_stream.py timed kernels that only read the same bytes: with that grid and direct loads
14.3 us; with a Gluon cp.async ring in this kernel's stage pattern (16 rows x 128 bytes per stage) 10.8 us, in the
same run. Loads into registers bound the bytes a warp keeps in flight by its registers; the ring keeps NS stages in
flight per CTA in shared memory.

Layout: a CTA owns 16 rows of one matrix pair (gate/up: an f-tile of one expert, gate and up over the whole of D, so
no partials and no counters) or of one down matrix (a d-tile of one expert over the whole of F). W warps; thread
(lane // 8, lane % 8) of warp w owns 16 / (4 W) rows and the 16-byte chunk lane % 8 of every stage. A stage is 8
chunks of every row: one K-quant block (256 weights), or 128 Q8_0 weights. The ring holds the main plane (qs); a
thread reads back exactly what it copied. The side words of its chunks (Q4_K / Q5_K: sub-scale, min and d / dmin
words, Q5_K's qh; Q8_0: d) are plain loads into registers issued a stage ahead of their use (_side_stage: the
matrix is selected, not branched on, so the loads' latency is waited for only at the use); the CTA's first step
bulk-prefetches those planes' rows into L2 (each plane's 16 rows are contiguous); the gate/up shared expert's CTAs
prefetch their main plane too, before their wait (SPF, see the end). KIMI_LOCAL_MOE_GLUON_SS=1 puts the gate/up side
words into rings of their own instead (session 11's kernel: 3.5 KB stages).
The arithmetic is the x8 word path's (quant_matmul._i8dot_q45k / _i8dot_q8_0): dp4a of the weight nibbles / bytes
with the x8 words, the group scales dx, the mins through sq. The 8 threads of a row sum their partials at the end.
Both kernels' stage loops are unrolled (DEFAULT_UNROLL, DOWN_UNROLL; session 20): the rolled loop's index and select
arithmetic goes (gate/up: 204 -> 134 instructions a stage, scripts/bench_moe_probe.py) and ptxas schedules the x and
side-word loads across stages (gate/up ~150 registers, 6 CTAs an SM; down ~96): 24.3 against 26.0 us a MoE call.
Session 21: the gate/up's stages alternate gate and up per block column (DEFAULT_PAIR), so a block's x words serve
both matrices (112 registers), and the down CTAs have one warp (DOWN_W: 4 rows a thread, so a thread's act words
serve 4 rows; 168 registers, 16 CTAs an SM by shared memory): 20.6 against 23.8 us a MoE call. Both kernels are
latency-bound, not issue-bound: chaining each thread's dp4a (-6 % instructions in the gate/up) was neutral.
gate/up: act = silu(gate) * up of the 16 rows is quantized to one x8 group as the Triton kernel's _act_store does;
the shared expert's CTAs come first and, with PDL, issue their first copies before the grid-dependency wait;
routed CTAs pick their expert from the router's logits (ROUTE) as moe._route_id does, or read slot_ids.
down: grid (expert, d-tile), the shared expert's first; every CTA issues its weight copies before the wait (a
routed CTA first picks its expert and weight from the logits, router._topk's rule: the logits are two launches
old); it stores its weighted rows as a partial, and the last of the d-tile's E CTAs to arrive (counter, re-armed
by it) sums the E partials in expert order and stores out (deterministic, as the Triton down kernel). With NORM
(the engine's KIMI_LOCAL_NORM_IN_DOWN=1) that last arrival instead adds the rows to the residual and writes the
tile's group of the next RMSNorm's normed x8 buffer (quant_matmul.NormedX8), in a [4 words, 4 bytes] layout of lanes:
its reductions are shuffles, no barrier (the 16-row layout's cross-warp reductions cost 0.8 us per call: -1.6 %
decode on an H200; this one +0.8 % on an H100 but still -1.0 % on an H200, docs/perf-notes.md session 15).
KIMI_LOCAL_NORM_PRE=2 (A/B) loads the residual and norm weight after the arrival instead of before it: -6.7 %.

The shared-memory carveout matters more than the kernel (H200, session 11, interleaved engine A/B, tok/s at 4K):
an SM changes its L1 / shared split only when idle, and the Triton kernels around this one (router, GEMVs) run in
the 64 KB configuration. Left to the driver, the first gate/up kernel asked for ~200 KB (its occupancy limit), so
under PDL it could not overlap its neighbours: 515 vs 558 tok/s for the Triton kernel, although alone it was as
fast (no PDL: 530 vs 532). Both kernels pin their carveout to 64 KB (DEFAULT_CARVEOUT) and size their rings to be
resident in it: gate/up 5 CTAs per SM (>= 576 / 132). Session 12 (kernels/carveout.py) tried the other way, every
kernel pinned to 228 KB so that the rings could be deeper: -9 % end to end with the same rings (525 vs 580), 567
with 8 stages: the Triton kernels lose more than the rings gain.
Ring depths, rolled stage loops (H200, session 12, interleaved engine A/B, tok/s at 4K; session 20 unrolled the
loops, whose kernels are best with 5 gate/up and 2 down stages: DEFAULT_NS, DOWN_NS): the down kernel was best with
ONE stage per CTA (589.4, against 555.3 with 2 stages, 561.0 with 3, 531.2 with 5, and 577.5 for the Triton down
kernel), although alone 2 stages are faster (9.86 vs 10.09 us; 3 stages 10.13, 5 stages 12.2, Triton 11.4): under
PDL what counts is how many down CTAs are resident (2 KB + 1 KB each) while gate/up's last CTAs and the next
kernel's first run. Without the L2 prefetch of the side planes 565.7. gate/up: side words in registers with 4 stages
of 2 KB 597.8 against 590.7 for session 11's 3.5 KB stages x 3 (alone 16.3 vs 17.0 us; Triton 17.4); 5 stages
17.9 us alone.
L2 prefetch of the main plane (session 13, H200, interleaved, tok/s at 4K): the gate/up shared expert's CTAs
bulk-prefetch their rows' main plane too (SPF = 2) before the wait, i.e. while the router runs: 616.8 against 598.2
with the side planes only. The same prefetch by the routed CTAs (PF = 2, after their routing) is slower alone (18.1
vs 16.3 us) and at best neutral end to end (620.1 with it off, 616.8 on); so is any extra prefetch in the down
kernel: its main plane before the wait 553.0 (it competes with gate/up), after the wait 613.6, by the shared down
CTAs before the wait 561.1, each gate/up CTA prefetching its share of the down rows at its end 611.4 (vs 616.9).
Fewer registers for more resident down CTAs (ptxas maxnreg 64 / 80, no spills offline) lost too: 567.7 / 585.8 vs
599.5.
"""
from __future__ import annotations

import os

import torch

from . import carveout
from .gluon_compat import HAVE_GLUON, _async_load, _barrier, cp, gl, gluon  # noqa: F401
from .gluon_compat import _gdc_launch_dependents, _gdc_wait  # noqa: F401
from .quant_matmul import QT_ID

GLUON_QTYPES = ("Q4_K", "Q8_0")
DOWN_QTYPES = ("Q4_K", "Q5_K", "Q8_0")
DOWN_MAX_F = 2048
BF = 16  # rows per CTA: one x8 group of act
DEFAULT_PF = 1  # gate/up routed CTAs: L2 prefetch of the side planes of the CTA's rows (2: also the main plane)
DEFAULT_SPF = 2  # gate/up shared-expert CTAs: side and main planes, before the wait (module doc, session 13)
DEFAULT_NS = 5  # gate/up ring stages of 2 KB (side words in registers): 5 CTAs x (10 + 1) KB per SM, see the module doc
SS_NS = 3  # with KIMI_LOCAL_MOE_GLUON_SS=1 (side words through the ring, session 11): stages of 3.5 KB
DOWN_NS = 2  # down: 2 KB stages in flight per CTA, many CTAs resident (see the module doc)
# Stage loops unrolled, the side words this many stages ahead (0: a rolled loop, the side words a stage ahead). H200,
# session 20, bench_moe_decode (us a call) / engine (tok/s at 4K, 128K), all rolled: 25.76 / 624.0, 539.6; gate/up
# only: 25.27; down only: 25.71 / 625.1, 540.8; both: 24.28 / 631.7, 544.7. Gate/up 2-9 stages ahead: slower; down 2
# stages ahead: 26.84 / 595.2, 517.0. Unrolled, deeper rings pay (run 6: 4 / 1 stages 24.30 / 631.2, 544.6; down 2
# stages 23.82 / 632.9, 545.7; and gate/up 5 stages 23.64 / 634.4, 547.3), where rolled they had lost (module doc).
DEFAULT_UNROLL = 1
DOWN_UNROLL = 1
# Gate/up (unrolled): its stages alternate between gate and up per block column, so each block's x words are loaded
# once for both (364 -> 274 LDG offline). H200, session 21: 23.82 -> 21.66 us a MoE call (bench_moe_decode), engine
# 632.3 -> 645.7 tok/s at 4K, 545.2 -> 555.2 at 128K. KIMI_LOCAL_MOE_GLUON_PAIR=0: gate's block columns, then up's.
# (A register ring without shared memory or barriers lost: 25.52 us, with PAIR 27.75; the down kernel's: 23.85 us,
# neutral; experiment d6b86fd.)
DEFAULT_PAIR = 1
DEFAULT_W = 2
# Down CTAs of 1 warp (4 rows a thread; KIMI_LOCAL_MOE_GLUON_DOWN_W): H200, session 21: 21.67 -> 20.62 us a MoE call,
# engine 645.8 -> 666.1 tok/s at 4K, 556.0 -> 570.7 at 128K (4 warps: 28.55 us)
DOWN_W = 1
DEFAULT_CARVEOUT = 28  # percent of 228 KB: the 64 KB configuration the Triton decode kernels run with


def enabled() -> bool:
    """KIMI_LOCAL_MOE_GLUON (default on): "0" keeps the Triton kernels of both halves (A/B runs). Knobs for A/B runs:
    gate/up KIMI_LOCAL_MOE_GLUON_NS / _W (ring stages / warps per CTA), _SS=1 (side words through the ring, session
    11's kernel), _PF / _SPF: the L2 prefetch of the routed / the shared expert's CTAs (0: none, 1: the side planes,
    2: also the main plane), _UNROLL (DEFAULT_UNROLL), _PAIR (DEFAULT_PAIR); down KIMI_LOCAL_MOE_GLUON_DOWN=0 (Triton
    down kernel), _DOWN_NS / _DOWN_W, _DOWN_PF (as _PF), _DOWN_UNROLL (DOWN_UNROLL); KIMI_LOCAL_MOE_GLUON_CARVEOUT:
    both kernels' preferred shared-memory carveout in percent (0: the driver's choice)."""
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
    def _issue(qr, sr0, sr1, sr2, i, w, blk, f0, N: gl.constexpr, K: gl.constexpr, QT: gl.constexpr,
               SS: gl.constexpr, L3: gl.constexpr, KR: gl.constexpr = 0):
        """cp.async of block column blk of the main plane (Q4_K / Q5_K qs: 8 chunks = one block; Q8_0: 128 weights)
        of rows f0 .. f0 + 15 of the packed matrix at w (rows of K values; KR > 0: of KR values, a matrix whose
        columns the caller walks in slices of K) into ring slot i [16, 8, 4] int32; SS (Q4_K / Q8_0): also each
        thread's side words (_side's s0 .. s2, 4-byte copies) into slot i of sr0 .. sr2."""
        r3, c3, i3, r2, c2 = _idx(L3)
        KK: gl.constexpr = K if KR == 0 else KR
        CPR: gl.constexpr = KK // 16 if QT == 0 else KK // 32  # 16-byte chunks per row of the main plane
        w32 = w.to(gl.pointer_type(gl.int32))
        _async_load(qr.index(i), w32 + ((f0 + r3) * CPR + blk * 8 + c3) * 4 + i3)
        if SS:
            if QT == 0:
                _async_load(sr0.index(i), w32 + (N * KK) // 4 + ((f0 + r2) * (KK // 32) + blk * 4 + c2 // 2) // 2)
            else:
                NBT: gl.constexpr = N * (KK // 256)
                rb = (f0 + r2) * (KK // 256) + blk
                jw = (c2 // 2) // 2
                _async_load(sr0.index(i), w32 + NBT * 32 + rb * 2 + jw)
                _async_load(sr1.index(i), w32 + NBT * 34 + rb * 2 + jw)
                _async_load(sr2.index(i), w32 + NBT * 36 + rb + c2 * 0)

    @gluon.jit
    def _side(w, blk, f0, N: gl.constexpr, K: gl.constexpr, QT: gl.constexpr, L3: gl.constexpr, KR: gl.constexpr = 0):
        """The side words of block column blk, plain loads into registers (issued a stage before their use):
        (s0, s1, s2) [16, 8] and h [16, 8, 4] int32. Q4_K / Q5_K (quant_matmul.repack planes: qs 128, [qh 32,] sc 8,
        m 8, dd 4 bytes per block): the sub-scale word, the min word and the d / dmin word of each thread's chunk,
        and Q5_K's qh words (half c % 2 of the block's 32 qh bytes); Q8_0 (qs [N, K] int8, then d [N, K / 32] fp16):
        the d word (s1, s2, h unused). KR: as _issue."""
        r3, c3, i3, r2, c2 = _idx(L3)
        KK: gl.constexpr = K if KR == 0 else KR
        w32 = w.to(gl.pointer_type(gl.int32))
        if QT == 0:
            s0 = gl.load(w32 + (N * KK) // 4 + ((f0 + r2) * (KK // 32) + blk * 4 + c2 // 2) // 2)
            return s0, s0, s0, gl.zeros([16, 8, 4], gl.int32, layout=L3)
        else:
            NB: gl.constexpr = KK // 256
            NBT: gl.constexpr = N * NB
            P: gl.constexpr = 40 if QT == 2 else 32  # words per block before the scale planes
            rb = (f0 + r2) * NB + blk
            jw = (c2 // 2) // 2  # the word of sub-scale pair c // 2
            s0 = gl.load(w32 + NBT * P + rb * 2 + jw)
            s1 = gl.load(w32 + NBT * (P + 2) + rb * 2 + jw)
            s2 = gl.load(w32 + NBT * (P + 4) + rb + c2 * 0)
            if QT == 2:
                h = gl.load(w32 + NBT * 32 + ((f0 + r3) * NB + blk) * 8 + 4 * (c3 % 2) + i3)
            else:
                h = gl.zeros([16, 8, 4], gl.int32, layout=L3)
            return s0, s1, s2, h

    @gluon.jit
    def _bulk_prefetch(ptr, nbytes, on):
        gl.inline_asm_elementwise(
            "{\n .reg .pred p;\n setp.ne.s32 p, $3, 0;\n"
            " @p cp.async.bulk.prefetch.L2.global [$1], $2;\n mov.u32 $0, 0;\n}",
            "=r,l,r,r", [ptr, nbytes, on], dtype=gl.int32, is_pure=False, pack=1)

    @gluon.jit
    def _prefetch_side(wa, wb, NM: gl.constexpr, f0, N: gl.constexpr, K: gl.constexpr, QT: gl.constexpr,
                       PF: gl.constexpr, W: gl.constexpr, KR: gl.constexpr = 0):
        """L2 prefetch (one bulk request per plane and matrix, from the first threads) of the side planes' bytes of
        rows f0 .. f0 + 15 of wa (and wb if NM == 2): each plane's rows are contiguous, so _side's loads hit L2.
        PF == 2: the main plane's rows too (plane 4), for the ring stages not yet issued. KR: as _issue (the whole
        rows)."""
        KK: gl.constexpr = K if KR == 0 else KR
        k = gl.arange(0, 32 * W, layout=gl.BlockedLayout([1], [32], [W], [0]))
        plane = k % 8
        mat = k // 8
        if QT == 0:
            off = gl.where(plane == 4, f0 * KK, N * KK + f0 * (KK // 16))
            size = gl.where(plane == 4, 16 * KK, 16 * (KK // 16))
            on = (mat < NM) & ((plane == 0) | ((plane == 4) & (PF == 2)))
        else:
            NB: gl.constexpr = KK // 256
            NBT: gl.constexpr = N * NB
            P: gl.constexpr = 160 if QT == 2 else 128
            off = gl.where(plane == 0, NBT * P + f0 * NB * 8,
                           gl.where(plane == 1, NBT * (P + 8) + f0 * NB * 8,
                                    gl.where(plane == 2, NBT * (P + 16) + f0 * NB * 4,
                                             gl.where(plane == 3, NBT * 128 + f0 * NB * 32, f0 * NB * 128))))
            size = gl.where(plane < 2, 16 * NB * 8,
                            gl.where(plane == 2, 16 * NB * 4, gl.where(plane == 3, 16 * NB * 32, 16 * NB * 128)))
            on = (mat < NM) & ((plane < 3) | ((plane == 3) & (QT == 2)) | ((plane == 4) & (PF == 2)))
        base = gl.where(mat == 0, wa + k * 0, wb + k * 0)
        _bulk_prefetch(base + off, size, on.to(gl.int32))

    @gluon.jit
    def _x_words(blk, xw, dxp, sqp, QT: gl.constexpr, L3: gl.constexpr):
        """The x8 words and group scales that each thread's chunk of block column blk multiplies (any matrix of the
        same K): Q8_0 (xg [1, 8, 4], dx [1, 8]); Q4_K / Q5_K (x_lo, x_hi [1, 8, 4], dx_lo, dx_hi, sq_lo, sq_hi [1, 8]:
        chunk c's 16 low nibbles take x group g, its 16 high nibbles group g + 2, quant_matmul._i8dot_q45k)."""
        r3, c3, i3, r2, c2 = _idx(L3)
        if QT == 0:
            g3 = blk * 8 + c3
            g2 = blk * 8 + c2
            return gl.load(xw + g3 * 4 + i3), gl.load(dxp + g2), c2, c2, c2, c2
        else:
            g3 = 2 * (blk * 8 + c3) - c3 % 2
            g2 = 2 * (blk * 8 + c2) - c2 % 2
            return (gl.load(xw + g3 * 4 + i3), gl.load(xw + (g3 + 2) * 4 + i3), gl.load(dxp + g2),
                    gl.load(dxp + g2 + 2), gl.load(sqp + g2), gl.load(sqp + g2 + 2))

    @gluon.jit
    def _dot_x(q, xs, s0, s1, s2, h, QT: gl.constexpr, L3: gl.constexpr):
        """[16, 8] fp32: each thread's chunk q [16, 8, 4] int32 (a ring slot's) times the x words xs
        (_x_words of its block column), with the side words s0 .. h (_side), as the x8 word path computes it
        (quant_matmul._i8dot_q45k / _i8dot_q8_0)."""
        r3, c3, i3, r2, c2 = _idx(L3)
        if QT == 0:
            xg, dx = xs[0], xs[1]
            isum = gl.sum(_dp4a(q, xg), axis=2).to(gl.float32)
            dw = s0 >> (16 * ((c2 // 2) % 2))  # group blk * 8 + c: its d is half (c // 2) % 2 of the word
            part = _h16(dw) * dx * isum
        else:
            x_lo, x_hi, dx_lo, dx_hi, sq_lo, sq_hi = xs[0], xs[1], xs[2], xs[3], xs[4], xs[5]
            v_lo = q & 0x0F0F0F0F
            v_hi = (q >> 4) & 0x0F0F0F0F
            if QT == 2:  # Q5_K: the 5th bits of sub-blocks 2j, 2j + 1 (j = c // 2) at bit 4 of every byte
                hs = h >> (2 * (c3 // 2))
                v_lo = v_lo | ((hs << 4) & 0x10101010)
                v_hi = v_hi | ((hs << 3) & 0x10101010)
            i_lo = gl.sum(_dp4a(v_lo, x_lo), axis=2).to(gl.float32)
            i_hi = gl.sum(_dp4a(v_hi, x_hi), axis=2).to(gl.float32)
            sh = 16 * ((c2 // 2) % 2)
            scp = (s0 >> sh) & 0xFFFF
            mp = (s1 >> sh) & 0xFFFF
            s_lo = (scp & 0xFF).to(gl.float32) * dx_lo * i_lo
            s_hi = (scp >> 8).to(gl.float32) * dx_hi * i_hi
            m_lo = (mp & 0xFF).to(gl.float32) * sq_lo
            m_hi = (mp >> 8).to(gl.float32) * sq_hi
            part = _h16(s2) * (s_lo + s_hi) - _h16(s2 >> 16) * (m_lo + m_hi)
        return part

    @gluon.jit
    def _stage_dot(qr, i, blk, xw, dxp, sqp, s0, s1, s2, h, QT: gl.constexpr, L3: gl.constexpr):
        """[16, 8] fp32: each thread's chunk of block column blk (ring slot i; side words s0 .. h from _side) times
        x."""
        q = qr.index(i).load(L3)  # [16, 8, 4] int32
        return _dot_x(q, _x_words(blk, xw, dxp, sqp, QT, L3), s0, s1, s2, h, QT, L3)

    @gluon.jit
    def _issue_stage(qr, sr0, sr1, sr2, t, wa, wb, NM: gl.constexpr, f0, N: gl.constexpr, K: gl.constexpr,
                     QT: gl.constexpr, NS: gl.constexpr, SS: gl.constexpr, L3: gl.constexpr,
                     PAIR: gl.constexpr = False, B0=0, KR: gl.constexpr = 0):
        """Stage t of the CTA (wa's block columns, then wb's if NM == 2; none past the last) into slot t % NS, as
        one commit group (empty past the last stage, so that wait_group counts stay the same). PAIR (t a constant,
        NM == 2): block column t // 2 of wa (t even) or wb (t odd) instead. NM == 1 with KR (a slice of K of rows
        of KR values): block columns B0 + t."""
        SPM: gl.constexpr = K // 128 if QT == 0 else K // 256  # stages per matrix
        if PAIR:
            if t < NM * SPM:
                if t % 2 == 0:
                    _issue(qr, sr0, sr1, sr2, t % NS, wa, t // 2, f0, N, K, QT, SS, L3)
                else:
                    _issue(qr, sr0, sr1, sr2, t % NS, wb, t // 2, f0, N, K, QT, SS, L3)
        elif t < SPM:
            _issue(qr, sr0, sr1, sr2, t % NS, wa, t + B0, f0, N, K, QT, SS, L3, KR)
        elif t < NM * SPM:
            _issue(qr, sr0, sr1, sr2, t % NS, wb, t - SPM, f0, N, K, QT, SS, L3)
        cp.commit_group()

    @gluon.jit
    def _side_stage(t, wa, wb, f0, N: gl.constexpr, K: gl.constexpr, QT: gl.constexpr, L3: gl.constexpr,
                    PAIR: gl.constexpr = False, B0=0, KR: gl.constexpr = 0):
        """_side of stage t (wa's block columns, then wb's; PAIR, B0, KR: as _issue_stage): the matrix is selected,
        not branched on, so the loads stay outside any branch (their latency is waited for at the use, a stage
        later)."""
        SPM: gl.constexpr = K // 128 if QT == 0 else K // 256  # stages per matrix
        if PAIR:
            return _side(wa if t % 2 == 0 else wb, t // 2, f0, N, K, QT, L3)
        second = t >= SPM
        return _side(gl.where(second, wb, wa), t - second.to(gl.int32) * SPM + B0, f0, N, K, QT, L3, KR)

    @gluon.jit
    def _prologue(qr, sr0, sr1, sr2, wa, wb, NM: gl.constexpr, f0, N: gl.constexpr, K: gl.constexpr,
                  QT: gl.constexpr, NS: gl.constexpr, SS: gl.constexpr, PF: gl.constexpr, L3: gl.constexpr,
                  W: gl.constexpr, PAIR: gl.constexpr = False, B0=0, KR: gl.constexpr = 0):
        """Weights only (safe before the PDL wait): the side planes into L2 (PF), the first NS - 1 ring stages. B0,
        KR: as _issue_stage."""
        if PF:
            _prefetch_side(wa, wb, NM, f0, N, K, QT, PF, W, KR)
        for t in gl.static_range(NS - 1):
            _issue_stage(qr, sr0, sr1, sr2, t, wa, wb, NM, f0, N, K, QT, NS, SS, L3, PAIR, B0, KR)

    @gluon.jit
    def _accumulate(acc_a, acc_b, part, t, SPM: gl.constexpr, NM: gl.constexpr, PAIR: gl.constexpr = False):
        """Stage t's products into matrix a's accumulator (t < SPM, or NM == 1; PAIR: t even) or matrix b's."""
        if PAIR:
            if t % 2 == 0:
                return acc_a + part, acc_b
            return acc_a, acc_b + part
        if NM == 2:
            first = t < SPM
            return acc_a + gl.where(first, part, 0.0), acc_b + gl.where(first, 0.0, part)
        return acc_a + part, acc_b

    @gluon.jit
    def _stream(qr, sr0, sr1, sr2, wa, wb, NM: gl.constexpr, f0, xw, dxp, sqp, N: gl.constexpr, K: gl.constexpr,
                QT: gl.constexpr, NS: gl.constexpr, SS: gl.constexpr, L3: gl.constexpr, UNROLL: gl.constexpr,
                PAIR: gl.constexpr, B0=0, KR: gl.constexpr = 0):
        """(ya, yb) [16] fp32: rows f0 .. f0 + 15 of wa (and wb if NM == 2; else yb = 0) times x, after _prologue.
        Each step issues the stage NS - 1 ahead into the ring; the side words come with it (SS) or are loaded into
        registers a stage ahead (not SS). UNROLL > 0 (not SS): the stage loop unrolled, the side words UNROLL stages
        ahead (unrolled, ptxas hoists the x loads of later stages: more registers; scripts/bench_moe_probe.py).
        PAIR (UNROLL, NM == 2; after _prologue with PAIR): the stages alternate between wa and wb per block column,
        and the block's x words are loaded once for both matrices. B0, KR (NM == 1, not SS; after _prologue with
        them): block columns B0 .. B0 + K / block - 1 of rows of KR values (x words of those columns: xw, dxp, sqp
        are the whole row's)."""
        SPM: gl.constexpr = K // 128 if QT == 0 else K // 256  # stages per matrix
        T: gl.constexpr = NM * SPM
        L2: gl.constexpr = gl.SliceLayout(2, L3)
        acc_a = gl.zeros([16, 8], gl.float32, layout=L2)
        acc_b = gl.zeros([16, 8], gl.float32, layout=L2)
        if SS:
            hz = gl.zeros([16, 8, 4], gl.int32, layout=L3)
            for t in range(T):
                _issue_stage(qr, sr0, sr1, sr2, t + NS - 1, wa, wb, NM, f0, N, K, QT, NS, SS, L3)
                cp.wait_group(NS - 1)  # stage t has landed; the NS - 1 newer ones may still be in flight
                i = t % NS
                part = _stage_dot(qr, i, t % SPM, xw, dxp, sqp, sr0.index(i).load(L2), sr1.index(i).load(L2),
                                  sr2.index(i).load(L2), hz, QT, L3)
                acc_a, acc_b = _accumulate(acc_a, acc_b, part, t, SPM, NM)
        else:
            if UNROLL:  # side words UNROLL stages ahead, held as a flat tuple (4 per stage)
                sides = ()
                for u in gl.static_range(UNROLL):
                    if u < T:
                        sides = sides + _side_stage(u, wa, wb, f0, N, K, QT, L3, PAIR, B0, KR)
                for t in gl.static_range(T):
                    _issue_stage(qr, sr0, sr1, sr2, t + NS - 1, wa, wb, NM, f0, N, K, QT, NS, SS, L3, PAIR, B0, KR)
                    if t + UNROLL < T:
                        sides = sides + _side_stage(t + UNROLL, wa, wb, f0, N, K, QT, L3, PAIR, B0, KR)
                    if PAIR:
                        if t % 2 == 0:  # block column t // 2 of both matrices: one load of its x words
                            xs = _x_words(t // 2, xw, dxp, sqp, QT, L3)
                        cp.wait_group(NS - 1)
                        part = _dot_x(qr.index(t % NS).load(L3), xs, sides[4 * t], sides[4 * t + 1], sides[4 * t + 2],
                                      sides[4 * t + 3], QT, L3)
                    else:  # x loaded after the wait, as measured (loading it before, as PAIR does, changes the SASS)
                        cp.wait_group(NS - 1)
                        part = _stage_dot(qr, t % NS, t % SPM + B0, xw, dxp, sqp, sides[4 * t], sides[4 * t + 1],
                                          sides[4 * t + 2], sides[4 * t + 3], QT, L3)
                    acc_a, acc_b = _accumulate(acc_a, acc_b, part, t, SPM, NM, PAIR)
            else:
                s0, s1, s2, h = _side_stage(0, wa, wb, f0, N, K, QT, L3, False, B0, KR)
                for t in range(T):
                    _issue_stage(qr, sr0, sr1, sr2, t + NS - 1, wa, wb, NM, f0, N, K, QT, NS, SS, L3, False, B0, KR)
                    n0, n1, n2, nh = _side_stage(gl.minimum(t + 1, T - 1), wa, wb, f0, N, K, QT, L3, False, B0, KR)
                    cp.wait_group(NS - 1)
                    part = _stage_dot(qr, t % NS, t % SPM + B0, xw, dxp, sqp, s0, s1, s2, h, QT, L3)
                    acc_a, acc_b = _accumulate(acc_a, acc_b, part, t, SPM, NM)
                    s0, s1, s2, h = n0, n1, n2, nh
        cp.wait_group(0)
        return gl.sum(acc_a, axis=1), gl.sum(acc_b, axis=1)

    @gluon.jit
    def _max_idx(v1, i1, v2, i2):
        take2 = (v2 > v1) | ((v2 == v1) & (i2 < i1))
        return gl.where(take2, v2, v1), gl.where(take2, i2, i1)

    @gluon.jit
    def _max_carry(v1, i1, w1, v2, i2, w2):
        take2 = (v2 > v1) | ((v2 == v1) & (i2 < i1))
        return gl.where(take2, v2, v1), gl.where(take2, i2, i1), gl.where(take2, w2, w1)

    @gluon.jit
    def _scores(logits, rbias, NR: gl.constexpr, W: gl.constexpr):
        """(o [1, NR], s = sigmoid(logits), selection scores s + rbias), every warp holding the whole row (reductions
        stay in a warp)."""
        LR: gl.constexpr = gl.BlockedLayout([1, NR // 32], [1, 32], [W, 1], [1, 0])
        o = gl.expand_dims(gl.arange(0, NR, layout=gl.SliceLayout(0, LR)), 0)
        s = 1.0 / (1.0 + gl.exp(-gl.load(logits + o, cache_modifier=".cg")))
        return o, s, s + gl.load(rbias + o)

    @gluon.jit
    def _pick(logits, rbias, j, NR: gl.constexpr, W: gl.constexpr):
        """Expert id of pick j of the top-k over logits [NR] fp32 (+ rbias for the selection): j + 1 arg-max
        passes, ties to the lower index (moe._route_id)."""
        o, _s, sel = _scores(logits, rbias, NR, W)
        idx = gl.zeros([1], gl.int32, layout=gl.SliceLayout(1, gl.BlockedLayout([1, NR // 32], [1, 32], [W, 1],
                                                                                 [1, 0])))
        for p in range(j + 1):
            _, idx = gl.reduce((sel, o), 1, _max_idx)
            sel = gl.where(o == gl.expand_dims(idx, 1), float("-inf"), sel)
        return gl.max(idx, 0)

    @gluon.jit
    def _pick_w(logits, rbias, j, rscale, NR: gl.constexpr, KTOP: gl.constexpr, BIASED: gl.constexpr,
                RENORM: gl.constexpr, W: gl.constexpr):
        """(expert id, routing weight) of pick j of the top-KTOP (router._topk: the weight is sigmoid(logit), or the
        selection score if BIASED, renormalised over the KTOP picks if RENORM, times rscale)."""
        o, s, sel = _scores(logits, rbias, NR, W)
        wv = sel if BIASED else s
        L1: gl.constexpr = gl.SliceLayout(1, gl.BlockedLayout([1, NR // 32], [1, 32], [W, 1], [1, 0]))
        idx_j = gl.zeros([1], gl.int32, layout=L1)
        w_j = gl.zeros([1], gl.float32, layout=L1)
        tot = gl.zeros([1], gl.float32, layout=L1)
        for p in gl.static_range(KTOP):
            _, idx, wp = gl.reduce((sel, o, wv), 1, _max_carry)
            idx_j = gl.where(j == p, idx, idx_j)
            w_j = gl.where(j == p, wp, w_j)
            tot += wp
            sel = gl.where(o == gl.expand_dims(idx, 1), float("-inf"), sel)
        if RENORM:
            w_j = w_j / (tot + 1e-20)
        return gl.max(idx_j, 0), gl.max(w_j * rscale, 0)

    @gluon.jit
    def _routed(qr, sr0, sr1, sr2, q, slot_ids, rbias, gate, up, mat_g, mat_u, xw, dxp, sqp, F: gl.constexpr,
                D: gl.constexpr, QT: gl.constexpr, ROUTE: gl.constexpr, NR: gl.constexpr, NS: gl.constexpr,
                PDL: gl.constexpr, SS: gl.constexpr, PF: gl.constexpr, L3: gl.constexpr, W: gl.constexpr,
                UNROLL: gl.constexpr, PAIR: gl.constexpr):
        """Routed gate/up CTA q (pick e = q // (F / 16), f-tile q % (F / 16)): (gate, up, e, f0)."""
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
        _prologue(qr, sr0, sr1, sr2, wg, wu, 2, f0, F, D, QT, NS, SS, PF, L3, W, PAIR)
        yg, yu = _stream(qr, sr0, sr1, sr2, wg, wu, 2, f0, xw, dxp, sqp, F, D, QT, NS, SS, L3, UNROLL, PAIR)
        return yg, yu, e, f0

    @gluon.jit
    def moe_gate_up_gluon_kernel(x8, slot_ids, rbias, gate, up, sgate, sup, act, mat_g, mat_u,
                                 F: gl.constexpr, D: gl.constexpr, KTOP: gl.constexpr, QT: gl.constexpr,
                                 QTS: gl.constexpr, HAS_SHARED: gl.constexpr, ROUTE: gl.constexpr,
                                 NR: gl.constexpr, NS: gl.constexpr, PDL: gl.constexpr, SS: gl.constexpr,
                                 PF: gl.constexpr, SPF: gl.constexpr, W: gl.constexpr, UNROLL: gl.constexpr,
                                 PAIR: gl.constexpr):
        """Grid (F / 16 * (KTOP + HAS_SHARED),): the shared expert's f-tiles first, then pick j's. x8: the x8 buffer of
        x [D]; act: [KTOP + 1, x8_words(F)] int32 (the shared expert's row is KTOP, as in moe.py). PF / SPF: the L2
        prefetch (_prefetch_side) of the routed / the shared expert's CTAs. UNROLL, PAIR: see _stream."""
        # W warps; thread (lane // 8, lane % 8) of warp w: rows RPT * (4 * w + lane // 8) + 0 .. RPT - 1, chunk lane % 8
        L3: gl.constexpr = gl.BlockedLayout([16 // (4 * W), 1, 4], [4, 8, 1], [W, 1, 1], [2, 1, 0])
        SL3: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [2, 1, 0])  # per ring slot (the leading dim)
        NT: gl.constexpr = F // 16
        pid = gl.program_id(0)
        qr = gl.allocate_shared_memory(gl.int32, [NS, 16, 8, 4], SL3)
        if SS:  # the side words' rings (Q4_K: sub-scale, min, d / dmin words; Q8_0: d words in sr0)
            SL2: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
            sr0 = gl.allocate_shared_memory(gl.int32, [NS, 16, 8], SL2)
            sr1 = gl.allocate_shared_memory(gl.int32, [NS, 16, 8], SL2)
            sr2 = gl.allocate_shared_memory(gl.int32, [NS, 16, 8], SL2)
        else:
            sr0 = qr
            sr1 = qr
            sr2 = qr
        xw = x8
        dxp = (x8 + D // 4).to(gl.pointer_type(gl.float32))
        sqp = dxp + D // 16
        if HAS_SHARED:
            if pid < NT:  # the shared expert: only weights are read before the wait
                e = pid * 0 + KTOP
                f0 = pid * 16
                _prologue(qr, sr0, sr1, sr2, sgate, sup, 2, f0, F, D, QTS, NS, SS, SPF, L3, W, PAIR)
                if PDL:
                    _gdc_wait()
                    _gdc_launch_dependents()
                yg, yu = _stream(qr, sr0, sr1, sr2, sgate, sup, 2, f0, xw, dxp, sqp, F, D, QTS, NS, SS, L3, UNROLL,
                                 PAIR)
            else:
                yg, yu, e, f0 = _routed(qr, sr0, sr1, sr2, pid - NT, slot_ids, rbias, gate, up, mat_g, mat_u, xw, dxp,
                                        sqp, F, D, QT, ROUTE, NR, NS, PDL, SS, PF, L3, W, UNROLL, PAIR)
        else:
            yg, yu, e, f0 = _routed(qr, sr0, sr1, sr2, pid, slot_ids, rbias, gate, up, mat_g, mat_u, xw, dxp, sqp, F,
                                    D, QT, ROUTE, NR, NS, PDL, SS, PF, L3, W, UNROLL, PAIR)
        # act = silu(gate) * up of the 16 rows, as one x8 group
        o = gl.arange(0, 16, layout=gl.SliceLayout(1, gl.SliceLayout(2, L3)))
        _x8_group(act + e * (F // 4 + F // 8), F, f0 // 16, yg / (1.0 + gl.exp(-yg)) * yu, o)

    @gluon.jit
    def _q8(h, amax):
        """(q, dx): one 16-group h (any layout) in int8 steps (integral fp32) and its scale, given max |h|
        (quant_matmul._x8_quant's rounding)."""
        inv = gl.where(amax > 0, 127.0 / gl.maximum(amax, 1e-30), 0.0)
        return gl.floor(h * inv + 0.5), amax / 127.0

    @gluon.jit
    def _x8_group(x8, K: gl.constexpr, g, h, o):
        """Store h (fp32 [16], lanes o) as group g of the x8 buffer x8 of a K-vector (quant_matmul._x8_quant)."""
        qv, dx = _q8(h, gl.max(gl.abs(h), 0))
        sq = dx * gl.sum(qv, 0)
        b = (qv.to(gl.int32) & 0xFF) << (8 * (o % 4))
        for wd in gl.static_range(4):
            gl.store(x8 + g * 4 + wd, gl.sum(gl.where(o // 4 == wd, b, 0), 0))
        fa = (x8 + K // 4).to(gl.pointer_type(gl.float32))
        gl.store(fa + g, dx)
        gl.store(fa + K // 16 + g, sq)

    @gluon.jit
    def _down_tile(qr, w, e, d0, act, D: gl.constexpr, F: gl.constexpr, QT: gl.constexpr, NS: gl.constexpr,
                   PDL: gl.constexpr, PF: gl.constexpr, L3: gl.constexpr, W: gl.constexpr, UNROLL: gl.constexpr,
                   B0=0, FT: gl.constexpr = 0):
        """[16] fp32: rows d0 .. d0 + 15 of down matrix w (rows of F values) times act row e (x8, from gate/up).
        FT > 0: w's rows have FT values, act's row too, and the CTA takes their columns B0 * block .. + F - 1."""
        _prologue(qr, qr, qr, qr, w, w, 1, d0, D, F, QT, NS, False, PF, L3, W, False, B0, FT)
        if PDL:  # act is the gate/up kernel's output
            _gdc_wait()
            _gdc_launch_dependents()
        if FT:
            F2: gl.constexpr = FT
        else:
            F2: gl.constexpr = F
        xw = act + e * (F2 // 4 + F2 // 8)
        dxp = (xw + F2 // 4).to(gl.pointer_type(gl.float32))
        y, _ = _stream(qr, qr, qr, qr, w, w, 1, d0, xw, dxp, dxp + F2 // 16, D, F, QT, NS, False, L3, UNROLL, False,
                       B0, FT)
        return y

    @gluon.jit
    def moe_down_gluon_kernel(act, slot_ids, weights, rbias, down, sdown, out, part, cnt, mat_d, rscale, res, nw, x8n,
                              D: gl.constexpr, F: gl.constexpr, KTOP: gl.constexpr, QT: gl.constexpr,
                              QTS: gl.constexpr, HAS_SHARED: gl.constexpr, ROUTE: gl.constexpr, NR: gl.constexpr,
                              BIASED: gl.constexpr, RENORM: gl.constexpr, NS: gl.constexpr, PDL: gl.constexpr,
                              PF: gl.constexpr, W: gl.constexpr, NORM: gl.constexpr, UNROLL: gl.constexpr,
                              FS: gl.constexpr):
        """Grid (D / 16 * E,), E = KTOP + HAS_SHARED: CTA (expert, 16-row d-tile), the shared expert's first. FS > 1
        (a dense FFN: KTOP = 0, the shared expert's down of FS * F columns): E = FS, CTA (column slice j of F, d-tile),
        partial j = slice j's products (the act row and the weight rows are the whole FS * F). Each
        writes its weighted rows to part [E, D] fp32; the last of a d-tile's E CTAs to arrive (counter cnt[tile],
        re-armed by it) sums the E partials in expert order (deterministic) and stores out [D]; with NORM it adds
        them to the residual res [D] instead and writes the tile's group of the next RMSNorm's normed x8 buffer x8n
        (weight nw; quant_matmul._res_norm_x8n's roundings)."""
        L3: gl.constexpr = gl.BlockedLayout([16 // (4 * W), 1, 4], [4, 8, 1], [W, 1, 1], [2, 1, 0])
        SL3: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [2, 1, 0])  # per ring slot (the leading dim)
        NT: gl.constexpr = D // 16
        E: gl.constexpr = KTOP + HAS_SHARED if FS == 1 else FS
        pid = gl.program_id(0)
        qr = gl.allocate_shared_memory(gl.int32, [NS, 16, 8, 4], SL3)
        tile = pid % NT
        d0 = tile * 16
        if FS > 1:  # slice e of the dense FFN's down (act row 0), unweighted
            e = pid // NT
            y = _down_tile(qr, sdown, 0, d0, act, D, F, QTS, NS, PDL, PF, L3, W, UNROLL,
                           e * (F // 128 if QTS == 0 else F // 256), F * FS)
        elif HAS_SHARED and pid < NT:  # the shared expert (act row KTOP), unweighted
            e = pid * 0 + KTOP
            y = _down_tile(qr, sdown, e, d0, act, D, F, QTS, NS, PDL, PF, L3, W, UNROLL)
        else:
            e = pid // NT - HAS_SHARED
            # the routing was written two launches back: the grid starts only once every gate/up CTA has passed
            # its own wait (router complete) and called launch_dependents, so it is read before our wait
            if ROUTE:
                slot, wt = _pick_w(slot_ids, rbias, e, rscale, NR, KTOP, BIASED, RENORM, W)
            else:
                slot = gl.load(slot_ids + e)
                wt = gl.load(weights + e)
            y = wt * _down_tile(qr, down + slot.to(gl.int64) * mat_d, e, d0, act, D, F, QT, NS, PDL, PF, L3, W,
                                UNROLL)
        o = gl.arange(0, 16, layout=gl.SliceLayout(1, gl.SliceLayout(2, L3)))
        gl.store(part + e * D + d0 + o, y)
        if NORM:
            # the last arrival works on the tile's 16 rows as [4 words, 4 bytes] in one warp's lanes (the warps
            # replicate it), so the int8 words are packed in registers and the group's reductions are lane shuffles
            LW: gl.constexpr = gl.BlockedLayout([1, 4], [4, 8], [W, 1], [1, 0])
            ow = gl.arange(0, 4, layout=gl.SliceLayout(1, LW))
            ob = gl.arange(0, 4, layout=gl.SliceLayout(0, LW))
            o2 = d0 + ow[:, None] * 4 + ob[None, :]  # [4, 4] rows of the tile
            xdt: gl.constexpr = res.dtype.element_ty
            if NORM == 1:  # the tile's residual rows and norm weights: their latency overlaps the arrival's
                b_res = gl.load(res + o2)
                b_nw = gl.load(nw + o2).to(xdt).to(gl.float32)
        _barrier()  # every thread's partial stored before the (releasing) arrival
        c = gl.atomic_add(cnt + tile, 1, sem="acq_rel", scope="gpu")
        if c == E - 1:
            if NORM:  # quant_matmul._res_norm_x8n for one group
                tot = gl.zeros([4, 4], gl.float32, layout=LW)
                for p in gl.static_range(E):
                    tot += gl.load(part + p * D + o2, cache_modifier=".cg")
                if NORM == 2:  # (A/B: loaded here, by the last arrival only)
                    b_res = gl.load(res + o2)
                    b_nw = gl.load(nw + o2).to(xdt).to(gl.float32)
                xs = (b_res.to(gl.float32) + tot.to(xdt).to(gl.float32)).to(xdt)
                gl.store(res + o2, xs)
                xf = xs.to(gl.float32)
                h = xf * b_nw
                qv, dx = _q8(h, gl.max(gl.max(gl.abs(h), 1), 0))
                gl.store(x8n + tile * 4 + ow, gl.sum((qv.to(gl.int32) & 0xFF) << (8 * ob[None, :]), 1))
                fa = (x8n + D // 4).to(gl.pointer_type(gl.float32))
                gl.store(fa + tile, dx)
                gl.store(fa + D // 16 + tile, dx * gl.sum(gl.sum(qv, 1), 0))
                gl.store(fa + D // 8 + tile, gl.sum(gl.sum(xf * xf, 1), 0))
            else:
                tot = gl.zeros([16], gl.float32, layout=gl.SliceLayout(1, gl.SliceLayout(2, L3)))
                for p in gl.static_range(E):
                    tot += gl.load(part + p * D + d0 + o, cache_modifier=".cg")
                gl.store(out + d0 + o, tot.to(out.dtype.element_ty))
            gl.atomic_xchg(cnt + tile, 0, sem="relaxed", scope="gpu")


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def _pin_carveout(k):
    """The decode chain's 64 KB carveout for a launched kernel (kernels/carveout.py), unless a global one is set."""
    if not carveout.percent():  # else every kernel already has the global carveout
        carveout.set_kernel(k, _env_int("KIMI_LOCAL_MOE_GLUON_CARVEOUT", DEFAULT_CARVEOUT))


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
    w = _env_int("KIMI_LOCAL_MOE_GLUON_W", DEFAULT_W)  # warps per CTA: 4, 2 or 1 (1, 2 or 4 rows per thread)
    ss = _env_int("KIMI_LOCAL_MOE_GLUON_SS", 0) != 0  # side words through the ring (session 11), else registers
    unroll = 0 if ss else _env_int("KIMI_LOCAL_MOE_GLUON_UNROLL", DEFAULT_UNROLL)
    if NS is None:
        NS = _env_int("KIMI_LOCAL_MOE_GLUON_NS", SS_NS if ss else DEFAULT_NS)
    pf = min(2, _env_int("KIMI_LOCAL_MOE_GLUON_PF", 0 if ss else DEFAULT_PF))
    k = moe_gate_up_gluon_kernel[grid](
        x8, slot_ids, rbias if route else slot_ids, gate_pool, up_pool, sg, su, act,
        gate_pool[0].numel(), up_pool[0].numel(), F=F, D=D, KTOP=ktop, QT=QT_ID[qt], QTS=QT_ID[qts or qt],
        HAS_SHARED=has_shared, ROUTE=bool(route), NR=nr, NS=NS,
        PDL=bool(pdl_on), SS=ss, PF=pf, SPF=min(2, _env_int("KIMI_LOCAL_MOE_GLUON_SPF", pf if ss else DEFAULT_SPF)),
        W=w, UNROLL=unroll, PAIR=unroll > 0 and _env_int("KIMI_LOCAL_MOE_GLUON_PAIR", DEFAULT_PAIR) != 0, num_warps=w,
        **({"launch_pdl": True} if pdl_on else {}))
    _pin_carveout(k)
    return act


def down_supported(device, qd: str, qsd: str | None, D: int, F: int, ktop: int) -> bool:
    """The Gluon down kernel applies: Gluon on Hopper, routed (and shared) down of a type in DOWN_QTYPES, D a multiple
    of 16, F a multiple of 256 and at most DOWN_MAX_F (a CTA walks all of F), at least one routed expert."""
    dev = torch.device(device)
    return (HAVE_GLUON and dev.type == "cuda" and qd in DOWN_QTYPES and (qsd is None or qsd in DOWN_QTYPES)
            and D % 16 == 0 and F % 256 == 0 and F <= DOWN_MAX_F and ktop >= 1
            and torch.cuda.get_device_capability(dev)[0] == 9)


DENSE_SLICE = 1024  # columns of a dense FFN's down slice: the MoE experts' width, whose down configuration is tuned


def dense_slices(device, qsd: str, D: int, F: int) -> int:
    """Column slices of a dense FFN's down matrix (the FFN run as the only, "shared", expert: moe.moe_decode with no
    routed expert) for the Gluon down kernel (FS): F in slices of DENSE_SLICE (or the largest multiple of 256 below it
    that divides F), each a CTA's whole walk; 0 where the kernel does not apply (then the Triton down kernel). Layer
    0's down (F = 9216, Q8_0 in Q4_K_M: 22.5 MB) took 15 us a token on the Triton kernel (H200, session 23 profile).
    KIMI_LOCAL_DENSE_GLUON_DOWN=0: the Triton kernel; KIMI_LOCAL_DENSE_SLICE: another slice width (A/B runs)."""
    width = _env_int("KIMI_LOCAL_DENSE_SLICE", DENSE_SLICE)  # (A/B runs)
    if os.environ.get("KIMI_LOCAL_DENSE_GLUON_DOWN", "1") == "0" or F <= width:
        return 0
    for fs in range(-(-F // width), F // 256 + 1):
        if F % fs == 0 and (F // fs) % 256 == 0:
            return fs if down_supported(device, qsd, qsd, D, F // fs, 1) else 0
    return 0


def down_enabled() -> bool:
    """KIMI_LOCAL_MOE_GLUON_DOWN (default on; "0" keeps the Triton down kernel, for A/B runs)."""
    return enabled() and os.environ.get("KIMI_LOCAL_MOE_GLUON_DOWN", "1") != "0"


def down(act, slot_ids, weights, rbias, down_pool, sdown, out, part, cnt, D: int, F: int, qd: str, qsd: str | None,
         ktop: int, route, pdl_on: bool, NS: int | None = None, res_norm=None, fs: int = 1):
    """Launch the Gluon down kernel: act int32 [ktop + 1, x8_words(F)] (gate/up's); slot_ids [ktop] int32 and weights
    [ktop] fp32, or with route = (rbias, k, scale, biased, renorm) the router's logits [NR] fp32; down_pool uint8
    [S, D, row bytes]; sdown the shared expert's packed down or None; out [D] (written); part fp32 >= (ktop + 1) * D
    and cnt int32 [D / 16] zeroed (split_workspace); res_norm: moe.moe_decode's (out then not written). fs > 1
    (dense_slices): a dense FFN (ktop = 0, sdown its down of F columns, act [1, x8_words(F)]) in fs column slices,
    part >= fs * D. Graph-capturable."""
    has_shared = sdown is not None
    if fs > 1:
        assert ktop == 0 and has_shared and F % fs == 0
    nr, rscale, biased, renorm = 32, 1.0, False, False
    if route is not None:
        rbias, _, rscale, biased, renorm = route
        nr = slot_ids.numel()
        assert nr >= 32 and (nr & (nr - 1)) == 0, "the Gluon down routes over a power of 2 (>= 32) experts"
    E = ktop + int(has_shared) if fs == 1 else fs
    assert part.numel() >= E * D and cnt.numel() >= D // 16
    w = _env_int("KIMI_LOCAL_MOE_GLUON_DOWN_W", DOWN_W)
    unroll = _env_int("KIMI_LOCAL_MOE_GLUON_DOWN_UNROLL", DOWN_UNROLL)
    k = moe_down_gluon_kernel[(D // 16 * E,)](
        act, slot_ids, weights if route is None else slot_ids, rbias if route is not None else slot_ids, down_pool,
        sdown if has_shared else down_pool[0], out, part, cnt, down_pool[0].numel(), float(rscale),
        *(res_norm if res_norm is not None else (out, out, out)),
        NORM=0 if res_norm is None else _env_int("KIMI_LOCAL_NORM_PRE", 1),
        D=D, F=F // fs, KTOP=ktop, QT=QT_ID[qd], QTS=QT_ID[qsd or qd], HAS_SHARED=has_shared, ROUTE=route is not None,
        NR=nr, BIASED=bool(biased), RENORM=bool(renorm),
        NS=NS or _env_int("KIMI_LOCAL_MOE_GLUON_DOWN_NS", DOWN_NS),
        PDL=bool(pdl_on), PF=_env_int("KIMI_LOCAL_MOE_GLUON_DOWN_PF", 1), W=w,
        UNROLL=unroll, FS=fs, num_warps=w,
        **({"launch_pdl": True} if pdl_on else {}))
    _pin_carveout(k)
    return out
