"""`kimi-local bench`: decode and prefill speed, memory, and the share of the HBM roofline.

--synthetic builds the full-size model (real config, random blocks of the chosen recipe) directly in
GPU memory; otherwise a model path is loaded. Decode is timed at several context depths (the MLA
cache is filled with random latents up to the depth: speed does not depend on its values), prefill
on prompts of several lengths. The roofline of a decode step = (weight bytes read for one token +
KDA state read and written + MLA latent bytes read at that depth) / HBM bandwidth measured in the
same run by a device-to-device copy.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

import torch

from kimi_local.config import KimiConfig


# ---- measurement helpers -----------------------------------------------------------------------
def hbm_bandwidth(device, nbytes: int = 2 << 30, warm_s: float = 0.3) -> float:
    """Device-to-device copy, bytes read + written per second: the median of 5 timings of 4 back-to-back copies,
    after warm_s seconds of copies. The warm-up matters: timed right after the synthetic model's build, copies read
    3.72 TB/s on an H200 where the same copies read 4.14-4.24 TB/s after ~0.35 s of copies (session 18; ~4.3 TB/s
    is the machine's documented copy rate; the clocks' ramp-up is the likely cause, not measured): the roofline
    percentages printed before session 18 are ~12 % too high."""
    a = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < warm_s:
        for _ in range(8):
            b.copy_(a)
        torch.cuda.synchronize(device)
    t = []
    for _ in range(5):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(4):
            b.copy_(a)
        e.record()
        e.synchronize()
        t.append(s.elapsed_time(e) / 1e3 / 4)
    del a, b
    return nbytes / _median(t)


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# ---- synthetic full-size model -------------------------------------------------------------------
def random_qtensor(shape: tuple[int, ...], qtype: str, device, gen: torch.Generator, out_device=None):
    """Random quantized blocks: 256 distinct quantized rows (quantized on `device`) tiled to the full
    shape on `out_device` (contents do not change the speed; addresses are all distinct)."""
    from kimi_local.quant.formats import QTensor, quantize

    K = shape[-1]
    rows = int(torch.tensor(shape[:-1]).prod())
    base = quantize(0.02 * torch.randn(min(rows, 256), K, generator=gen, device=device), qtype)
    base = base.to(out_device or device)
    reps = -(-rows // base.shape[0])
    data = base.repeat(reps, 1)[:rows].reshape(*shape[:-1], base.shape[-1]).contiguous()
    return QTensor(data, qtype, tuple(shape))


def synthetic_weights(cfg: KimiConfig, qtype_of, device, seed: int = 0, zipf: float = 0.0,
                      expert_device=None) -> dict:
    """Canonical weights of `cfg` on `device`: matrices quantized per `qtype_of(name, shape)`, vectors
    fp32. zipf > 0 skews the routing: the selection bias favours experts by Zipf(s=zipf) popularity.
    expert_device="cpu" builds the routed experts in host memory (offloading benchmarks)."""
    from kimi_local.quant.recipe import canonical_shapes, stored_f32

    gen = torch.Generator(device=device).manual_seed(seed)
    randn = lambda *s: torch.randn(*s, device=device, generator=gen)  # noqa: E731
    w = {}
    for name, s in canonical_shapes(cfg).items():
        if name.endswith("ssm_a"):
            w[name] = -torch.empty(s, device=device).uniform_(1, 16, generator=gen)
        elif name.endswith("exp_probs_b.bias"):
            b = torch.zeros(s, device=device)
            if zipf > 0:  # log-popularity bias over a random expert order
                rank = torch.randperm(s[0], device=device, generator=gen) + 1
                b = -0.5 * zipf * torch.log(rank.float())
            w[name] = b
        elif "norm" in name:
            w[name] = torch.ones(s, device=device)
        elif name.endswith(("attn_k_b.weight", "attn_v_b.weight")) or stored_f32(name):
            w[name] = 0.05 * randn(*s) if "conv1d" not in name else 0.5 * randn(*s)
        else:
            qt = qtype_of(name, s)
            dense = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}.get(qt)
            home = expert_device if "_exps" in name else None  # routed experts may live on the host
            w[name] = (0.02 * randn(*s)).to(dense) if dense else random_qtensor(s, qt, device, gen, home)
    return w


def weight_bytes_per_token(net, cfg: KimiConfig) -> int:
    """Bytes of weights a decode step must read: every non-expert matrix once (one embedding row),
    the shared expert, and top-k routed experts per MoE layer."""
    from kimi_local.engine import GpuWeight

    total = 0
    for name, t in net.w.items():
        if name == "token_embd.weight":
            total += t.data[0].numel() if hasattr(t, "qtype") else t[0].numel() * t.element_size()
        elif isinstance(t, GpuWeight):
            total += t.nbytes
        elif isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
        elif isinstance(t, list):
            pass  # the shared expert's GpuWeights are counted through "shexp" below
        elif name.endswith("shexp"):
            total += sum(p.numel() for p in t[0])
    for i in range(cfg.first_k_dense_replace, cfg.num_hidden_layers):
        pools = net.experts.pools(i)
        per_expert = sum(p[0].numel() for p in pools)
        total += cfg.num_experts_per_token * per_expert
    return total


def _category(name: str) -> str:
    if name == "token_embd.weight":
        return "token_embd"
    if name == "output.weight":
        return "lm_head"
    if "shexp" in name:
        return "shared experts"
    if "_exps." in name:
        return "routed experts"
    if ".ffn_gate." in name or ".ffn_up." in name or ".ffn_down." in name:
        return "dense FFN"
    if name.endswith(("attn_k_b.weight", "attn_v_b.weight")):
        return "MLA k_b/v_b (bf16)"
    return "attention + KDA" if any(k in name for k in (".qkv", ".fgb_a", ".attn_", ".ssm_f_b", ".ssm_g_b")) \
        and "norm" not in name else "vectors (fp32)"


def memory_account(net) -> dict[str, int]:
    """Bytes of the engine's weights by category, each storage counted once (views and a second
    reference, e.g. the shared experts' kernel_form, share one). Keys: categories of the tensors
    on the net's device, "total" (their sum), and "host" (weights kept in host memory: a host
    embedding table, an expert store)."""
    from kimi_local.offload import _tensors_of

    dev = torch.device(net.device)
    seen, acc = set(), {}

    def add(cat, obj):
        for t in _tensors_of(obj):
            key = (t.device, t.untyped_storage().data_ptr())
            if key in seen:
                continue
            seen.add(key)
            here = t.device.type == dev.type and (t.device.index or 0) == (dev.index or 0)
            k = cat if here else "host"
            acc[k] = acc.get(k, 0) + t.untyped_storage().nbytes()

    for name, t in net.w.items():
        add(_category(name), t)
    experts = getattr(net, "experts", None)
    for i in range(net.cfg.first_k_dense_replace, net.cfg.num_hidden_layers):
        if experts is not None and hasattr(experts, "pools"):
            add("routed experts", list(experts.pools(i)))
    acc["total"] = sum(v for k, v in acc.items() if k != "host")
    return acc


def state_bytes_per_token(cfg: KimiConfig, ctx: int, kv_bytes: int) -> int:
    """KDA fp32 state read + written, conv tails, and the MLA latent rows read at depth ctx."""
    return 2 * cfg.kda_state_bytes() + ctx * cfg.latent_dim * kv_bytes * len(cfg.mla_layer_ids)


@dataclass
class BenchResult:
    rows: list = field(default_factory=list)
    info: dict = field(default_factory=dict)


def _fill_cache(cache, depth: int, n_tokens: int) -> None:
    cache.reserve(depth + n_tokens + 1)
    for lat in cache.latent.values():  # never time on zeros (filled in slices: bounded extra memory)
        for a in range(0, depth, 65536):
            b = min(depth, a + 65536)
            lat[a:b].copy_(torch.randn(b - a, lat.shape[1], device=lat.device).to(lat.dtype))
    cache.pos = depth
    cache.tokens = [0] * depth


def time_decode_variants(net, cache, variants: list, n_tokens: int, depth: int, rounds: int = 5) -> list[float]:
    """Seconds per decoded token at `depth` for each (name, env) variant, CUDA graphs only: one graph captured
    per variant over the same cache, then `rounds` rounds that replay n_tokens with each variant in turn
    (interleaved, so clock and thermal drift hit every variant alike); the median round per variant."""
    from kimi_local.engine import DecodeGraph

    _fill_cache(cache, depth, n_tokens)
    graphs = [_with_env(env, lambda: DecodeGraph(net, cache)) for _, env in variants]
    samplers = [_with_env(env, lambda: _sampler(net)) for _, env in variants]
    times = [[] for _ in variants]
    for _ in range(rounds + 1):  # round 0: warm-up, not kept
        for j, (g, smp) in enumerate(zip(graphs, samplers)):
            times[j].append(_with_env(variants[j][1], lambda: _decode_round(lambda tok, n: g.stream(smp, tok, n),
                                                                            cache, n_tokens, depth)))
    del graphs
    return [_median(t[1:]) for t in times]


def _median(xs: list) -> float:
    return sorted(xs)[len(xs) // 2]


def _sampler(net):
    """Greedy, or KIMI_LOCAL_BENCH_SAMPLING="temperature=0.6,top_p=0.95,..." (SamplingParams fields; seed 0 unless
    given): the decode rows then time sampling on the device as generate does it (e.g. as a --variant)."""
    from kimi_local.generate import Sampler, SamplingParams

    spec = os.environ.get("KIMI_LOCAL_BENCH_SAMPLING", "")
    kw = {"temperature": 0.0, "seed": 0}
    for item in filter(None, (t.strip() for t in spec.split(","))):
        key, _, val = item.partition("=")
        kw[key.strip()] = int(val) if key.strip() in ("top_k", "repeat_last_n", "seed") else float(val)
    return Sampler(SamplingParams(**kw), net.cfg.vocab_size, net.device)


def _decode_round(stream, cache, n_tokens: int, depth: int) -> float:
    """Seconds per token of n_tokens greedy tokens from context depth `depth`, fed and sampled by
    stream(tok, n) (generate's decode loop: one host sync per token)."""
    cache.pos, cache.tokens = depth, [0] * depth
    _sync(cache.device)
    t0 = time.perf_counter()
    for _ in stream(1, n_tokens):
        pass
    _sync(cache.device)
    return (time.perf_counter() - t0) / n_tokens


def time_decode(net, cache, n_tokens: int, depth: int, rounds: int = 3) -> float:
    """Seconds per decoded token at context depth `depth` (graph replays on CUDA, generate's decode loop):
    the median of `rounds` timed rounds of n_tokens, after one untimed round (graph captures, then the GPU's
    clocks ramping up from idle: a single warm-up token left the first timed tokens ~10 % slower, H200,
    session 8)."""
    from kimi_local.generate import decode_steps

    _fill_cache(cache, depth, n_tokens)
    sampler = _sampler(net)
    stream = lambda tok, n: decode_steps(net, cache, sampler, tok, n)  # noqa: E731
    times = [_decode_round(stream, cache, n_tokens, depth) for _ in range(rounds + 1)]
    return _median(times[1:])


def time_prefill(net, n: int, chunk: int | None, vocab: int) -> tuple[float, int]:
    """(seconds, chunk) of prefilling n random tokens; chunk None: the engine's own, fitted when its cache
    is made (net.prefill_chunk), as generation uses it."""
    from kimi_local.generate import prefill

    ids = torch.randint(0, vocab, (n,)).tolist()
    cache = net.new_cache(max_ctx=n + 8)
    chunk = chunk or getattr(net, "prefill_chunk", 2048)  # None: what the engine fitted beside this cache
    warm = min(n, 2 * chunk)
    prefill(net, net.new_cache(max_ctx=warm + 8), ids[:warm], chunk)  # warm-up: compile, autotune
    _sync(net.device)
    t0 = time.perf_counter()
    prefill(net, cache, ids, chunk)
    _sync(net.device)
    return time.perf_counter() - t0, chunk


# decode variants for `--pdl-ab`: (name, environment) — read when a decode graph is captured (kernels/pdl.py)
PDL_VARIANTS = [("pdl+prefetch", {"KIMI_LOCAL_PDL": "1", "KIMI_LOCAL_PREFETCH": "1"}),  # own weights, before the wait
                ("pdl", {"KIMI_LOCAL_PDL": "1", "KIMI_LOCAL_PREFETCH": "0"}),
                ("no pdl", {"KIMI_LOCAL_PDL": "0", "KIMI_LOCAL_PREFETCH": "0"})]


def parse_variants(specs: list[str]) -> list[tuple[str, dict]]:
    """`--variant` values ("VAR=value[;VAR=value...]", e.g. "KIMI_LOCAL_PREFETCH_NEXT=kda,mla;KIMI_LOCAL_X8=0")
    -> decode variants [(name, env)], the unchanged environment ("default") first. Raises ValueError on a
    malformed entry."""
    out = [("default", {})]
    for spec in specs:
        env = {}
        for item in filter(None, (p.strip() for p in spec.split(";"))):
            key, sep, val = item.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"--variant {spec!r}: expected VAR=value[;VAR=value...]")
            env[key.strip()] = val.strip()
        if not env:
            raise ValueError(f"--variant {spec!r} sets nothing")
        out.append((spec, env))
    return out


def _with_env(env: dict, fn):
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return fn()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_bench(net, cfg: KimiConfig, contexts: list[int], prompts: list[int], decode_tokens: int,
              chunks: list[int], kv_bytes: int, label: str, decode_variants: list | None = None,
              prefill_variants: list | None = None) -> BenchResult:
    """decode_variants: [(name, env)] to time each decode depth under each environment (a decode graph per
    variant, captured under its environment; a row's "note" names its variant), e.g. PDL_VARIANTS. On CUDA
    with graphs the variants are timed in interleaved rounds (time_decode_variants). prefill_variants: likewise,
    each prompt prefilled once per variant under its environment (read at each call, e.g. the MoE kernels')."""
    dev = net.device
    res = BenchResult()
    bw = hbm_bandwidth(dev) if dev.type == "cuda" else 0.0
    wbytes = weight_bytes_per_token(net, cfg) if dev.type == "cuda" else 0
    res.info.update(model=label, device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                    hbm_GBps=round(bw / 1e9, 1), weight_bytes_per_token=wbytes,
                    weights_GiB=round(memory_account(net)["total"] / 2**30, 3))
    if dev.type == "cuda":
        from kimi_local.kernels import pdl

        res.info["pdl"] = pdl.supported(dev)  # the decode graph's kernels chained by PDL (KIMI_LOCAL_PDL=0: off)
    interleave = bool(decode_variants) and dev.type == "cuda" and getattr(net, "use_graph", False)
    for ctx in contexts:
        if interleave:  # every variant's graph over one cache, timed in interleaved rounds
            try:
                cache = net.new_cache(max_ctx=ctx + decode_tokens + 8)
            except torch.cuda.OutOfMemoryError:
                res.rows.append(dict(kind="decode", ctx=ctx, note="does not fit"))
                continue
            secs = time_decode_variants(net, cache, decode_variants, decode_tokens, ctx - 1)
            del cache
            torch.cuda.empty_cache()
        for j, (name, env) in enumerate(decode_variants or [(None, {})]):
            if interleave:
                s = secs[j]
            else:
                try:
                    cache = net.new_cache(max_ctx=ctx + decode_tokens + 8)
                except torch.cuda.OutOfMemoryError:
                    res.rows.append(dict(kind="decode", ctx=ctx, note="does not fit"))
                    break
                s = _with_env(env, lambda: time_decode(net, cache, decode_tokens, ctx - 1))
                del cache
            nbytes = wbytes + state_bytes_per_token(cfg, ctx, kv_bytes)
            row = dict(kind="decode", ctx=ctx, tok_s=round(1 / s, 1), ms_per_tok=round(1e3 * s, 3))
            if name:
                row["note"] = name
            if bw:
                row.update(GBps=round(nbytes / s / 1e9, 1), roofline_pct=round(100 * nbytes / bw / s, 1),
                           roofline_tok_s=round(bw / nbytes, 1))
            res.rows.append(row)
            net._graphs.clear() if hasattr(net, "_graphs") else None  # each variant captures its own graph
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    for n in prompts:
        for chunk in chunks:
            for name, env in prefill_variants or [(None, {})]:
                try:
                    s, used = _with_env(env, lambda: time_prefill(net, n, chunk, cfg.vocab_size))
                except torch.cuda.OutOfMemoryError:
                    res.rows.append(dict(kind="prefill", ctx=n, chunk=chunk, note="does not fit"))
                    break
                row = dict(kind="prefill", ctx=n, chunk=used, tok_s=round(n / s, 1), s=round(s, 3))
                if name:
                    row["note"] = name
                res.rows.append(row)
    if dev.type == "cuda":
        res.info["peak_vram_GiB"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)
        res.info["peak_reserved_GiB"] = round(torch.cuda.max_memory_reserved(dev) / 2**30, 2)
    return res


def llama_cpp_rows(path, contexts: list[int], prompts: list[int], decode_tokens: int, vocab: int, gpu: bool,
                   n_batch: int = 4096) -> tuple[list[dict], dict]:
    """The same measurements through llama.cpp (llama-cpp-python) on the same GGUF file: prefill tok/s for
    each prompt (one eval of random tokens, in llama.cpp's own n_batch micro-batches) and decode tok/s at
    each depth (the depth filled by such a prefill: llama.cpp has no synthetic cache fill; then one token
    per eval, like a generation loop without sampling). gpu: offload every layer (needs a CUDA build of
    llama-cpp-python: info["gpu_offload"] says whether it has one). Returns (rows, info)."""
    import random

    import llama_cpp

    n_ctx = max(contexts + prompts) + decode_tokens + 8
    info = {"llama_cpp": getattr(llama_cpp, "__version__", "?"), "gpu_offload": bool(llama_cpp.llama_supports_gpu_offload()),
            "n_batch": min(n_batch, n_ctx)}
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=info["n_batch"], n_ubatch=info["n_batch"],
                          n_gpu_layers=-1 if gpu else 0, logits_all=False, verbose=False)
    rng = random.Random(0)

    def ids(n):
        return [rng.randrange(vocab) for _ in range(n)]

    llm.eval(ids(8))  # warm-up: graph build, allocations
    rows = []
    for n in prompts:
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids(n))
        s = time.perf_counter() - t0
        rows.append(dict(kind="prefill", ctx=n, tok_s=round(n / s, 1), s=round(s, 3), note="llama.cpp"))
    for ctx in contexts:
        llm.reset()
        llm.eval(ids(ctx - 1))
        t0 = time.perf_counter()
        for t in ids(decode_tokens):
            llm.eval([t])
        s = (time.perf_counter() - t0) / decode_tokens
        rows.append(dict(kind="decode", ctx=ctx, tok_s=round(1 / s, 1), ms_per_tok=round(1e3 * s, 3), note="llama.cpp"))
    llm.close()
    return rows, info


def add_baseline(res: BenchResult, rows: list[dict], info: dict) -> None:
    """Append llama.cpp's rows to res and give each of ours with a matching (kind, ctx) the ratio
    x_llama_cpp = our tok/s / llama.cpp's."""
    theirs = {(r["kind"], r["ctx"]): r["tok_s"] for r in rows}
    for r in res.rows:
        base = theirs.get((r["kind"], r["ctx"]))
        if base and r.get("tok_s"):
            r["x_llama_cpp"] = round(r["tok_s"] / base, 2)
            r["note"] = (r.get("note", "") + f" {r['x_llama_cpp']}x llama.cpp").strip()
    res.rows.extend(rows)
    res.info.update(info)


def format_table(res: BenchResult) -> str:
    lines = [" ".join(f"{k}={v}" for k, v in res.info.items())]
    lines.append(f"{'kind':8} {'ctx':>8} {'chunk':>6} {'tok/s':>10} {'GB/s':>8} {'%roof':>6} {'roof tok/s':>10}  note")
    for r in res.rows:
        lines.append(f"{r['kind']:8} {r['ctx']:>8} {r.get('chunk', '-'):>6} {r.get('tok_s', '-'):>10} "
                     f"{r.get('GBps', '-'):>8} {r.get('roofline_pct', '-'):>6} {r.get('roofline_tok_s', '-'):>10}  "
                     f"{r.get('note', '')}")
    return "\n".join(lines)


def text_table(rows: list[dict], cols: list[str], fmt: dict | None = None) -> str:
    """Rows (dicts) as an aligned text table of `cols` (the device scripts print theirs last): a missing or
    None value is blank, "ok" prints ok / FAIL, "note" is cut at 100 characters, fmt maps a column to a
    format string."""
    fmt = fmt or {}

    def cell(r, c):
        v = r.get(c)
        if v is None:
            return ""
        if c == "ok":
            return "ok" if v else "FAIL"
        if c == "note":
            return str(v)[:100]
        return fmt.get(c, "{}").format(v)

    cells = [[cell(r, c) for c in cols] for r in rows]
    width = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(cols)]
    lines = ["", " | ".join(c.ljust(w) for c, w in zip(cols, width)), "-+-".join("-" * w for w in width)]
    return "\n".join(lines + [" | ".join(v.ljust(w) for v, w in zip(x, width)) for x in cells])


def to_json(res: BenchResult) -> str:
    return json.dumps({"info": res.info, "rows": res.rows}, indent=2)
