"""What a CUDA-graph boundary costs a decode token: greedy tokens timed three ways at one context depth.

  stream   generate's device stream (DecodeGraph.stream: one graph per token = the step + the greedy pick, the
           next replay launched before the host reads a token; bench's end-to-end token time)
  replay   the same one-token graph replayed back to back (CUDA events around N replays; no host reads)
  graphK   K tokens' steps and picks captured in ONE graph (the pick feeds the next step on the device), replayed
           N / K times: no graph boundary between those K tokens
replay - graphK is the boundary's cost per token; stream - replay what the host loop adds. The weights are the
synthetic full-size model of `kimi-local bench --synthetic` (random blocks: the tokens mean nothing; the state
is left changed). Prints one line per row and writes $OUT/bench_graph_steps.json if $OUT is set.

GPU:  .venv/bin/python scripts/bench_graph_steps.py --recipe Q4_K_M --ctx 4096 --k 2,4
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--recipe", default="Q4_K_M")
    p.add_argument("--ctx", type=int, default=4096)
    p.add_argument("--kv-cache", default="bf16", choices=("bf16", "fp8"))
    p.add_argument("--zipf", type=float, default=0.0)
    p.add_argument("--tokens", type=int, default=32, help="tokens per timed round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--k", default="2,4", help="tokens per multi-token graph (comma-separated)")
    a = p.parse_args(argv)
    a.eager, a.smoke = False, False
    return a


def main(argv=None):
    a = parse_args(argv)
    import torch

    from kimi_local.bench import _median, time_decode
    from kimi_local.engine import _capture
    from kimi_local.kernels.sample import greedy_next
    from profile_decode import build

    cfg, net = build(a)
    ks = [int(k) for k in a.k.split(",") if k]
    depth = a.ctx - 1
    cache = net.new_cache(max_ctx=a.ctx + a.tokens * (a.rounds + 2) + 16)
    rows = {"stream": 1e6 * time_decode(net, cache, a.tokens, depth, rounds=a.rounds)}
    g = net._graph(cache)
    whole = g._sampler[2]  # the greedy one-token graph the stream used
    c = cache

    def timed(graph, per_replay: int) -> float:  # us per token: median round of a.tokens tokens
        n = max(1, a.tokens // per_replay)
        out = []
        for _ in range(a.rounds + 1):
            c.pos_dev.fill_(depth)
            c.len_dev.fill_(depth + 1)
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            for _ in range(n):
                graph.replay()
            e.record()
            torch.cuda.synchronize()
            out.append(1e3 * s.elapsed_time(e) / (n * per_replay))
        return _median(out[1:])

    rows["replay"] = timed(whole, 1)
    for k in ks:
        def steps(k=k):
            for _ in range(k):
                greedy_next(net.decode_body(g.inp, c)[-1], g.inp, c.pos_dev, c.len_dev)

        c.pos_dev.fill_(depth)
        c.len_dev.fill_(depth + 1)
        graph, _ = _capture(net.device, steps, 1, g.pdl)
        rows[f"graph{k}"] = timed(graph, k)
        del graph
    info = dict(device=torch.cuda.get_device_name(), recipe=a.recipe, ctx=a.ctx, kv_cache=a.kv_cache,
                tokens=a.tokens, rounds=a.rounds)
    for name, us in rows.items():
        print(f"{name:8} {us:8.1f} us/token  {1e6 / us:7.1f} tok/s")
    print(" ".join(f"{k}={v}" for k, v in info.items()))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "bench_graph_steps.json").write_text(json.dumps(dict(info=info, us_per_token=rows)))


if __name__ == "__main__":
    main()
