"""Stress the KDA decode step's cluster variants: many back-to-back launches (64 layers' states, graph-replayed or
eager, with or without PDL), each variant in its own process (a device fault ends the CUDA context).

A race that shows once in ~1e5 launches passes every unit test (tens of launches each) and still takes down a long
decode, so each cluster exchange is run here ~1e6 times before it becomes a default. Each line also says how many
step kernels loaded with a cluster width (0 for the arrival counter; a cluster variant with 0 would run as clusters of
one CTA, which is what made bench_kernels fault in session 26 before the launcher installed its load hook itself).

    python scripts/stress_kda_cluster.py [--launches 1000000] [--timeout 120]
"""
import argparse
import os
import subprocess
import sys
import time

# (label, env, fused, pdl, graph)
VARIANTS = [
    ("arrival counter, unfused", {"KIMI_LOCAL_KDA_CLUSTER": "0"}, False, True, True),
    ("cluster barrier exchange, unfused", {"KIMI_LOCAL_KDA_NBAR": "0"}, False, True, True),
    ("cluster barrier exchange, fused", {"KIMI_LOCAL_KDA_NBAR": "0"}, True, True, True),
    ("mbarrier exchange, unfused", {"KIMI_LOCAL_KDA_NBAR": "1"}, False, True, True),
    ("mbarrier exchange, unfused, no PDL", {"KIMI_LOCAL_KDA_NBAR": "1"}, False, False, True),
    ("mbarrier exchange, unfused, after the arrival kernel", {"KIMI_LOCAL_KDA_NBAR": "1", "STRESS_PRE": "1"},
     False, True, True),
    ("mbarrier exchange, unfused, L2 flush between replays", {"KIMI_LOCAL_KDA_NBAR": "1", "STRESS_FLUSH": "1"},
     False, True, True),
    ("mbarrier exchange, unfused, eager", {"KIMI_LOCAL_KDA_NBAR": "1"}, False, True, False),
    ("mbarrier exchange, fused", {"KIMI_LOCAL_KDA_NBAR": "1"}, True, True, True),
]


def child(fused: bool, pdl_on: bool, graph: bool, launches: int) -> None:
    import torch
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        from kimi_local.kernels import kda, pdl
    except ImportError:
        from kernels import kda, pdl
    H, K, V, W, L = 32, 128, 128, 4, 64
    P, bf, dev = H * K, torch.bfloat16, "cuda"
    states = [torch.randn(H, K, V, device=dev) * 0.05 for _ in range(L)]
    conv_w = [torch.randn(3, P, W, device=dev) * 0.3 for _ in range(L)]
    tails = [torch.randn(3, P, W - 1, device=dev).to(bf) for _ in range(L)]
    f_b, g_b = ((torch.randn(P, K, device=dev) * K**-0.5).to(bf) for _ in range(2))
    a, dt_bias, norm_w = -torch.rand(H, device=dev) - 0.1, torch.randn(P, device=dev), torch.rand(V, device=dev)
    q, k, v, f, z = (torch.randn(P, device=dev).to(bf) for _ in range(5))
    beta, fg = torch.randn(H, device=dev).to(bf), torch.randn(2 * K, device=dev).to(bf)
    out = torch.empty(P, device=dev, dtype=bf)

    def layers(cluster=None):
        for i in range(L):
            kw = dict(fg_a=fg, f_b=f_b, g_b=g_b) if fused else {}
            kda.kda_decode_step(q, k, v, None if fused else f, beta, None if fused else z, conv_w[i], tails[i], a,
                                dt_bias, norm_w, states[i], out, 1e-5, BV=32, num_warps=4, cluster=cluster, **kw)

    flush = torch.empty(256 << 20, dtype=torch.int8, device=dev) if os.environ.get("STRESS_FLUSH") else None
    with pdl.active(pdl_on):
        if os.environ.get("STRESS_PRE"):  # the arrival kernel first (bench_kernels' order)
            g0 = torch.cuda.CUDAGraph()
            layers(cluster=False)
            with torch.cuda.graph(g0):
                layers(cluster=False)
            for _ in range(300):
                g0.replay()
            torch.cuda.synchronize()
        layers()
        torch.cuda.synchronize()
        run = layers
        if not graph:  # eager launches cost ~40 us of host time each
            launches //= 20
        if graph:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                layers()
            run = g.replay
        t0, done = time.perf_counter(), 0
        while done < launches:
            for _ in range(50):
                run()
                if flush is not None:
                    flush.zero_()
            done += 50 * L
            torch.cuda.synchronize()
        assert torch.isfinite(out.float()).all()
    print(f"ok {done} launches {time.perf_counter() - t0:.1f} s, cluster kernels {len(kda._CLUSTER_FUNCS)}")
    sys.stdout.flush()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--launches", type=int, default=1_000_000)
    ap.add_argument("--timeout", type=float, default=120)
    ap.add_argument("--only", default="", help="run the variants whose label contains this text")
    ap.add_argument("--child", nargs=3, type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*map(bool, args.child), args.launches)
        return 0
    bad = 0
    for label, env, fused, pdl_on, graph in VARIANTS:
        if args.only not in label:
            continue
        cmd = [sys.executable, __file__, "--launches", str(args.launches), "--child", str(int(fused)),
               str(int(pdl_on)), str(int(graph))]
        try:
            r = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, timeout=args.timeout)
            res = r.stdout.strip().splitlines()[-1] if r.returncode == 0 else \
                "FAIL " + next((ln for ln in reversed(r.stderr.splitlines()) if "Error" in ln), r.stderr[-200:])
        except subprocess.TimeoutExpired:
            res = f"FAIL timeout after {args.timeout:.0f} s (a hang)"
        bad += res.startswith("FAIL")
        print(f"{label:52s} {res}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
