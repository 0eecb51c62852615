"""Kernel benchmarks on synthetic full-size weights (random valid ggml blocks made on the GPU).

    python scripts/bench_kernels.py [--only moe,qgemv,qgemm] [--quick]

Measures the device's copy bandwidth and bf16 matmul rate first, then every selected section; each row
gives the median time (CUDA events, triton.testing.do_bench), effective GB/s, % of the measured copy
bandwidth (or TFLOP/s and % of the measured matmul rate), and a baseline timed in the same run.
Small kernels are timed as CUDA-graph replays of R calls over R different weight sets (or expert
selections) so the 50 MB L2 never holds the working set. The table is printed last; full rows go to
$OUT/bench_kernels.json when $OUT is set.

Adding a section (KDA, MLA, ...): write `def bench_name(ctx) -> list[dict]` using ctx.time / ctx.row and
decorate it with @section("name").
"""
import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

try:
    from kimi_local.kernels import moe, pdl, quant_matmul as qm
except ImportError:  # not pip-installed (device machine): import the source dirs
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from kernels import moe, pdl, quant_matmul as qm
from kimi_local.bench import text_table  # noqa: E402 (the repo root is on sys.path either way)


def pdl_mode(tag: str):
    """Context for a variant tag: "+pdl" launches the PDL-aware kernels with programmatic dependent launch
    (graph replays then chain the R calls), "+pdl-nopf" the same without the L2 weight prefetch."""
    if "+pdl" not in tag:
        return pdl.active(False)
    os.environ["KIMI_LOCAL_PREFETCH"] = "0" if "nopf" in tag else "1"
    return pdl.active(True)

SECTIONS = []  # (name, fn)


def section(name):
    def deco(fn):
        SECTIONS.append((name, fn))
        return fn
    return deco


class Ctx:
    def __init__(self, quick):
        self.quick = quick
        self.bw = None  # bytes/s, measured
        self.flops = None  # bf16 FLOP/s, measured
        self.rows = []

    def time(self, fn, graph=False, calls=1):
        """Median ms of one call of fn (fn may do `calls` calls; the result is divided)."""
        if graph:
            fn()  # warm (autotune, compile) outside the capture
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                fn()
            torch.cuda.current_stream().wait_stream(s)
            with torch.cuda.graph(g):
                fn()
            run = g.replay
        else:
            run = fn
        ms = triton.testing.do_bench(run, warmup=50 if self.quick else 200, rep=100 if self.quick else 500,
                                     return_mode="median")
        return ms / calls

    def row(self, sec, case, ms, nbytes=None, flop=None, base=None, base_ms=None, note=""):
        r = {"section": sec, "case": case, "ms": ms}
        if nbytes is not None:
            r["GB/s"] = nbytes / ms / 1e6
            r["%bw"] = 100 * nbytes / (ms * 1e-3) / self.bw
            r["floor_ms"] = nbytes / self.bw * 1e3
        if flop is not None:
            r["TFLOP/s"] = flop / ms / 1e9
            r["%mm"] = 100 * flop / (ms * 1e-3) / self.flops
        if base is not None:
            r["baseline"] = base
            r["base_ms"] = base_ms
            r["x_base"] = ms / base_ms
        r["note"] = note
        self.rows.append(r)
        print(json.dumps(r), flush=True)
        return r


# ------------------------------------------------------------------------------------------------
# synthetic weights

FP16_FIELDS = {"Q8_0": [0], "Q6_K": [208], "Q5_K": [0, 2], "Q4_K": [0, 2], "Q3_K": [108], "Q2_K": [80, 82]}


def rand_packed(qtype, lead, N, K, scale=0.002):
    """Packed weight uint8 [*lead, N, prb] from random valid ggml blocks, made on the GPU."""
    if qtype == "BF16":
        return qm.repack((torch.randn(*lead, N, K, device="cuda") * scale).bfloat16(), "BF16")
    nb, ts = K // qm.QK[qtype], qm.TYPE_SIZE[qtype]
    b = torch.randint(0, 256, (*lead, N, nb, ts), dtype=torch.uint8, device="cuda")
    for o in FP16_FIELDS[qtype]:
        v = (torch.rand(*lead, N, nb, 1, device="cuda") * scale + scale / 10).half()
        b[..., o:o + 2] = v.view(torch.uint8)
    return qm.repack(b.view(*lead, N, nb * ts), qtype)


def n_copies(nbytes, target=400e6, most=16):
    """How many weight copies to rotate over so one pass reads >= target bytes (>> 50 MB L2)."""
    return max(1, min(most, math.ceil(target / nbytes)))


# ------------------------------------------------------------------------------------------------


@section("bandwidth")
def bench_bandwidth(ctx):
    n = 2 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), warmup=50, rep=300, return_mode="median")
    ctx.bw = 2 * n / (ms * 1e-3)
    r = ctx.row("bandwidth", "d2d copy 2 GiB (read+write)", ms, nbytes=2 * n)
    del a, b
    S = 8192
    x, y = torch.randn(S, S, device="cuda", dtype=torch.bfloat16), torch.randn(S, S, device="cuda", dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: x @ y, warmup=50, rep=300, return_mode="median")
    ctx.flops = 2 * S ** 3 / (ms * 1e-3)
    ctx.row("bandwidth", "bf16 matmul 8192^3 (random)", ms, flop=2 * S ** 3)
    return r


@section("dequant")
def bench_dequant(ctx):
    N, K = 4096, 2304
    for qt in ["Q4_K", "Q6_K", "Q8_0", "Q3_K"]:
        R = n_copies(N * K * 2.6)
        ws = [rand_packed(qt, (), N, K) for _ in range(R)]
        outs = [torch.empty(N, K, device="cuda", dtype=torch.bfloat16) for _ in range(R)]
        ms = ctx.time(lambda: [qm.dequantize_gpu(w, qt, (N, K), out=o) for w, o in zip(ws, outs)], graph=True, calls=R)
        ctx.row("dequant", f"{qt} [{N},{K}] -> bf16", ms, nbytes=ws[0].numel() + N * K * 2)


@section("qgemv")
def bench_qgemv(ctx):
    shapes = [("lm_head", 163840, 2304), ("kda_qkv", 12288, 2304), ("o_proj", 2304, 4096), ("expert_up", 1024, 2304)]
    qtypes = ["Q4_K", "Q6_K", "Q8_0", "Q5_K", "Q2_K"]
    Ms = [1] if ctx.quick else [1, 8]
    for name, N, K in shapes:
        wb_bytes = N * K * 2
        Rb = n_copies(wb_bytes)
        wbs = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.01 for _ in range(Rb)]
        for M in Ms:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            ob = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
            base_ms = ctx.time(lambda: [torch.matmul(x, w.t(), out=ob) for w in wbs], graph=True, calls=Rb)
            ctx.row("qgemv", f"{name} [{N},{K}] M={M} bf16 cuBLAS", base_ms, nbytes=wb_bytes)
            for qt in qtypes:
                nbytes = N * qm.packed_row_bytes(qt, K)
                R = n_copies(nbytes)
                ws = [rand_packed(qt, (), N, K) for _ in range(R)]
                out = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
                # M=1: word path with fp activations and with int8 activations (x8, quantized beforehand as
                # the engine's norms do), alone and chained by PDL (no L2 prefetch: the engine's default)
                methods = ["word", "word+pdl-nopf", "x8", "x8+pdl-nopf", "fma"] if M == 1 else ["fma", "dot"]
                x8 = qm.quantize_x8(x[0])
                for tag in methods:
                    meth = tag.split("+")[0]
                    kw = {"x8": x8 if meth == "x8" else False} if M == 1 and meth != "fma" else {}
                    meth = "word" if meth == "x8" else meth
                    with pdl_mode(tag):
                        ms = ctx.time(lambda: [qm.qgemv(x, w, qt, N, out=out, method=meth, **kw) for w in ws],
                                      graph=True, calls=R)
                    meth = tag
                    ctx.row("qgemv", f"{name} [{N},{K}] M={M} {qt} {meth}", ms, nbytes=nbytes + M * (K + N) * 2,
                            base="bf16 cuBLAS", base_ms=base_ms)
                del ws
        del wbs


@section("qgemm")
def bench_qgemm(ctx):
    N, K = 4096, 2304
    # 64, 256: short prompts, where the fused GEMM and dequant + cuBLAS cross (qm.GEMM_CUBLAS_MIN_M)
    Ms = [64, 256, 512, 2048, 8192] if ctx.quick else [64, 256, 512, 1024, 2048, 4096, 8192]
    wb = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.01
    scratch = torch.empty(N, K, device="cuda", dtype=torch.bfloat16)
    for qt in ["Q4_K", "Q8_0"] if ctx.quick else ["Q4_K", "Q6_K", "Q8_0", "Q3_K"]:
        w = rand_packed(qt, (), N, K)
        ms = ctx.time(lambda: qm.dequantize_gpu(w, qt, (N, K), out=scratch))
        ctx.row("qgemm", f"dequantize [{N},{K}] {qt} -> bf16", ms, nbytes=w.numel() + scratch.numel() * 2)
        for br, g, nw in [(16, 16, 2), (32, 16, 4), (64, 16, 8), (16, 8, 1), (32, 8, 2), (64, 8, 4)]:
            grid = (triton.cdiv(N, br), triton.cdiv(K, 16 * g))
            ms = ctx.time(lambda: qm._dequant_kernel[grid](w, scratch, N, K, scratch.stride(0), QT=qm.QT_ID[qt],
                                                           BR=br, G=g, num_warps=nw))
            ctx.row("qgemm", f"dequantize {qt} BR={br} G={g} warps={nw}", ms, nbytes=w.numel() + scratch.numel() * 2)
        for M in Ms:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            out = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
            flop = 2 * M * N * K
            base_ms = ctx.time(lambda: torch.matmul(x, wb.t(), out=out))
            ctx.row("qgemm", f"[{M}x{K}]x[{N},{K}]^T bf16 cuBLAS (dequantized weight)", base_ms, flop=flop)
            for meth in ["fused", "cublas"]:
                ms = ctx.time(lambda: qm.qgemm(x, w, qt, N, out=out, method=meth, scratch=scratch))
                ctx.row("qgemm", f"[{M}x{K}]x[{N},{K}]^T {qt} {meth}", ms, flop=flop, base="bf16 cuBLAS",
                        base_ms=base_ms)


def _moe_pools(qtypes, S, D, Fe):
    return [rand_packed(qt, (S,), r, c) for qt, r, c in zip(qtypes, (Fe, Fe, D), (D, D, Fe))]


@section("moe")
def bench_moe_decode(ctx):
    S, D, Fe, k = 256, 2304, 1024, 8
    shq = ("Q8_0", "Q8_0", "Q8_0")
    shared = [rand_packed(qt, (), r, c) for qt, r, c in zip(shq, (Fe, Fe, D), (D, D, Fe))]
    shared_bytes = sum(s.numel() for s in shared)
    R = 8  # expert selections per graph: 8 x ~40 MB
    gen = torch.Generator().manual_seed(0)
    sel = [torch.randperm(S, generator=gen)[:k] for _ in range(R)]
    slot_ts = [s.to(torch.int32).cuda() for s in sel]
    wts = [torch.rand(k, generator=gen).cuda() for _ in range(R)]
    x = torch.randn(D, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(D, device="cuda", dtype=torch.bfloat16)
    # baseline 1: experts resident as bf16, torch per expert (cuBLAS GEMVs), graph-replayed
    wbf = [torch.randn(S, r, c, device="cuda", dtype=torch.bfloat16) * 0.01 for r, c in ((Fe, D), (Fe, D), (D, Fe))]
    sbf = [torch.randn(r, c, device="cuda", dtype=torch.bfloat16) * 0.01 for r, c in ((Fe, D), (Fe, D), (D, Fe))]

    def torch_moe(weights, slots, wt):
        y = F.linear(F.silu(F.linear(x, sbf[0])) * F.linear(x, sbf[1]), sbf[2]).float()
        for j, s in enumerate(slots.tolist()):
            y += wt[j] * F.linear(F.silu(F.linear(x, weights[0][s])) * F.linear(x, weights[1][s]), weights[2][s])
        out.copy_(y)

    bf_ms = ctx.time(lambda: [torch_moe(wbf, s, w) for s, w in zip(sel, wts)], graph=True, calls=R)
    ctx.row("moe", "decode k=8+shared bf16 experts, torch per expert", bf_ms, nbytes=(k + 1) * 3 * Fe * D * 2)
    del wbf
    for qtypes in [("Q4_K", "Q4_K", "Q4_K"), ("Q3_K", "Q3_K", "Q3_K"), ("Q4_K", "Q4_K", "Q5_K"), ("Q2_K", "Q2_K", "Q3_K")]:
        pools = _moe_pools(qtypes, S, D, Fe)
        nbytes = k * sum(p[0].numel() for p in pools) + shared_bytes
        # baseline 2: dequantize each selected expert to bf16 scratch (Triton) + torch matmuls
        scr = [torch.empty(r, c, device="cuda", dtype=torch.bfloat16) for r, c in ((Fe, D), (Fe, D), (D, Fe))]
        sh_scr = [torch.empty(r, c, device="cuda", dtype=torch.bfloat16) for r, c in ((Fe, D), (Fe, D), (D, Fe))]

        def deq_moe(slots, wt):
            for i, (p, qt, (r, c)) in enumerate(zip(shared, shq, ((Fe, D), (Fe, D), (D, Fe)))):
                qm.dequantize_gpu(p, qt, (r, c), out=sh_scr[i])
            y = F.linear(F.silu(F.linear(x, sh_scr[0])) * F.linear(x, sh_scr[1]), sh_scr[2]).float()
            for j, s in enumerate(slots.tolist()):
                for i, (p, qt, (r, c)) in enumerate(zip(pools, qtypes, ((Fe, D), (Fe, D), (D, Fe)))):
                    qm.dequantize_gpu(p[s], qt, (r, c), out=scr[i])
                y += wt[j] * F.linear(F.silu(F.linear(x, scr[0])) * F.linear(x, scr[1]), scr[2])
            out.copy_(y)

        base_ms = ctx.time(lambda: [deq_moe(s, w) for s, w in zip(sel, wts)], graph=True, calls=R)
        name = "/".join(qtypes)
        ctx.row("moe", f"decode {name} dequant+torch per expert", base_ms, nbytes=nbytes)
        x8 = qm.quantize_x8(x)
        for tag in ["word", "word+pdl-nopf", "x8", "x8+pdl-nopf", "tile"]:
            impl = tag.split("+")[0]
            kw = {"x8": x8 if impl == "x8" else False}
            impl = "word" if impl == "x8" else impl
            with pdl_mode(tag):
                ms = ctx.time(lambda: [moe.moe_decode(x, s, w, *pools, qtypes, out, shared=shared, shared_qtypes=shq,
                                                      impl=impl, **kw) for s, w in zip(slot_ts, wts)],
                              graph=True, calls=R)
            ctx.row("moe", f"decode {name} fused {tag} (+Q8_0 shared)", ms, nbytes=nbytes, base="dequant+torch",
                    base_ms=base_ms, note=f"bf16-torch x{ms / bf_ms:.2f}")
        del pools


@section("moe_prefill")
def bench_moe_prefill(ctx):
    S, D, Fe, k = 256, 2304, 1024, 8
    qtypes = ("Q4_K", "Q4_K", "Q4_K")
    pools = _moe_pools(qtypes, S, D, Fe)
    wbf = [torch.randn(S, r, c, device="cuda", dtype=torch.bfloat16) * 0.01 for r, c in ((Fe, D), (Fe, D), (D, Fe))]
    Ts = [int(t) for t in os.environ.get("BENCH_MOE_PREFILL_T", "512,2048,8192").split(",")]  # (a subset: A/B runs)
    for T in Ts:
        x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
        ids = torch.rand(T, S, device="cuda").topk(k, dim=1).indices
        w = torch.rand(T, k, device="cuda")
        out = torch.empty(T, D, device="cuda", dtype=torch.bfloat16)
        flop = 2 * T * k * 3 * Fe * D
        # baseline: tokens pre-sorted by expert (not timed), bf16 cuBLAS per expert, graph-replayed
        flat = ids.reshape(-1)
        order = torch.sort(flat, stable=True).indices
        counts = torch.bincount(flat, minlength=S).tolist()
        xs = x[order // k]
        ys = torch.empty(T * k, D, device="cuda", dtype=torch.bfloat16)
        bounds = [0]
        for c in counts:
            bounds.append(bounds[-1] + c)

        def torch_grouped():
            for e in range(S):
                a, b = bounds[e], bounds[e + 1]
                if a == b:
                    continue
                xe = xs[a:b]
                h = F.silu(F.linear(xe, wbf[0][e])) * F.linear(xe, wbf[1][e])
                torch.matmul(h, wbf[2][e].t(), out=ys[a:b])

        base_ms = ctx.time(torch_grouped, graph=True)
        ctx.row("moe_prefill", f"T={T} bf16 cuBLAS per expert (pre-sorted)", base_ms, flop=flop)
        # stronger baseline: torch's grouped GEMM (one launch per matrix; CUTLASS on sm_90), pre-sorted
        gm_ms = None
        if hasattr(torch, "_grouped_mm"):
            offs = torch.cumsum(torch.tensor(counts, device="cuda"), 0).to(torch.int32)
            wt = [m.transpose(1, 2) for m in wbf]  # [S, K, N] views

            def torch_grouped_mm():
                h = F.silu(torch._grouped_mm(xs, wt[0], offs=offs)) * torch._grouped_mm(xs, wt[1], offs=offs)
                return torch._grouped_mm(h, wt[2], offs=offs)

            try:
                gm_ms = ctx.time(torch_grouped_mm, graph=True)
                ctx.row("moe_prefill", f"T={T} bf16 torch._grouped_mm (pre-sorted)", gm_ms, flop=flop)
            except Exception as e:  # older torch / unsupported layout: keep the per-expert baseline
                print(f"torch._grouped_mm: {type(e).__name__}: {e}", file=sys.stderr)
        if moe.moe_prefill_gluon.supported("cuda", "Q4_K", Fe, D):  # the two GEMMs alone, pre-sorted as the baselines
            PG = moe.moe_prefill_gluon
            A = T * k
            bm = moe.prefill_tile_rows(A, S)  # as moe_prefill picks it
            bmd = min(bm, PG.DOWN_MAX_BM)
            hh = torch.empty(A, Fe, device="cuda", dtype=torch.bfloat16)
            yy = torch.empty(A, D, device="cuda", dtype=torch.float32)
            wf = w.reshape(-1).contiguous()

            srt = moe.moe_route_sort(ids, S)  # one sort, cut into tiles as moe_prefill cuts them
            asg = srt[0]
            tok = asg // k

            def gemm_fns(split):  # (both halves, gate/up alone, down alone); split: the small tiles as moe_prefill
                gu = moe.prefill_tiles(ids, S, bm, moe.prefill_split(bm) if split else 0, srt)
                dn = moe.prefill_tiles(ids, S, bmd, moe.prefill_split(bmd) if split else 0, srt)

                def gate_up():
                    for i, (b, (ts, r0, r1)) in enumerate(gu):  # i = 1: the small tiles
                        PG.gate_up(x, tok, ts, r0, r1, pools[0], pools[1], hh, "Q4_K", b, i and PG.small_ns())

                def down():
                    for i, (b, (ts, r0, r1)) in enumerate(dn):
                        PG.down(hh, asg, wf, ts, r0, r1, pools[2], yy, "Q4_K", b, i and PG.small_ns())

                return (lambda: (gate_up(), down())), gate_up, down

            for split in (True, False):
                gemms, gate_up, down = gemm_fns(split)
                cut = moe.prefill_split(bm)
                tag = (f" small tiles {cut}/{moe.prefill_split(bmd)}" if split and cut
                       else " no small tiles" if not split else "")
                ms = ctx.time(gemms, graph=True)
                ctx.row("moe_prefill", f"T={T} Q4_K Gluon GEMMs only (pre-sorted){tag}", ms, flop=flop,
                        base="bf16 cuBLAS per expert", base_ms=base_ms,
                        note="" if gm_ms is None else f"grouped_mm x{ms / gm_ms:.2f}")
                if T >= 2048:  # each half alone
                    ms = ctx.time(gate_up, graph=True)
                    ctx.row("moe_prefill", f"T={T} Q4_K Gluon gate/up alone BM={bm}{tag}", ms, flop=flop * 2 / 3)
                    ms = ctx.time(down, graph=True)
                    ctx.row("moe_prefill", f"T={T} Q4_K Gluon down alone BM={bmd}{tag}", ms, flop=flop / 3)
                sweep = os.environ.get("BENCH_MOE_PREFILL_SWEEP", "1") != "0"  # 0: no knob sweeps (short runs)
                if T >= 2048 and split and sweep:  # the ring depth / MMA overlap knobs (A/B)
                    for ns, wait in ((3, 1), (4, 1), (5, 0)):
                        os.environ.update(KIMI_LOCAL_MOE_PREFILL_NS=str(ns), KIMI_LOCAL_MOE_PREFILL_WAIT=str(wait))
                        try:
                            ms = ctx.time(gemms, graph=True)
                        except Exception as e:  # e.g. a ring that does not fit the shared memory
                            print(f"NS={ns} WAIT={wait}: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
                            continue
                        ctx.row("moe_prefill", f"T={T} Q4_K Gluon GEMMs only NS={ns} WAIT={wait}", ms, flop=flop,
                                note="" if gm_ms is None else f"grouped_mm x{ms / gm_ms:.2f}")
                    for var in ("KIMI_LOCAL_MOE_PREFILL_NS", "KIMI_LOCAL_MOE_PREFILL_WAIT"):
                        os.environ.pop(var)
                    for sns in (4, 6, 8):  # the small-tile launch's ring depth alone
                        os.environ["KIMI_LOCAL_MOE_PREFILL_SMALL_NS"] = str(sns)
                        for fn, what in ((gate_up, "gate/up"), (down, "down")):
                            try:
                                ms = ctx.time(fn, graph=True)
                            except Exception as e:
                                print(f"SMALL_NS={sns}: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
                                continue
                            ctx.row("moe_prefill", f"T={T} Q4_K Gluon {what} alone, small tiles' NS={sns}", ms,
                                    flop=flop * (2 if what == "gate/up" else 1) / 3)
                    os.environ.pop("KIMI_LOCAL_MOE_PREFILL_SMALL_NS")
                if T >= 8192 and split and sweep:  # tile shape / residency: 128-row tiles, registers capped or not
                    for which, b, ns, mr in (("gate/up", 256, 5, 0), ("gate/up", 128, 5, 0), ("gate/up", 128, 3, 128),
                                             ("gate/up", 128, 4, 128), ("gate/up", 128, 5, 128),
                                             ("down", 128, 5, 0), ("down", 128, 3, 128), ("down", 128, 4, 128),
                                             ("down", 128, 5, 128)):
                        tb = moe.prefill_tiles(ids, S, b, moe.prefill_split(b), srt)

                        def run_sweep():
                            for i, (bb, (ts, r0, r1)) in enumerate(tb):  # i = 1: the small tiles (defaults)
                                os.environ["KIMI_LOCAL_MOE_PREFILL_MAXNREG"] = str(0 if i else mr)
                                if which == "gate/up":
                                    PG.gate_up(x, tok, ts, r0, r1, pools[0], pools[1], hh, "Q4_K", bb, 0 if i else ns)
                                else:
                                    PG.down(hh, asg, wf, ts, r0, r1, pools[2], yy, "Q4_K", bb, 0 if i else ns)

                        try:
                            ms = ctx.time(run_sweep, graph=True)
                        except Exception as e:
                            print(f"sweep {which} {b} {ns} {mr}: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
                            continue
                        finally:
                            os.environ.pop("KIMI_LOCAL_MOE_PREFILL_MAXNREG", None)
                        ctx.row("moe_prefill", f"T={T} Q4_K Gluon {which} alone BM={b} NS={ns} maxnreg={mr}",
                                ms, flop=flop * (2 if which == "gate/up" else 1) / 3)
        for gluon in ("1", "0"):  # the Gluon kernels (moe_prefill_gluon), then the Triton grouped kernels
            os.environ["KIMI_LOCAL_MOE_PREFILL_GLUON"] = gluon
            for bm, small in [(None, None), (None, 0)] + ([(128, None)] if T >= 8192 and gluon == "0" else []):
                ms = ctx.time(lambda: moe.moe_prefill(x, ids, w, *pools, qtypes, out, BM=bm, small=small))
                ctx.row("moe_prefill", f"T={T} Q4_K {'Gluon' if gluon == '1' else 'Triton'} grouped (sort+gemms+sum)"
                        + (f" BM={bm}" if bm else "") + (" no small tiles" if small == 0 else ""), ms, flop=flop,
                        base="bf16 cuBLAS per expert", base_ms=base_ms,
                        note="" if gm_ms is None else f"grouped_mm x{ms / gm_ms:.2f}")
        os.environ.pop("KIMI_LOCAL_MOE_PREFILL_GLUON")


# ------------------------------------------------------------------------------------------------
# KDA / MLA (kernels/kda.py, kernels/mla.py)


def _kda_mla():
    try:
        from kimi_local.kernels import kda, mla, naive
    except ImportError:
        from kernels import kda, mla, naive
    return kda, mla, naive


@section("norm")
def bench_norm(ctx):
    """Decode-size residual add + RMSNorm (55 per token) and prefill gated norm, vs torch graph-replayed."""
    try:
        from kimi_local.kernels import naive, norm
    except ImportError:
        from kernels import naive, norm
    D, L, bf = 2304, 64, torch.bfloat16
    xs = [torch.randn(D, device="cuda").to(bf) for _ in range(L)]
    rs = [torch.randn(D, device="cuda").to(bf) for _ in range(L)]
    w = (torch.rand(D, device="cuda") + 0.5).to(bf)
    out = torch.empty(D, device="cuda", dtype=bf)

    def torch_norm():
        for x, r in zip(xs, rs):
            r.add_(x)
            out.copy_(naive.rms_norm(r, w, 1e-5))

    base_ms = ctx.time(torch_norm, graph=True, calls=L)
    ctx.row("norm", f"decode residual add + rms_norm D={D}: torch, graph", base_ms, nbytes=5 * D * 2)
    ms = ctx.time(lambda: [norm.rms_norm(x, w, 1e-5, out, residual=r) for x, r in zip(xs, rs)], graph=True, calls=L)
    ctx.row("norm", f"decode residual add + rms_norm D={D}: Triton, graph", ms, nbytes=5 * D * 2,
            base="torch", base_ms=base_ms)
    T, H, V = 8192, 32, 128
    o = torch.randn(T, H, V, device="cuda").to(bf)
    z = torch.randn(T, H, V, device="cuda").to(bf)
    wv = torch.rand(V, device="cuda") + 0.5
    go = torch.empty(T, H, V, device="cuda", dtype=bf)
    nbytes = 3 * T * H * V * 2
    base_ms = ctx.time(lambda: go.copy_(naive.gated_rms_norm(o, z, wv, 1e-5)))
    ctx.row("norm", f"prefill gated rms_norm T={T}: torch", base_ms, nbytes=nbytes)
    ms = ctx.time(lambda: norm.gated_rms_norm(o, z, wv, 1e-5, go))
    ctx.row("norm", f"prefill gated rms_norm T={T}: Triton", ms, nbytes=nbytes, base="torch", base_ms=base_ms)


def _fla_recurrent():
    try:
        from fla.ops.kda.fused_recurrent import fused_recurrent_kda_fwd
    except Exception:  # fla-core not installed (carry a wheel to compare)
        return None
    return fused_recurrent_kda_fwd


@section("kda")
def bench_kda_decode(ctx):
    """One KDA decode token per layer, graph-replayed over L layers' states (L x 2 MiB >> L2)."""
    kda, _, naive = _kda_mla()
    H, K, V, W = 32, 128, 128, 4
    P, bf = H * K, torch.bfloat16
    state_bytes = H * K * V * 4
    L = 64
    states = [torch.randn(H, K, V, device="cuda") * 0.05 for _ in range(L)]
    conv_w = [torch.randn(3, P, W, device="cuda") * 0.3 for _ in range(L)]
    tails = [torch.randn(3, P, W - 1, device="cuda").to(bf) for _ in range(L)]
    a = -torch.rand(H, device="cuda") - 0.1
    dt_bias, norm_w = torch.randn(P, device="cuda"), torch.rand(V, device="cuda") + 0.5
    q, k, v, f, z = (torch.randn(P, device="cuda").to(bf) for _ in range(5))
    beta = torch.randn(H, device="cuda").to(bf)
    out = torch.empty(P, device="cuda", dtype=bf)
    # state read + write, conv weights, tails read + write, projections in, output
    nbytes = 2 * state_bytes + 3 * P * W * 4 + 2 * 3 * P * (W - 1) * 2 + 5 * P * 2 + P * 2
    fla_fwd = _fla_recurrent()
    base, base_ms = None, None
    if fla_fwd is not None:
        A_log = torch.log(-a)
        q4, k4, v4, f4 = (t.view(1, 1, H, K) for t in (q, k, v, f))
        b4, o4 = beta.view(1, 1, H), torch.empty(1, 1, H, V, device="cuda", dtype=bf)

        def fla_step():
            for s in states:
                fla_fwd(q4, k4, v4, f4, b4, A_log=A_log, dt_bias=dt_bias, initial_state=s[None], scale=K**-0.5,
                        inplace_final_state=True, use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True,
                        use_beta_sigmoid_in_kernel=True, out=o4)

        base_ms = ctx.time(fla_step, graph=True, calls=L)
        base = "fla fused_recurrent_kda (no conv/norm)"
        ctx.row("kda", "decode step: fla fused_recurrent_kda, gate/l2/beta in kernel (no conv, no norm)", base_ms,
                nbytes=2 * state_bytes + 5 * P * 2)
    Lt = 8  # the eager-torch reference is slow: fewer layers, still 16 MiB of state
    t_ms = ctx.time(lambda: [naive.kda_decode_ref(q, k, v, f, beta, z, conv_w[i], tails[i], a, dt_bias, norm_w,
                                                  states[i], 1e-5) for i in range(Lt)], graph=True, calls=Lt)
    ctx.row("kda", "decode step: torch reference (naive.kda_decode_ref), graph", t_ms, nbytes=nbytes)
    # BV None: kda.DEFAULTS; cl: the head's V blocks as one thread-block cluster (False: the arrival counter)
    for BV, nw, pdl, cl in ((None, None, False, False), (None, None, True, False), (None, None, False, True),
                            (None, None, True, True), (16, 2, True, True), (32, 1, True, True), (32, 2, True, True),
                            (8, None, False, False), (32, None, False, False), (32, None, True, False),
                            (32, None, True, True), (64, None, True, True), (64, 2, True, True),
                            (128, None, False, False), (128, None, True, False)):
        ms = ctx.time(lambda: [kda.kda_decode_step(q, k, v, f, beta, z, conv_w[i], tails[i], a, dt_bias, norm_w,
                                                   states[i], out, 1e-5, BV=BV, num_warps=nw, pdl=pdl, cluster=cl)
                               for i in range(L)], graph=True, calls=L)
        name = (f"decode step fused (conv+l2+gate+delta+gated norm) BV={BV or 'default'}" + (f" w{nw}" if nw else "")
                + (" pdl" if pdl else "") + (" cluster" if cl else ""))
        ctx.row("kda", name, ms, nbytes=nbytes, base=base, base_ms=base_ms, note=f"torch ref x{ms / t_ms:.3f}")
    bench_kda_engine(ctx, kda, states, conv_w, tails, a, dt_bias, norm_w, base, base_ms)


def bench_kda_engine(ctx, kda, states, conv_w, tails, a, dt_bias, norm_w, base, base_ms):
    """The engine's KDA decode chain per layer, graph-replayed with PDL over the layers' states: the step as the
    engine calls it (low-rank gates fused: fg_a with bf16 f_b / g_b; the output also as x8), alone and followed by
    the o-projection's GEMV ([2304, 4096] Q8_0 on that x8 buffer), and that GEMV alone."""
    H, K, V = states[0].shape
    P, bf, L, D = H * K, torch.bfloat16, len(states), 2304
    q, k, v = (torch.randn(P, device="cuda").to(bf) for _ in range(3))
    beta, fg = torch.randn(H, device="cuda").to(bf), torch.randn(2 * K, device="cuda").to(bf)
    f_b = [(torch.randn(P, K, device="cuda") * K**-0.5).to(bf) for _ in range(L)]
    g_b = [(torch.randn(P, K, device="cuda") * K**-0.5).to(bf) for _ in range(L)]
    wo = [rand_packed("Q8_0", (), D, P) for _ in range(L)]
    out, y = torch.empty(P, device="cuda", dtype=bf), torch.empty(1, D, device="cuda", dtype=bf)
    o8 = torch.empty(qm.x8_words(P), dtype=torch.int32, device="cuda")
    step_bytes = 2 * H * K * V * 4 + 2 * P * K * 2 + 3 * P * 4 * 4 + 2 * 3 * P * 3 * 2
    gemv_bytes = wo[0].numel()

    def step(i, cluster=None, BV=None, nw=None):
        kda.kda_decode_step(q, k, v, None, beta, None, conv_w[i], tails[i], a, dt_bias, norm_w, states[i], out, 1e-5,
                            out8=o8, fg_a=fg, f_b=f_b[i], g_b=g_b[i], cluster=cluster, BV=BV, num_warps=nw)

    def gemv(i):
        qm.qgemv(out[None], wo[i], "Q8_0", D, out=y, x8=o8)

    with pdl.active(True):
        ms = ctx.time(lambda: [step(i) for i in range(L)], graph=True, calls=L)
        ctx.row("kda", "engine step (fused gates, x8 out), pdl", ms, nbytes=step_bytes, base=base, base_ms=base_ms)
        for cl, BV, nw, fsplit in ((False, None, None, "1"), (True, None, None, "0"), (True, 16, 4, "1"),
                                   (True, 16, 2, "1"), (True, 32, 2, "1"), (True, 64, 4, "1"), (True, 32, 8, "1")):
            os.environ["KIMI_LOCAL_KDA_FSPLIT"] = fsplit  # read at launch: the graph captures the choice
            ms = ctx.time(lambda: [step(i, cl, BV, nw) for i in range(L)], graph=True, calls=L)
            os.environ.pop("KIMI_LOCAL_KDA_FSPLIT")
            ctx.row("kda", f"engine step (fused gates, x8 out), pdl, {'cluster' if cl else 'no cluster'}"
                    + (f" BV={BV} w{nw}" if BV else "") + (" no f split" if fsplit == "0" else ""), ms,
                    nbytes=step_bytes, base=base, base_ms=base_ms)
        ms = ctx.time(lambda: [gemv(i) for i in range(L)], graph=True, calls=L)
        ctx.row("kda", "o-proj GEMV Q8_0 [2304, 4096] x8, pdl", ms, nbytes=gemv_bytes)
        ms = ctx.time(lambda: [(step(i), gemv(i)) for i in range(L)], graph=True, calls=L)
        ctx.row("kda", "engine step + o-proj GEMV, pdl", ms, nbytes=step_bytes + gemv_bytes)
        ms = ctx.time(lambda: [(step(i, False), gemv(i)) for i in range(L)], graph=True, calls=L)
        ctx.row("kda", "engine step + o-proj GEMV, pdl, no cluster", ms, nbytes=step_bytes + gemv_bytes)
        # the default above preloads (quant_matmul.preload_default: the GEMV's whole rows into registers before its
        # wait, PRELOAD_SPLIT = 1 slice); against one-step slices without it, and preloads of other row / slice counts
        # (session 22, H200, us a layer of step + GEMV: 4 slices 12.31, 8 slices 15.15, 4 slices of 2 rows 14.69,
        # 2 slices 10.3, 1 slice 10.0)
        for name, kw in (("4 one-step slices, no preload", dict(BN=4, SPLIT=4, C=64, preload=False)),
                         ("preload BN=8 SPLIT=4", dict(BN=8, SPLIT=4, preload=True)),
                         ("preload BN=8 SPLIT=2", dict(BN=8, SPLIT=2, preload=True)),
                         ("preload BN=8 SPLIT=2, 2 warps", dict(BN=8, SPLIT=2, preload=True, num_warps=2)),
                         ("preload BN=4 SPLIT=2", dict(BN=4, SPLIT=2, preload=True)),
                         ("preload BN=2 SPLIT=1", dict(BN=2, SPLIT=1, preload=True))):
            def gemv_v(i, kw=kw):
                qm.qgemv1(out, wo[i], "Q8_0", D, out=y[0], x8=o8, **{"num_warps": 1, **kw})
            ms = ctx.time(lambda: [gemv_v(i) for i in range(L)], graph=True, calls=L)
            ctx.row("kda", f"o-proj GEMV Q8_0 [2304, 4096] x8, pdl, {name}", ms, nbytes=gemv_bytes)
            ms = ctx.time(lambda: [(step(i), gemv_v(i)) for i in range(L)], graph=True, calls=L)
            ctx.row("kda", f"engine step + o-proj GEMV, pdl, {name}", ms, nbytes=step_bytes + gemv_bytes)


@section("kda_parts")
def bench_kda_parts(ctx):
    """Where the engine's KDA step spends its time over the unfused one: the same cluster step (BV = 32, 4 warps, PDL,
    graph over 64 layers' states) unfused without / with the x8 output, fused (f / z from fg_a) without / with it."""
    kda, _, _ = _kda_mla()
    H, K, V, W, L = 32, 128, 128, 4, 64
    P, bf = H * K, torch.bfloat16
    states = [torch.randn(H, K, V, device="cuda") * 0.05 for _ in range(L)]
    conv_w = [torch.randn(3, P, W, device="cuda") * 0.3 for _ in range(L)]
    tails = [torch.randn(3, P, W - 1, device="cuda").to(bf) for _ in range(L)]
    f_b = [(torch.randn(P, K, device="cuda") * K**-0.5).to(bf) for _ in range(L)]
    g_b = [(torch.randn(P, K, device="cuda") * K**-0.5).to(bf) for _ in range(L)]
    a, dt_bias, norm_w = -torch.rand(H, device="cuda") - 0.1, torch.randn(P, device="cuda"), torch.rand(V, device="cuda")
    q, k, v, f, z = (torch.randn(P, device="cuda").to(bf) for _ in range(5))
    beta, fg = torch.randn(H, device="cuda").to(bf), torch.randn(2 * K, device="cuda").to(bf)
    out, o8 = torch.empty(P, device="cuda", dtype=bf), torch.empty(qm.x8_words(P), dtype=torch.int32, device="cuda")
    nbytes = 2 * H * K * V * 4

    def step(i, fused, x8, cl):
        kw = dict(fg_a=fg, f_b=f_b[i], g_b=g_b[i]) if fused else {}
        kda.kda_decode_step(q, k, v, None if fused else f, beta, None if fused else z, conv_w[i], tails[i], a, dt_bias,
                            norm_w, states[i], out, 1e-5, out8=o8 if x8 else None, BV=32, num_warps=4, cluster=cl, **kw)

    with pdl.active(True):
        # nbar "1": the norm's partial sums by st.async into mbarrier-counted slots (default); "0": a cluster barrier
        for fused, x8, cl, nbar in ((False, False, False, "1"), (False, False, True, "0"), (False, False, True, "1"),
                                    (False, True, True, "1"), (True, False, True, "1"), (True, True, False, "1"),
                                    (True, True, True, "0"), (True, True, True, "1")):
            os.environ["KIMI_LOCAL_KDA_NBAR"] = nbar  # read at launch: the graph captures the choice
            ms = ctx.time(lambda: [step(i, fused, x8, cl) for i in range(L)], graph=True, calls=L)
            os.environ.pop("KIMI_LOCAL_KDA_NBAR")
            ctx.row("kda_parts", f"step BV=32 w4 pdl {'cluster' if cl else 'arrival'}"
                    + (" barrier norm" if cl and nbar == "0" else "") + f", {'fused gates' if fused else 'unfused'}"
                    + (", x8 out" if x8 else ""), ms, nbytes=nbytes)


@section("kda_prefill")
def bench_kda_prefill(ctx):
    kda, _, naive = _kda_mla()
    T, H, K, V, W = 8192, 32, 128, 128, 4
    C, bf = H * K, torch.bfloat16
    x = torch.randn(T, C, device="cuda").to(bf)
    w = torch.randn(C, W, device="cuda")
    tail = torch.randn(C, W - 1, device="cuda").to(bf)
    out = torch.empty(T, C, device="cuda", dtype=bf)
    wt = w.view(C, 1, W).to(bf)
    base_ms = ctx.time(lambda: F.silu(F.conv1d(torch.cat([tail.t(), x], 0).t()[None], wt, groups=C)))
    ctx.row("kda_prefill", f"short conv T={T} C={C}: torch conv1d+silu (bf16)", base_ms, nbytes=2 * T * C * 2)
    for BT, BC in ((64, 64), (32, 128), (128, 64)):
        ms = ctx.time(lambda: kda.causal_conv_prefill(x, w, tail, out, BT=BT, BC=BC))
        ctx.row("kda_prefill", f"short conv T={T} C={C} Triton BT={BT} BC={BC}", ms, nbytes=2 * T * C * 2,
                base="torch conv1d", base_ms=base_ms)
    q = naive.l2norm(torch.randn(T, H, K, device="cuda")).to(bf)
    k = naive.l2norm(torch.randn(T, H, K, device="cuda")).to(bf)
    v = torch.randn(T, H, V, device="cuda").to(bf)
    g = -torch.rand(T, H, K, device="cuda")
    beta = torch.rand(T, H, device="cuda")
    state = torch.zeros(H, K, V, device="cuda")
    flop = T * H * (4 * K * V + 2 * 64 * (K + V))  # state read/write + intra-chunk terms, roughly
    base_ms = ctx.time(lambda: kda.kda_prefill(q, k, v, g, beta, state, use_fla=False))
    ctx.row("kda_prefill", f"chunked KDA T={T}: torch naive.kda_chunked (fp32)", base_ms, flop=flop)
    if kda._fla_chunk_kda() is not None:
        ms = ctx.time(lambda: kda.kda_prefill(q, k, v, g, beta, state, use_fla=True))
        ctx.row("kda_prefill", f"chunked KDA T={T}: fla chunk_kda via kda_prefill", ms, flop=flop,
                base="torch kda_chunked", base_ms=base_ms)


@section("mla")
def bench_mla_decode(ctx):
    """MLA decode attention over the 576-value latent cache, one query token, 32 heads."""
    _, mla, _ = _kda_mla()
    H, R, DR = 32, 512, 64
    scale = 1 / math.sqrt(192)
    bf, fp8 = torch.bfloat16, torch.float8_e4m3fn
    q_abs = (torch.randn(H, R, device="cuda") * 0.05).to(bf)
    q_pe = torch.randn(H, DR, device="cuda").to(bf)
    q_cat = torch.cat([q_abs, q_pe], 1).view(1, 1, H, R + DR)  # MQA as one head: the 32 heads are 32 queries
    out = torch.empty(H, R, device="cuda")
    configs = [dict(), dict(variant="t", BS=64, num_warps=4, num_stages=2, min_chunk=128),  # {}: mla.DEFAULTS
               dict(variant="hm", BS=32, num_warps=8, num_stages=2, min_chunk=128)]
    if not ctx.quick:  # scripts/sweep_kda_mla.py sweeps more
        configs += [dict(variant="t", BS=64, num_warps=8, num_stages=2, min_chunk=128),
                    dict(variant="hm", BS=16, num_warps=8, num_stages=3, min_chunk=128)]
    for S in ([4096, 131072] if ctx.quick else [4096, 131072, 1048576]):
        base_ms = {}
        for dt in (bf, fp8):
            row_bytes = (R + DR) * (2 if dt == bf else 1) + (4 if dt == fp8 else 0)
            nbytes = S * row_bytes
            n = n_copies(nbytes, target=150e6, most=32)
            lats = [(torch.randn(S, R + DR, device="cuda") * (1 if dt == bf else 40)).to(dt) for _ in range(n)]
            scs = [torch.rand(S, device="cuda") * 0.02 + 0.01 for _ in range(n)]
            seq = torch.tensor([S], dtype=torch.int32, device="cuda")
            tag = "bf16" if dt == bf else "fp8"
            if dt == bf:
                def sdpa():
                    for lat in lats:
                        F.scaled_dot_product_attention(q_cat, lat.view(1, 1, S, R + DR), lat[:, :R].view(1, 1, S, R),
                                                       scale=scale)

                def eager():
                    for lat in lats:
                        s = (q_abs @ lat[:, :R].t() + q_pe @ lat[:, R:].t()).float() * scale
                        torch.softmax(s, -1).to(bf) @ lat[:, :R]

                for name, fn in (("torch SDPA (MQA, 1 kv head)", sdpa), ("torch eager absorbed", eager)):
                    try:
                        base_ms[name] = ctx.time(fn, graph=True, calls=n)
                        ctx.row("mla", f"S={S} bf16 {name}", base_ms[name], nbytes=nbytes)
                    except Exception as e:  # a backend without this head size: keep going
                        print(f"mla baseline {name} S={S}: {type(e).__name__}: {e}", flush=True)
            bname = next(iter(base_ms), None)
            for cfg in configs:
                ms = ctx.time(lambda: [mla.mla_decode(q_abs, q_pe, lat, seq, scale, out, latent_scale=sc, **cfg)
                                       for lat, sc in zip(lats, scs)], graph=True, calls=n)
                cfg_s = " ".join(f"{k}={v}" for k, v in cfg.items()) or "defaults"
                ctx.row("mla", f"S={S} {tag} split-K {cfg_s}", ms, nbytes=nbytes, base=bname and f"{bname} bf16",
                        base_ms=base_ms.get(bname), note=f"splits={mla.default_splits(out.device)}")
            del lats, scs
            torch.cuda.empty_cache()


def print_table(rows):
    cols = ["section", "case", "ms", "floor_ms", "GB/s", "%bw", "TFLOP/s", "%mm", "baseline", "base_ms", "x_base",
            "note"]
    fmt = {"ms": "{:.4f}", "floor_ms": "{:.4f}", "base_ms": "{:.4f}", "GB/s": "{:.0f}", "%bw": "{:.1f}",
           "TFLOP/s": "{:.1f}", "%mm": "{:.1f}", "x_base": "{:.2f}"}
    print(text_table(rows, cols, fmt))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="", help="comma list of section names, or prefixes ending in '*' (bandwidth always runs)")
    ap.add_argument("--quick", action="store_true", help="fewer sizes, shorter timing")
    args = ap.parse_args()
    only = [s for s in args.only.split(",") if s]
    ctx = Ctx(args.quick)
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}", flush=True)
    failed = []
    for name, fn in SECTIONS:
        if name != "bandwidth" and only and not any(name == o or (o.endswith("*") and name.startswith(o[:-1]))
                                                      for o in only):
            continue
        try:
            fn(ctx)
        except Exception as e:  # keep the other sections' numbers
            if name == "bandwidth":
                raise
            failed.append(f"{name}: {type(e).__name__}: {e}")
            print("FAILED", failed[-1], flush=True)
        torch.cuda.empty_cache()
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "bench_kernels.json").write_text(json.dumps(
            {"device": torch.cuda.get_device_name(), "rows": ctx.rows, "failed": failed}, indent=1))
    print_table(ctx.rows)
    for f in failed:
        print("FAILED", f)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
