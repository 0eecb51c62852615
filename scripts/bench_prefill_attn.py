"""GPU benchmark of MLA prefill attention: one chunk of T = 4096 queries, 32 heads, after P past tokens.

    python3 scripts/bench_prefill_attn.py [--sizes 16384,65536,131072] [--T 4096] [--key-block 16384] [--fp8]
    python3 scripts/bench_prefill_attn.py --smoke   # CPU, tiny shapes: checks the script (SDPA rows FAIL there)

Variants, all with the engine's contract (q [T, H, 192], latent cache [P+T, 512+64], k_b, v_b -> [T, H, 128]
fp32), keys/values decompressed <= key_block rows at a time:
  (a) efficient   kimi_local.engine.mla_prefill_attention(backend="efficient"): PyTorch's memory-efficient
                  SDPA per key block, blocks merged by log-sum-exp in torch (the baseline; every error is
                  measured against it);
  (b) cudnn       the same code with cuDNN's fused attention (the engine's default; FAILED where cuDNN refuses).
A Triton flash kernel (two dots per tile: nope + the shared rope key) measured 99-100 TFLOP/s here on an H200,
below (a)'s 128, and was removed (docs/perf-notes.md, session 3).
Each row: median ms over several calls (CUDA events), attention TFLOP/s (2*T*H*S_eff*(192+128), S_eff = keys
attended: P + (T+1)/2 on average), speed-up over (a), relative Frobenius error vs (a) and (smallest size
only, chunked per head) vs an fp32 torch reference, and the peak memory the call allocated. A variant with
error > 1e-2 or NaN is marked FAIL. The table is printed last; rows go to --json PATH (default
$OUT/bench_prefill_attn.json when $OUT is set). Runs in ~1-2 minutes on an H100.
"""
import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import triton  # noqa: E402

DEV = "cpu" if SMOKE else "cuda"

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, when not pip-installed
from kimi_local.bench import text_table  # noqa: E402

try:
    from kimi_local import engine
except Exception as e:  # noqa: BLE001
    engine, ENGINE_ERR = None, e

ROWS = []
BOUND = 1e-2


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def sync():
    if not SMOKE:
        torch.cuda.synchronize()


def timeit(fn, min_reps=3, max_reps=20, budget_s=0.6):
    """Median ms of fn() (one untimed warm-up call, then reps until the budget or max_reps)."""
    fn()
    sync()
    if SMOKE:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    times = []
    t_end = time.perf_counter() + budget_s
    while len(times) < min_reps or (len(times) < max_reps and time.perf_counter() < t_end):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def checked_call(fn):
    """(output, peak MB allocated during one call)."""
    if SMOKE:
        return fn(), float("nan")
    sync()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    sync()
    return out, (torch.cuda.max_memory_allocated() - base) / 2**20


def row(size, case, ms, flop, err=None, err32=None, base_ms=None, peak=None, note=""):
    bad = err is not None and not (err == err and err < BOUND)
    r = {"P": size, "case": case, "ms": ms, "TFLOP/s": flop / ms / 1e9 if ms == ms else float("nan"),
         "speedup": base_ms / ms if base_ms else None, "err_vs_a": err, "err_vs_fp32": err32, "peak_MB": peak,
         "ok": None if err is None else not bad, "note": note}
    ROWS.append(r)
    print(json.dumps(r), flush=True)
    return r


def fail_row(size, case, e):
    r = {"P": size, "case": case, "ms": float("nan"), "note": f"FAILED {type(e).__name__}: {str(e)[:240]}", "ok": False}
    ROWS.append(r)
    print(json.dumps(r), flush=True)


def fp32_reference(q, latent, latent_scale, k_b, v_b, p0, scale):
    """fp32 causal attention, one head at a time (scores [T, P+T] fp32 per head)."""
    T, H, _ = q.shape
    R, Dn = k_b.shape[1], k_b.shape[2]
    n = p0 + T
    rows = latent[:n].float() if latent_scale is None else latent[:n].float() * latent_scale[:n, None]
    c, kpe = rows[:, :R], rows[:, R:]
    mask = torch.arange(n, device=q.device)[None, :] > (p0 + torch.arange(T, device=q.device))[:, None]
    out = torch.empty(T, H, v_b.shape[1], device=q.device)
    for h in range(H):
        qh = q[:, h].float()
        s = (qh[:, :Dn] @ (c @ k_b[h].float()).t() + qh[:, Dn:] @ kpe.t()) * scale
        p = torch.softmax(s.masked_fill(mask, float("-inf")), -1)
        out[:, h] = p @ (c @ v_b[h].float().t())
        del s, p
    return out


def bench_size(P, T, H, key_block, fp8, with_fp32_ref, args):
    Dn, Dr, Dv, R = 128, 64, 128, 512
    scale = 1 / math.sqrt(Dn + Dr)
    g = torch.Generator(device=DEV).manual_seed(P)
    n = P + T
    tag = "fp8" if fp8 else "bf16"
    q = torch.randn(T, H, Dn + Dr, device=DEV, generator=g).to(torch.bfloat16)
    lat = torch.randn(n, R + Dr, device=DEV, generator=g)
    sc = None
    if fp8:
        sc = torch.rand(n, device=DEV, generator=g) * 0.02 + 0.01
        lat = (lat / sc[:, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    else:
        lat = lat.to(torch.bfloat16)
    # k_b scaled so the logits spread (std ~ 2): the softmax is far from uniform
    k_b = (torch.randn(H, R, Dn, device=DEV, generator=g) * (2 / math.sqrt(R))).to(torch.bfloat16)
    v_b = (torch.randn(H, Dv, R, device=DEV, generator=g) / math.sqrt(R)).to(torch.bfloat16)
    flop = 2 * H * (T * P + T * (T + 1) / 2) * (Dn + Dr + Dv)
    args_ = (q, lat, sc, k_b, v_b, P, scale)
    pre = f"{tag} "

    ref32 = None
    if with_fp32_ref:
        try:
            ref32 = fp32_reference(*args_)
        except Exception as e:  # noqa: BLE001 (e.g. out of memory)
            print(f"fp32 reference failed: {e}", flush=True)
    e32 = (lambda o: rel(o, ref32)) if ref32 is not None else (lambda o: None)

    # (a) engine (memory-efficient SDPA)
    base, base_ms = None, None
    if engine is None:
        fail_row(P, pre + "(a) engine, memory-efficient SDPA", ENGINE_ERR)
    else:
        try:
            fn = lambda: engine.mla_prefill_attention(*args_, key_block, backend="efficient")  # noqa: E731
            base, peak = checked_call(fn)
            base_ms = timeit(fn)
            row(P, pre + "(a) engine, memory-efficient SDPA", base_ms, flop, err32=e32(base), peak=peak)
        except Exception as e:  # noqa: BLE001 (no CPU kernel in --smoke)
            fail_row(P, pre + "(a) engine, memory-efficient SDPA", e)
            base = None
    if base is None:  # errors are then measured against the fp32 reference (err_vs_a = err_vs_fp32)
        base = ref32 if ref32 is not None else fp32_reference(*args_)
    base = base.float()

    # (b) cuDNN SDPA in the engine's loop
    if engine is not None and not args.no_cudnn:
        try:
            fn = lambda: engine.mla_prefill_attention(*args_, key_block, backend="cudnn")  # noqa: E731
            if engine._CUDNN_FAILED:
                raise RuntimeError(engine._CUDNN_FAILED[0])
            o, peak = checked_call(fn)
            ms = timeit(fn)
            row(P, pre + "(b) engine loop, cuDNN SDPA", ms, flop, rel(o, base), e32(o), base_ms, peak)
            if engine._CUDNN_FAILED:
                raise RuntimeError(engine._CUDNN_FAILED[0])
        except Exception as e:  # noqa: BLE001
            fail_row(P, pre + "(b) engine loop, cuDNN SDPA", e)

    del q, lat, sc, base, ref32
    if not SMOKE:
        torch.cuda.empty_cache()


def print_table():
    cols = ["P", "case", "ms", "TFLOP/s", "speedup", "err_vs_a", "err_vs_fp32", "peak_MB", "ok", "note"]
    fmt = {"ms": "{:.2f}", "TFLOP/s": "{:.0f}", "speedup": "{:.2f}x", "err_vs_a": "{:.1e}", "err_vs_fp32": "{:.1e}",
           "peak_MB": "{:.0f}"}
    print(text_table(ROWS, cols, fmt))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="16384,65536,131072", help="past tokens P before the chunk")
    ap.add_argument("--T", type=int, default=4096, help="queries in the chunk")
    ap.add_argument("--H", type=int, default=32)
    ap.add_argument("--key-block", type=int, default=16384)
    ap.add_argument("--fp8", action="store_true", help="also an fp8 (e4m3 + row scale) latent cache per size")
    ap.add_argument("--no-cudnn", action="store_true")
    ap.add_argument("--json", default=None, help="write the rows here (default $OUT/bench_prefill_attn.json)")
    ap.add_argument("--smoke", action="store_true", help="CPU interpreter, tiny shapes: checks this script only")
    args = ap.parse_args()
    if args.smoke:
        args.sizes, args.T, args.H, args.key_block = "40", 8, 2, 32
    t0 = time.time()
    name = "cpu (interpreter smoke)" if SMOKE else torch.cuda.get_device_name()
    print(f"device: {name}  torch {torch.__version__}  triton {triton.__version__}  T={args.T} H={args.H} "
          f"key_block={args.key_block}", flush=True)
    sizes = [int(s) for s in args.sizes.split(",")]
    for i, P in enumerate(sizes):
        for fp8 in ([False, True] if args.fp8 else [False]):
            try:
                bench_size(P, args.T, args.H, args.key_block, fp8, i == 0, args)
            except Exception as e:  # noqa: BLE001
                fail_row(P, "size", e)
    path = args.json or (os.path.join(os.environ["OUT"], "bench_prefill_attn.json") if os.environ.get("OUT") else None)
    if path:
        Path(path).write_text(json.dumps({"device": name, "torch": torch.__version__, "triton": triton.__version__,
                                          "T": args.T, "H": args.H, "key_block": args.key_block, "rows": ROWS},
                                         indent=1))
    print(f"took {time.time() - t0:.0f} s")
    print_table()
    bad = [r["case"] for r in ROWS if r.get("ok") is False and "FAILED" not in r.get("note", "")]
    if bad:
        print("WRONG RESULTS (do not use):", "; ".join(f"P={r['P']} {r['case']}" for r in ROWS if r["case"] in bad))
    return 0


if __name__ == "__main__":
    sys.exit(main())
