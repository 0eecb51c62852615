"""MoE prefill grouped GEMMs for Q4_K / Q5_K experts in Gluon (sm_90): the tokens sorted by expert
(moe.moe_route_tiles), one CTA per (expert tile of BM sorted rows, 128 weight rows), the dequantized weight tile as
the warpgroup MMA's register operand (A) and the activation rows as its shared-memory operand (B), as
moe._moe_*_grouped_kernel do in Triton. moe.moe_prefill picks these where they apply (supported()).

Why: the Triton grouped kernels spend ~15 instructions per weight on the dequantization (offline SASS, session 14:
LOP3 / PRMT / IMAD / SHF / FADD / FFMA per nibble, in fp32), so they are bound by it and stay 1.8-2.3x behind
torch._grouped_mm on the dequantized bf16 weights. Here a thread unpacks the nibbles straight into the MMA's register
layout with packed bf16x2 arithmetic: per 16-bit word (4 weights) one PRMT, two LOP3 and one shift make the bf16x2
pairs (0x4300 | n is the bf16 of 128 + n; Q5_K ORs the 5th bits of qh in at bit 4), then per pair one HSUB2 (- 128,
exact) and one HFMA2 (n * s - m, one rounding; s and m are rounded to bf16 first): ~2.3 instructions per weight, plus
the per-sub-block scale pairs. Measured (docs/perf-notes.md), the two GEMMs alone against torch._grouped_mm on bf16
weights (tokens pre-sorted for both): 0.61-0.69x the time at T = 512 (session 16), 0.91-1.07x at 2048, 1.15-1.21x at
8192 (session 17, H100 / H200, with moe_prefill's small tiles and the down kernel's register cap); the error against
the bf16 reference is the Triton kernels' for Q4_K (1.7e-3 relative RMSE) and 1.7x theirs for Q5_K (4e-3: the extra
roundings of s and of n * s - m matter more at 5 bits).

Register layout of the A operand (wgmma m64nNk16, bf16): thread (g = lane // 4, t = lane % 4) of warp w holds rows
16 w + g and 16 w + g + 8, columns 2t, 2t + 1, 2t + 8, 2t + 9 of every 16-column step. A Q4_K 64-weight chunk is 32
bytes whose low nibbles are weights 0..31 and high nibbles weights 32..63 (ggml order, kept by the loader). So the
thread's weights of a chunk are the low and high nibbles of the 16-bit words t, t + 4, t + 8, t + 12 of its rows:
qs is read from shared memory as u16 [128, 16] in layout LP (layouts(): lanes t over the word index), and join /
reshape / permute of the four unpacked bf16 values per word give exactly the A layout (checked by the compiler:
convert_layout(assert_trivial=True)).

Pipeline: per 64-weight chunk a stage holds the qs rows (4 KB, swizzled so that rows g and g + 4 fall in other
banks; Q5_K: also the block's qh rows), the rows' sub-scale / min / (d, dmin) words (u32) and the activation tile
[BM, 64] (NVMMA-swizzled), copied with cp.async NS - 2 chunks ahead (_ns: 3 stages up to 64-row tiles, 5 above); one
MMA in flight while the next chunk is dequantized (WAIT = 1; 0 retires each MMA first: 13 % slower at T = 8192).
The loop body holds two chunks, so that the operand registers of the MMA in flight are never the next chunk's
(one chunk per body: NaN from 64-row tiles up, H100 run 1). The chunk loop has a static trip count (K constexpr):
with a possible zero-trip path ptxas serialized every MMA ("non wgmma instructions defining accumulator registers").
gate/up: rows 0..63 of the A tile are gate rows f0 .. f0 + 63, rows 64..127 the same rows of up (one warpgroup each);
the epilogue meets them in shared memory and stores h = silu(gate) * up (bf16); tiles of up to 256 rows. down: 128
rows of down; the epilogue stores y[assignment] = acc * topk weight (fp32), as the Triton kernel; tiles of up to 128
rows (DOWN_MAX_BM), those of 128 rows capped at 128 registers with 4 stages so that two CTAs share an SM
(down_maxnreg). moe.moe_prefill launches each kernel twice when an expert's last tile is short (moe_route_tiles'
small tiles): a tile's cost hardly depends on its real rows, since every tile dequantizes its weights again and its
MMA is BM wide (ncu, T = 8192, H200: one CTA an SM, tensor pipe 40 % busy, issue slots 21 %, L2 24 %: not L2 bound).
The column tiles of one expert tile are neighbours in the grid (program_id(0)), so its activation rows are read from
L2 by all of them.
"""
from __future__ import annotations

import os

import torch

from .gluon_compat import HAVE_WGMMA as HAVE_GLUON  # noqa: F401
from .gluon_compat import (_async_load, _barrier, cp, fence_async_shared, gl, gluon, warpgroup_mma,  # noqa: F401
                           warpgroup_mma_wait)

BMS = (16, 32, 64, 128, 256)  # rows per expert tile (the wgmma N); gate/up up to 256, down up to DOWN_MAX_BM
DOWN_MAX_BM = 128  # (256-row down tiles spill: the epilogue's store addresses beside 128 accumulator registers)
QTYPES = ("Q4_K", "Q5_K")
DEFAULT_NS = 5  # ring stages (a chunk of 64 weights each) from 128-row tiles (_ns); KIMI_LOCAL_MOE_PREFILL_NS:
# A/B (>= 3)
ROWS = 128  # weight rows per CTA (two warpgroups)


def enabled() -> bool:
    """KIMI_LOCAL_MOE_PREFILL_GLUON (default on): "0" keeps the Triton grouped kernels (A/B runs)."""
    return HAVE_GLUON and os.environ.get("KIMI_LOCAL_MOE_PREFILL_GLUON", "1") != "0"


def small_ns() -> int:
    """Ring stages of the small-tile launch (moe.moe_route_tiles' small): KIMI_LOCAL_MOE_PREFILL_SMALL_NS (A/B), else 0
    (_ns' default)."""
    return int(os.environ.get("KIMI_LOCAL_MOE_PREFILL_SMALL_NS", 0))


def supported(device, qtype: str, N: int, K: int) -> bool:
    """A matrix [N, K] of the prefill MoE can go through these kernels: Gluon, a Hopper GPU, a type in QTYPES, K a
    multiple of 256 and N of 128."""
    dev = torch.device(device)
    return (HAVE_GLUON and dev.type == "cuda" and qtype in QTYPES and K % 256 == 0 and N % 128 == 0
            and torch.cuda.get_device_capability(dev)[0] == 9)


if HAVE_GLUON:

    # Per 16-bit qs word (bytes b0, b1) $4: the bf16 weights of b0.lo, b1.lo (one pair, outputs $0 $1) and b0.hi,
    # b1.hi ($2 $3: the same columns 32 further), as n * s - m with the sub-blocks' packed pairs (s, s) $5 / $7 and
    # (-m, -m) $6 / $8. Q5_K: $9 the 16-bit word of qh at the same place, $10 = 2 * (chunk in block): bit $10 of each
    # qh byte is the low nibble's 5th bit, bit $10 + 1 the high nibble's.
    _UNPACK_HEAD = gl.constexpr("""{
    .reg .b32 x, y, t, lo, hi, mg, hy, ht;
    mov.b32 x, {$4, $4};
    prmt.b32 y, x, x, 0x1100;
    mov.b32 mg, 0x43004300;
    lop3.b32 lo, y, 0x000F000F, mg, 0xEA;
    shr.b32 t, y, 4;
    lop3.b32 hi, t, 0x000F000F, mg, 0xEA;
    """)
    _UNPACK_Q5 = gl.constexpr("""
    mov.b32 x, {$9, $9};
    prmt.b32 hy, x, x, 0x1100;
    shr.b32 hy, hy, $10;
    shl.b32 ht, hy, 4;
    lop3.b32 lo, ht, 0x00100010, lo, 0xEA;
    shl.b32 ht, hy, 3;
    lop3.b32 hi, ht, 0x00100010, hi, 0xEA;
    """)
    _UNPACK_TAIL = gl.constexpr("""
    sub.rn.bf16x2 lo, lo, mg;
    sub.rn.bf16x2 hi, hi, mg;
    fma.rn.bf16x2 lo, lo, $5, $6;
    fma.rn.bf16x2 hi, hi, $7, $8;
    mov.b32 {$0, $1}, lo;
    mov.b32 {$2, $3}, hi;
    }""")

    @gluon.jit
    def _h16(v):
        """fp16 bits (the low 16 bits of an int) -> fp32."""
        return (v & 0xFFFF).to(gl.uint16).to(gl.float16, bitcast=True).to(gl.float32)

    @gluon.jit
    def _pair(v):
        """fp32 [R] -> int32 [R]: the bf16x2 (v, v) (one rounding)."""
        return gl.inline_asm_elementwise("cvt.rn.bf16x2.f32 $0, $1, $1;", "=r,r", [v], dtype=gl.int32,
                                         is_pure=True, pack=1)

    @gluon.jit
    def _dequant(qs_t, qh_t, sc_t, mn_t, dd_t, cc, Q5: gl.constexpr, LP: gl.constexpr, DOT: gl.constexpr):
        """The bf16 A tile [128, 64] (layout DOT) of one chunk from its stage: qs_t (and Q5_K's qh_t) u16 [128, 16],
        the rows' sub-scale, min and (d, dmin) words sc_t, mn_t, dd_t u32 [128]; cc = the chunk's index in its
        block (0..3)."""
        LR: gl.constexpr = gl.SliceLayout(1, LP)
        q = qs_t.load(LP)
        scw = sc_t.load(LR)
        mw = mn_t.load(LR)
        dw = dd_t.load(LR)
        sh = (cc % 2) * 16  # this chunk's two sub-blocks: bytes 2 cc, 2 cc + 1 of the 8 (the word's half)
        d = _h16(dw)
        dmin = _h16(dw >> 16)
        z = gl.zeros_like(q).to(gl.int32)
        s_lo = z + _pair(d * ((scw >> sh) & 0xFF).to(gl.float32))[:, None]
        s_hi = z + _pair(d * ((scw >> (sh + 8)) & 0xFF).to(gl.float32))[:, None]
        m_lo = z + _pair(-dmin * ((mw >> sh) & 0xFF).to(gl.float32))[:, None]
        m_hi = z + _pair(-dmin * ((mw >> (sh + 8)) & 0xFF).to(gl.float32))[:, None]
        if Q5:
            o0, o1, o2, o3 = gl.inline_asm_elementwise(
                _UNPACK_HEAD + _UNPACK_Q5 + _UNPACK_TAIL, "=h,=h,=h,=h,h,r,r,r,r,h,r",
                [q, s_lo, m_lo, s_hi, m_hi, qh_t.load(LP), z + 2 * cc], dtype=(gl.bfloat16,) * 4, is_pure=True, pack=1)
        else:
            o0, o1, o2, o3 = gl.inline_asm_elementwise(
                _UNPACK_HEAD + _UNPACK_TAIL, "=h,=h,=h,=h,h,r,r,r,r", [q, s_lo, m_lo, s_hi, m_hi],
                dtype=(gl.bfloat16,) * 4, is_pure=True, pack=1)
        lo = gl.join(o0, o1).reshape([128, 32])  # column 2j + p: the low nibbles
        hi = gl.join(o2, o3).reshape([128, 32])  # 32 + 2j + p
        a = gl.join(lo, hi).permute([0, 2, 1]).reshape([128, 64])
        return gl.convert_layout(a, DOT, assert_trivial=True)  # the same layout: no data moves

    @gluon.jit
    def _issue(qs_s, qh_s, sc_s, mn_s, dd_s, x_s, wq_row, wh_row, wv_row, rb_row, x_row, c, NBT, Q5: gl.constexpr,
               LQC: gl.constexpr, LVC: gl.constexpr, LXC: gl.constexpr):
        """cp.async of chunk c (64 weights of every row) into one stage: the rows' qs words (wq_row: u16 pointers to
        each row's first block), Q5_K's qh (wh_row: likewise), the side words (wv_row: u32 pointers to each row's
        matrix, rb_row: the row's first block index) and the activation tile (x_row: each row's first element)."""
        b = c // 4
        cc = c % 4
        oq = gl.arange(0, 16, layout=gl.SliceLayout(0, LQC))
        _async_load(qs_s, wq_row[:, None] + (b * 64 + cc * 16) + oq[None, :])
        rb = rb_row + b
        if Q5:  # planes (bytes a block): qs 128, qh 32, sub-scales 8, mins 8, (d, dmin) 4
            _async_load(qh_s, wh_row[:, None] + b * 16 + oq[None, :])
            P: gl.constexpr = 40
        else:  # qs 128, sub-scales 8, mins 8, (d, dmin) 4
            P: gl.constexpr = 32
        _async_load(sc_s, wv_row + (NBT * P + 2 * rb + cc // 2))
        _async_load(mn_s, wv_row + (NBT * (P + 2) + 2 * rb + cc // 2))
        _async_load(dd_s, wv_row + (NBT * (P + 4) + rb))
        ok = gl.arange(0, 64, layout=gl.SliceLayout(0, LXC))
        _async_load(x_s, x_row[:, None] + (c * 64 + ok)[None, :])

    @gluon.jit
    def _step(i, acc, a_prev, qs_s, qh_s, sc_s, mn_s, dd_s, x_s, wq_row, wh_row, wv_row, rb_row, x_row, NBT,
              NC: gl.constexpr, NS: gl.constexpr, Q5: gl.constexpr, LP: gl.constexpr, DOT: gl.constexpr,
              LQC: gl.constexpr, LVC: gl.constexpr, LXC: gl.constexpr, WAIT: gl.constexpr):
        """Chunk i of the main loop: wait for its stage, refill the stage two chunks back, dequantize, issue its MMA,
        retire the previous one (whose register operand is a_prev). Returns (acc, a_prev, this chunk's operand)."""
        cp.wait_group(NS - 3)  # chunk i's copies (this thread's) have landed
        _barrier()  # everyone's; and every MMA that read stage (i - 2) % NS has been waited for
        j = i + NS - 2
        if j < NC:
            sj = j % NS
            _issue(qs_s.index(sj), qh_s.index(sj), sc_s.index(sj), mn_s.index(sj), dd_s.index(sj), x_s.index(sj),
                   wq_row, wh_row, wv_row, rb_row, x_row, j, NBT, Q5, LQC, LVC, LXC)
        cp.commit_group()
        st = i % NS
        a = _dequant(qs_s.index(st), qh_s.index(st), sc_s.index(st), mn_s.index(st), dd_s.index(st), i % 4, Q5, LP,
                     DOT)
        fence_async_shared()
        acc = warpgroup_mma(a, x_s.index(st).permute((1, 0)), acc, is_async=True)
        acc, a_prev = warpgroup_mma_wait(WAIT, deps=[acc, a_prev])
        return acc, a_prev, a

    @gluon.jit
    def _mainloop(wq_row, wh_row, wv_row, rb_row, x_row, K: gl.constexpr, NBT, BM: gl.constexpr, NS: gl.constexpr,
                  Q5: gl.constexpr, LP: gl.constexpr, MMA: gl.constexpr, LQC: gl.constexpr, LVC: gl.constexpr,
                  LXC: gl.constexpr, WAIT: gl.constexpr):
        """acc [128, BM] (layout MMA) = the rows' dequantized weights [128, K] @ the activation rows [BM, K]^T.
        WAIT: MMAs left in flight after each chunk's (1: the next chunk is dequantized during this one's MMA)."""
        DOT: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
        QS_L: gl.constexpr = gl.SwizzledSharedLayout(8, 4, 2, [1, 0])  # rows g and g + 4 in other banks
        V_L: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
        X_L: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
        qs_s = gl.allocate_shared_memory(gl.uint16, [NS, 128, 16], QS_L)
        if Q5:
            qh_s = gl.allocate_shared_memory(gl.uint16, [NS, 128, 16], QS_L)
        else:
            qh_s = qs_s  # (unused)
        sc_s = gl.allocate_shared_memory(gl.uint32, [NS, 128], V_L)
        mn_s = gl.allocate_shared_memory(gl.uint32, [NS, 128], V_L)
        dd_s = gl.allocate_shared_memory(gl.uint32, [NS, 128], V_L)
        x_s = gl.allocate_shared_memory(gl.bfloat16, [NS, BM, 64], X_L)
        NC: gl.constexpr = K // 64
        gl.static_assert(NC % 2 == 0)
        for p in gl.static_range(NS - 2):
            if p < NC:
                _issue(qs_s.index(p), qh_s.index(p), sc_s.index(p), mn_s.index(p), dd_s.index(p), x_s.index(p),
                       wq_row, wh_row, wv_row, rb_row, x_row, p, NBT, Q5, LQC, LVC, LXC)
            cp.commit_group()
        acc = gl.zeros([128, BM], gl.float32, layout=MMA)
        a_odd = gl.zeros([128, 64], gl.bfloat16, layout=DOT)
        # Unrolled by two chunks (even, odd): an MMA reads its register operand while in flight, so the operand is a
        # dependency of the wait that retires that MMA, and the next chunk's operand is another value; with one
        # value per loop body the compiler gave every chunk the same registers and the next dequantization wrote
        # them under the running MMA (NaN at 64- and 128-row tiles, run 1). WAIT = 1: the previous MMA retires there.
        for i2 in range(NC // 2):  # (static trip count: ptxas pipelines the MMAs only without a zero-trip path)
            acc, a_odd, a_even = _step(2 * i2, acc, a_odd, qs_s, qh_s, sc_s, mn_s, dd_s, x_s, wq_row, wh_row, wv_row,
                                       rb_row, x_row, NBT, NC, NS, Q5, LP, DOT, LQC, LVC, LXC, WAIT)
            acc, a_even, a_odd = _step(2 * i2 + 1, acc, a_even, qs_s, qh_s, sc_s, mn_s, dd_s, x_s, wq_row, wh_row,
                                       wv_row, rb_row, x_row, NBT, NC, NS, Q5, LP, DOT, LQC, LVC, LXC, WAIT)
        acc, a_odd = warpgroup_mma_wait(0, deps=[acc, a_odd])
        cp.wait_group(0)
        return acc

    @gluon.jit
    def moe_gate_up_prefill_kernel(x, stride_xt, tok, tile_slot, tile_row0, tile_row1, gate, up, h, mat_g, S,
                                   F: gl.constexpr, D: gl.constexpr, BM: gl.constexpr, NS: gl.constexpr,
                                   Q5: gl.constexpr, LP: gl.constexpr, LQC: gl.constexpr, LVC: gl.constexpr,
                                   LXC: gl.constexpr, LE: gl.constexpr, WAIT: gl.constexpr):
        """h [A, F] (bf16, rows in sorted order) = silu(x[tok] @ gate^T) * (x[tok] @ up^T) for one tile of BM
        sorted rows of one expert slot and 64 columns f0 .. f0 + 63. Gate and up pools [S, mat_g bytes], Q4_K
        (Q5: Q5_K)."""
        MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[8, 1], instr_shape=[16, BM, 16])
        f0 = gl.program_id(0) * 64  # the column tiles of one expert tile run side by side: its rows stay in L2
        i_t = gl.program_id(1)
        slot = gl.load(tile_slot + i_t).to(gl.int64)
        if slot < S:
            r0 = gl.load(tile_row0 + i_t)
            r1 = gl.load(tile_row1 + i_t)
            NB: gl.constexpr = D // 256
            NBT = gl.to_tensor(F).to(gl.int64) * NB
            # A rows 0..63: gate f0 .. f0 + 63; rows 64..127: up (the select of two bases hides the 16-byte
            # alignment of the row pointers from the compiler: multiple_of)
            iq = gl.arange(0, 128, layout=gl.SliceLayout(1, LQC))
            bq = gl.where(iq < 64, gate + slot * mat_g, up + slot * mat_g).to(gl.pointer_type(gl.uint16))
            nq = (f0 + iq % 64).to(gl.int64)
            wq_row = gl.multiple_of(bq + nq * (NB * 64), 16)
            wh_row = gl.multiple_of(bq + NBT * 64 + nq * (NB * 16), 16)
            iv = gl.arange(0, 128, layout=LVC)
            wv_row = gl.where(iv < 64, gate + slot * mat_g, up + slot * mat_g).to(gl.pointer_type(gl.uint32))
            rb_row = (f0 + iv % 64).to(gl.int64) * NB
            rx = gl.minimum(r0 + gl.arange(0, BM, layout=gl.SliceLayout(1, LXC)), r1 - 1)
            x_row = x + gl.load(tok + rx).to(gl.int64) * stride_xt
            acc = _mainloop(wq_row, wh_row, wv_row, rb_row, x_row, D, NBT, BM, NS, Q5, LP, MMA, LQC, LVC, LXC,
                            WAIT)
            # gate (warpgroup 0) meets up (warpgroup 1) in shared memory
            E_L: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
            e_s = gl.allocate_shared_memory(gl.float32, [128, BM], E_L, acc)
            _barrier()
            g = e_s.slice(0, 64).load(LE)
            u = e_s.slice(64, 64).load(LE)
            hv = g / (1.0 + gl.exp(-g)) * u
            oi = gl.arange(0, 64, layout=gl.SliceLayout(1, LE))
            om = gl.arange(0, BM, layout=gl.SliceLayout(0, LE))
            rr = (r0 + om).to(gl.int64)
            gl.store(h + rr[None, :] * F + (f0 + oi)[:, None], hv.to(gl.bfloat16), mask=(r0 + om < r1)[None, :])

    @gluon.jit
    def moe_down_prefill_kernel(hin, asg, topk_w, tile_slot, tile_row0, tile_row1, down, y, mat_d, S,
                                F: gl.constexpr, D: gl.constexpr, BM: gl.constexpr, NS: gl.constexpr,
                                Q5: gl.constexpr, LP: gl.constexpr, LQC: gl.constexpr, LVC: gl.constexpr,
                                LXC: gl.constexpr, WAIT: gl.constexpr):
        """y[asg[r]] [D] (fp32) = topk_w[asg[r]] * (h[r] @ down^T) for one tile of BM sorted rows r of one expert
        slot and 128 columns d0 .. d0 + 127. Down pool [S, mat_d bytes] Q4_K (Q5: Q5_K), h [A, F] bf16."""
        MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[8, 1], instr_shape=[16, BM, 16])
        d0 = gl.program_id(0) * 128
        i_t = gl.program_id(1)
        slot = gl.load(tile_slot + i_t).to(gl.int64)
        if slot < S:
            r0 = gl.load(tile_row0 + i_t)
            r1 = gl.load(tile_row1 + i_t)
            NB: gl.constexpr = F // 256
            NBT = gl.to_tensor(D).to(gl.int64) * NB
            base = down + slot * mat_d
            nq = (d0 + gl.arange(0, 128, layout=gl.SliceLayout(1, LQC))).to(gl.int64)
            wq_row = base.to(gl.pointer_type(gl.uint16)) + nq * (NB * 64)
            wh_row = base.to(gl.pointer_type(gl.uint16)) + NBT * 64 + nq * (NB * 16)
            iv = gl.arange(0, 128, layout=LVC)
            wv_row = base.to(gl.pointer_type(gl.uint32)) + gl.zeros_like(iv).to(gl.int64)
            rb_row = (d0 + iv).to(gl.int64) * NB
            rx = gl.minimum(r0 + gl.arange(0, BM, layout=gl.SliceLayout(1, LXC)), r1 - 1).to(gl.int64)
            acc = _mainloop(wq_row, wh_row, wv_row, rb_row, hin + rx * F, F, NBT, BM, NS, Q5, LP, MMA, LQC, LVC,
                            LXC, WAIT)
            om = gl.arange(0, BM, layout=gl.SliceLayout(0, MMA))
            a = gl.load(asg + gl.minimum(r0 + om, r1 - 1)).to(gl.int64)
            wt = gl.load(topk_w + a)
            on = gl.arange(0, 128, layout=gl.SliceLayout(1, MMA))
            gl.store(y + a[None, :] * D + (d0 + on)[:, None], acc * wt[None, :], mask=(r0 + om < r1)[None, :])


def _wait() -> int:
    """MMAs in flight across chunks: 1, or 0 with KIMI_LOCAL_MOE_PREFILL_WAIT=0 (A/B runs)."""
    return int(os.environ.get("KIMI_LOCAL_MOE_PREFILL_WAIT", "1"))


def layouts(BM: int):
    """(LP, LQC, LVC, LXC, LE): the qs read layout (see the module doc), the copy layouts of the qs rows, side words
    and activation tile (16 / 4 / 16 bytes a thread), and the gate/up epilogue's layout [64, BM]."""
    lp = gl.DistributedLinearLayout(reg_bases=[[8, 0], [0, 4], [0, 8]],
                                    lane_bases=[[0, 1], [0, 2], [1, 0], [2, 0], [4, 0]],
                                    warp_bases=[[16, 0], [32, 0], [64, 0]], block_bases=[], shape=[128, 16])
    lqc = gl.BlockedLayout([1, 8], [16, 2], [8, 1], [1, 0])
    lvc = gl.BlockedLayout([1], [32], [8], [0])
    lxc = gl.BlockedLayout([1, 8], [4, 8], [8, 1], [1, 0])
    le = gl.BlockedLayout([2, 1], [32, 1], [1, 8], [0, 1])
    return lp, lqc, lvc, lxc, le


def _ns(NS: int, BM: int, down: bool = False) -> int:
    """Ring stages: NS if given, else KIMI_LOCAL_MOE_PREFILL_NS, else 3 for tiles of up to 64 rows (the copies one
    chunk ahead), 4 for the down kernel's 128-row tiles (two CTAs an SM beside down_maxnreg's cap; Q5_K: 102 KB of
    shared memory a CTA with 4 stages, 128 KB with 5) and DEFAULT_NS otherwise. H100, session 16 (GEMMs alone, ms):
    T=2048 (64-row tiles) 1.44 / 1.50 / 1.54 with 3 / 4 / 5 stages; T=8192 (256 / 128) 5.02 / 3.95 / 3.76; T=512
    (16) 0.85 / 0.86 with 3 / 5."""
    return NS or int(os.environ.get("KIMI_LOCAL_MOE_PREFILL_NS", 0)) or (
        3 if BM <= 64 else 4 if down and BM == 128 else DEFAULT_NS)


def down_maxnreg(BM: int) -> int:
    """The down kernel's ptxas register cap for BM-row tiles, 0 for none: 128 for 128-row tiles (192 registers
    uncapped: one CTA an SM; at 128, no spills (offline sm_90 compile) and two CTAs an SM with _ns' 4 stages;
    H100, session 17, Q4_K, T=8192 down alone 0.96-0.99 ms (4 or 5 stages) vs 1.09-1.11 uncapped). The gate/up
    kernel stays uncapped: its 128-row tiles with two CTAs an SM were slower than one 256-row tile (2.17-2.29 vs
    1.97-1.98 ms)."""
    return 128 if BM == 128 else 0


def _maxnreg(default: int = 0) -> dict:
    """ptxas register cap (launch option): KIMI_LOCAL_MOE_PREFILL_MAXNREG if set (A/B; 0: no cap), else default (0:
    no cap)."""
    env = os.environ.get("KIMI_LOCAL_MOE_PREFILL_MAXNREG")
    r = int(env) if env is not None else default
    return {"maxnreg": r} if r else {}


def gate_up(x, tok, tile_slot, row0, row1, gate_pool, up_pool, h, qtype: str, BM: int, NS: int = 0):
    """h [A, F] bf16 = silu(x[tok] gate^T) * (x[tok] up^T) per expert tile (moe.moe_route_tiles with this BM);
    gate and up of one type (QTYPES)."""
    S, F = gate_pool.shape[0], gate_pool.shape[1]
    D = x.shape[1]
    assert qtype in QTYPES and BM in BMS and x.stride(1) == 1 and x.dtype == torch.bfloat16
    assert gate_pool[0].numel() == up_pool[0].numel()
    lp, lqc, lvc, lxc, le = layouts(BM)
    moe_gate_up_prefill_kernel[(F // 64, tile_slot.numel())](
        x, x.stride(0), tok, tile_slot, row0, row1, gate_pool, up_pool, h, gate_pool[0].numel(), S, F=F, D=D,
        BM=BM, NS=_ns(NS, BM), Q5=qtype == "Q5_K", LP=lp, LQC=lqc, LVC=lvc, LXC=lxc, LE=le, WAIT=_wait(), num_warps=8,
        **_maxnreg())
    return h


def down(h, asg, topk_w, tile_slot, row0, row1, down_pool, y, qtype: str, BM: int, NS: int = 0):
    """y [A, D] fp32: y[asg[r]] = topk_w[asg[r]] * (h[r] down^T) per expert tile."""
    S, D = down_pool.shape[0], down_pool.shape[1]
    F = h.shape[1]
    assert qtype in QTYPES and BM in BMS and BM <= DOWN_MAX_BM and h.is_contiguous() and h.dtype == torch.bfloat16
    lp, lqc, lvc, lxc, _ = layouts(BM)
    moe_down_prefill_kernel[(D // 128, tile_slot.numel())](
        h, asg, topk_w, tile_slot, row0, row1, down_pool, y, down_pool[0].numel(), S, F=F, D=D,
        BM=BM, NS=_ns(NS, BM, down=True), Q5=qtype == "Q5_K", LP=lp, LQC=lqc, LVC=lvc, LXC=lxc, WAIT=_wait(),
        num_warps=8, **_maxnreg(down_maxnreg(BM)))
    return y
