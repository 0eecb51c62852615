"""Expert offloading benchmark: the real engine (GpuKimi) on the synthetic full-size model, one process.

The model is built once (`kimi_local.bench.synthetic_weights`, routed experts in pinned host memory);
then, under each routing (uniform; Zipf(s) popularity through the routers' selection bias), it decodes
and prefills in each mode:
  (a) resident  every expert on the GPU (no budget: the speed ceiling)
  (b) naive     --vram budget, load-on-miss: decisions on the host (one sync per MoE layer), LRU,
                no prefetch, the compute waits for each miss's copy, no decode graph
  (c) loader    --vram budget, kimi-local's loader: hit / victim decisions and miss copies on the GPU
                inside the decode CUDA graph (kernels/expert_cache.py), next-layer router prefetch on a
                side stream, decayed LFU
  (host)        optional: the same loader with host-side decisions (the previous design)
Reports decode tok/s, prefill tok/s, hit rate, prefetch precision / recall, MB moved per token, the
host->device bandwidth (cudaMemcpy from pinned memory, and the zero-copy kernel that (c) uses), the
bound that hit rate and bandwidth allow, and the decode speed predicted at a PCIe 4.0 card's 25 GB/s.

    python scripts/bench_offload.py --vram 24GB --recipe Q4_K_M --tokens 48 --prefill 8192
Table printed last; JSON to $OUT/bench_offload.json when $OUT is set. ~4-6 minutes on an H100.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kimi_local import bench as B  # noqa: E402
from kimi_local.api import build_net  # noqa: E402
from kimi_local.config import KimiConfig  # noqa: E402
from kimi_local.engine import GpuExperts, apply_vram_budget  # noqa: E402
from kimi_local.offload import apply_offload, parse_size  # noqa: E402
from kimi_local.quant.recipe import get_recipe  # noqa: E402

MODES = {"naive": dict(loader="host", prefetch=False, policy="lru"),
         "loader": dict(loader="device", prefetch=True, policy="lfu"),
         "host": dict(loader="host", prefetch=True, policy="lfu")}


def memcpy_gbps(dev, nbytes=1 << 30) -> float:
    a = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    b = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    b.copy_(a, non_blocking=True)
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    b.copy_(a, non_blocking=True)
    e.record()
    e.synchronize()
    return nbytes / (s.elapsed_time(e) / 1e3) / 1e9


def zero_copy_gbps(store, L: int, dev, reps: int = 5) -> float:
    """The loader's copy kernel moving 8 experts host -> slots (what one token's misses cost)."""
    from kimi_local.kernels.expert_cache import copy_misses

    raw = store.raw[L]
    pools = [torch.empty((8, *r.shape[1:]), dtype=r.dtype, device=dev) for r in raw]
    miss = torch.stack([torch.arange(8, dtype=torch.int32) * 7, torch.arange(8, dtype=torch.int32)]).to(dev)
    copy_misses(miss, raw, pools)
    torch.cuda.synchronize()
    t = []
    for r in range(reps):
        miss[0] = torch.arange(8, device=dev, dtype=torch.int32) * 7 + 1 + r
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        copy_misses(miss, raw, pools)
        e.record()
        e.synchronize()
        t.append(s.elapsed_time(e) / 1e3)
    ok = all(torch.equal(p[j].cpu(), r[int(miss[0, j])]) for p, r in zip(pools, raw) for j in range(8))
    nbytes = 8 * store.expert_bytes[L]
    return nbytes / sorted(t)[len(t) // 2] / 1e9 if ok else float("nan")


def set_routing(net, cfg, zipf: float, seed: int = 1) -> None:
    """Selection bias favouring experts by Zipf(zipf) popularity over a random order per layer (in place:
    captured graphs read the same tensors)."""
    g = torch.Generator().manual_seed(seed)
    for i in range(cfg.first_k_dense_replace, cfg.num_hidden_layers):
        b = net.w[f"blk.{i}.exp_probs_b.bias"]
        rank = (torch.randperm(cfg.num_experts, generator=g) + 1).float()
        b.copy_((-0.5 * zipf * torch.log(rank)) if zipf else torch.zeros_like(rank))


def snapshot(st) -> dict:
    st.collect()
    return {k: getattr(st, k) for k in ("tokens", "lookups", "hits", "misses", "prefetched", "guessed",
                                        "guess_right", "guess_needed", "h2d_bytes")}


def run_mode(net, cfg, tokens: int, warmup: int, prefill_n: int, chunk: int, depth: int) -> dict:
    cache = net.new_cache(max_ctx=max(depth, 1) + tokens + warmup + 8)
    B.time_decode(net, cache, warmup, depth, rounds=1)  # fills the cache to depth, builds the graph, warms the expert cache
    st = getattr(net, "expert_stats", None)
    before = snapshot(st) if st else None
    cache.pos, cache.tokens = 0, []  # time_decode reserves from the current position
    s = B.time_decode(net, cache, tokens, depth, rounds=1)
    row = dict(decode_tok_s=round(1 / s, 2), decode_ms_per_token=round(1e3 * s, 3), graph=bool(net._graphs))
    if st:
        d = {k: v - before[k] for k, v in snapshot(st).items()}
        row.update(hit_rate=round(d["hits"] / max(d["lookups"], 1), 4),
                   prefetch_precision=round(d["guess_right"] / max(d["guessed"], 1), 4),
                   prefetch_recall=round(d["guess_right"] / max(d["guess_needed"], 1), 4),
                   misses_per_token=round(d["misses"] / max(d["tokens"], 1), 2),
                   prefetched_per_token=round(d["prefetched"] / max(d["tokens"], 1), 2),
                   mb_per_token=round(d["h2d_bytes"] / max(d["tokens"], 1) / 1e6, 2), tokens_counted=d["tokens"])
    del cache
    net._graphs.clear()
    torch.cuda.empty_cache()
    if prefill_n:
        t, _ = B.time_prefill(net, prefill_n, chunk, cfg.vocab_size)
        row["prefill_tok_s"] = round(prefill_n / t, 1)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vram", default="24GB")
    ap.add_argument("--recipe", default="Q4_K_M")
    ap.add_argument("--ctx", type=int, default=32768, help="context the budget reserves an MLA cache for")
    ap.add_argument("--depth", type=int, default=4096, help="decode at this context depth")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--warmup", type=int, default=32)
    ap.add_argument("--prefill", type=int, default=8192, help="prompt tokens for prefill (0: skip)")
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--zipf", type=float, default=1.0)
    ap.add_argument("--routing", default="uniform,zipf")
    ap.add_argument("--modes", default="resident,naive,loader")
    ap.add_argument("--pcie-gbps", type=float, default=25.0)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_offload needs a CUDA GPU")
    dev, cfg = torch.device("cuda"), KimiConfig()
    t0 = time.perf_counter()
    w = B.synthetic_weights(cfg, get_recipe(args.recipe).qtype, dev, expert_device="cpu")
    net = build_net(cfg, w, dev, torch.bfloat16, expert_store="cpu")
    del w
    layers = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe(i)]
    host_pools = {L: net.experts.pools(L) for L in layers}
    qtypes = {L: net.experts.qtypes(L) for L in layers}
    expert_bytes = sum(p[0].numel() * p.element_size() for p in host_pools[layers[0]])
    print(f"built in {time.perf_counter() - t0:.0f} s; expert {expert_bytes:,} B", flush=True)
    bw = memcpy_gbps(dev)
    name = torch.cuda.get_device_name()
    rows, zc = [], None
    modes = args.modes.split(",")
    for routing in args.routing.split(","):
        set_routing(net, cfg, args.zipf if routing == "zipf" else 0.0)
        for mode in modes:
            if mode == "resident":
                torch.cuda.set_per_process_memory_fraction(1.0)  # no budget
                if not (isinstance(net.experts, GpuExperts) and net.experts.pools(layers[0])[0].is_cuda):
                    if hasattr(net.experts, "release"):
                        net.experts.release()  # the loader's slot pools (its stats may keep the object alive)
                    net.experts = None
                    net._graphs.clear()
                    torch.cuda.empty_cache()
                    net.experts = GpuExperts({L: (tuple(p.to(dev) for p in host_pools[L]), qtypes[L]) for L in layers})
                    net.use_graph = True
                    if hasattr(net, "expert_stats"):
                        del net.expert_stats
            else:
                if net.experts.pools(layers[0])[0].is_cuda and not hasattr(net.experts, "store"):
                    net.experts = GpuExperts({L: (host_pools[L], qtypes[L]) for L in layers})  # drop the GPU copy
                    net._graphs.clear()
                    torch.cuda.empty_cache()
                apply_vram_budget(dev, parse_size(args.vram))
                o = MODES[mode]
                off = None  # the previous mode's slot pools go before the new ones are allocated
                print(f"[{mode}] allocated before planning: {torch.cuda.memory_allocated() / 2**30:.2f} GiB", flush=True)
                off = apply_offload(net, parse_size(args.vram), args.ctx, o["policy"], prefetch=o["prefetch"],
                                    loader=o["loader"])
                if zc is None:
                    zc = zero_copy_gbps(off.store, layers[0], dev)
                    print(f"host->device: cudaMemcpy {bw:.1f} GB/s, zero-copy kernel {zc:.1f} GB/s; "
                          f"{off.placement.describe()}", flush=True)
            r = run_mode(net, cfg, args.tokens, args.warmup, args.prefill, args.chunk, args.depth)
            r.update(routing=routing, mode=mode)
            rows.append(r)
            print(json.dumps(r), flush=True)
    for r in rows:  # bounds: what the hit rate and the bandwidth allow
        res = next((x for x in rows if x["routing"] == r["routing"] and x["mode"] == "resident"), None)
        if res is None or "mb_per_token" not in r:
            continue
        t_res = res["decode_ms_per_token"] / 1e3
        moved = r["mb_per_token"] * 1e6
        r["bound_tok_s"] = round(1 / max(t_res, moved / (zc * 1e9)), 1)
        r["pct_of_bound"] = round(100 * r["decode_tok_s"] / r["bound_tok_s"], 1)
        t = r["decode_ms_per_token"] / 1e3
        r["pred_tok_s_at_pcie"] = round(1 / (t + moved * (1 / (args.pcie_gbps * 1e9) - 1 / (zc * 1e9))), 1)
    for rt in args.routing.split(","):
        b = next((x for x in rows if x["routing"] == rt and x["mode"] == "naive"), None)
        c = next((x for x in rows if x["routing"] == rt and x["mode"] == "loader"), None)
        if b and c:
            c["x_naive"] = round(c["decode_tok_s"] / b["decode_tok_s"], 2)
    out = {"device": name, "memcpy_h2d_gbps": round(bw, 1), "zero_copy_gbps": round(zc or 0, 1),
           "expert_bytes": expert_bytes, "args": vars(args), "rows": rows}
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "bench_offload.json").write_text(json.dumps(out, indent=2))
    print(f"\n{name}: host->device cudaMemcpy {bw:.1f} GB/s, zero-copy kernel {zc or 0:.1f} GB/s; "
          f"recipe {args.recipe}, --vram {args.vram}, ctx {args.ctx}, depth {args.depth}")
    hdr = ("routing", "mode", "decode tok/s", "x naive", "prefill tok/s", "hit", "prec", "recall", "MB/tok",
           "bound tok/s", "% bound", f"tok/s @{args.pcie_gbps:g}")
    print(" | ".join(f"{h:>12}" for h in hdr))
    keys = ("routing", "mode", "decode_tok_s", "x_naive", "prefill_tok_s", "hit_rate", "prefetch_precision",
            "prefetch_recall", "mb_per_token", "bound_tok_s", "pct_of_bound", "pred_tok_s_at_pcie")
    for r in rows:
        print(" | ".join(f"{str(r.get(k, '-')):>12}" for k in keys))


if __name__ == "__main__":
    main()
