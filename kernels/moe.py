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

from .quant_matmul import (_P56, _P77, _P81, _P85, _P89, _P93, _PM56, INTERPRET, QT_ID, WORD_QTYPES, _bf,
                           _dot_w, _dq_dot_rows, _dq_tile, _h16, _i2f, _wdot, packed_row_bytes, qlinear,
                           split_workspace, word_c)


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
def _wdot_e(x, w, n, N, K, e0, e1, QT: tl.constexpr, BN: tl.constexpr, C: tl.constexpr, EVEN: tl.constexpr):
    """_wdot over elements [e0, e1) of K (multiples of the type's block)."""
    if QT == 0:
        b0 = e0 // 32
        b1 = tl.minimum(e1, K) // 32
    else:
        b0 = e0 // 256
        b1 = tl.minimum(e1, K) // 256
    return _wdot(x, 1, w, n, N, K, b0, b1, QT, BN, C, EVEN)


@triton.jit
def _moe_w_gate_up_kernel(x, slot_ids, gate, up, sgate, sup, act, part, cnt, F, D, mat_g, mat_u, EPS,
                          KTOP: tl.constexpr, E: tl.constexpr, S1: tl.constexpr, BF: tl.constexpr,
                          QTG: tl.constexpr, CG: tl.constexpr, EVG: tl.constexpr,
                          QTU: tl.constexpr, CU: tl.constexpr, EVU: tl.constexpr,
                          QTSG: tl.constexpr, CSG: tl.constexpr, EVSG: tl.constexpr,
                          QTSU: tl.constexpr, CSU: tl.constexpr, EVSU: tl.constexpr):
    i_f, i_e, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    f = i_f * BF + tl.arange(0, BF)
    fl = tl.minimum(f, F - 1)
    f_mask = f < F
    e0 = i_s * EPS
    e1 = e0 + EPS
    if i_e < KTOP:
        slot = tl.load(slot_ids + i_e).to(tl.int64)
        b_g = _wdot_e(x, gate + slot * mat_g, fl, F, D, e0, e1, QTG, BF, CG, EVG)
        b_u = _wdot_e(x, up + slot * mat_u, fl, F, D, e0, e1, QTU, BF, CU, EVU)
    else:
        b_g = _wdot_e(x, sgate, fl, F, D, e0, e1, QTSG, BF, CSG, EVSG)
        b_u = _wdot_e(x, sup, fl, F, D, e0, e1, QTSU, BF, CSU, EVSU)
    if S1 == 1:
        tl.store(act + i_e * F + f, b_g * tl.sigmoid(b_g) * b_u, mask=f_mask)
    else:
        pg = part + (i_s * E + i_e) * 2 * F
        tl.store(pg + f, b_g, mask=f_mask)
        tl.store(pg + F + f, b_u, mask=f_mask)
        tl.debug_barrier()
        nt = tl.cdiv(F, BF)
        c = tl.atomic_add(cnt + i_e * nt + i_f, 1, sem="acq_rel", scope="gpu")
        if c == S1 - 1:
            g = tl.zeros([BF], tl.float32)
            u = tl.zeros([BF], tl.float32)
            for s in range(S1):
                ps = part + (s * E + i_e) * 2 * F
                g += tl.load(ps + f, mask=f_mask, other=0.0, cache_modifier=".cg")
                u += tl.load(ps + F + f, mask=f_mask, other=0.0, cache_modifier=".cg")
            tl.store(act + i_e * F + f, g * tl.sigmoid(g) * u, mask=f_mask)
            tl.atomic_xchg(cnt + i_e * nt + i_f, 0, sem="relaxed", scope="gpu")


@triton.jit
def _moe_w_down_kernel(act, slot_ids, weights, down, sdown, out, part, cnt, F, D, mat_d, FPS,
                       KTOP: tl.constexpr, E: tl.constexpr, S2: tl.constexpr, BD: tl.constexpr,
                       QTD: tl.constexpr, CD: tl.constexpr, EVD: tl.constexpr,
                       QTSD: tl.constexpr, CSD: tl.constexpr, EVSD: tl.constexpr):
    i_d, i_e, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    d = i_d * BD + tl.arange(0, BD)
    dl = tl.minimum(d, D - 1)
    d_mask = d < D
    e0 = i_s * FPS
    e1 = e0 + FPS
    if i_e < KTOP:
        slot = tl.load(slot_ids + i_e).to(tl.int64)
        wt = tl.load(weights + i_e).to(tl.float32)
        y = wt * _wdot_e(act + i_e * F, down + slot * mat_d, dl, D, F, e0, e1, QTD, BD, CD, EVD)
    else:
        y = _wdot_e(act + i_e * F, sdown, dl, D, F, e0, e1, QTSD, BD, CSD, EVSD)
    NP: tl.constexpr = E * S2
    if NP == 1:
        tl.store(out + d, y.to(out.dtype.element_ty), mask=d_mask)
    else:
        tl.store(part + (i_e * S2 + i_s) * D + d, y, mask=d_mask)
        tl.debug_barrier()
        c = tl.atomic_add(cnt + i_d, 1, sem="acq_rel", scope="gpu")
        if c == NP - 1:
            tot = tl.zeros([BD], tl.float32)
            for p in range(NP):
                tot += tl.load(part + p * D + d, mask=d_mask, other=0.0, cache_modifier=".cg")
            tl.store(out + d, tot.to(out.dtype.element_ty), mask=d_mask)
            tl.atomic_xchg(cnt + i_d, 0, sem="relaxed", scope="gpu")


def moe_decode_config(qtypes, shared_qtypes, D, F):
    """Default (BF, S1, BD, S2, num_warps) of the word-path decode (see scripts/sweep_gemv.py)."""
    if INTERPRET:  # few, wide programs: the interpreter's cost is per operation
        return 128, 1, 128, 1, 4
    return 16, 9, 16, 4, 2  # run 3 sweep (H200): 48.9 us Q4_K/Q4_K/Q6_K, 46.3 us Q3_K/Q3_K/Q4_K (+Q8_0 shared)


def moe_decode(x, slot_ids, weights, gate_pool, up_pool, down_pool, qtypes, out, shared=None,
               shared_qtypes=None, workspace=None, impl="word", BF=None, S1=None, BD=None, S2=None,
               num_warps=None, num_stages=None, C=None, variant=None, IPP1=None, IPP2=None):
    """One token. x [D] (any float dtype); slot_ids [k] int32 and weights [k] fp32 on the device;
    pools uint8 [S, rows, packed_row_bytes] (packed layout); qtypes (gate, up, down);
    shared: (gate [F, ...], up, down [D, ...]) packed, unweighted, with shared_qtypes.
    Writes out [D]. impl "word" (default): split-K word-path kernels, knobs BF/S1 (rows per program and
    D-splits of gate/up), BD/S2 (rows and F-splits of down), num_warps, num_stages, C (chunks per step);
    "tile": the older tile kernels. Workspaces are cached per device and size (graph-capturable after
    the first call).
    variant: None = DEFAULTS["variant"]; "v1" = the kernels above (impl picks word/tile); "v2" =
    moe_decode_v2 (knobs BF, BD, IPP1, IPP2, num_warps, num_stages; S1/S2/C do not apply)."""
    variant = variant or DEFAULTS["variant"]
    if variant == "v2" and impl != "tile":
        return moe_decode_v2(x, slot_ids, weights, gate_pool, up_pool, down_pool, qtypes, out, shared=shared,
                             shared_qtypes=shared_qtypes, workspace=workspace, BF=BF, BD=BD, IPP1=IPP1,
                             IPP2=IPP2, num_warps=num_warps, num_stages=num_stages)
    assert variant == "v1", variant
    num_stages = num_stages or 1
    if impl == "tile":
        return moe_decode_tile(x, slot_ids, weights, gate_pool, up_pool, down_pool, qtypes, out, shared=shared,
                               shared_qtypes=shared_qtypes, workspace=workspace)
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
    E = K + int(has_shared)
    dBF, dS1, dBD, dS2, dW = moe_decode_config(qtypes, shared_qtypes, D, F)
    BF, S1, BD, S2 = BF or dBF, S1 or dS1, BD or dBD, S2 or dS2
    num_warps = num_warps or dW
    all_word = all(q in WORD_QTYPES for q in (qg, qu, qd, qsg, qsu, qsd))
    for t in (gate_pool, up_pool, down_pool, sg, su, sd):
        assert t.data_ptr() % 16 == 0
    assert gate_pool[0].numel() % 16 == 0 and up_pool[0].numel() % 16 == 0 and down_pool[0].numel() % 16 == 0
    if not all_word:  # the word path has no split/fast path for Q5_K, Q2_K, BF16: use the tile kernels
        return moe_decode_tile(x, slot_ids, weights, gate_pool, up_pool, down_pool, qtypes, out, shared=shared,
                               shared_qtypes=shared_qtypes, workspace=workspace)
    # K slices in elements, multiples of 256
    S1 = max(1, min(S1, D // 256))
    eps = triton.cdiv(D // 256, S1) * 256
    S1 = triton.cdiv(D, eps)
    S2 = max(1, min(S2, F // 256))
    fps = triton.cdiv(F // 256, S2) * 256
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
    act = workspace if workspace is not None else _workspace(E * F, x.device)
    part1, cnt1 = split_workspace(x.device, S1 * E * 2 * F if S1 > 1 else 0, E * ntf if S1 > 1 else 0)
    _moe_w_gate_up_kernel[(ntf, E, S1)](
        x, slot_ids, gate_pool, up_pool, sg, su, act, part1, cnt1, F, D, gate_pool[0].numel(), up_pool[0].numel(),
        eps, KTOP=K, E=E, S1=S1, BF=BF, QTG=QT_ID[qg], CG=CG, EVG=EVG, QTU=QT_ID[qu], CU=CU, EVU=EVU,
        QTSG=QT_ID[qsg], CSG=CSG, EVSG=EVSG, QTSU=QT_ID[qsu], CSU=CSU, EVSU=EVSU,
        num_warps=num_warps, num_stages=num_stages)
    NP = E * S2
    part2, cnt2 = split_workspace(x.device, NP * D if NP > 1 else 0, ntd if NP > 1 else 0)
    _moe_w_down_kernel[(ntd, E, S2)](
        act, slot_ids, weights, down_pool, sd, out, part2, cnt2, F, D, down_pool[0].numel(), fps,
        KTOP=K, E=E, S2=S2, BD=BD, QTD=QT_ID[qd], CD=CD, EVD=EVD, QTSD=QT_ID[qsd], CSD=CSD, EVSD=EVSD,
        num_warps=num_warps, num_stages=num_stages)
    return out


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
# Decode "v2": all routed experts (and the shared one) of a row tile in ONE program, pipelined K loop.
#
# Why (analysis of v1 at 5x its floor): v1 programs are one-shot (one 256-element slice of BF rows of one
# expert). Each lives through a serial chain slot id -> weights -> partial store -> acq_rel counter ->
# last-arriver reloads, and its weight bytes are in flight only during ~1/3 of that life, so an SM has
# far fewer bytes outstanding than the ~30-40 KB that HBM latency x bandwidth needs; on top, Q6_K down
# at BD=16 gives one row per thread, so the per-thread x preparation (~3 instr per x element) is not
# shared and dominates the instruction count.
# v2: a program owns IPP row tiles (gate/up: BF rows of F; down: BD rows of D) and walks the K axis in
# 256-element steps with a flat `tl.range(num_stages=NS)` loop; every step loads, for ALL k routed experts
# at once, a [BR, KP, chunks, 4-word] tile (KP = k rounded up to a power of two), plus the shared expert's
# [BR, 1, ...] tile. Consequences:
#   - bytes per step are big (gate/up Q4_K, BF=8, k=8: 2 x 8 x 8 x 148 B + 2 x 8 x 272 B = 23 KB) and
#     the loop is flat, so Triton's pipeliner (num_stages > 1) keeps the next steps' loads in flight
#     (cp.async into shared memory) while the current step is computed;
#   - x preparation is shared by every row AND (gate/up) every expert held by a thread;
#   - the full K of a tile stays in one program: no partials, no counters, no atomics, no reductions
#     across programs; the down program sums w_e * y_e over the experts in registers and writes out
#     directly (deterministic by construction); only 2 plain launches, nothing to re-arm.
# Scales are loaded once per (row, expert, block or chunk pair) as in v1.
# Types: Q4_K, Q6_K, Q3_K, Q8_0 (word path); others fall back to the tile kernels.
# Shapes in the helpers: BR rows (tile), KP expert lanes, XK = 1 (x shared by all lanes) or KP (down:
# one act row per lane). All return [BR, KP] fp32 partial dots * 2^-56 (see quant_matmul's word path).

DEFAULTS = {
    "variant": "v1",  # the GPU sweep (scripts/sweep_moe.py) decides; "v2" = the kernels below
    # v2: rows per gate/up program, rows per down program, row tiles per program (gate/up, down),
    # warps, pipeline stages of the K loop
    "v2": dict(BF=8, BD=8, IPP1=1, IPP2=1, num_warps=4, num_stages=3),
}
V2_QTYPES = ("Q8_0", "Q6_K", "Q4_K", "Q3_K")


@triton.jit
def _xv(xb, b: tl.constexpr):
    # x at pointers xb ([XK, C, 4]) + b, fp32
    return tl.load(xb + b).to(tl.float32)


@triton.jit
def _sum4(v):
    return tl.sum(v, axis=3)  # [BR, KP, C, 4] -> [BR, KP, C]


@triton.jit
def _v2_q4k(xp, wp, n, N, K, blk):
    """Q4_K block `blk` (256 elements, 8 16-byte chunks per row) of rows n [BR] of the matrices at
    wp [KP] (uint8 pointers), dotted with x (pointers xp [XK] to element 0)."""
    NB = K // 256
    NBT = N * NB
    cc = tl.arange(0, 8)
    ii = tl.arange(0, 4)
    rb = (n * NB + blk)[:, None]  # [BR, 1] block index within each matrix
    wq = wp.to(tl.pointer_type(tl.uint32))[None, :, None, None]
    q = tl.load(wq + ((rb * 32)[:, :, None, None] + (cc * 4)[None, None, :, None] + ii[None, None, None, :]))
    base = 256 * blk + 32 * cc - 16 * (cc % 2)  # element of (word 0, byte 0, low nibble) per chunk
    xb = xp[:, None, None] + (base[:, None] + 4 * ii[None, :])[None, :, :]  # [XK, 8, 4]
    xl0, xl1, xl2, xl3 = _xv(xb, 0), _xv(xb, 1), _xv(xb, 2), _xv(xb, 3)
    xh0, xh1, xh2, xh3 = _xv(xb, 32), _xv(xb, 33), _xv(xb, 34), _xv(xb, 35)
    t = q >> 12
    s_lo = _bf(q & 0xF) * (xl0 * _P93)[None]
    s_lo += _bf(q & 0xF00) * (xl1 * _P85)[None]
    s_lo += _bf(q & 0xF0000) * (xl2 * _P77)[None]
    s_lo += _bf(t & 0xF000) * (xl3 * _P81)[None]
    s_hi = _bf(q & 0xF0) * (xh0 * _P89)[None]
    s_hi += _bf(q & 0xF000) * (xh1 * _P81)[None]
    s_hi += _bf(t & 0xF00) * (xh2 * _P85)[None]
    s_hi += _bf(t & 0xF0000) * (xh3 * _P77)[None]
    xs_lo = (tl.sum(xl0 + xl1 + xl2 + xl3, axis=2) * _PM56)[None]  # [1, XK, 8]
    xs_hi = (tl.sum(xh0 + xh1 + xh2 + xh3, axis=2) * _PM56)[None]
    # chunk pair j = cc // 2 holds sub-blocks 2j (low nibbles) and 2j+1 (high): one uint16 of sc and m
    so = (rb * 4)[:, :, None] + (cc // 2)[None, None, :]  # [BR, 1, 8]
    scp = tl.load((wp + NBT * 128).to(tl.pointer_type(tl.uint16))[None, :, None] + so).to(tl.int32)
    mp = tl.load((wp + NBT * 136).to(tl.pointer_type(tl.uint16))[None, :, None] + so).to(tl.int32)
    dd = tl.load((wp + NBT * 144).to(tl.pointer_type(tl.uint32))[None, :] + rb)  # [BR, KP] fp16 d | dmin
    a = _i2f(scp & 0xFF, 0.0) * _sum4(s_lo) + _i2f(scp >> 8, 0.0) * _sum4(s_hi)
    b = _i2f(mp & 0xFF, 0.0) * xs_lo + _i2f(mp >> 8, 0.0) * xs_hi
    return _h16(dd & 0xFFFF) * tl.sum(a, axis=2) - _h16(dd >> 16) * tl.sum(b, axis=2)


@triton.jit
def _v2_q8_0(xp, wp, n, N, K, blk):
    """Q8_0: the 8 blocks (16 chunks of 16 quants) of the 256 elements of step `blk`."""
    RW = K // 4  # uint32 words per row of the qs plane
    cg = blk * 16 + tl.arange(0, 16)  # 16-element chunk index along the row
    ii = tl.arange(0, 4)
    wq = wp.to(tl.pointer_type(tl.uint32))[None, :, None, None]
    q = tl.load(wq + ((n * RW)[:, None, None, None] + (cg * 4)[None, None, :, None] + ii[None, None, None, :]))
    xb = xp[:, None, None] + (16 * cg[:, None] + 4 * ii[None, :])[None, :, :]  # [XK, 16, 4]
    x0, x1, x2, x3 = _xv(xb, 0), _xv(xb, 1), _xv(xb, 2), _xv(xb, 3)
    u = q ^ 0x80808080  # offset binary: byte + 128
    t = u >> 16
    s = _bf(u & 0xFF) * (x0 * _P93)[None]
    s += _bf(u & 0xFF00) * (x1 * _P85)[None]
    s += _bf(t & 0xFF) * (x2 * _P93)[None]
    s += _bf(t & 0xFF00) * (x3 * _P85)[None]
    xs = (tl.sum(x0 + x1 + x2 + x3, axis=2) * (128.0 * _PM56))[None]  # [1, XK, 16]
    dp = (wp + N * K).to(tl.pointer_type(tl.float16))[None, :, None]
    d = tl.load(dp + ((n * (K // 32))[:, None, None] + (cg // 2)[None, None, :])).to(tl.float32)
    return tl.sum(d * (_sum4(s) - xs), axis=2)


@triton.jit
def _v2_s6(v, x0, x1, x2, x3):
    s = _bf(v & 0x3F) * (x0 * _P93)[None]
    s += _bf(v & 0x3F00) * (x1 * _P85)[None]
    s += _bf(v & 0x3F0000) * (x2 * _P77)[None]
    s += _bf((v >> 16) & 0x3F00) * (x3 * _P85)[None]
    return _sum4(s)


@triton.jit
def _v2_s3(v, x0, x1, x2, x3):
    s = _bf(v & 0x7) * (x0 * _P93)[None]
    s += _bf(v & 0x700) * (x1 * _P85)[None]
    s += _bf(v & 0x70000) * (x2 * _P77)[None]
    s += _bf((v >> 16) & 0x700) * (x3 * _P85)[None]
    return _sum4(s)


@triton.jit
def _v2_xs4(x0, x1, x2, x3):
    return (tl.sum(x0 + x1 + x2 + x3, axis=2) * _PM56)[None]  # [XK, C, 4] -> [1, XK, C]


@triton.jit
def _v2_q6k(xp, wp, n, N, K, blk):
    """Q6_K block: 4 chunks per row, each ql 2 x 16 B + qh 16 B = 64 quants of 4 groups of 16."""
    NB = K // 256
    NBT = N * NB
    cc = tl.arange(0, 4)
    ii = tl.arange(0, 4)
    nh = cc // 2  # which 128-element half
    g = cc % 2  # which 16 of each 32-run
    rb = (n * NB + blk)[:, None]
    wl = wp.to(tl.pointer_type(tl.uint32))[None, :, None, None]
    wh = (wp + NBT * 128).to(tl.pointer_type(tl.uint32))[None, :, None, None]
    ol = (rb * 32)[:, :, None, None] + (16 * nh + 4 * g)[None, None, :, None] + ii[None, None, None, :]
    a0 = tl.load(wl + ol)
    a1 = tl.load(wl + ol + 8)
    hw = tl.load(wh + ((rb * 16)[:, :, None, None] + (8 * nh + 4 * g)[None, None, :, None]
                       + ii[None, None, None, :]))
    c_0 = (a0 & 0x0F0F0F0F) | ((hw << 4) & 0x30303030)
    c_1 = (a1 & 0x0F0F0F0F) | ((hw << 2) & 0x30303030)
    c_2 = ((a0 >> 4) & 0x0F0F0F0F) | (hw & 0x30303030)
    c_3 = ((a1 >> 4) & 0x0F0F0F0F) | ((hw >> 2) & 0x30303030)
    base = 256 * blk + 128 * nh + 16 * g
    so = (rb * 16)[:, :, None] + (8 * nh + g)[None, None, :]  # [BR, 1, 4] scale of run k = so + 2k
    scp = (wp + NBT * 192).to(tl.pointer_type(tl.int8))[None, :, None]
    d = tl.load((wp + NBT * 208).to(tl.pointer_type(tl.float16))[None, :] + rb).to(tl.float32)
    part = tl.zeros(so.shape, tl.float32) + tl.zeros(d.shape, tl.float32)[:, :, None]  # [BR, KP, 4]
    for k in tl.static_range(4):
        xb = xp[:, None, None] + ((base + 32 * k)[:, None] + 4 * ii[None, :])[None, :, :]
        x0, x1, x2, x3 = _xv(xb, 0), _xv(xb, 1), _xv(xb, 2), _xv(xb, 3)
        if k == 0:
            sk = _v2_s6(c_0, x0, x1, x2, x3)
        elif k == 1:
            sk = _v2_s6(c_1, x0, x1, x2, x3)
        elif k == 2:
            sk = _v2_s6(c_2, x0, x1, x2, x3)
        else:
            sk = _v2_s6(c_3, x0, x1, x2, x3)
        sc = tl.load(scp + so + 2 * k).to(tl.float32)
        part += sc * (sk - 32.0 * _v2_xs4(x0, x1, x2, x3))
    return d * tl.sum(part, axis=2)


@triton.jit
def _v2_q3k(xp, wp, n, N, K, blk):
    """Q3_K block: 4 chunks per row, each qs 16 B + hm 16 B (shared by the two halves)."""
    NB = K // 256
    NBT = N * NB
    cc = tl.arange(0, 4)
    ii = tl.arange(0, 4)
    nh = cc // 2
    g = cc % 2
    rb = (n * NB + blk)[:, None]
    wqs = wp.to(tl.pointer_type(tl.uint32))[None, :, None, None]
    whm = (wp + NBT * 64).to(tl.pointer_type(tl.uint32))[None, :, None, None]
    qs = tl.load(wqs + ((rb * 16)[:, :, None, None] + (8 * nh + 4 * g)[None, None, :, None]
                        + ii[None, None, None, :]))
    hm = tl.load(whm + ((rb * 8)[:, :, None, None] + (4 * g)[None, None, :, None] + ii[None, None, None, :]))
    hm = hm >> (4 * nh).to(tl.uint32)[None, None, :, None]  # bit j of each byte: high bit of group j
    base = 256 * blk + 128 * nh + 16 * g
    so = (rb * 16)[:, :, None] + (8 * nh + g)[None, None, :]
    scp = (wp + NBT * 96).to(tl.pointer_type(tl.int8))[None, :, None]
    d = tl.load((wp + NBT * 112).to(tl.pointer_type(tl.float16))[None, :] + rb).to(tl.float32)
    part = tl.zeros(so.shape, tl.float32) + tl.zeros(d.shape, tl.float32)[:, :, None]
    for jj in tl.static_range(4):
        xb = xp[:, None, None] + ((base + 32 * jj)[:, None] + 4 * ii[None, :])[None, :, :]
        x0, x1, x2, x3 = _xv(xb, 0), _xv(xb, 1), _xv(xb, 2), _xv(xb, 3)
        if jj == 0:
            v = (qs & 0x03030303) | ((hm << 2) & 0x04040404)
        elif jj == 1:
            v = ((qs >> 2) & 0x03030303) | ((hm << 1) & 0x04040404)
        elif jj == 2:
            v = ((qs >> 4) & 0x03030303) | (hm & 0x04040404)
        else:
            v = ((qs >> 6) & 0x03030303) | ((hm >> 1) & 0x04040404)
        sj = _v2_s3(v, x0, x1, x2, x3)
        sc = tl.load(scp + so + 2 * jj).to(tl.float32)
        part += sc * (sj - 4.0 * _v2_xs4(x0, x1, x2, x3))
    return d * tl.sum(part, axis=2)


@triton.jit
def _v2_blk(xp, wp, n, N, K, blk, QT: tl.constexpr):
    """[BR, KP] * 2^-56: 256-element step `blk` of rows n of the matrices wp [KP] dotted with x (xp [XK])."""
    if QT == 3:
        return _v2_q4k(xp, wp, n, N, K, blk)
    elif QT == 0:
        return _v2_q8_0(xp, wp, n, N, K, blk)
    elif QT == 1:
        return _v2_q6k(xp, wp, n, N, K, blk)
    else:
        return _v2_q3k(xp, wp, n, N, K, blk)


@triton.jit
def _moe_v2_gate_up_kernel(x, slot_ids, gate, up, sgate, sup, act, F, D, mat_g, mat_u, NIT,
                           KTOP: tl.constexpr, KP: tl.constexpr, BF: tl.constexpr, HAS_SHARED: tl.constexpr,
                           QTG: tl.constexpr, QTU: tl.constexpr, QTSG: tl.constexpr, QTSU: tl.constexpr,
                           NS: tl.constexpr):
    """Program p: row tiles p, p + P, ... (< NIT) of F, BF rows each, every routed expert (+ shared):
    act[e, f] = silu(gate_e[f] . x) * (up_e[f] . x), e < KTOP; act[KTOP, f] the shared expert's."""
    pid = tl.program_id(0)
    npg = tl.num_programs(0)
    NB = D // 256
    e = tl.arange(0, KP)
    e_ok = e < KTOP
    slot = tl.load(slot_ids + tl.minimum(e, KTOP - 1)).to(tl.int64)  # padded lanes repeat the last expert
    gp = gate + slot * mat_g  # [KP] uint8 pointers
    upp = up + slot * mat_u
    zero1 = tl.zeros([1], tl.int32)
    xp = x + zero1  # [1]: x shared by all expert lanes
    sgp = sgate + zero1
    sup_ = sup + zero1
    n_mine = tl.cdiv(NIT - pid, npg)  # row tiles of this program
    acc_g = tl.zeros([BF, KP], tl.float32)
    acc_u = tl.zeros([BF, KP], tl.float32)
    acc_sg = tl.zeros([BF, 1], tl.float32)
    acc_su = tl.zeros([BF, 1], tl.float32)
    for st in tl.range(0, n_mine * NB, num_stages=NS):  # flat (tile, block) loop: pipelinable
        it = pid + (st // NB) * npg
        blk = st % NB
        f = it * BF + tl.arange(0, BF)
        fl = tl.minimum(f, F - 1)  # clamped rows: loads stay in bounds, stores are masked
        acc_g += _v2_blk(xp, gp, fl, F, D, blk, QTG)
        acc_u += _v2_blk(xp, upp, fl, F, D, blk, QTU)
        if HAS_SHARED:
            acc_sg += _v2_blk(xp, sgp, fl, F, D, blk, QTSG)
            acc_su += _v2_blk(xp, sup_, fl, F, D, blk, QTSU)
        last = blk == NB - 1  # tile done: write act, restart the sums (branch-free)
        g = acc_g * _P56
        u = acc_u * _P56
        f_ok = (f < F) & ((blk + tl.zeros([BF], tl.int32)) == NB - 1)  # [BF] (vector: interpreter-safe)
        tl.store(act + e[None, :] * F + f[:, None], g * tl.sigmoid(g) * u, mask=f_ok[:, None] & e_ok[None, :])
        acc_g = tl.where(last, 0.0, acc_g)
        acc_u = tl.where(last, 0.0, acc_u)
        if HAS_SHARED:
            g = acc_sg * _P56
            u = acc_su * _P56
            tl.store(act + KTOP * F + f[:, None], g * tl.sigmoid(g) * u, mask=f_ok[:, None])
            acc_sg = tl.where(last, 0.0, acc_sg)
            acc_su = tl.where(last, 0.0, acc_su)


@triton.jit
def _moe_v2_down_kernel(act, slot_ids, weights, down, sdown, out, F, D, mat_d, NIT,
                        KTOP: tl.constexpr, KP: tl.constexpr, BD: tl.constexpr, HAS_SHARED: tl.constexpr,
                        QTD: tl.constexpr, QTSD: tl.constexpr, NS: tl.constexpr):
    """Program p: row tiles p, p + P, ... (< NIT) of D, BD rows each:
    out[d] = sum_e w_e * down_e[d] . act[e] (+ shared_down[d] . act[KTOP]), summed in registers."""
    pid = tl.program_id(0)
    npg = tl.num_programs(0)
    NB = F // 256
    e = tl.arange(0, KP)
    e_ok = e < KTOP
    slot = tl.load(slot_ids + tl.minimum(e, KTOP - 1)).to(tl.int64)
    wt = tl.where(e_ok, tl.load(weights + tl.minimum(e, KTOP - 1)).to(tl.float32), 0.0)  # padded lanes: 0
    dp = down + slot * mat_d  # [KP]
    ap = act + tl.minimum(e, KTOP - 1) * F  # [KP]: each lane dots its own expert's act row
    sdp = sdown + tl.zeros([1], tl.int32)
    sap = act + KTOP * F + tl.zeros([1], tl.int32)
    n_mine = tl.cdiv(NIT - pid, npg)
    acc = tl.zeros([BD, KP], tl.float32)
    acc_s = tl.zeros([BD, 1], tl.float32)
    for st in tl.range(0, n_mine * NB, num_stages=NS):
        it = pid + (st // NB) * npg
        blk = st % NB
        d = it * BD + tl.arange(0, BD)
        dl = tl.minimum(d, D - 1)
        acc += _v2_blk(ap, dp, dl, D, F, blk, QTD)
        if HAS_SHARED:
            acc_s += _v2_blk(sap, sdp, dl, D, F, blk, QTSD)
        last = blk == NB - 1
        y = tl.sum(acc * wt[None, :], axis=1)
        if HAS_SHARED:
            y += tl.sum(acc_s, axis=1)
        y = y * _P56
        tl.store(out + d, y.to(out.dtype.element_ty), mask=(d < D) & ((blk + tl.zeros([BD], tl.int32)) == NB - 1))
        acc = tl.where(last, 0.0, acc)
        if HAS_SHARED:
            acc_s = tl.where(last, 0.0, acc_s)


def moe_decode_v2(x, slot_ids, weights, gate_pool, up_pool, down_pool, qtypes, out, shared=None,
                  shared_qtypes=None, workspace=None, BF=None, BD=None, IPP1=None, IPP2=None, num_warps=None,
                  num_stages=None):
    """moe_decode's contract (see there), v2 kernels; knobs default to DEFAULTS["v2"]. Types outside
    V2_QTYPES (Q5_K, Q2_K, BF16) go to the tile kernels. No allocation after the first call per device
    and size (act workspace cached), no host sync, no atomics: graph-capturable and deterministic."""
    D = x.shape[-1]
    F = gate_pool.shape[1]
    K = slot_ids.shape[0]
    qg, qu, qd = qtypes
    assert gate_pool.shape[2] == packed_row_bytes(qg, D) and down_pool.shape[2] == packed_row_bytes(qd, F)
    assert x.is_contiguous() and out.is_contiguous() and x.numel() == D
    has_shared = shared is not None
    if has_shared:
        sg, su, sd = shared
        qsg, qsu, qsd = shared_qtypes
        assert sg.shape[0] == F, "shared expert width must equal routed width"
    else:
        sg, su, sd = gate_pool, up_pool, down_pool
        qsg, qsu, qsd = qg, qu, qd
    if not all(q in V2_QTYPES for q in (qg, qu, qd, qsg, qsu, qsd)):
        return moe_decode_tile(x, slot_ids, weights, gate_pool, up_pool, down_pool, qtypes, out, shared=shared,
                               shared_qtypes=shared_qtypes, workspace=workspace)
    assert D % 256 == 0 and F % 256 == 0, "v2 walks K in 256-element steps"
    for t in (gate_pool, up_pool, down_pool, sg, su, sd):
        assert t.data_ptr() % 16 == 0
    assert gate_pool[0].numel() % 16 == 0 and up_pool[0].numel() % 16 == 0 and down_pool[0].numel() % 16 == 0
    assert max(gate_pool.numel(), up_pool.numel(), down_pool.numel()) < 2 ** 62
    cfg = dict(DEFAULTS["v2"])
    if INTERPRET:  # few, wide programs: the interpreter's cost is per operation
        cfg.update(BF=32, BD=32)
    BF, BD = BF or cfg["BF"], BD or cfg["BD"]
    IPP1, IPP2 = IPP1 or cfg["IPP1"], IPP2 or cfg["IPP2"]
    num_warps, num_stages = num_warps or cfg["num_warps"], num_stages or cfg["num_stages"]
    KP = triton.next_power_of_2(K)
    act = workspace if workspace is not None else _workspace((K + 1) * F, x.device)
    assert act.numel() >= (K + 1) * F
    ntf, ntd = triton.cdiv(F, BF), triton.cdiv(D, BD)
    _moe_v2_gate_up_kernel[(triton.cdiv(ntf, IPP1),)](
        x, slot_ids, gate_pool, up_pool, sg, su, act, F, D, gate_pool[0].numel(), up_pool[0].numel(), ntf,
        KTOP=K, KP=KP, BF=BF, HAS_SHARED=has_shared, QTG=QT_ID[qg], QTU=QT_ID[qu], QTSG=QT_ID[qsg],
        QTSU=QT_ID[qsu], NS=num_stages, num_warps=num_warps)
    _moe_v2_down_kernel[(triton.cdiv(ntd, IPP2),)](
        act, slot_ids, weights, down_pool, sd, out, F, D, down_pool[0].numel(), ntd,
        KTOP=K, KP=KP, BD=BD, HAS_SHARED=has_shared, QTD=QT_ID[qd], QTSD=QT_ID[qsd], NS=num_stages,
        num_warps=num_warps)
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
