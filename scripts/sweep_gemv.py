"""GPU sweep of the decode kernels' variants: qgemv M=1 (word path knobs vs the tile path and bf16 cuBLAS)
and moe_decode (word path knobs vs the tile kernels). Self-contained; < 3 minutes on an H100/H200.

    python3 scripts/sweep_gemv.py [--budget 150] [--only gemv,moe]

Each variant: one fp32-output call on NaN-poisoned output checked against the tile path (rel. error
< 1e-3, else flagged WRONG), then timed as CUDA-graph replays of R calls over R weight copies / expert
selections (so L2 never holds the weights), median of triton.testing.do_bench. GB/s counts the packed
weight bytes (+ x and y); %bw is against a measured device-to-device copy (read + write bytes).
The table is printed last; all rows go to $OUT/sweep_gemv.json when OUT is set. Variants past the time
budget are skipped (listed as such).
"""
import argparse
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

SMOKE = "--cpu-smoke" in sys.argv  # CPU dry run of this script's logic (Triton interpreter, tiny shapes)
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import triton  # noqa: E402

DEV = "cpu" if SMOKE else "cuda"

try:
    from kimi_local.kernels import moe, quant_matmul as qm
except ImportError:  # device machine: import the source dirs
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from kernels import moe, quant_matmul as qm
from kimi_local.bench import text_table  # noqa: E402 (the repo root is on sys.path either way)

FP16_FIELDS = {"Q8_0": [0], "Q6_K": [208], "Q5_K": [0, 2], "Q4_K": [0, 2], "Q3_K": [108], "Q2_K": [80, 82]}
T0 = time.time()
ROWS = []


def rand_packed(qtype, lead, N, K, scale=0.002):
    """Packed weight uint8 [*lead, N, prb] from random valid ggml blocks, made on the GPU."""
    nb, ts = K // qm.QK[qtype], qm.TYPE_SIZE[qtype]
    b = torch.randint(0, 256, (*lead, N, nb, ts), dtype=torch.uint8, device=DEV)
    for o in FP16_FIELDS[qtype]:
        v = (torch.rand(*lead, N, nb, 1, device=DEV) * scale + scale / 10).half()
        b[..., o:o + 2] = v.view(torch.uint8)
    return qm.repack(b.view(*lead, N, nb * ts), qtype)


def n_copies(nbytes, target=300e6, most=16):
    return max(2, min(most, math.ceil(target / nbytes)))


def graph_time(calls, quick):
    """Median ms per call of a list of zero-arg callables, replayed as one CUDA graph."""
    if SMOKE:
        t = time.perf_counter()
        for c in calls:
            c()
        return (time.perf_counter() - t) * 1e3 / len(calls)
    for c in calls:
        c()
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    ms = triton.testing.do_bench(g.replay, warmup=10 if quick else 25, rep=30 if quick else 60,
                                 return_mode="median")
    return ms / len(calls)


def sync():
    if not SMOKE:
        torch.cuda.synchronize()


def empty_cache():
    if not SMOKE:
        torch.cuda.empty_cache()


def rel_err(y, ref):
    y, ref = y.double(), ref.double()
    if torch.isnan(y).any():
        return float("inf")
    return ((y - ref).norm() / ref.norm()).item()


def row(sec, case, variant, ms=None, nbytes=None, err=None, note="", bw=None, tol=1e-3, **kw):
    r = {"section": sec, "case": case, "variant": variant, "ms": ms, "us": None if ms is None else ms * 1e3}
    if ms is not None and nbytes is not None:
        r["GB/s"] = nbytes / ms / 1e6
        r["%bw"] = 100 * nbytes / (ms * 1e-3) / bw
    if err is not None:
        r["rel_err"] = err
        if not err < tol:
            note = ("WRONG " + note).strip()
    r["note"] = note
    r.update(kw)
    ROWS.append(r)
    print(json.dumps(r), flush=True)
    return r


def bandwidth():
    if SMOKE:
        return 1e10
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device=DEV).random_()
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), warmup=20, rep=100, return_mode="median")
    bw = 2 * n / (ms * 1e-3)
    del a, b
    empty_cache()
    return bw


# ------------------------------------------------------------------------------------------------


def gemv_variants(N, K, qt):
    """(name, kwargs for qgemv) of the word path; the first entry is the default config."""
    v = [("word default", {})]
    nblk = K // qm.QK[qt]
    if N >= 32768:  # lm_head: many rows, no split
        for bn, nw, ns in [(64, 4, 1), (256, 8, 1), (128, 8, 1), (128, 4, 2), (64, 2, 1), (128, 4, 3)]:
            v.append((f"BN={bn} S=1 nw={nw} ns={ns}", dict(BN=bn, SPLIT=1, num_warps=nw, num_stages=ns)))
        return v
    bn0, _, s0, nw0, _ = qm.gemv1_config(qt, N, K)
    cand = [(bn0, min(nblk, 2 * s0), nw0, 1), (bn0, min(nblk, 4 * s0), nw0, 1), (bn0, max(1, s0 // 2), nw0, 1),
            (bn0, s0, nw0, 2), (bn0, s0, nw0, 3), (bn0, s0, 1, 1), (bn0, s0, 4, 1), (16, min(nblk, 2 * s0), 2, 1),
            (64, s0, 4, 1), (bn0, nblk, nw0, 1)]
    for bn, sp, nw, ns in cand:
        name = f"BN={bn} S={sp} nw={nw} ns={ns}"
        if name not in [n for n, _ in v]:
            v.append((name, dict(BN=bn, SPLIT=sp, num_warps=nw, num_stages=ns)))
    return v


def onestep_variants(N, K, qt):
    """Configs whose K slices are 8, 16 or 32 chunks loaded in ONE step (C = the slice): all of a program's
    weight loads in flight at once instead of C-chunk steps that each wait for DRAM."""
    v = [("word default", {})]
    cpb = qm.CHUNKS_PER_BLOCK[qt]
    chunks = K // qm.QK[qt] * cpb
    if N >= 32768:
        for bn, nw, c in [(64, 4, 16), (64, 4, 32), (128, 8, 16), (32, 2, 16), (64, 8, 32)]:
            v.append((f"BN={bn} S=1 nw={nw} C={c}", dict(BN=bn, SPLIT=1, num_warps=nw, C=c)))
        return v
    for cps in (8, 16, 32):
        if chunks % cps or (cps % cpb and cpb % cps):
            continue
        sp = chunks // cps
        for nw in (1, 2):
            v.append((f"BN=32 S={sp} nw={nw} C={cps}", dict(BN=32, SPLIT=sp, num_warps=nw, C=cps)))
    return v


def rows_variants(N, K, qt):
    """x8 configs where each program reads whole rows (no or few K splits) and few of them: every program's
    bytes are one contiguous stretch of the matrix instead of short row segments (split K)."""
    v = [("word default", {})]
    if N >= 32768:
        cand = [(8, 1, 16, 1), (8, 1, 32, 1), (4, 1, 16, 1), (8, 1, 8, 1), (8, 1, 16, 2), (4, 1, 32, 1)]
    elif K <= 2304:
        cand = [(4, 1, 16, 1), (2, 1, 16, 1), (4, 1, 32, 1), (4, 2, 16, 1), (8, 1, 16, 2), (2, 2, 16, 1),
                (4, 1, 8, 1), (8, 2, 16, 2)]
    else:  # long rows: a few K slices
        cand = [(4, 2, 16, 1), (4, 4, 16, 1), (2, 2, 16, 1), (8, 4, 16, 1), (4, 2, 32, 1), (4, 8, 16, 1),
                (8, 8, 16, 1), (2, 4, 16, 1)]
    for bn, sp, c, nw in cand:
        v.append((f"BN={bn} S={sp} C={c} nw={nw}", dict(BN=bn, SPLIT=sp, C=c, num_warps=nw)))
    return v


# the engine's decode GEMVs (Q4_K_M recipe: Q8_0 rest; Q2_K/Q3_K_M: Q6_K rest) and calls per token
ENGINE_GEMVS = [("kda_qkv", 12288, 2304, 20), ("kda_o", 2304, 4096, 20), ("kda_fgb_a", 288, 2304, 20),
                ("kda_f_b", 4096, 128, 40), ("mla_q", 6144, 2304, 7), ("mla_kv_a", 576, 2304, 7),
                ("mla_o", 2304, 4096, 7), ("dense_gate", 9216, 2304, 2), ("dense_down", 2304, 9216, 1),
                ("lm_head", 163840, 2304, 1)]


def sweep_gemv(bw, args):
    shapes = [(n, N, K) for n, N, K, _ in ENGINE_GEMVS if not args.shapes or n in args.shapes.split(",")]
    if SMOKE:
        shapes = [("kda_qkv", 40, 512), ("o_proj", 24, 1024)]
    for name, N, K in shapes:
        case0 = f"{name} [{N},{K}]"
        x = torch.randn(1, K, device=DEV, dtype=torch.bfloat16)
        # bf16 cuBLAS baseline
        wb = N * K * 2
        R = n_copies(wb, target=200e6, most=64)
        wbs = [torch.randn(N, K, device=DEV, dtype=torch.bfloat16) * 0.01 for _ in range(R)]
        ob = torch.empty(1, N, device=DEV, dtype=torch.bfloat16)
        ms = graph_time([lambda w=w: torch.matmul(x, w.t(), out=ob) for w in wbs], args.quick)
        row("gemv", f"{case0} bf16", "cuBLAS", ms, wb + 2 * (K + N), bw=bw)
        del wbs
        empty_cache()
        for qt in args.qtypes.split(","):
            if K % qm.QK[qt]:
                continue
            case = f"{case0} {qt}"
            nbytes = N * qm.packed_row_bytes(qt, K) + 2 * (K + N)
            R = n_copies(nbytes, target=200e6, most=256)  # cold weights, as in a decode step
            ws = [rand_packed(qt, (), N, K) for _ in range(R)]
            ref = torch.full((1, N), float("nan"), device=DEV)
            qm.qgemv(x, ws[0], qt, N, out=ref, method="fma")
            out = torch.empty(1, N, device=DEV, dtype=torch.bfloat16)
            vf = onestep_variants if args.onestep else rows_variants if args.rows else gemv_variants
            variants = [(n, dict(method="word", x8=False, **kw)) for n, kw in vf(N, K, qt)]
            if args.x8 or args.rows:  # the fp default beside the int8-activation variants (x quantized beforehand)
                x8 = qm.quantize_x8(x)
                variants = variants[:1] + [("x8 " + n, dict(kw, x8=x8)) for n, kw in variants]
            if args.default_only:
                variants = [v for v in variants if v[0].endswith("word default")]
            for vname, kw in variants:
                if time.time() - T0 > args.budget:
                    row("gemv", case, vname, note="SKIPPED (time budget)")
                    continue
                try:
                    o32 = torch.full((1, N), float("nan"), device=DEV)
                    qm.qgemv(x, ws[0], qt, N, out=o32, **kw)
                    sync()
                    err = rel_err(o32, ref)
                    ms = graph_time([lambda w=w: qm.qgemv(x, w, qt, N, out=out, **kw) for w in ws], args.quick)
                    cfg = qm.gemv1_config(qt, N, K, x8=vname.startswith("x8")) if vname.endswith("word default") else ""
                    row("gemv", case, vname, ms, nbytes, err, note=str(cfg) if cfg else "", bw=bw,
                        tol=3e-2 if vname.startswith("x8") else 1e-3)
                except Exception as e:  # keep sweeping
                    row("gemv", case, vname, note=f"FAILED {type(e).__name__}: {str(e)[:200]}")
                    traceback.print_exc()
            del ws
            empty_cache()


# ------------------------------------------------------------------------------------------------


def _mv(**kw):
    """A moe_decode variant (name, kwargs), named after its knobs ("BF=16 S1=3 ... nw=2")."""
    return " ".join(f"{'nw' if k == 'num_warps' else k}={v}" for k, v in kw.items()), kw


MOE_VARIANTS = [
    ("word default", {}),
    _mv(BF=16, S1=3, BD=16, S2=2, C=32),  # gate/up and down in one step each
    _mv(BF=16, S1=3, BD=16, S2=1, C=32),
    _mv(BF=16, S1=3, BD=16, S2=2, C=32, num_warps=2),
    _mv(BF=32, S1=3, BD=32, S2=2, C=32, num_warps=2),
    _mv(BF=16, S1=9, BD=16, S2=4, C=8),
    _mv(BF=32, S1=1, BD=32, S2=1),
    _mv(BF=16, S1=3, BD=16, S2=2),
    _mv(BF=32, S1=9, BD=32, S2=4),
    _mv(BF=64, S1=3, BD=64, S2=4),
    _mv(BF=32, S1=3, BD=32, S2=2, num_warps=8),
    _mv(BF=16, S1=9, BD=16, S2=4, num_warps=2),
    _mv(BF=8, S1=9, BD=8, S2=4, num_warps=1),
    _mv(BF=16, S1=9, BD=16, S2=4, num_warps=1),
    _mv(BF=32, S1=9, BD=32, S2=4, num_warps=4),
    _mv(BF=16, S1=3, BD=32, S2=2, num_warps=1),
    _mv(BF=32, S1=3, BD=16, S2=2, num_warps=1),
    _mv(BF=16, S1=3, BD=16, S2=1, num_warps=1),
]


MOE_ROWS_VARIANTS = [  # whole-row programs (no or fewer K splits)
    ("word default", {}),
    _mv(BF=16, S1=1, BD=16, S2=1),
    _mv(BF=16, S1=1, BD=16, S2=1, C=16),
    _mv(BF=16, S1=1, BD=8, S2=1),
    _mv(BF=16, S1=3, BD=16, S2=1),
    _mv(BF=16, S1=1, BD=16, S2=2),
    _mv(BF=16, S1=3, BD=8, S2=2),
    _mv(BF=16, S1=1, BD=8, S2=2, C=16),
]


MOE_SMALL_VARIANTS = [  # gate/up f-tiles below the x8 group of 16 rows (16-row group counters), then down
    ("word default", {}),
    _mv(BF=8, S1=1, BD=16, S2=2),
    _mv(BF=8, S1=2, BD=16, S2=2),
    _mv(BF=8, S1=3, BD=16, S2=2),
    _mv(BF=4, S1=1, BD=16, S2=2),
    _mv(BF=4, S1=2, BD=16, S2=2),
    _mv(BF=4, S1=3, BD=16, S2=2),
    _mv(BF=4, S1=1, BD=16, S2=2, C=16),
    _mv(BF=2, S1=1, BD=16, S2=2, C=16),
    _mv(BF=16, S1=3, BD=8, S2=1),
    _mv(BF=16, S1=3, BD=4, S2=1),
    _mv(BF=16, S1=3, BD=32, S2=4),
    _mv(BF=4, S1=1, BD=8, S2=1),
]


MOE_SHAPE = (256, 2304, 1024, 8) if not SMOKE else (4, 512, 512, 2)  # slots S, D, F, top-k
MOE_SHARED_QT = ("Q8_0", "Q8_0", "Q8_0")


def moe_inputs():
    """The MoE sweeps' fixed inputs: the Q8_0 shared expert, 8 (2 smoke) random selections with weights, x."""
    S, D, Fe, k = MOE_SHAPE
    shared = expert_pools(MOE_SHARED_QT, ())
    gen = torch.Generator().manual_seed(0)
    sel = [torch.randperm(S, generator=gen)[:k].to(torch.int32).to(DEV) for _ in range(8 if not SMOKE else 2)]
    wts = [torch.rand(k, generator=gen).to(DEV) for _ in sel]
    return shared, sel, wts, torch.randn(D, device=DEV, dtype=torch.bfloat16)


def expert_pools(qtypes, lead):
    """Random packed gate [F, D], up [F, D], down [D, F] of the given types, with leading dims `lead`."""
    S, D, Fe, k = MOE_SHAPE
    return [rand_packed(qt, lead, r, c) for qt, r, c in zip(qtypes, (Fe, Fe, D), (D, D, Fe))]


def sweep_moe(bw, args):
    S, D, Fe, k = MOE_SHAPE
    shq = MOE_SHARED_QT
    shared, sel, wts, x = moe_inputs()
    shared_bytes = sum(s.numel() for s in shared)
    cases = [("Q4_K", "Q4_K", "Q5_K"), ("Q2_K", "Q2_K", "Q3_K"), ("Q4_K", "Q4_K", "Q6_K"),
             ("Q3_K", "Q3_K", "Q4_K")]  # the Q4_K_M and Q2_K recipes' experts first
    for qtypes in cases[:args.moe_cases]:
        case = "/".join(qtypes) + " k=8 +Q8_0 shared"
        pools = expert_pools(qtypes, (S,))
        nbytes = k * sum(p[0].numel() for p in pools) + shared_bytes + 2 * D * 2
        ref = torch.full((D,), float("nan"), device=DEV)
        moe.moe_decode(x, sel[0], wts[0], *pools, qtypes, ref, shared=shared, shared_qtypes=shq, impl="tile")
        out = torch.empty(D, device=DEV, dtype=torch.bfloat16)
        variants = [("tile (old)", dict(impl="tile"))] + [(n, dict(kw, x8=False)) for n, kw in MOE_VARIANTS]
        if args.rows or args.small:
            x8 = qm.quantize_x8(x)
            vs = MOE_SMALL_VARIANTS if args.small else MOE_ROWS_VARIANTS
            variants = variants[:1] + [("x8 " + n, dict(kw, x8=x8)) for n, kw in vs]
        elif args.x8:  # int8 activations (x quantized beforehand); BF must be a multiple of 16
            x8 = qm.quantize_x8(x)
            variants = variants[:2] + [("x8 " + n, dict(kw, x8=x8)) for n, kw in MOE_VARIANTS
                                       if kw.get("BF", 16) % 16 == 0]
        if args.default_only:
            variants = [v for v in variants if v[0].endswith("word default")]
        for vname, kw in variants:
            if time.time() - T0 > args.budget:
                row("moe", case, vname, note="SKIPPED (time budget)")
                continue
            try:
                o32 = torch.full((D,), float("nan"), device=DEV)
                moe.moe_decode(x, sel[0], wts[0], *pools, qtypes, o32, shared=shared, shared_qtypes=shq, **kw)
                sync()
                err = rel_err(o32, ref)
                ms = graph_time([lambda s=s, w=w: moe.moe_decode(x, s, w, *pools, qtypes, out, shared=shared,
                                                                 shared_qtypes=shq, **kw)
                                 for s, w in zip(sel, wts)], args.quick)
                # a second check after the graph replays (counters re-armed, no race between replays)
                o32.fill_(float("nan"))
                moe.moe_decode(x, sel[1], wts[1], *pools, qtypes, o32, shared=shared, shared_qtypes=shq, **kw)
                ref1 = torch.full((D,), float("nan"), device=DEV)
                moe.moe_decode(x, sel[1], wts[1], *pools, qtypes, ref1, shared=shared, shared_qtypes=shq,
                               impl="tile")
                sync()
                err = max(err, rel_err(o32, ref1))
                note = (str(moe.moe_decode_config(qtypes, shq, D, Fe, x8=vname.startswith("x8")))
                        if vname.endswith("word default") else "")
                row("moe", case, vname, ms, nbytes, err, note=note, bw=bw, tol=3e-2 if vname.startswith("x8") else 1e-3)
            except Exception as e:
                row("moe", case, vname, note=f"FAILED {type(e).__name__}: {str(e)[:200]}")
                traceback.print_exc()
        del pools
        empty_cache()


class _NoLaunch:
    """Stands in for a Triton kernel: `k[grid](...)` launches nothing (timing one half of the MoE)."""

    def __getitem__(self, grid):
        return lambda *a, **kw: None


def sweep_moe_halves(bw, args):
    """The x8 MoE decode's two kernels timed apart (the other one replaced by no launch), for the default
    and the --small variants' gate/up or down configs: where the MoE time goes."""
    S, D, Fe, k = MOE_SHAPE
    shq = MOE_SHARED_QT
    shared, sel, wts, x = moe_inputs()
    x8 = qm.quantize_x8(x)
    qtypes = ("Q4_K", "Q4_K", "Q5_K")
    pools = expert_pools(qtypes, (S,))
    sh = [s_.numel() for s_ in shared]
    half_bytes = {"gate/up": k * (pools[0][0].numel() + pools[1][0].numel()) + sh[0] + sh[1],
                  "down": k * pools[2][0].numel() + sh[2]}
    out = torch.empty(D, device=DEV, dtype=torch.bfloat16)
    moe_gluon = moe.moe_gluon
    names = ("_moe_w_gate_up_kernel", "_moe_w_down_kernel", "moe_gate_up_gluon_kernel", "moe_down_gluon_kernel")
    mods = (moe, moe, moe_gluon, moe_gluon)
    real = [getattr(m, n, None) for m, n in zip(mods, names)]
    stub = {"gate/up": (1, 3), "down": (0, 2)}  # the kernels replaced by no launch when timing a half
    env = {"_ns": "KIMI_LOCAL_MOE_GLUON_NS", "_dns": "KIMI_LOCAL_MOE_GLUON_DOWN_NS", "_w": "KIMI_LOCAL_MOE_GLUON_W",
           "_dw": "KIMI_LOCAL_MOE_GLUON_DOWN_W", "_pf": "KIMI_LOCAL_MOE_GLUON_DOWN_PF",
           "_ss": "KIMI_LOCAL_MOE_GLUON_SS", "_gpf": "KIMI_LOCAL_MOE_GLUON_PF", "_gspf": "KIMI_LOCAL_MOE_GLUON_SPF"}
    variants = [("default", {}), ("triton (both halves)", dict(gluon=False)), ("triton down", dict(gluon_down=False))]
    variants += [("gluon gate/up, main plane prefetched by the routed CTAs too", dict(_gpf=2)),
                 ("gluon gate/up, side planes prefetched only (session 12)", dict(_gspf=1)),
                 ("gluon gate/up side words through the ring (session 11)", dict(_ss=1))]
    variants += [(f"gluon down NS={ns}", dict(_dns=ns)) for ns in (2,)]
    variants += [("gluon down, no L2 prefetch of the side planes", dict(_pf=0))]
    for vname, kw in variants:
        kw = dict(kw)
        for key, var in env.items():
            if key in kw:
                os.environ[var] = str(kw.pop(key))
        for half in ("gate/up", "down"):
            for i in stub[half]:
                if real[i] is not None:
                    setattr(mods[i], names[i], _NoLaunch())
            try:
                ms = graph_time([lambda s=s, w=w: moe.moe_decode(x, s, w, *pools, qtypes, out, shared=shared,
                                                                 shared_qtypes=shq, x8=x8, **kw)
                                 for s, w in zip(sel, wts)], args.quick)
                row("moe-half", f"Q4_K/Q4_K/Q5_K {half} only", "x8 " + vname, ms, half_bytes[half], bw=bw)
            except Exception as e:  # a variant that does not build: keep going
                row("moe-half", f"Q4_K/Q4_K/Q5_K {half} only", "x8 " + vname,
                    note=f"FAILED {type(e).__name__}: {str(e)[:200]}")
            finally:
                for m, n, r in zip(mods, names, real):
                    if r is not None:
                        setattr(m, n, r)
        for var in env.values():
            os.environ.pop(var, None)
    del pools
    empty_cache()


def sweep_route(bw, args):
    """norm + router + top-k (router.norm_router_route) for top-8, top-4 and top-1: the top-k tail's cost."""
    from kimi_local.kernels import router
    D, E = (2304, 256) if not SMOKE else (256, 64)
    g = torch.Generator().manual_seed(0)
    R = 16 if not SMOKE else 2
    ws = [(torch.randn(E, D, generator=g) * 0.02).to(DEV) for _ in range(R)]
    bias = (torch.randn(E, generator=g) * 0.1).to(DEV)
    v = torch.randn(1, D, device=DEV, dtype=torch.bfloat16)
    res = torch.randn(1, D, device=DEV, dtype=torch.bfloat16)
    nw = torch.ones(D, device=DEV, dtype=torch.bfloat16)
    h8 = torch.empty(qm.x8_words(D), dtype=torch.int32, device=DEV)
    for topk in (8, 4, 1):
        ms = graph_time([lambda w=w: router.norm_router_route(v, res, nw, 1e-5, w, bias, topk, 2.446, x8_out=h8)
                         for w in ws], args.quick)
        row("route", f"norm+router+top-k E={E} D={D}", f"k={topk}", ms, E * D * 4 + 4 * D, bw=bw)


def print_table(rows):
    cols = ["section", "case", "variant", "us", "GB/s", "%bw", "rel_err", "note"]
    fmt = {"us": "{:.2f}", "GB/s": "{:.0f}", "%bw": "{:.1f}", "rel_err": "{:.1e}"}
    print(text_table(rows, cols, fmt))


def engine_summary(rows):
    """Per weight type: the decode step's GEMV time per token with the default config vs the best."""
    calls = {f"{n} [{N},{K}]": c for n, N, K, c in ENGINE_GEMVS}
    tot = {}
    for r in rows:
        if r.get("ms") is None or "WRONG" in r["note"] or r["section"] != "gemv":
            continue
        case, _, qt = r["case"].rpartition(" ")
        if case not in calls or qt == "bf16":
            continue
        d = tot.setdefault(qt, {}).setdefault(case, [None, None, ""])
        if r["variant"] == "word default":
            d[0] = r["us"]
        if d[1] is None or r["us"] < d[1]:
            d[1], d[2] = r["us"], r["variant"]
    for qt, cases in tot.items():
        dflt = sum(calls[c] * v[0] for c, v in cases.items() if v[0] is not None)
        best = sum(calls[c] * v[1] for c, v in cases.items())
        print(f"\nengine GEMVs per token, {qt}: default configs {dflt:.0f} us, best configs {best:.0f} us")
        for c, v in cases.items():
            print(f"  {c:28s} x{calls[c]:<3d} default {v[0] or 0:7.2f} us  best {v[1]:7.2f} us  {v[2]}")


def best_summary(rows):
    """Per case: fastest correct variant."""
    best = {}
    for r in rows:
        if r.get("ms") is None or "WRONG" in r["note"]:
            continue
        k = (r["section"], r["case"])
        if k not in best or r["ms"] < best[k]["ms"]:
            best[k] = r
    print("\nfastest correct variant per case:")
    for (sec, case), r in best.items():
        print(f"  {sec:5s} {case:40s} {r['variant']:32s} {r['us']:.2f} us  {r.get('%bw', 0):.1f}%bw")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=155.0, help="seconds after which variants are skipped")
    ap.add_argument("--only", default="gemv,moe", help="comma list of: moe, gemv, halves (MoE kernels apart), route")
    ap.add_argument("--qtypes", default="Q8_0,Q6_K", help="GEMV weight types")
    ap.add_argument("--quick", action="store_true", default=True)
    ap.add_argument("--x8", action="store_true", help="int8-activation (dp4a) variants beside the fp default")
    ap.add_argument("--onestep", action="store_true", help="GEMV variants whose K slices load in one step")
    ap.add_argument("--moe-cases", type=int, default=4, help="how many expert type mixes (Q4_K_M's first)")
    ap.add_argument("--rows", action="store_true",
                    help="x8 variants whose programs read whole rows (no / few K splits) beside the x8 default")
    ap.add_argument("--small", action="store_true",
                    help="MoE x8 variants with gate/up f-tiles below 16 rows, and down variants")
    ap.add_argument("--default-only", action="store_true", help="time only the default configs (A/B of code)")
    ap.add_argument("--shapes", default="", help="comma list of ENGINE_GEMVS names (default: all)")
    ap.add_argument("--cpu-smoke", action="store_true", help="dry run on the CPU (interpreter, tiny shapes)")
    args = ap.parse_args()
    name = "cpu (smoke)" if SMOKE else torch.cuda.get_device_name()
    print(f"device: {name}  torch {torch.__version__}  triton {triton.__version__}",
          flush=True)
    bw = bandwidth()
    row("bw", "d2d copy 1 GiB (read+write)", "torch copy_", 2 * (1 << 30) / bw * 1e3, 2 * (1 << 30), bw=bw)
    only = args.only.split(",")
    # MoE first: it decides the tok/s most and must not be cut by the budget
    if "moe" in only:
        sweep_moe(bw, args)
    if "halves" in only:
        sweep_moe_halves(bw, args)
    if "route" in only:
        sweep_route(bw, args)
    if "gemv" in only:
        sweep_gemv(bw, args)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "sweep_gemv.json").write_text(json.dumps(
            {"device": name, "bw": bw, "rows": ROWS, "elapsed_s": time.time() - T0},
            indent=1))
    print_table(ROWS)
    best_summary(ROWS)
    engine_summary(ROWS)
    print(f"elapsed {time.time() - T0:.0f} s")
    return 1 if any("WRONG" in r["note"] or "FAILED" in r["note"] for r in ROWS) else 0


if __name__ == "__main__":
    sys.exit(main())
