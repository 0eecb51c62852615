"""The MoE decode (moe.moe_decode) under environment variants, A/B in one process: Q4_K_M experts (Q4_K gate/up, Q5_K
down, Q8_0 shared expert), real shapes (256 experts of [1024, 2304], top-8), routed inside the kernels from the
router's logits and with x8 activations, as the engine calls it, under PDL.

    python scripts/bench_moe_decode.py [--variant 'VAR=value[;VAR=value]' ...] [--rounds 7] [--half gate_up|down]
                                       [--shared Q8_0|Q4_K|none]

Each variant (the unchanged environment first) captures one CUDA graph of R = 8 calls, each over other logits (so
other experts: 8 x ~40 MB, more than the 50 MB L2); the graphs are then replayed in interleaved rounds, so clock drift
hits every variant alike. Prints per variant the median us per call, GB/s of the bytes the call must read (the 8
picked experts and the shared expert) and % of the copy bandwidth measured in the same run. --half: only that
half's Gluon kernel, R launches a graph (its bytes only; the down half reads an act that one gate/up call filled).
--shared: the shared expert's type (Q4_K_M's Q8_0 by default; Q4_K: as many bytes as a routed expert's, none: no
shared expert), to see what its CTAs (twice the stages of a routed CTA at Q8_0) cost the call.
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
from kimi_local.kernels import moe, moe_gluon, pdl, quant_matmul as qm  # noqa: E402

S, D, F, K, R = 256, 2304, 1024, 8, 8
QTYPES = ("Q4_K", "Q4_K", "Q5_K")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", action="append", default=[], help="VAR=value[;VAR=value], repeatable")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--half", choices=("both", "gate_up", "down"), default="both",
                    help="time one half's Gluon kernel alone (default: the whole MoE call)")
    ap.add_argument("--shared", choices=("Q8_0", "Q4_K", "none"), default="Q8_0",
                    help="the shared expert's type (gate, up and down), or none")
    args = ap.parse_args()
    SHQ = None if args.shared == "none" else (args.shared,) * 3
    variants = parse_variants(args.variant)
    pools = [rand_packed(qt, (S,), r, c) for qt, r, c in zip(QTYPES, (F, F, D), (D, D, F))]
    shared = [rand_packed(qt, (), r, c) for qt, r, c in zip(SHQ, (F, F, D), (D, D, F))] if SHQ else None
    halves = {"both": (0, 1, 2), "gate_up": (0, 1), "down": (2,)}[args.half]
    nbytes = sum(K * pools[i][0].numel() + (shared[i].numel() if SHQ else 0) for i in halves)
    gen = torch.Generator().manual_seed(0)
    logits = [(torch.randn(S, generator=gen) * 2).cuda() for _ in range(R)]
    bias = (torch.randn(S, generator=gen) * 0.1).cuda()
    x8 = qm.quantize_x8(torch.randn(D, device="cuda", dtype=torch.bfloat16))
    x = torch.empty(D, device="cuda", dtype=torch.bfloat16)  # only its shape is read: x8 is given
    out = torch.empty(D, device="cuda", dtype=torch.bfloat16)
    route = (bias, K, 2.446, False, True)

    act = torch.zeros(K + 1, qm.x8_words(F), dtype=torch.int32, device="cuda")
    part, cnt = qm.split_workspace("cuda", (K + 1) * D, D // 16)

    def gate_up(lg):  # the arguments moe.moe_decode passes to the Gluon gate/up
        moe_gluon.gate_up(x8, lg, bias, pools[0], pools[1], shared[:2] if SHQ else None, act, D, QTYPES[0],
                          SHQ and SHQ[0], K, True, pdl.enabled())

    def calls():
        for lg in logits:
            if args.half == "both":
                moe.moe_decode(x, lg, None, *pools, QTYPES, out, shared=shared, shared_qtypes=SHQ, x8=x8, route=route)
            elif args.half == "gate_up":
                gate_up(lg)
            else:  # act as one gate/up call left it (filled before the captures)
                moe_gluon.down(act, lg, None, None, pools[2], shared[2] if SHQ else None, out, part, cnt, D, F,
                               QTYPES[2], SHQ and SHQ[2], K, route, pdl.enabled())

    def capture():
        calls()  # compile outside the capture
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            calls()
        return g

    with pdl.active(pdl.supported("cuda")):
        if args.half != "both":
            ok = moe_gluon.supported("cuda", QTYPES[0], QTYPES[1], *(SHQ or QTYPES)[:2], D, F)
            assert ok, "--half: Gluon kernels"
            gate_up(logits[0])
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
    print(f"copy {bw / 1e9:.0f} GB/s; {args.half}, shared {args.shared}: bytes per call {nbytes / 1e6:.1f} MB, "
          f"floor {nbytes / bw * 1e6:.2f} us")
    print("| variant | us per call | GB/s | % of copy |\n|---|---|---|---|")
    for (name, _), t in zip(variants, times):
        us = statistics.median(t)
        print(f"| {name} | {us:.2f} | {nbytes / us / 1e3:.0f} | {100 * nbytes / (us * 1e-6) / bw:.1f} |")


if __name__ == "__main__":
    main()
