"""GPU sweep of the KDA decode-step configurations and MLA decode variants (kernels/kda.py, kernels/mla.py).

    python3 scripts/sweep_kda_mla.py [--only kda,mla] [--sizes 4096,131072,1048576]
    python3 scripts/sweep_kda_mla.py --smoke   # CPU, Triton interpreter, tiny shapes: checks the script

Runs in ~2-3 minutes on one H100/H200. Measures a 1 GiB device-to-device copy first (bytes read + written)
and reports every variant as median us (CUDA events, triton.testing.do_bench), effective GB/s over the
fewest bytes the op must move, and % of the measured copy rate. Every variant's output is checked against
an fp32 torch reference on the same inputs (relative Frobenius error; a bound per case); a variant over its
bound or producing NaN is marked FAIL in the table and must not become a default.

KDA: one decode token per layer for 32 heads, K = V = 128, graph-replayed over 64 layers' states (64 x 2 MiB
>> L2), vs fla's fused_recurrent_kda with gate / L2 norm / beta in its kernel (no conv, no output norm;
skipped when fla is not importable). MLA: 32 heads, latent 512 + 64, one query token, bf16 and fp8 caches
at each size (caches rotated so one pass reads >= 150 MB), split kernel + combine per call, seq_len from a
device tensor as in the engine's captured graph; the combine kernel alone, the combine + W_UV launch alone, the
Gluon split kernel alone and the engine's whole call (split + combine + W_UV + x8) are timed too. The table is
printed last; all rows go to $OUT/sweep_kda_mla.json when $OUT is set.
"""
import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

SMOKE = "--smoke" in sys.argv  # CPU check of this script itself: interpreter, tiny shapes, no graphs
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import triton  # noqa: E402

DEV = "cpu" if SMOKE else "cuda"
MATCH: list = []  # --match

try:
    from kimi_local.kernels import kda, mla, naive
except ImportError:  # not pip-installed (device machine): import the source dirs
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from kernels import kda, mla, naive
from kimi_local.bench import text_table  # noqa: E402 (the repo root is on sys.path either way)

ROWS = []
BW = None  # bytes/s of the d2d copy


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def bench(fn, graph=False, calls=1, warmup=25, rep=80):
    """Median ms of one call (fn makes `calls` calls)."""
    if SMOKE:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3 / calls
    if graph:
        fn()
        torch.cuda.synchronize()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        run = g.replay
    else:
        run = fn
    return triton.testing.do_bench(run, warmup=warmup, rep=rep, return_mode="median") / calls


def sync():
    if not SMOKE:
        torch.cuda.synchronize()


def row(sec, case, ms, nbytes, err=None, bound=None, note=""):
    r = {"section": sec, "case": case, "us": ms * 1e3, "GB/s": nbytes / ms / 1e6, "%copy": 100 * nbytes / (ms * 1e-3) / BW,
         "floor_us": nbytes / BW * 1e6, "err": err, "ok": None if err is None else bool(err == err and err < bound),
         "note": note}
    ROWS.append(r)
    print(json.dumps(r), flush=True)
    return r


def fail_row(sec, case, e):
    r = {"section": sec, "case": case, "us": float("nan"), "note": f"FAILED {type(e).__name__}: {str(e)[:200]}"}
    ROWS.append(r)
    print(json.dumps(r), flush=True)


def measure_copy():
    global BW
    if SMOKE:
        BW = 1e9
        return
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device=DEV).random_()
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), warmup=25, rep=150, return_mode="median")
    BW = 2 * n / (ms * 1e-3)
    row("copy", "d2d copy 1 GiB (read + write)", ms, 2 * n)
    del a, b
    torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------
KDA_CONFIGS = [  # (BV, num_warps, pdl); None = the kernel's rule. v1 and v2 kernels removed after the H100 sweep
    (8, 1, False), (8, 2, False), (16, 1, False), (16, 2, False), (16, 4, False), (32, 2, False), (32, 4, False),
    (64, 4, False), (128, 4, False), (128, 8, False), (128, 16, False),  # 128: NV = 1
    # programmatic dependent launch: here each step's prologue (state load) overlaps the previous layer's
    # step, an upper bound for the engine, where the kernel before the KDA step is a projection GEMV
    (8, 1, True), (16, 1, True), (16, 2, True), (32, 4, True), (128, 8, True),
]


def sweep_kda():
    H, K, V, W = (2, 16, 16, 4) if SMOKE else (32, 128, 128, 4)
    P, bf = H * K, torch.bfloat16
    L = 2 if SMOKE else 64
    g = torch.Generator(device=DEV).manual_seed(0)
    rn = lambda *s: torch.randn(*s, device=DEV, generator=g)  # noqa: E731
    states = [rn(H, K, V) * 0.05 for _ in range(L)]
    conv_w = [rn(3, P, W) * 0.3 for _ in range(L)]
    tails = [rn(3, P, W - 1).to(bf) for _ in range(L)]
    a = -torch.rand(H, device=DEV, generator=g) - 0.1
    dt_bias, norm_w = rn(P), torch.rand(V, device=DEV, generator=g) + 0.5
    q, k, v, f, z = (rn(P).to(bf) for _ in range(5))
    beta = rn(H).to(bf)
    out = torch.empty(P, device=DEV, dtype=bf)
    nbytes = 2 * H * K * V * 4 + 3 * P * W * 4 + 2 * 3 * P * (W - 1) * 2 + 5 * P * 2 + P * 2

    # reference for the checks: one step from layer 0's initial state in fp32 torch (the timed runs below
    # update states/tails in place, so every check starts from the pristine copies s0/t0)
    s0, t0 = states[0].clone(), tails[0].clone()
    s_ref, t_ref = s0.clone(), t0.clone()
    o_ref = naive.kda_decode_ref(q, k, v, f, beta, z, conv_w[0], list(t_ref.unbind(0)), a, dt_bias, norm_w, s_ref, 1e-5)

    try:
        from fla.ops.kda.fused_recurrent import fused_recurrent_kda_fwd
    except Exception as e:  # fla-core absent
        print(f"fla not importable ({type(e).__name__}: {e}); no fla baseline", flush=True)
        fused_recurrent_kda_fwd = None
    if fused_recurrent_kda_fwd is not None:
        try:
            A_log = torch.log(-a)
            q4, k4, v4, f4 = (t.view(1, 1, H, K) for t in (q, k, v, f))
            b4, o4 = beta.view(1, 1, H), torch.empty(1, 1, H, V, device=DEV, dtype=bf)

            def fla_step():
                for s in states:
                    fused_recurrent_kda_fwd(q4, k4, v4, f4, b4, A_log=A_log, dt_bias=dt_bias, initial_state=s[None],
                                            scale=K**-0.5, inplace_final_state=True, use_qk_l2norm_in_kernel=True,
                                            use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True, out=o4)

            ms = bench(fla_step, graph=True, calls=L)
            row("kda", "fla fused_recurrent_kda (gate/l2/beta in kernel; no conv, no out norm)", ms,
                2 * H * K * V * 4 + 5 * P * 2 + P * 2)
        except Exception as e:
            fail_row("kda", "fla fused_recurrent_kda", e)
    for BV, nw, pdl in KDA_CONFIGS:
        if BV > V:
            continue
        case = f"kda_decode_step BV={BV} num_warps={nw or 'auto'}" + (" pdl (chained steps overlap)" if pdl else "")
        try:
            # check: same step on a copy of layer 0, fp32 output (tight bound), NaN-poisoned
            s_chk, t_chk = s0.clone(), t0.clone()
            o_chk = torch.full((P,), float("nan"), device=DEV)
            kda.kda_decode_step(q, k, v, f, beta, z, conv_w[0], t_chk, a, dt_bias, norm_w, s_chk, o_chk, 1e-5,
                                BV=BV, num_warps=nw, pdl=pdl)
            sync()
            err = max(rel(o_chk, o_ref), rel(s_chk, s_ref))
            if not torch.equal(t_chk, t_ref):
                err = float("inf")
            ms = bench(lambda: [kda.kda_decode_step(q, k, v, f, beta, z, conv_w[i], tails[i], a, dt_bias, norm_w,
                                                    states[i], out, 1e-5, BV=BV, num_warps=nw, pdl=pdl)
                                for i in range(L)], graph=True, calls=L)
            row("kda", case, ms, nbytes, err, 1e-4)
        except Exception as e:
            fail_row("kda", case, e)
    del states, conv_w, tails
    if not SMOKE:
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------
def mla_variants(dtype, S, n_sm):
    """(label, kwargs) per variant; the first is the current default (DEFAULTS) for the dtype."""
    v = [("default", {})]
    if dtype == torch.bfloat16:  # the session-9 default, against the Gluon kernel (the default now)
        v += [("t BS=64 w4 s2 (session 9)", dict(variant="t", BS=64, num_warps=4, num_stages=2))]
    hm = dict(variant="hm", BS=32, num_warps=8, num_stages=2)
    t = dict(variant="t", BS=64, num_warps=8, num_stages=2)
    if dtype == torch.bfloat16:
        v += [("hm BS=32 w8 s2", hm), ("hm BS=64 w8 s2", dict(hm, BS=64)), ("hm BS=16 w8 s3", dict(hm, BS=16, num_stages=3)),
              ("t BS=64 w8 s2", t), ("t BS=64 w4 s2", dict(t, num_warps=4)),
              ("t BS=64 w8 s2 2xSM splits", dict(t, num_splits=2 * n_sm)),
              ("t BS=64 w4 s3", dict(t, num_warps=4, num_stages=3)),
              ("t BS=32 w4 s4", dict(t, BS=32, num_warps=4, num_stages=4)),
              ("t BS=32 w4 s3 2xSM splits", dict(t, BS=32, num_warps=4, num_stages=3, num_splits=2 * n_sm)),
              ("t BS=64 w4 s2 min_chunk=512", dict(t, num_warps=4, min_chunk=512)),
              ("hm BS=32 w8 s2 2xSM splits", dict(hm, num_splits=2 * n_sm)),
              ("g BS=64 w4 min_chunk=64", dict(variant="g", BS=64, num_warps=4, min_chunk=64)),
              ("g BS=64 w4 min_chunk=256", dict(variant="g", BS=64, num_warps=4, min_chunk=256)),
              ("g 0.5xSM splits", dict(variant="g", num_splits=max(1, n_sm // 2))),
              ("g 2xSM splits", dict(variant="g", num_splits=2 * n_sm))]
        if S <= 8192:
            v += [("t BS=64 w8 s2 min_chunk=64", dict(t, min_chunk=64))]
    else:
        v += [("hm BS=32 w8 s2", hm), ("hm BS=16 w8 s3", dict(hm, BS=16, num_stages=3)),
              ("hm BS=32 w4 s2", dict(hm, num_warps=4)),
              ("t BS=64 w8 s2 bf16", t), ("t BS=64 w8 s2 fp16", dict(t, fp8_compute="fp16")),
              ("t BS=64 w8 s3 fp16", dict(t, fp8_compute="fp16", num_stages=3)),
              ("hm BS=32 w8 s2 2xSM splits", dict(hm, num_splits=2 * n_sm))]  # "t BS=64 w8 s2 fp16": session 9's
    if MATCH:  # --match: only the variants whose label contains one of these strings (and the default)
        v = [x for x in v if x[0] == "default" or any(m in x[0] for m in MATCH)]
    return v


def sweep_mla(sizes):
    H, R, DR = 32, 512, 64
    scale = 1 / math.sqrt(192)
    bf, fp8 = torch.bfloat16, torch.float8_e4m3fn
    n_sm = 4 if SMOKE else torch.cuda.get_device_properties(0).multi_processor_count
    g = torch.Generator(device=DEV).manual_seed(1)
    q_abs = (torch.randn(H, R, device=DEV, generator=g) * 0.05).to(bf)
    q_pe = torch.randn(H, DR, device=DEV, generator=g).to(bf)
    out = torch.empty(H, R, device=DEV)
    v_b = (torch.randn(H, 128, R, device=DEV, generator=g) * 0.05).to(bf)  # W_UV [H, Dv, R]
    o_vo = torch.empty(H * 128, dtype=bf, device=DEV)
    for S in sizes:
        for dt in (bf, fp8):
            tag = "bf16" if dt == bf else "fp8"
            row_bytes = (R + DR) * (2 if dt == bf else 1) + (4 if dt == fp8 else 0)
            nbytes = S * row_bytes
            n = 1 if SMOKE else max(1, min(32, math.ceil(150e6 / nbytes)))
            lats = [(torch.randn(S, R + DR, device=DEV, generator=g) * (1 if dt == bf else 40)).to(dt) for _ in range(n)]
            scs = [torch.rand(S, device=DEV, generator=g) * 0.02 + 0.01 for _ in range(n)]
            seq = torch.tensor([S], dtype=torch.int32, device=DEV)
            # fp32 reference on copy 0 (chunked over rows: the 1M-row fp32 cache would be 2.4 GB)
            sc_all, cs = [], 1 << 17
            for r0 in range(0, S, cs):
                blk = lats[0][r0:r0 + cs].float()
                if dt == fp8:
                    blk = blk * scs[0][r0:r0 + cs, None]
                sc_all.append((q_abs.float() @ blk[:, :R].t() + q_pe.float() @ blk[:, R:].t()) * scale)
            p = torch.softmax(torch.cat(sc_all, 1), -1)
            ref = torch.zeros(H, R, device=DEV)
            for r0 in range(0, S, cs):
                blk = lats[0][r0:r0 + cs, :R].float()
                if dt == fp8:
                    blk = blk * scs[0][r0:r0 + cs, None]
                ref += p[:, r0:r0 + cs] @ blk
            del p, sc_all
            for label, kw in mla_variants(dt, S, n_sm):
                case = f"S={S} {tag} {label}"
                try:
                    chk = torch.full((H, R), float("nan"), device=DEV)
                    n_fb = len(mla._FALLBACK)
                    mla.mla_decode(q_abs, q_pe, lats[0], seq, scale, chk, latent_scale=scs[0], **kw)
                    sync()
                    err = rel(chk, ref)
                    fb = " (fell back to hm: out of shared memory)" if len(mla._FALLBACK) > n_fb else ""
                    ms = bench(lambda: [mla.mla_decode(q_abs, q_pe, lat, seq, scale, out, latent_scale=sc, **kw)
                                        for lat, sc in zip(lats, scs)], graph=True, calls=n)
                    row("mla", case, ms, nbytes, err, 2e-2, note=fb)
                except Exception as e:
                    fail_row("mla", case, e)
            # the combine kernel alone (same workspace the default run filled)
            try:
                NS = n_sm
                ws = mla._workspace(out.device, NS, H, R)
                mla.mla_decode(q_abs, q_pe, lats[0], seq, scale, out, latent_scale=scs[0], num_splits=NS, workspace=ws)
                d = mla.DEFAULTS[tag]
                bs = d["BS"]
                mc = triton.cdiv(max(d["min_chunk"], bs), bs) * bs
                BR = min(R, 128)
                comb = lambda: mla.mla_decode_combine_kernel[(H, R // BR)](  # noqa: E731
                    ws[0], ws[1], ws[2], seq, 0, out, H=H, R=R, BR=BR, BN=mla._combine_bn(NS), BNS=triton.next_power_of_2(NS),
                    BS=bs, NS=NS, MIN_CHUNK=mc, LEN_IN_PTR=True, PDL=False, ONEPASS=mla._onepass(),
                    num_warps=1 if SMOKE else 4)
                used = min(NS, triton.cdiv(S, max(triton.cdiv(triton.cdiv(S, NS), bs) * bs, mc)))
                ms = bench(comb, graph=True)
                row("mla", f"S={S} {tag} combine kernel alone ({used} splits)", ms, used * H * (R + 2) * 4 + H * R * 4)
                # the decode step's combine launch: + o = W_UV ctx and o's x8 groups (mla_decode with v_b)
                common = dict(BS=bs, NS=NS, MIN_CHUNK=mc, LEN_IN_PTR=True)
                o8 = torch.empty(mla.x8_words(H * 128), dtype=torch.int32, device=DEV)
                comb_vo = lambda: mla._combine_vo(ws[0], ws[1], ws[2], seq, 0, None, v_b, o_vo, o8, None, NS, common)  # noqa: E731
                ms = bench(comb_vo, graph=True)
                row("mla", f"S={S} {tag} combine + W_UV + x8 alone ({used} splits)", ms,
                    used * H * (R + 2) * 4 + v_b.numel() * 2 + H * 128 * 2 + o8.numel() * 4)
                # the engine's call whole (split + combine + W_UV + x8), and the Gluon split kernel alone
                ms = bench(lambda: [mla.mla_decode(q_abs, q_pe, lat, seq, scale, latent_scale=sc, v_b=v_b, o=o_vo,
                                                   o8=o8) for lat, sc in zip(lats, scs)], graph=True, calls=n)
                row("mla", f"S={S} {tag} engine call: split + combine + W_UV + x8", ms, nbytes)
                if not SMOKE and mla.mla_gluon.supported(lats[0], H, R, DR):
                    split = lambda: [mla.mla_gluon.mla_split_gluon(  # noqa: E731
                        q_abs, q_pe, lat, seq, ws, scale * mla._LOG2E, NS, bs, mc,
                        latent_scale=sc if dt == fp8 else None)
                        for lat, sc in zip(lats, scs)]
                    row("mla", f"S={S} {tag} Gluon split kernel alone", bench(split, graph=True, calls=n), nbytes)
            except Exception as e:
                fail_row("mla", f"S={S} {tag} combine alone", e)
            del lats, scs
            if not SMOKE:
                torch.cuda.empty_cache()


def print_table():
    cols = ["section", "case", "us", "floor_us", "GB/s", "%copy", "err", "ok", "note"]
    fmt = {"us": "{:.2f}", "floor_us": "{:.2f}", "GB/s": "{:.0f}", "%copy": "{:.1f}", "err": "{:.1e}"}
    print(text_table(ROWS, cols, fmt))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="kda,mla")
    ap.add_argument("--sizes", default="4096,131072,1048576")
    ap.add_argument("--match", default="", help="comma-separated substrings: only the MLA variants whose label has one")
    ap.add_argument("--smoke", action="store_true", help="CPU interpreter, tiny shapes: checks this script only")
    args = ap.parse_args()
    global MATCH
    MATCH = [m for m in args.match.split(",") if m]
    if args.smoke:
        args.sizes = "200"
    t0 = time.time()
    name = "cpu (interpreter smoke)" if SMOKE else torch.cuda.get_device_name()
    print(f"device: {name}  torch {torch.__version__}  triton {triton.__version__}", flush=True)
    measure_copy()
    only = args.only.split(",")
    if "kda" in only:
        try:
            sweep_kda()
        except Exception as e:
            fail_row("kda", "section", e)
    if "mla" in only:
        try:
            sweep_mla([int(s) for s in args.sizes.split(",")])
        except Exception as e:
            fail_row("mla", "section", e)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "sweep_kda_mla.json").write_text(json.dumps(
            {"device": name, "triton": triton.__version__, "rows": ROWS,
             "kda_defaults": kda.DEFAULTS, "mla_defaults": mla.DEFAULTS}, indent=1))
    print_table()
    print(f"sweep took {time.time() - t0:.0f} s")
    bad = [r["case"] for r in ROWS if r.get("ok") is False]
    if bad:
        print("WRONG RESULTS (do not use):", "; ".join(bad))
    return 0


if __name__ == "__main__":
    sys.exit(main())
