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

Prefill (T tokens): assignments (token, j) are sorted by slot on the device (torch.sort + scatter_add
counts + searchsorted tile table: no host sync); grouped GEMMs over BM-row tiles of one expert each,
in-kernel dequant + tl.dot: gate/up fused with SiLU*up -> H [T*k, F] bf16 (sorted order), then down
with the routing weight in the epilogue -> Y [T*k, D] in (token, j) order, summed over j in fp32.
Floor: 2 * T * k * 3 * F * D flops (T=8192: 928 GFLOP -> ~1.2 ms at ~780 TFLOP/s); compute bound
from T ~ 1k on; at T=512 the expert weights (all 256 experts touched: 1.3 GB in Q4_K... per layer
256 * 3 * 2.36 M * 0.578 B = 1.05 GB -> 350 us) dominate.
"""
import torch
import triton
import triton.language as tl

from .quant_matmul import INTERPRET, QT_ID, _dot_w, _dq_dot_rows, _dq_tile, packed_row_bytes, qlinear


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


def moe_decode(x, slot_ids, weights, gate_pool, up_pool, down_pool, qtypes, out, shared=None,
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
            for bn, g, nw, ns in [(64, 4, 4, 3), (128, 4, 8, 3), (64, 8, 4, 2), (128, 8, 8, 2), (32, 8, 4, 3)]]


@triton.autotune(configs=_gemm_cfgs(), key=["F", "D", "BM", "QTG", "QTU"])
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
    acc_g = tl.zeros([BM, BN], tl.float32)
    acc_u = tl.zeros([BM, BN], tl.float32)
    for g0 in range(0, tl.cdiv(D, 16), G):
        gg = g0 + tl.arange(0, G)
        k = g0 * 16 + tl.arange(0, G * 16)
        b_x = tl.load(x + t[:, None] * stride_xt + k[None, :], mask=r_mask[:, None] & (k < D)[None, :],
                      other=0.0)
        q, A, B = _dq_tile(wg, n, n_mask, gg, F, D, QTG)
        acc_g = _dot_w(b_x, q, A, B, acc_g, DOT_F32)
        q, A, B = _dq_tile(wu, n, n_mask, gg, F, D, QTU)
        acc_u = _dot_w(b_x, q, A, B, acc_u, DOT_F32)
    b_h = acc_g * tl.sigmoid(acc_g) * acc_u
    tl.store(h + r[:, None].to(tl.int64) * F + n[None, :], b_h.to(h.dtype.element_ty),
             mask=r_mask[:, None] & n_mask[None, :])


@triton.autotune(configs=_gemm_cfgs(), key=["F", "D", "BM", "QTD"])
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
    acc = tl.zeros([BM, BN], tl.float32)
    for g0 in range(0, tl.cdiv(F, 16), G):
        gg = g0 + tl.arange(0, G)
        k = g0 * 16 + tl.arange(0, G * 16)
        b_h = tl.load(h + r[:, None] * F + k[None, :], mask=r_mask[:, None] & (k < F)[None, :], other=0.0)
        q, A, B = _dq_tile(wd, n, n_mask, gg, D, F, QTD)
        acc = _dot_w(b_h, q, A, B, acc, DOT_F32)
    acc = acc * wt[:, None]
    tl.store(y + a[:, None] * D + n[None, :], acc.to(y.dtype.element_ty), mask=r_mask[:, None] & n_mask[None, :])


def moe_route_tiles(topk_ids, S, BM):
    """Sort assignments by slot and cut them into BM-row tiles of one slot each, on the device.
    Returns (asg [A] sorted assignment indices, tile_slot, tile_row0, tile_row1 [max_tiles] int32);
    tiles past the real count carry slot = S (programs exit)."""
    flat = topk_ids.reshape(-1)
    A = flat.numel()
    srt, asg = torch.sort(flat.to(torch.int32), stable=True)
    counts = torch.zeros(S, dtype=torch.int32, device=flat.device)
    counts.scatter_add_(0, srt.long(), torch.ones_like(srt))
    row_end = torch.cumsum(counts, 0, dtype=torch.int32)  # [S]
    tiles = (counts + BM - 1) // BM
    tile_end = torch.cumsum(tiles, 0, dtype=torch.int32)  # [S]
    max_tiles = triton.cdiv(A, BM) + min(S, A)
    p = torch.arange(max_tiles, dtype=torch.int32, device=flat.device)
    tile_slot = torch.searchsorted(tile_end, p, right=True).to(torch.int32)  # S past the end
    e = tile_slot.clamp(max=S - 1).long()
    first_tile = tile_end[e] - tiles[e]
    tile_row0 = (row_end[e] - counts[e]) + (p - first_tile) * BM
    tile_row1 = row_end[e]
    return asg.to(torch.int32), tile_slot, tile_row0.to(torch.int32), tile_row1


def moe_prefill(x, topk_ids, topk_w, gate_pool, up_pool, down_pool, qtypes, out, shared=None,
                shared_qtypes=None, BM=None):
    """x [T, D]; topk_ids [T, k] slot ids (int); topk_w [T, k]; pools as in moe_decode. Writes out [T, D]."""
    T, D = x.shape
    k = topk_ids.shape[1]
    S, F = gate_pool.shape[0], gate_pool.shape[1]
    qg, qu, qd = qtypes
    A = T * k
    if BM is None:  # rows per expert tile, from the mean rows per slot
        BM = 16 if INTERPRET else max(16, min(128, triton.next_power_of_2(max(1, A // S))))
    asg, tile_slot, row0, row1 = moe_route_tiles(topk_ids, S, BM)
    tok = asg // k
    h = torch.empty(A, F, dtype=torch.bfloat16, device=x.device)
    y = torch.empty(A, D, dtype=torch.float32, device=x.device)
    nt = tile_slot.numel()
    w_flat = topk_w.reshape(-1).contiguous()
    _moe_gate_up_grouped_kernel[lambda m: (nt, triton.cdiv(F, m["BN"]))](
        x, x.stride(0), tok, tile_slot, row0, row1, gate_pool, up_pool, h, F, D,
        gate_pool[0].numel(), up_pool[0].numel(), S, QTG=QT_ID[qg], QTU=QT_ID[qu], BM=BM, DOT_F32=INTERPRET)
    _moe_down_grouped_kernel[lambda m: (nt, triton.cdiv(D, m["BN"]))](
        h, asg, w_flat, tile_slot, row0, row1, down_pool, y, F, D, down_pool[0].numel(), S,
        QTD=QT_ID[qd], BM=BM, DOT_F32=INTERPRET)
    res = y.view(T, k, D).sum(1)
    if shared is not None:
        sg, su, sd = shared
        qsg, qsu, qsd = shared_qtypes
        g = qlinear(x, sg, qsg, F)
        u = qlinear(x, su, qsu, F)
        res += qlinear(torch.nn.functional.silu(g.float()).mul_(u.float()).to(x.dtype), sd, qsd, D).float()
    out.copy_(res)
    return out
