"""Where the time of one decode step goes: kernels per token, their time, and the gaps between them.

Builds the synthetic full-size model exactly like `kimi-local bench --synthetic` (bench.synthetic_weights
+ api.build_net), fills the MLA cache to the depth and decodes like bench.time_decode, then
  (a) times the decode step: graph replays (CUDA events, median) and bench's end-to-end token time;
  (b) profiles a few steps with torch.profiler (CUDA activity: CUPTI reports the kernels of a CUDA graph
      one by one) and prints a table by kernel name: calls per token, us per token, us per call, % of
      the step; the launches per token; the sum of kernel times vs the step time (the rest = gaps
      between graph nodes / launch overhead); the JSON also has the last profiled step kernel by kernel
      ("sequence": name, us, gap before it in us).
--eager profiles the same region (GpuKimi.decode_body) without the graph.
--smoke runs on the CPU: the tiny config, the engine through the Triton interpreter (no graph), the
profiler on CPU activities only; a "kernel" there is one Triton launch or one torch op that would
launch a kernel on a GPU (views, allocations and no-op casts/copies are not counted), so the launch
counts match the GPU's up to cuBLAS/ATen internals. JSON goes to $OUT/profile_decode.json if $OUT is set.

GPU:  .venv/bin/python scripts/profile_decode.py --recipe Q4_K_M --ctx 4096
CPU:  .venv/bin/python scripts/profile_decode.py --smoke
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--recipe", default="Q4_K_M")
    p.add_argument("--ctx", type=int, default=4096, help="context depth of the timed/profiled steps")
    p.add_argument("--kv-cache", default="bf16", choices=("bf16", "fp8"))
    p.add_argument("--zipf", type=float, default=0.0, help="skewed routing (0 = uniform, like bench)")
    p.add_argument("--tokens", type=int, default=32, help="tokens timed end to end (bench.time_decode)")
    p.add_argument("--steps", type=int, default=100, help="graph replays / eager steps timed for (a)")
    p.add_argument("--replays", type=int, default=5, help="steps under the profiler for (b)")
    p.add_argument("--eager", action="store_true", help="profile without the CUDA graph")
    p.add_argument("--smoke", action="store_true", help="CPU: tiny model, Triton interpreter, CPU profiler")
    p.add_argument("--top", type=int, default=40, help="rows of the kernel table")
    a = p.parse_args(argv)
    if a.smoke:
        a.eager = True
        a.ctx, a.tokens, a.steps, a.replays = min(a.ctx, 24), 1, 1, 1
    return a


# ---- counting launches on the CPU ----------------------------------------------------------------
_NO_KERNEL = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "lift_fresh",
              "alias", "_reshape_alias", "set_", "resize_", "_local_scalar_dense", "is_nonzero", "equal",
              "record_stream"}


def _launches_kernel(func) -> bool:
    return not func.is_view and func.overloadpacket.__name__ not in _NO_KERNEL


class LaunchCounter:
    """Context manager: records every Triton launch and every torch op that launches a kernel on a GPU
    (below autograd: composite ops such as `.to`/`.contiguous` that do nothing are not seen), each in a
    profiler range named "launch::<name>". Torch ops run inside a Triton interpreter launch are ignored."""

    def __init__(self):
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self
        self.names: list[str] = []
        self._inside = 0

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if counter._inside or not _launches_kernel(func):
                    return func(*args, **kwargs)
                return counter._launch("aten::" + func.overloadpacket.__name__, func, args, kwargs)

        self._mode = _Mode()
        self._torch = torch
        self._patched = []

    def _launch(self, name, fn, args, kwargs):
        self.names.append(name)
        self._inside += 1
        try:
            with self._torch.profiler.record_function("launch::" + name):
                return fn(*args, **kwargs)
        finally:
            self._inside -= 1

    def __enter__(self):
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction

        counter = self
        for cls in (InterpretedFunction, JITFunction):
            orig = cls.run

            def run(fself, *args, _orig=orig, **kwargs):
                if counter._inside or kwargs.get("warmup"):
                    return _orig(fself, *args, **kwargs)
                name = "triton::" + getattr(getattr(fself, "fn", None), "__name__", type(fself).__name__)
                return counter._launch(name, lambda *a, **k: _orig(fself, *a, **k), args, kwargs)

            cls.run = run
            self._patched.append((cls, orig))
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        for cls, orig in self._patched:
            cls.run = orig
        self._patched.clear()
        return False


# ---- model ------------------------------------------------------------------------------------------
def build(a):
    import torch

    from kimi_local.bench import synthetic_weights
    from kimi_local.config import KimiConfig, tiny_config
    from kimi_local.quant.recipe import get_recipe

    r = get_recipe(a.recipe)
    if a.smoke:
        from kimi_local.engine import GpuKimi

        # the tiny config, widened to one K-quant block (256) per row so that the recipe's K-quant types
        # and the MoE word-path kernels are used as on the real model
        cfg, dev = replace(tiny_config(), hidden_size=256, moe_intermediate_size=256), torch.device("cpu")
        w = synthetic_weights(cfg, r.qtype, dev, zipf=a.zipf)
        kv = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}[a.kv_cache]
        return cfg, GpuKimi(cfg, w, dev, torch.bfloat16, kv_dtype=kv, use_graph=False)
    from kimi_local.api import build_net

    cfg, dev = KimiConfig(), torch.device("cuda")
    w = synthetic_weights(cfg, r.qtype, dev, zipf=a.zipf)
    net = build_net(cfg, w, dev, torch.bfloat16, kv_cache=a.kv_cache, use_graph=not a.eager)
    del w
    return cfg, net


def _set_pos(cache):
    cache.pos_dev.fill_(cache.pos)
    cache.len_dev.fill_(cache.pos + 1)


def timed_steps(a, net, cache, ids):
    """(a): ms per step of the captured region, median over a.steps."""
    import torch

    if net.device.type == "cuda" and not a.eager:
        g = net._graphs[id(cache)].graph
        evs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(a.steps)]
        for _ in range(3):
            g.replay()
        torch.cuda.synchronize()
        for s, e in evs:
            s.record()
            g.replay()
            e.record()
        torch.cuda.synchronize()
        per = [s.elapsed_time(e) for s, e in evs]
        t0 = time.perf_counter()
        for _ in range(a.steps):
            g.replay()
        torch.cuda.synchronize()
        return statistics.median(per), 1e3 * (time.perf_counter() - t0) / a.steps
    per = []
    _set_pos(cache)
    for _ in range(a.steps):
        if net.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        net.decode_body(ids, cache)
        if net.device.type == "cuda":
            torch.cuda.synchronize()
        per.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(per), sum(per) / len(per)


def profile_steps(a, net, cache, ids):
    """(b): kernel events [(name, us)] of a.replays steps, and the profiled span per step in us."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = net.device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    _set_pos(cache)
    if cuda and not a.eager:
        g = net._graphs[id(cache)].graph
        step = g.replay
    else:
        def step():
            net.decode_body(ids, cache)
    counter = None
    if cuda:
        torch.cuda.synchronize()
        with profile(activities=acts) as prof:
            for _ in range(a.replays):
                step()
            torch.cuda.synchronize()
    else:
        with profile(activities=acts) as prof, LaunchCounter() as counter:
            for _ in range(a.replays):
                step()
    evs = prof.events()
    if cuda:
        kern = [e for e in evs if e.device_type == torch.autograd.DeviceType.CUDA]
    else:
        kern = [e for e in evs if e.name.startswith("launch::")]
    if not kern:
        return [], 0.0, counter, []
    t0 = min(e.time_range.start for e in kern)
    t1 = max(e.time_range.end for e in kern)
    kern = sorted(kern, key=lambda e: e.time_range.start)
    out = [(e.name.removeprefix("launch::"), e.time_range.elapsed_us()) for e in kern]
    n = len(kern) // a.replays  # the last profiled step, kernel by kernel: (name, us, us since the previous ended)
    last = kern[-n:]
    seq = [(e.name.removeprefix("launch::")[:60], round(e.time_range.elapsed_us(), 2),
            round(e.time_range.start - last[j - 1].time_range.end, 2) if j else 0.0) for j, e in enumerate(last)]
    return out, (t1 - t0) / a.replays, counter, seq


def table(events, n_steps: int, step_us: float):
    by = defaultdict(lambda: [0, 0.0])
    for name, us in events:
        by[name][0] += 1
        by[name][1] += us
    rows = sorted(({"kernel": n, "calls_per_token": c / n_steps, "us_per_token": t / n_steps,
                    "us_per_call": t / c, "pct_of_step": 100 * t / n_steps / step_us if step_us else 0.0}
                   for n, (c, t) in by.items()), key=lambda r: -r["us_per_token"])
    return rows


def format_rows(rows, top: int) -> str:
    lines = [f"{'kernel':72} {'calls/tok':>9} {'us/tok':>9} {'us/call':>8} {'%step':>6}"]
    for r in rows[:top]:
        n = r["kernel"] if len(r["kernel"]) <= 72 else r["kernel"][:69] + "..."
        lines.append(f"{n:72} {r['calls_per_token']:>9.1f} {r['us_per_token']:>9.1f} {r['us_per_call']:>8.2f} "
                     f"{r['pct_of_step']:>6.1f}")
    if len(rows) > top:
        rest = rows[top:]
        lines.append(f"{'(' + str(len(rest)) + ' more kernels)':72} {sum(r['calls_per_token'] for r in rest):>9.1f} "
                     f"{sum(r['us_per_token'] for r in rest):>9.1f} {'':>8} {sum(r['pct_of_step'] for r in rest):>6.1f}")
    return "\n".join(lines)


def main(argv=None):
    a = parse_args(argv)
    if a.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
    import torch

    from kimi_local.bench import time_decode

    t_build = time.perf_counter()
    cfg, net = build(a)
    t_build = time.perf_counter() - t_build
    cuda = net.device.type == "cuda"
    depth = a.ctx - 1
    cache = net.new_cache(max_ctx=a.ctx + a.tokens + 16)
    e2e = time_decode(net, cache, a.tokens, depth)  # fills the cache to the depth; builds the graph
    ids = torch.tensor([1], device=net.device)
    with torch.no_grad():
        ms_med, ms_mean = timed_steps(a, net, cache, ids)
        events, span_us, counter, seq = profile_steps(a, net, cache, ids)
    if cuda and not events:
        print("no CUDA kernel events were recorded (CUPTI did not report the graph's kernels): try --eager",
              file=sys.stderr)
    step_us = span_us if a.smoke else 1e3 * ms_med  # CPU: the profiled step (the counter's ranges cost time)
    rows = table(events, a.replays, step_us)
    launches = len(events) / a.replays
    kern_us = sum(us for _, us in events) / a.replays
    mode = "smoke (CPU, Triton interpreter)" if a.smoke else ("eager" if a.eager else "CUDA graph")
    info = dict(mode=mode, device=torch.cuda.get_device_name() if cuda else "cpu", recipe=a.recipe, ctx=a.ctx,
                kv_cache=a.kv_cache, zipf=a.zipf, build_s=round(t_build, 1),
                e2e_ms_per_token=round(1e3 * e2e, 4), e2e_tok_s=round(1 / e2e, 1),
                step_ms_median=round(ms_med, 4), step_ms_mean=round(ms_mean, 4),
                profiled_steps=a.replays, profiled_span_us_per_step=round(span_us, 1),
                launches_per_token=launches, kernel_us_per_token=round(kern_us, 1),
                gap_us_per_token=round(step_us - kern_us, 1),
                kernel_pct_of_step=round(100 * kern_us / step_us, 1) if step_us else 0.0)
    if counter is not None:
        kinds = defaultdict(int)
        for n in counter.names:
            kinds[n.split("::")[0]] += 1
        info["launches_by_kind_per_token"] = {k: v / a.replays for k, v in kinds.items()}
    print(" ".join(f"{k}={v}" for k, v in info.items()))
    print(f"step {ms_med:.3f} ms (median of {a.steps}{' graph replays' if cuda and not a.eager else ' steps'}), "
          f"end to end {1e3 * e2e:.3f} ms/token ({1 / e2e:.1f} tok/s); {launches:.0f} launches per token; "
          f"kernels {kern_us:.1f} us of {step_us:.1f} us = {info['kernel_pct_of_step']} %, "
          f"gaps {step_us - kern_us:.1f} us ({(step_us - kern_us) / max(launches, 1):.2f} us per launch)")
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / "profile_decode.json"
        path.write_text(json.dumps({"info": info, "kernels": rows, "sequence": seq}, indent=1))
        print(f"wrote {path}")
    print(format_rows(rows, a.top))
    return info, rows


if __name__ == "__main__":
    main()
