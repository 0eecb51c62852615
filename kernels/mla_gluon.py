"""MLA decode split kernel in Gluon (Triton's explicit-layout dialect, sm_90): the bf16 "t" split kernel of
kernels/mla.py with a hand-written two-buffer copy pipeline, so the next latent tile streams in while this
tile's products run.

Why: Triton 3.6 pipelines the "t" kernel's tile loads with two shared buffers but issues the next tile's
async copies at the end of the loop body, after this tile's three products (sm_90 TTGIR: async_wait, the
products, then async_copy), so load and compute never overlap; three 72 KB stages do not fit next to q, and
num_stages=1 miscompiles that kernel (illegal shared reads, session 10). Here the copies for tile i + 1 are
issued before the products of tile i.

Same contract as mla.mla_decode_split_t_kernel (workspace ws_m / ws_l [NS, H], ws_acc [NS, H, R] for the
combine kernel; the length read from seq_ptr [1]); bf16 or fp8 (e4m3, per-row scale) cache, H <= 32 heads,
BS = 64 rows, 4 warps. mla.mla_decode picks it (variant "g") and falls back to the Triton kernels where it
does not apply or does not build.
Per program: q_abs^T [R, 32] and q_pe^T in shared memory (B operands), the latent tile ring [2, 64, R] and
[2, 64, DR], scores^T [64, 32] = C q^T and acc^T [R, 32] += C^T p^T as warpgroup MMAs (A = the tile, K-major for
the scores, its transpose for acc), p [64, 32] through shared memory.
"""
from __future__ import annotations

import torch

from .gluon_compat import HAVE_WGMMA as HAVE_GLUON  # noqa: F401
from .gluon_compat import (_async_load, _barrier, _gdc_launch_dependents, _gdc_wait, cp,  # noqa: F401
                           fence_async_shared, gl, gluon, warpgroup_mma, warpgroup_mma_wait)


def supported(latent: torch.Tensor, H: int, R: int, DR: int) -> bool:
    """The Gluon kernels apply: Gluon importable, a Hopper GPU, a bf16 or fp8 (e4m3) cache, up to 32 heads, R and DR
    powers of two from 64 (shared-memory swizzle rows)."""
    return (HAVE_GLUON and latent.is_cuda and latent.dtype in (torch.bfloat16, torch.float8_e4m3fn) and H <= 32
            and R % 64 == 0 and DR % 64 == 0 and (R & (R - 1)) == 0 and (DR & (DR - 1)) == 0
            and torch.cuda.get_device_capability(latent.device)[0] == 9)


if HAVE_GLUON:

    @gluon.jit
    def _issue_tile(c_buf, k_buf, lat, s, s1, stride_lat, R: gl.constexpr, DR: gl.constexpr, BS: gl.constexpr,
                    LC: gl.constexpr, LK: gl.constexpr):
        """Async copies of latent rows s .. s+BS-1 (rows past s1 re-read row s1 - 1: their p is 0) into c_buf [BS, R]
        and k_buf [BS, DR]."""
        rc = gl.minimum(s + gl.arange(0, BS, layout=gl.SliceLayout(1, LC)), s1 - 1).to(gl.int64)
        cc = gl.arange(0, R, layout=gl.SliceLayout(0, LC))
        _async_load(c_buf, lat + rc[:, None] * stride_lat + cc[None, :])
        rk = gl.minimum(s + gl.arange(0, BS, layout=gl.SliceLayout(1, LK)), s1 - 1).to(gl.int64)
        ck = gl.arange(0, DR, layout=gl.SliceLayout(0, LK))
        _async_load(k_buf, lat + R + rk[:, None] * stride_lat + ck[None, :])

    @gluon.jit
    def mla_split_gluon_kernel(q_abs, q_pe, lat, lat_scale, seq_ptr, ws_m, ws_l, ws_acc, qk_scale, stride_lat,
                               stride_qp, H: gl.constexpr, R: gl.constexpr, DR: gl.constexpr, BH: gl.constexpr,
                               BS: gl.constexpr, NS: gl.constexpr, MIN_CHUNK: gl.constexpr, FP8: gl.constexpr,
                               RING_DT: gl.constexpr, LC: gl.constexpr, LK: gl.constexpr, RING_L: gl.constexpr,
                               PDL: gl.constexpr):
        """bf16 cache: the MMAs read the ring's tiles. FP8 (e4m3, row = stored * lat_scale[row]): the ring holds the
        fp8 rows; each tile is widened to fp16 (exact for e4m3) into one fp16 tile that the MMAs read (fp16 q and p;
        the row scales multiply the scores and p, as in the "t" kernel). LC / LK: the copies' register layouts
        (16-byte vectors along a row) for the [BS, R] and [BS, DR] parts; RING_L: the ring's shared layout.
        PDL (kernels/pdl.py): the length (set before the step) and the first tile's rows, if the newest row (n - 1,
        written by the previous launch, mla_absorb_write) is not among them, are read before the wait; q and
        every later tile after it."""
        CDT: gl.constexpr = gl.float16 if FP8 else gl.bfloat16  # the MMAs' operand type
        LQ: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [4, 1], [1, 0])  # q [BH, R]
        LQP: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])  # q_pe [BH, DR]
        MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BH, 16])
        SW: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
        SWP: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=BH * 2, element_bitwidth=16, rank=2)

        i_s = gl.program_id(0)
        n = gl.load(seq_ptr)
        chunk = gl.maximum(gl.cdiv(gl.cdiv(n, NS), BS) * BS, MIN_CHUNK)
        s0 = i_s * chunk
        s1 = gl.minimum(s0 + chunk, n)
        if s0 < n:
            c_ring = gl.allocate_shared_memory(RING_DT, [2, BS, R], RING_L)
            k_ring = gl.allocate_shared_memory(RING_DT, [2, BS, DR], RING_L)
            if PDL:
                early = s0 + BS < n  # tile 0 ends before row n - 1
                if early:
                    _issue_tile(c_ring.index(0), k_ring.index(0), lat, s0, s1, stride_lat, R, DR, BS, LC, LK)
                _gdc_wait()
                _gdc_launch_dependents()
                if not early:
                    _issue_tile(c_ring.index(0), k_ring.index(0), lat, s0, s1, stride_lat, R, DR, BS, LC, LK)
            else:
                _issue_tile(c_ring.index(0), k_ring.index(0), lat, s0, s1, stride_lat, R, DR, BS, LC, LK)
            cp.commit_group()
            # q_abs [BH, R] and q_pe [BH, DR] (heads past H = 0) into shared memory, read as q^T by the MMAs
            oh = gl.arange(0, BH, layout=gl.SliceLayout(1, LQ))
            orr = gl.arange(0, R, layout=gl.SliceLayout(0, LQ))
            qa = gl.load(q_abs + oh[:, None] * R + orr[None, :], mask=(oh < H)[:, None], other=0.0)
            q_s = gl.allocate_shared_memory(CDT, [BH, R], SW, qa.to(CDT))
            ohk = gl.arange(0, BH, layout=gl.SliceLayout(1, LQP))
            odk = gl.arange(0, DR, layout=gl.SliceLayout(0, LQP))
            qp = gl.load(q_pe + ohk[:, None] * stride_qp + odk[None, :], mask=(ohk < H)[:, None], other=0.0)
            qp_s = gl.allocate_shared_memory(CDT, [BH, DR], SW, qp.to(CDT))
            p_s = gl.allocate_shared_memory(CDT, [BS, BH], SWP)
            if FP8:  # this tile, widened
                c_w = gl.allocate_shared_memory(CDT, [BS, R], SW)
                k_w = gl.allocate_shared_memory(CDT, [BS, DR], SW)

            m_i = gl.full([BH], float("-inf"), gl.float32, layout=gl.SliceLayout(0, MMA))
            l_i = gl.zeros([BH], gl.float32, layout=gl.SliceLayout(0, MMA))
            acc = gl.zeros([R, BH], gl.float32, layout=MMA)  # acc^T
            zero_s = gl.zeros([BS, BH], gl.float32, layout=MMA)
            rows = gl.arange(0, BS, layout=gl.SliceLayout(1, MMA))
            ntiles = gl.cdiv(s1 - s0, BS)
            for it in range(ntiles):
                s = s0 + it * BS
                buf = it % 2
                _barrier()  # every warp is done with the ring slot the next copies overwrite (and c_w)
                if it + 1 < ntiles:  # the next tile streams in during this tile's products
                    _issue_tile(c_ring.index(1 - buf), k_ring.index(1 - buf), lat, s + BS, s1, stride_lat,
                                R, DR, BS, LC, LK)
                cp.commit_group()
                if FP8:
                    rs = gl.load(lat_scale + gl.minimum(s + rows, s1 - 1))  # [BS] row scales (overlaps the wait)
                cp.wait_group(1)  # this tile's group has landed (the newest may still be in flight)
                _barrier()
                if FP8:
                    c8 = c_ring.index(buf)
                    for r0 in gl.static_range(0, BS, 16):  # 16-row chunks: few registers live beside acc
                        c_w.slice(r0, 16).store(c8.slice(r0, 16).load(LC).to(CDT))
                    k_w.store(k_ring.index(buf).load(LK).to(CDT))
                    _barrier()
                    c_t = c_w
                    k_t = k_w
                else:
                    c_t = c_ring.index(buf)
                    k_t = k_ring.index(buf)
                fence_async_shared()
                sc = warpgroup_mma(c_t, q_s.permute((1, 0)), zero_s, use_acc=False, is_async=True)
                sc = warpgroup_mma(k_t, qp_s.permute((1, 0)), sc, is_async=True)
                sc = warpgroup_mma_wait(0, deps=[sc])  # scores^T [BS, BH] (of the stored values)
                if FP8:
                    sc = sc * (rs * qk_scale)[:, None]
                else:
                    sc = sc * qk_scale
                sc = gl.where((s + rows < s1)[:, None], sc, float("-inf"))
                m_new = gl.maximum(m_i, gl.max(sc, 0))
                alpha = gl.exp2(m_i - m_new)
                p = gl.exp2(sc - m_new[None, :])
                l_i = l_i * alpha + gl.sum(p, 0)
                m_i = m_new
                if FP8:
                    p = p * rs[:, None]
                p_s.store(p.to(CDT))
                _barrier()
                fence_async_shared()
                acc = warpgroup_mma(c_t.permute((1, 0)), p_s, acc * alpha[None, :], is_async=True)
                acc = warpgroup_mma_wait(0, deps=[acc])
            cp.wait_group(0)
            oho = gl.arange(0, BH, layout=gl.SliceLayout(0, MMA))
            gl.store(ws_m + i_s * H + oho, m_i, mask=oho < H)
            gl.store(ws_l + i_s * H + oho, l_i, mask=oho < H)
            oro = gl.arange(0, R, layout=gl.SliceLayout(1, MMA))
            gl.store(ws_acc + (i_s * H + oho)[None, :] * R + oro[:, None], acc, mask=(oho < H)[None, :])


def split_layouts(fp8: bool, DR: int):
    """(LC, LK, RING_L) of the split kernel: the register layouts of the latent and rope copies (16 bytes a thread)
    and the ring's shared layout (fp8: rows written and read whole, no MMA reads it)."""
    v = 16 if fp8 else 8  # elements per 16-byte copy
    lc = gl.BlockedLayout([1, v], [1, 32], [4, 1], [1, 0])
    lk = gl.BlockedLayout([1, v], [32 // (DR // v), DR // v], [4, 1], [1, 0])
    ring = gl.SwizzledSharedLayout(1, 1, 1, [1, 0]) if fp8 else gl.NVMMASharedLayout(
        swizzle_byte_width=128, element_bitwidth=16, rank=2)
    return lc, lk, ring


def mla_split_gluon(q_abs, q_pe, latent, seq_ptr, ws, qk_scale: float, NS: int, BS: int, min_chunk: int,
                    latent_scale=None, pdl_kw=None):
    """Launch the split kernel: q_abs [H, R], q_pe [H, DR] (row stride free), latent [S_cap, R + DR] bf16, or fp8
    e4m3 with latent_scale [S_cap] fp32; seq_ptr an int32 device tensor [1]; ws = (m, l, acc) workspaces of
    mla._workspace(NS, H, R); pdl_kw: mla._pdl_kw() (PDL and the launch option), default without PDL."""
    H, R = q_abs.shape
    DR = q_pe.shape[1]
    assert BS == 64 and latent.stride(1) == 1 and q_pe.stride(1) == 1 and q_abs.is_contiguous()
    fp8 = latent.dtype == torch.float8_e4m3fn
    assert not fp8 or (latent_scale is not None and latent_scale.is_contiguous())
    lc, lk, ring = split_layouts(fp8, DR)
    mla_split_gluon_kernel[(NS,)](q_abs, q_pe, latent, latent_scale if fp8 else ws[0], seq_ptr, *ws, qk_scale,
                                  latent.stride(0), q_pe.stride(0), H=H, R=R, DR=DR, BH=32, BS=BS, NS=NS,
                                  MIN_CHUNK=min_chunk, FP8=fp8, RING_DT=gl.float8e4nv if fp8 else gl.bfloat16,
                                  LC=lc, LK=lk, RING_L=ring, num_warps=4, **(pdl_kw or dict(PDL=False)))
