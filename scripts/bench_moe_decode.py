"""The MoE decode (moe.moe_decode) under environment variants, A/B in one process: Q4_K_M experts (Q4_K gate/up, Q5_K
down, Q8_0 shared expert), real shapes (256 experts of [1024, 2304], top-8), routed inside the kernels from the
router's logits and with x8 activations, as the engine calls it, under PDL.

    python scripts/bench_moe_decode.py [--variant 'VAR=value[;VAR=value]' ...] [--rounds 7]

Each variant (the unchanged environment first) captures one CUDA graph of R = 8 calls, each over other logits (so
other experts: 8 x ~40 MB, more than the 50 MB L2); the graphs are then replayed in interleaved rounds, so clock drift
hits every variant alike. Prints per variant the median us per call, GB/s of the bytes the call must read (the 8
picked experts and the shared expert) and % of the copy bandwidth measured in the same run.
"""
import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_kernels import rand_packed  # noqa: E402
from kimi_local.bench import _with_env, hbm_bandwidth, parse_variants  # noqa: E402
from kimi_local.kernels import moe, pdl, quant_matmul as qm  # noqa: E402

S, D, F, K, R = 256, 2304, 1024, 8, 8
QTYPES, SHQ = ("Q4_K", "Q4_K", "Q5_K"), ("Q8_0", "Q8_0", "Q8_0")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", action="append", default=[], help="VAR=value[;VAR=value], repeatable")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    variants = parse_variants(args.variant)
    pools = [rand_packed(qt, (S,), r, c) for qt, r, c in zip(QTYPES, (F, F, D), (D, D, F))]
    shared = [rand_packed(qt, (), r, c) for qt, r, c in zip(SHQ, (F, F, D), (D, D, F))]
    nbytes = K * sum(p[0].numel() for p in pools) + sum(s.numel() for s in shared)
    gen = torch.Generator().manual_seed(0)
    logits = [(torch.randn(S, generator=gen) * 2).cuda() for _ in range(R)]
    bias = (torch.randn(S, generator=gen) * 0.1).cuda()
    x8 = qm.quantize_x8(torch.randn(D, device="cuda", dtype=torch.bfloat16))
    x = torch.empty(D, device="cuda", dtype=torch.bfloat16)  # only its shape is read: x8 is given
    out = torch.empty(D, device="cuda", dtype=torch.bfloat16)
    route = (bias, K, 2.446, False, True)

    def calls():
        for lg in logits:
            moe.moe_decode(x, lg, None, *pools, QTYPES, out, shared=shared, shared_qtypes=SHQ, x8=x8, route=route)

    def capture():
        calls()  # compile outside the capture
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            calls()
        return g

    with pdl.active(pdl.supported("cuda")):
        graphs = [_with_env(env, capture) for _, env in variants]
    bw = hbm_bandwidth("cuda")
    times = [[] for _ in variants]
    ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(args.rounds):
        for j, g in enumerate(graphs):
            for _ in range(3):
                g.replay()
            ev0.record()
            for _ in range(20):
                g.replay()
            ev1.record()
            torch.cuda.synchronize()
            times[j].append(ev0.elapsed_time(ev1) * 1e3 / (20 * R))
    print(f"copy {bw / 1e9:.0f} GB/s; bytes per call {nbytes / 1e6:.1f} MB, floor {nbytes / bw * 1e6:.2f} us")
    print("| variant | us per call | GB/s | % of copy |\n|---|---|---|---|")
    for (name, _), t in zip(variants, times):
        us = statistics.median(t)
        print(f"| {name} | {us:.2f} | {nbytes / us / 1e3:.0f} | {100 * nbytes / (us * 1e-6) / bw:.1f} |")


if __name__ == "__main__":
    main()
