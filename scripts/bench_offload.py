"""Expert offloading benchmark on a synthetic full-size Kimi-Linear MoE (real shapes, random bytes).

Every routed expert (26 layers x 256, Q4_K gate/up + Q6_K down by default) lives in pinned host memory;
the GPU holds the slot pools that a --vram budget leaves (kimi_local.offload.plan_placement). Per token
and layer: a stand-in for the non-expert work (a bf16 GEMV over the layer's share of the resident
weights), the router, then the fused MoE kernel (kernels.moe.moe_decode / moe_prefill when importable,
else a torch stand-in reading the same bytes). Routing: `uniform` (random router) and `zipf` (the router's
selection bias calibrated so expert e of a random ranking is chosen with p ~ 1/rank^s); the hidden state
drifts between layers by --drift (relative noise), which sets how well the next layer's router guesses.

Modes, same budget and trace:
  (a) resident  all experts on the GPU (no budget; the speed ceiling)
  (b) naive     load-on-miss: LRU, synchronous copies on the compute stream, no prefetch, no overlap
  (c) loader    kimi_local.offload.OffloadedExperts: side-stream copies, router prefetch, decayed LFU

    python scripts/bench_offload.py --vram 24GB --ctx 131072 --tokens 64 --prefill 8192
Prints a table last; writes bench_offload.json to $OUT when set.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def _alias_source_dirs() -> None:
    """Not pip-installed (the device machine): serve quant/ and kernels/ as kimi_local.quant / .kernels."""
    import importlib

    import kimi_local

    for sub in ("quant", "kernels"):
        try:
            importlib.import_module(f"kimi_local.{sub}")
        except ImportError:
            mod = importlib.import_module(sub)
            sys.modules[f"kimi_local.{sub}"] = mod
            setattr(kimi_local, sub, mod)


_alias_source_dirs()

from kimi_local.config import KimiConfig, tiny_config  # noqa: E402
from kimi_local.offload import HostStore, OffloadedExperts, parse_size, plan_placement, vram_for_slots  # noqa: E402

try:
    from kimi_local.kernels.moe import moe_decode, moe_prefill
    from kimi_local.kernels.quant_matmul import packed_row_bytes
    HAVE_KERNELS = True
except Exception as e:  # noqa: BLE001  (no triton, no kernels: torch stand-in)
    print(f"kernels.moe not importable ({e}); using a torch stand-in for the MoE compute", flush=True)
    HAVE_KERNELS = False
    from kimi_local.quant.formats import row_nbytes as packed_row_bytes  # noqa: E402

REST_BYTES = 2_012_259_200 * 17 // 16  # non-expert weights at ~Q8_0 (spec 7.1)
NON_EXPERT_ACTIVE = 1_257_284_480  # non-expert params touched per token (excl. embedding, lm_head)


# ---- synthetic model -----------------------------------------------------------------------------
class SyntheticExperts:
    """Pinned host stacks per MoE layer: gate/up uint8 [E, F, row_bytes(D)], down [E, D, row_bytes(F)]."""

    def __init__(self, cfg, layers, qtypes, pin: bool):
        E, F, D = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
        qg, qu, qd = qtypes
        shapes = [(E, F, packed_row_bytes(qg, D)), (E, F, packed_row_bytes(qu, D)), (E, D, packed_row_bytes(qd, F))]
        per_layer = sum(math.prod(s) for s in shapes)
        t0 = time.perf_counter()
        flat = torch.empty(per_layer * len(layers), dtype=torch.uint8, pin_memory=pin)
        self._pools, off = {}, 0
        for L in layers:
            views = []
            for s in shapes:
                n = math.prod(s)
                views.append(flat[off : off + n].view(s))
                off += n
            self._pools[L] = tuple(views)
        self.qt = qtypes
        self.host_bytes = flat.numel()
        self.pin_s = time.perf_counter() - t0

    def pools(self, L):
        return self._pools[L]

    def qtypes(self, L):
        return self.qt


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def calibrate_bias(router: torch.Tensor, target: torch.Tensor, k: int, iters: int = 60) -> torch.Tensor:
    """Selection bias [E] so that top-k(sigmoid(h W^T) + bias) picks expert e with frequency ~ target[e]."""
    E, D = router.shape
    h = torch.randn(8192, D, device=router.device)
    s = torch.sigmoid(h @ router.t())
    bias = torch.zeros(E, device=router.device)
    for _ in range(iters):
        ids = torch.topk(s + bias, k, dim=-1).indices
        freq = torch.bincount(ids.reshape(-1), minlength=E).float() / ids.numel()
        bias += 0.05 * (torch.log(target + 1e-6) - torch.log(freq + 1e-6))
    return bias


def make_weights(cfg, layers, routing: str, zipf_s: float, device, g):
    """Routers, selection biases and ffn norms of the MoE layers (what routing and prefetch read)."""
    E, D, k = cfg.num_experts, cfg.hidden_size, cfg.num_experts_per_token
    w = {}
    p = torch.arange(1, E + 1, dtype=torch.float32, device=device) ** -zipf_s
    for L in layers:
        r = torch.randn(E, D, generator=g, device=device) / math.sqrt(D)
        w[f"blk.{L}.ffn_gate_inp.weight"] = r
        w[f"blk.{L}.ffn_norm.weight"] = torch.ones(D, device=device)
        if routing == "zipf":
            target = (p / p.sum())[torch.argsort(torch.rand(E, generator=g, device=device))]
            w[f"blk.{L}.exp_probs_b.bias"] = calibrate_bias(r, target, k)
        else:
            w[f"blk.{L}.exp_probs_b.bias"] = torch.zeros(E, device=device)
    return w


def route(h, w, L, k):
    """h [T, D] -> (ids [T, k] int64, weights [T, k] fp32), the model's sigmoid router."""
    s = torch.sigmoid(h.float() @ w[f"blk.{L}.ffn_gate_inp.weight"].t())
    ids = torch.topk(s + w[f"blk.{L}.exp_probs_b.bias"], k, dim=-1).indices
    wts = torch.gather(s, 1, ids)
    return ids, (wts / wts.sum(-1, keepdim=True)).float()


# ---- expert holders for modes (a) and (b) ---------------------------------------------------------
class Resident:
    def __init__(self, src, layers, device):
        self._p = {L: tuple(t.to(device) for t in src.pools(L)) for L in layers}
        self.qt = src.qt

    def pools(self, L):
        return self._p[L]

    def qtypes(self, L):
        return self.qt

    def prepare(self, L, ids, h=None):
        return ids


class Naive:
    """Load-on-miss: LRU per layer, synchronous copies on the compute stream, no prefetch; a chunk that
    needs more experts than the pool holds goes through a staging pool of E slots."""

    def __init__(self, src, layers, slots, device):
        self.src, self.qt, self.device = src, src.qt, device
        E = src.pools(layers[0])[0].shape[0]
        self.pool = {L: [torch.empty((slots[L], *t.shape[1:]), dtype=t.dtype, device=device) for t in src.pools(L)]
                     for L in layers}
        self.stage = [torch.empty((E, *t.shape[1:]), dtype=t.dtype, device=device) for t in src.pools(layers[0])]
        self.where = {L: {} for L in layers}  # expert -> slot, in LRU order (dicts keep insertion order)
        self.S = slots
        self.cur = {}
        self.hits = self.lookups = 0

    def pools(self, L):
        return self.cur[L]

    def qtypes(self, L):
        return self.qt

    def prepare(self, L, ids, h=None):
        need = torch.unique(ids.cpu()).tolist()
        where, host = self.where[L], self.src.pools(L)
        self.lookups += len(need)
        self.hits += sum(e in where for e in need)
        if len(need) > self.S[L]:
            for j, e in enumerate(need):
                for dst, src, pool in zip(self.stage, host, self.pool[L]):
                    dst[j].copy_(pool[where[e]] if e in where else src[e])
            self.cur[L] = self.stage
            m = torch.full((host[0].shape[0],), -1, dtype=torch.int64)
            m[need] = torch.arange(len(need))
            return m[ids.cpu()].to(self.device)
        keep = set(need)
        for e in need:
            if e in where:
                where[e] = where.pop(e)  # most recent last
                continue
            if len(where) < self.S[L]:
                s = len(where)
            else:
                old = next(x for x in where if x not in keep)
                s = where.pop(old)
            where[e] = s
            for dst, src in zip(self.pool[L], host):
                dst[s].copy_(src[e])  # pageable-sync semantics: the stream waits, nothing overlaps
        self.cur[L] = self.pool[L]
        slot_of = torch.full((host[0].shape[0],), -1, dtype=torch.int64)
        for e, s in where.items():
            slot_of[e] = s
        return slot_of[ids.cpu()].to(self.device)


# ---- one forward over the layers ------------------------------------------------------------------
def moe_compute(experts, L, h, ids, wts, out):
    slots = experts.prepare(L, ids, h)
    pools = experts.pools(L)
    qt = experts.qtypes(L)
    if HAVE_KERNELS and h.is_cuda:
        if h.shape[0] == 1:
            moe_decode(h[0], slots[0].to(torch.int32), wts[0].contiguous(), *pools, qt, out[0])
        else:
            moe_prefill(h, slots.to(torch.int32), wts, *pools, qt, out)
    else:  # read the selected blocks once (bandwidth stand-in)
        sel = torch.unique(slots)
        out.zero_()
        for p in pools:
            out[:, 0] += p.index_select(0, sel).float().mean()
    return out


def forward(cfg, experts, w, dense_w, x, drift, g):
    """x [T, D]: every layer does the dense stand-in; MoE layers route on h and run the experts."""
    k = cfg.num_experts_per_token
    h = x
    out = torch.empty_like(x)
    for L in range(cfg.num_hidden_layers):
        torch.matmul(h, dense_w.t())  # KDA/MLA projections + shared expert stand-in
        if cfg.is_moe(L):
            ids, wts = route(h, w, L, k)
            moe_compute(experts, L, h, ids, wts, out)
        h = h + drift * torch.randn(h.shape, generator=g, device=h.device, dtype=h.dtype)
        h = h / h.float().pow(2).mean(-1, keepdim=True).sqrt().to(h.dtype)


def run_mode(name, cfg, experts, w, dense_w, tokens, warmup, prefill, chunk, drift, seed, device):
    D = cfg.hidden_size
    g = torch.Generator(device=device).manual_seed(seed)
    res = {"mode": name}
    stats = getattr(experts, "stats", None)
    for t in range(warmup + tokens):
        if t == warmup:
            sync(device)
            t0 = time.perf_counter()
            if stats is not None:
                stats.resolve(wait=True)
                base = dict(stats.as_dict(), stall_s=stats.stall_s, h2d_s=stats.h2d_s)
        forward(cfg, experts, w, dense_w, torch.randn(1, D, generator=g, device=device, dtype=torch.bfloat16),
                drift, g)
    sync(device)
    dt = time.perf_counter() - t0
    res["decode_tok_s"] = tokens / dt
    res["decode_ms_per_token"] = 1e3 * dt / tokens
    if stats is not None:
        stats.resolve(wait=True)
        d = stats.as_dict()
        n_look = d["lookups"] - base["lookups"]
        res["hit_rate"] = 1 - (d["misses"] - base["misses"]) / max(n_look, 1)
        res["prefetch_recall"] = stats.prefetch_recall
        res["prefetch_precision"] = stats.prefetch_precision
        res["mb_per_token"] = (d["h2d_bytes"] - base["h2d_bytes"]) / tokens / 1e6
        res["stall_ms_per_token"] = 1e3 * (stats.stall_s - base["stall_s"]) / tokens
        res["copy_gbps"] = (d["h2d_bytes"] - base["h2d_bytes"]) / max(stats.h2d_s - base["h2d_s"], 1e-9) / 1e9
    if isinstance(experts, Naive):
        res["hit_rate"] = experts.hits / max(experts.lookups, 1)
    if prefill:
        x = torch.randn(prefill, D, generator=g, device=device, dtype=torch.bfloat16)
        forward(cfg, experts, w, dense_w, x[:chunk], drift, g)  # autotune the prefill kernels untimed
        sync(device)
        t0 = time.perf_counter()
        for s in range(0, prefill, chunk):
            forward(cfg, experts, w, dense_w, x[s : s + chunk], drift, g)
        sync(device)
        res["prefill_tok_s"] = prefill / (time.perf_counter() - t0)
    return res


def h2d_gbps(device, nbytes=1 << 30) -> float:
    if device.type != "cuda":
        src, dst = torch.empty(nbytes >> 4, dtype=torch.uint8), torch.empty(nbytes >> 4, dtype=torch.uint8)
        t0 = time.perf_counter()
        dst.copy_(src)
        return src.numel() / (time.perf_counter() - t0) / 1e9
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    s = torch.cuda.Stream(device)
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(2):
        with torch.cuda.stream(s):
            a.record(s)
            dst.copy_(src, non_blocking=True)
            b.record(s)
        b.synchronize()
    return nbytes / (a.elapsed_time(b) / 1e3) / 1e9


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vram", default="24GB")
    ap.add_argument("--ctx", type=int, default=131072)
    ap.add_argument("--down", default="Q6_K", help="down-projection type (Q4_K_M: Q6_K; pure Q4_K: Q4_K)")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--warmup", type=int, default=16)
    ap.add_argument("--prefill", type=int, default=8192, help="prompt tokens for the prefill measurement (0: skip)")
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--zipf", type=float, default=1.0)
    ap.add_argument("--drift", type=float, default=0.35, help="relative hidden-state change between layers")
    ap.add_argument("--routing", default="uniform,zipf")
    ap.add_argument("--modes", default="resident,naive,loader")
    ap.add_argument("--pcie-gbps", type=float, default=25.0)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU: checks the script, measures nothing")
    args = ap.parse_args()
    if args.smoke:
        dev, cfg = torch.device("cpu"), replace(tiny_config(), hidden_size=256, moe_intermediate_size=256,
                                                 num_experts=16, num_experts_per_token=4)
    elif torch.cuda.is_available():
        dev, cfg = torch.device("cuda"), KimiConfig()
    else:
        sys.exit("bench_offload needs a CUDA GPU (or --smoke)")
    layers = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe(i)]
    qtypes = ("Q4_K", "Q4_K", args.down)
    g = torch.Generator(device=dev).manual_seed(0)
    src = SyntheticExperts(cfg, layers, qtypes, pin=dev.type == "cuda")
    expert_bytes = sum(t[0].numel() for t in src.pools(layers[0]))
    rest = REST_BYTES if not args.smoke else 10**6
    vram = parse_size(args.vram) if not args.smoke else vram_for_slots(cfg, args.ctx, rest, expert_bytes, 8)
    place = plan_placement(cfg, vram, args.ctx, rest, expert_bytes)
    bw = h2d_gbps(dev)
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (smoke)"
    print(f"{name}: host->device {bw:.1f} GB/s (pinned, side stream); host store "
          f"{src.host_bytes / 1e9:.1f} GB pinned in {src.pin_s:.1f} s; expert {expert_bytes:,} B; {place.describe()}",
          flush=True)
    dense_w = torch.randn(NON_EXPERT_ACTIVE // 27 // cfg.hidden_size // (1000 if args.smoke else 1), cfg.hidden_size,
                          device=dev, dtype=torch.bfloat16)
    rows = []
    for routing in args.routing.split(","):
        w = make_weights(cfg, layers, routing, args.zipf, dev, g)
        for mode in args.modes.split(","):
            if mode == "resident":
                ex = Resident(src, layers, dev)
            elif mode == "naive":
                ex = Naive(src, layers, place.slots, dev)
            else:
                store = HostStore(src, layers, pin=dev.type == "cuda")
                ex = OffloadedExperts(cfg, w, store, place, dev, "lfu", True, None, {L: qtypes for L in layers})
            r = run_mode(mode, cfg, ex, w, dense_w, args.tokens, args.warmup, args.prefill, args.chunk,
                         args.drift, 1, dev)
            r["routing"] = routing
            rows.append(r)
            print(json.dumps(r), flush=True)
            del ex
            torch.cuda.empty_cache()
    # predictions: the bound the hit rate and bandwidth allow, and the speed at a PCIe 4.0 card's 25 GB/s
    for r in rows:
        res = next(x for x in rows if x["routing"] == r["routing"] and x["mode"] == "resident")
        if r["mode"] == "loader":
            t_res = res["decode_ms_per_token"]
            miss_ms = (1 - r["hit_rate"]) * len(layers) * cfg.num_experts_per_token * expert_bytes / bw / 1e6
            r["bound_tok_s"] = 1e3 / max(t_res, miss_ms)
            r["pct_of_bound"] = 100 * r["decode_tok_s"] / r["bound_tok_s"]
            stall = r["stall_ms_per_token"]
            r["pred_tok_s_at_pcie"] = 1e3 / (r["decode_ms_per_token"] - stall + stall * bw / args.pcie_gbps)
    out = {"device": name, "h2d_gbps": bw, "expert_bytes": expert_bytes,
           "slots": place.slots, "placement": place.describe(), "args": vars(args), "rows": rows}
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "bench_offload.json").write_text(json.dumps(out, indent=2))
    print(f"\n{out['device']}, host->device {bw:.1f} GB/s, {place.describe()}")
    hdr = ("routing", "mode", "decode tok/s", "prefill tok/s", "hit", "recall", "MB/tok", "stall ms/tok",
           "copy GB/s", "% bound", f"tok/s @{args.pcie_gbps:g}GB/s")
    print(" | ".join(f"{h:>12}" for h in hdr))
    for r in rows:
        f = lambda key, fmt: (fmt.format(r[key]) if key in r else "-")  # noqa: E731
        print(" | ".join(f"{c:>12}" for c in (
            r["routing"], r["mode"], f("decode_tok_s", "{:.1f}"), f("prefill_tok_s", "{:.0f}"),
            f("hit_rate", "{:.3f}"), f("prefetch_recall", "{:.3f}"), f("mb_per_token", "{:.1f}"),
            f("stall_ms_per_token", "{:.2f}"), f("copy_gbps", "{:.1f}"), f("pct_of_bound", "{:.0f}"),
            f("pred_tok_s_at_pcie", "{:.1f}"))))


if __name__ == "__main__":
    main()
