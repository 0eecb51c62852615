"""GPU sweep of the fused MoE decode (kernels.moe.moe_decode: word path, split-K + last-arriver reductions):
its default configuration (moe_decode_config) against nearby knob settings and the older tile kernels.
A second design (all experts of a row tile per program, flat pipelined K loop) was swept here too and
measured 1.6-2.7x slower on an H100, so it and its rows were removed.

    python3 scripts/sweep_moe.py [--budget 150] [--smoke]

Real shapes: D=2304, F=1024, 256 experts, top-8 + a Q8_0 shared expert; cases Q4_K/Q4_K/Q6_K and
Q3_K/Q3_K/Q4_K. Each configuration: one call on a NaN-poisoned fp32 output checked against the dense reference
(naive.moe_ref on the dequantized selected experts; rel. error < 1e-4 else WRONG), timed as CUDA-graph
replays of R calls over R expert selections (triton.testing.do_bench median), then checked again after the
replays. GB/s counts the selected experts' packed bytes + shared + x/out; %bw is against a device-to-device
copy measured in the same run. Table printed last; rows to $OUT/sweep_moe.json when OUT is set.
--smoke: CPU dry run under the Triton interpreter at tiny shapes (checks this script's logic).
"""
import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import triton  # noqa: E402

try:
    from kimi_local.kernels import moe, quant_matmul as qm
    from kimi_local.kernels.naive import moe_ref
except ImportError:  # device machine: import the source dirs
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from kernels import moe, quant_matmul as qm
    from kernels.naive import moe_ref

DEV = "cpu" if SMOKE else "cuda"
FP16_FIELDS = {"Q8_0": [0], "Q6_K": [208], "Q5_K": [0, 2], "Q4_K": [0, 2], "Q3_K": [108], "Q2_K": [80, 82]}
T0 = time.time()
ROWS = []

# (name, moe_decode kwargs); the default first (baseline), then knob settings around it (BF/S1: rows and
# D-splits of gate/up, BD/S2: rows and F-splits of down), then the tile kernels
VARIANTS = [
    ("default", {}),
    ("BF=16 S1=9 BD=16 S2=4 nw=4", dict(BF=16, S1=9, BD=16, S2=4, num_warps=4)),
    ("BF=8 S1=9 BD=8 S2=4 nw=1", dict(BF=8, S1=9, BD=8, S2=4, num_warps=1)),
    ("BF=32 S1=9 BD=32 S2=4 nw=4", dict(BF=32, S1=9, BD=32, S2=4, num_warps=4)),
    ("BF=16 S1=3 BD=16 S2=2 nw=2", dict(BF=16, S1=3, BD=16, S2=2, num_warps=2)),
    ("BF=16 S1=9 BD=16 S2=4 nw=2 ns=2", dict(BF=16, S1=9, BD=16, S2=4, num_warps=2, num_stages=2)),
    ("tile (old)", dict(impl="tile")),
]
if SMOKE:
    VARIANTS = [VARIANTS[0], ("BF=64 S1=2 BD=128 S2=1", dict(BF=64, S1=2, BD=128, S2=1)), VARIANTS[-1]]


def rand_packed(qtype, lead, N, K, scale=0.002):
    """Packed weight uint8 [*lead, N, prb] from random valid ggml blocks (fp16 scales sane)."""
    nb, ts = K // qm.QK[qtype], qm.TYPE_SIZE[qtype]
    b = torch.randint(0, 256, (*lead, N, nb, ts), dtype=torch.uint8, device=DEV)
    for o in FP16_FIELDS[qtype]:
        v = (torch.rand(*lead, N, nb, 1, device=DEV) * scale + scale / 10).half()
        b[..., o:o + 2] = v.view(torch.uint8)
    return qm.repack(b.view(*lead, N, nb * ts), qtype)


def sync():
    if not SMOKE:
        torch.cuda.synchronize()


def graph_time(calls):
    """Median ms per call of zero-arg callables replayed as one CUDA graph (wall time in smoke mode)."""
    if SMOKE:
        t = time.perf_counter()
        for c in calls:
            c()
        return (time.perf_counter() - t) * 1e3 / len(calls)
    for c in calls:  # compile / warm up outside the capture
        c()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    ms = triton.testing.do_bench(g.replay, warmup=10, rep=40, return_mode="median")
    return ms / len(calls)


def bandwidth():
    if SMOKE:
        return 1e10
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device=DEV).random_()
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), warmup=20, rep=100, return_mode="median")
    del a, b
    torch.cuda.empty_cache()
    return 2 * n / (ms * 1e-3)


def rel_err(y, ref):
    y, ref = y.double(), ref.double()
    if torch.isnan(y).any():
        return float("inf")
    return ((y - ref).norm() / ref.norm()).item()


def row(case, variant, ms=None, nbytes=None, err=None, note="", bw=None):
    r = {"case": case, "variant": variant, "ms": ms, "us": None if ms is None else ms * 1e3}
    if ms is not None and nbytes is not None:
        r["GB/s"] = nbytes / ms / 1e6
        r["%bw"] = 100 * nbytes / (ms * 1e-3) / bw
    if err is not None:
        r["rel_err"] = err
        if not err < 1e-4:
            note = ("WRONG " + note).strip()
    r["note"] = note
    ROWS.append(r)
    print(json.dumps(r), flush=True)


def dense_ref(x, sel, wt, pools, qtypes, shared, shq, D, Fe):
    """moe_ref on the dequantized (fp32, exact) selected experts and shared expert."""
    shapes = ((Fe, D), (Fe, D), (D, Fe))
    dense = [torch.stack([qm.dequantize_gpu(p[s], qt, rc, out=torch.empty(*rc, device=DEV))
                          for s in sel.long().tolist()]) for p, qt, rc in zip(pools, qtypes, shapes)]
    sh = [qm.dequantize_gpu(p, qt, rc, out=torch.empty(*rc, device=DEV)) for p, qt, rc in zip(shared, shq, shapes)]
    k = sel.numel()
    return moe_ref(x, torch.arange(k, device=DEV)[None], wt[None], *dense, shared=sh)


def sweep(bw, args):
    S, D, Fe, k = (256, 2304, 1024, 8) if not SMOKE else (4, 512, 256, 3)
    R = 8 if not SMOKE else 2
    shq = ("Q8_0", "Q8_0", "Q8_0")
    shared = [rand_packed(qt, (), r, c) for qt, r, c in zip(shq, (Fe, Fe, D), (D, D, Fe))]
    gen = torch.Generator().manual_seed(0)
    sel = [torch.randperm(S, generator=gen)[:k].to(torch.int32).to(DEV) for _ in range(R)]
    wts = [torch.rand(k, generator=gen).to(DEV) for _ in range(R)]
    x = torch.randn(D, generator=gen).to(DEV, torch.bfloat16)
    for qtypes in [("Q4_K", "Q4_K", "Q6_K"), ("Q3_K", "Q3_K", "Q4_K")]:
        case = "/".join(qtypes) + f" k={k} +Q8_0 shared"
        pools = [rand_packed(qt, (S,), r, c) for qt, r, c in zip(qtypes, (Fe, Fe, D), (D, D, Fe))]
        nbytes = k * sum(p[0].numel() for p in pools) + sum(s.numel() for s in shared) + 2 * D * 2
        refs = [dense_ref(x, sel[i], wts[i], pools, qtypes, shared, shq, D, Fe) for i in (0, 1)]
        out = torch.empty(D, device=DEV, dtype=torch.bfloat16)  # the model's output dtype while timing
        for vname, kw in VARIANTS:
            if time.time() - T0 > args.budget:
                row(case, vname, note="SKIPPED (time budget)")
                continue
            try:
                o32 = torch.full((D,), float("nan"), device=DEV)
                moe.moe_decode(x, sel[0], wts[0], *pools, qtypes, o32, shared=shared, shared_qtypes=shq, **kw)
                sync()
                err = rel_err(o32, refs[0])
                ms = graph_time([lambda s=s, w=w: moe.moe_decode(x, s, w, *pools, qtypes, out, shared=shared,
                                                                 shared_qtypes=shq, **kw)
                                 for s, w in zip(sel, wts)])
                o32.fill_(float("nan"))  # again after the replays (any state left by them would show here)
                moe.moe_decode(x, sel[1], wts[1], *pools, qtypes, o32, shared=shared, shared_qtypes=shq, **kw)
                sync()
                err = max(err, rel_err(o32, refs[1]))
                note = ""
                if vname == "default":
                    note = str(moe.moe_decode_config(qtypes, shq, D, Fe))
                row(case, vname, ms, nbytes, err, note=note, bw=bw)
            except Exception as e:  # keep sweeping
                row(case, vname, note=f"FAILED {type(e).__name__}: {str(e)[:200]}")
                traceback.print_exc()
        del pools
        if not SMOKE:
            torch.cuda.empty_cache()


def print_table(rows):
    cols = ["case", "variant", "us", "GB/s", "%bw", "rel_err", "note"]
    fmt = {"us": "{:.2f}", "GB/s": "{:.0f}", "%bw": "{:.1f}", "rel_err": "{:.1e}"}
    cells = [[fmt.get(c, "{}").format(r[c]) if r.get(c) is not None else "" for c in cols] for r in rows]
    width = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(cols)]
    print("\n" + " | ".join(c.ljust(w) for c, w in zip(cols, width)))
    print("-+-".join("-" * w for w in width))
    for x in cells:
        print(" | ".join(v.ljust(w) for v, w in zip(x, width)))
    best = {}
    for r in rows:
        if r.get("ms") is not None and "WRONG" not in r["note"] and r["case"] != "bw":
            if r["case"] not in best or r["ms"] < best[r["case"]]["ms"]:
                best[r["case"]] = r
    print("\nfastest correct configuration per case:")
    for case, r in best.items():
        print(f"  {case:36s} {r['variant']:32s} {r['us']:.2f} us  {r.get('%bw', 0):.1f}%bw")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=150.0, help="seconds after which configurations are skipped")
    ap.add_argument("--smoke", action="store_true", help="CPU dry run (Triton interpreter, tiny shapes)")
    args = ap.parse_args()
    name = "cpu (smoke)" if SMOKE else torch.cuda.get_device_name()
    print(f"device: {name}  torch {torch.__version__}  triton {triton.__version__}", flush=True)
    bw = bandwidth()
    row("bw", "d2d copy 1 GiB (read+write)", 2 * (1 << 30) / bw * 1e3, 2 * (1 << 30), bw=bw)
    sweep(bw, args)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "sweep_moe.json").write_text(json.dumps(
            {"device": name, "bw": bw, "rows": ROWS, "elapsed_s": time.time() - T0}, indent=1))
    print_table(ROWS)
    print(f"elapsed {time.time() - T0:.0f} s")
    return 1 if any("WRONG" in r["note"] or "FAILED" in r["note"] for r in ROWS) else 0


if __name__ == "__main__":
    sys.exit(main())
