"""`kimi-local` command line (typer). Thin: each command parses flags and calls into the package.

Exit codes: 0 ok, 1 runtime error (bad model file, context overflow, ...), 2 usage error.
"""
from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from kimi_local.config import ModelError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode="rich",
    help="Run Kimi-Linear-48B-A3B locally: convert checkpoints to GGUF, chat, pipe documents in.",
)

# ---- shared options ------------------------------------------------------------------------
DeviceOpt = typer.Option("auto", "--device", help="cpu, cuda or auto (cuda when available).")
TempOpt = typer.Option(0.6, "--temperature", "-t", min=0.0, help="Sampling temperature; 0 = greedy.")
TopKOpt = typer.Option(0, "--top-k", min=0, help="Keep the k most likely tokens (0 = off).")
TopPOpt = typer.Option(1.0, "--top-p", min=0.0, max=1.0, help="Nucleus sampling mass (1 = off).")
MinPOpt = typer.Option(0.0, "--min-p", min=0.0, max=1.0, help="Drop tokens below min_p x the top probability.")
RepOpt = typer.Option(1.0, "--repeat-penalty", min=0.01, help="Penalty for recently seen tokens (1 = off).")
SeedOpt = typer.Option(None, "--seed", help="Random seed for reproducible sampling.")
CtxOpt = typer.Option(None, "--ctx", min=1, help="Context limit in tokens (default: the model's).")


def fail(msg: str, code: int = 1) -> None:
    from kimi_local.ui import error

    error(msg)
    raise typer.Exit(code)


def _sampling(temperature, top_k, top_p, min_p, repeat_penalty, seed):
    from kimi_local.generate import SamplingParams

    p = SamplingParams(temperature, top_k, top_p, min_p, repeat_penalty, seed=seed)
    try:
        p.validate()
    except ValueError as e:
        fail(str(e), 2)
    return p


def _read_document(file: Optional[Path]) -> Optional[str]:
    """The document: --file, else piped stdin, else None. Invalid UTF-8 is replaced, with a warning."""
    from kimi_local.ui import warn

    if file is not None:
        if not file.is_file():
            fail(f"--file {file}: no such file", 2)
        raw = file.read_bytes()
    elif not sys.stdin.isatty():
        raw = sys.stdin.buffer.read()
    else:
        return None
    text = raw.decode("utf-8", errors="replace")
    if "\ufffd" in text and "\ufffd".encode() not in raw:
        warn("input is not valid UTF-8; invalid bytes were replaced with U+FFFD")
    return text


KvOpt = typer.Option("bf16", "--kv-cache", help="MLA latent cache on the GPU: bf16, or fp8 (half the memory: 1M tokens in 4.3 GB).")


def load_model(model: Path, device: str, load_in_4bit: bool = False, kv_cache: str = "bf16",
               vram: Optional[str] = None):
    """Load a model; with --vram on a GPU the budget is enforced from the start and the routed experts
    are kept in pinned host memory (the caller then sets up offloading with _offload_experts)."""
    import kimi_local
    from kimi_local.api import resolve_device

    if kv_cache not in ("bf16", "fp8"):
        fail("--kv-cache must be bf16 or fp8", 2)
    opts = {"kv_cache": kv_cache}
    try:
        if vram is not None and resolve_device(device).type == "cuda":
            from kimi_local.engine import apply_vram_budget

            apply_vram_budget(resolve_device(device), _vram_budget(vram))
            opts["expert_store"] = "cpu"
        return kimi_local.load(model, device=device, load_in_4bit=load_in_4bit, **opts)
    except ModelError as e:
        fail(str(e))


# ---- run -------------------------------------------------------------------------------------
@app.command()
def run(
    model: Path = typer.Argument(..., help="HF model directory or .gguf file."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="The instruction. Piped stdin (or --file) is the document placed before it."),
    file: Optional[Path] = typer.Option(None, "--file", "-f", help="Read the document from this file instead of stdin."),
    system: Optional[str] = typer.Option(None, "--system", "-s", help="System prompt."),
    max_tokens: int = typer.Option(512, "--max-tokens", "-n", min=1, help="Most tokens to generate."),
    temperature: float = TempOpt, top_k: int = TopKOpt, top_p: float = TopPOpt, min_p: float = MinPOpt,
    repeat_penalty: float = RepOpt, seed: Optional[int] = SeedOpt,
    device: str = DeviceOpt, ctx: Optional[int] = CtxOpt,
    load_in_4bit: bool = typer.Option(False, "--load-in-4bit", help="HF dirs only: quantize linear weights to NF4 with bitsandbytes while loading."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object (text, token counts, timings) instead of streaming."),
    vram: Optional[str] = typer.Option(None, "--vram", help="Memory budget (e.g. 24GB): routed experts that do not fit live in host RAM and stream in (also emulated with --device cpu)."),
    expert_policy: str = typer.Option("lfu", "--expert-policy", help="With --vram: expert cache eviction, lfu (decayed frequency) or lru."),
    expert_profile: Optional[Path] = typer.Option(None, "--expert-profile", help="With --vram: place the most used experts first, from a file saved by --save-expert-profile."),
    save_expert_profile: Optional[Path] = typer.Option(None, "--save-expert-profile", help="With --vram: save this run's expert popularity (plus --expert-profile's) for later runs."),
    show_stats: bool = typer.Option(False, "--stats", help="With --vram: print expert cache statistics (hit rate, prefetch, GB/s, stalls) to stderr."),
    prompt_cache: Optional[Path] = typer.Option(None, "--prompt-cache", help="Save the state after the document to this file; later runs with the same document and model skip its prefill."),
    kv_cache: str = KvOpt,
):
    """Answer one prompt, streaming tokens to stdout and stats to stderr.

    [dim]cat report.txt | kimi-local run model.gguf -p "Summarise this"[/]
    """
    from kimi_local.cache import ContextOverflow
    from kimi_local.generate import Stats, generate
    from kimi_local.ui import err_console, stats_line, token_progress

    params = _sampling(temperature, top_k, top_p, min_p, repeat_penalty, seed)
    doc = _read_document(file)
    if prompt is None and not doc:
        fail("give a prompt with -p/--prompt, or pipe a document on stdin", 2)
    text = "\n\n".join(x for x in (doc, prompt) if x)
    m = load_model(model, device, load_in_4bit, kv_cache, vram)
    if vram is not None:
        _offload_experts(m, vram, ctx, expert_policy, expert_profile, kv_cache)
    elif save_expert_profile or expert_profile or show_stats:
        fail("--expert-profile, --save-expert-profile and --stats need --vram", 2)
    cache = m.new_cache(ctx)
    ids = m.chat_ids(text, system)
    room = cache.max_ctx - max(1, min(max_tokens, 16))
    if len(ids) > room:
        fail(f"the input is {len(ids)} tokens but the context limit is {cache.max_ctx}: "
             f"{len(ids) - room} tokens too long (shorten it or raise --ctx)")
    stats = Stats()
    if prompt_cache is not None:
        ids = _apply_prompt_cache(m, cache, ids, doc, system, prompt_cache, stats)
    dec = m.tokenizer.decode_stream()
    pieces = []
    try:
        with token_progress("prefill", len(ids)) as prog:
            gen = generate(m.net, cache, ids, params, max_tokens, m.tokenizer.stop_ids, stats, progress=prog)
            first = next(gen)  # the prefill runs here, under the progress bar
        for tok in itertools.chain([first], gen):
            if tok in m.tokenizer.stop_ids:
                break
            piece = dec.push(tok)
            if piece:
                pieces.append(piece)
                if not json_out:
                    sys.stdout.write(piece)
                    sys.stdout.flush()
    except ContextOverflow as e:
        fail(str(e))
    tail = dec.flush()
    if tail:
        pieces.append(tail)
        if not json_out:
            sys.stdout.write(tail)
    if json_out:
        print(json.dumps({
            "text": "".join(pieces), "prompt_tokens": stats.prefill_tokens,
            "completion_tokens": stats.decode_tokens, "prefill_s": round(stats.prefill_s, 4),
            "decode_s": round(stats.decode_s, 4), "prefill_tok_s": round(stats.prefill_tps, 2),
            "decode_tok_s": round(stats.decode_tps, 2),
        }, ensure_ascii=False))
    else:
        sys.stdout.write("\n")
        sys.stdout.flush()
        err_console.print(f"[dim]{stats_line(stats)}[/]")
    experts = getattr(m.net, "expert_stats", None)
    if experts is not None and show_stats:
        err_console.print(f"[dim]{experts.summary()}[/]")
    if save_expert_profile is not None:
        m.net.experts.save_profile(save_expert_profile, m.net.experts.profile)


def _apply_prompt_cache(m, cache, ids, doc, system, path: Path, stats) -> list[int]:
    """--prompt-cache: restore (or prefill and save) the state after the document; returns the
    ids still to prefill. Reports on stderr whether the file was used."""
    from kimi_local.session import document_prefix_len, use_prompt_cache
    from kimi_local.ui import err_console, token_progress, warn

    if not doc:
        warn("--prompt-cache needs a document (stdin or --file); not used")
        return ids
    n = document_prefix_len(m.tokenizer, ids, doc, system)
    with token_progress("prefill", n) as prog:
        rest, status = use_prompt_cache(m, cache, ids, n, path, stats, prog)
    err_console.print(f"[dim]prompt cache {path}: {status}[/]", soft_wrap=True)
    return rest


def _offload_experts(m, vram: str, ctx, policy: str, profile: Optional[Path], kv_cache: str = "bf16"):
    from kimi_local.offload import apply_offload, parse_size

    try:
        return apply_offload(m, parse_size(vram), ctx, policy, profile, kv_bytes_per_value=1 if kv_cache == "fp8" else 2)
    except ModelError as e:
        fail(str(e))


# ---- demo ------------------------------------------------------------------------------------
@app.command()
def demo(device: str = DeviceOpt, seed: int = typer.Option(0, "--seed", help="Seed of the tiny model.")):
    """Make a tiny random-weight Kimi-Linear model (once, in the cache dir) and run a short chat
    exchange and a piped-document run on it. The text is gibberish: the weights are random."""
    import time

    from rich.console import Console

    from kimi_local.generate import SamplingParams, Stats, generate
    from kimi_local.tiny import tiny_checkpoint_dir
    from kimi_local.ui import stats_line

    out = Console(highlight=False, soft_wrap=True)
    t0 = time.perf_counter()
    path = tiny_checkpoint_dir(seed)
    out.print(f"[bold]tiny model[/] {path} ({time.perf_counter() - t0:.1f} s)")
    m = load_model(path, device)
    params = SamplingParams(temperature=0.8, top_k=40, seed=1)
    cache = m.new_cache()
    tok = m.tokenizer
    turns = ["Hello! Who are you?", "Tell me about linear attention."]
    msgs = [{"role": "system", "content": "You are a helpful assistant."}]
    for k, user in enumerate(turns):
        msgs.append({"role": "user", "content": user})
        new = tok.encode_chat(msgs, add_generation_prompt=True) if k == 0 else \
            tok.encode_chat_continuation(msgs[-1:], add_generation_prompt=True)
        stats = Stats()
        ids = [t for t in generate(m.net, cache, new, params, 24, tok.stop_ids, stats) if t not in tok.stop_ids]
        dec = tok.decode_stream()
        answer = "".join(dec.push(t) for t in ids) + dec.flush()
        msgs.append({"role": "assistant", "content": answer})
        out.print(f"[bold cyan]user>[/] {user}\n[bold green]kimi>[/] {answer!r}")
        out.print(f"[dim]  {stats_line(stats)}; prefilled only the {len(new)} new tokens, "
                  f"{cache.pos} in context[/]")
    doc = "Kimi Linear is a hybrid linear attention architecture. " * 20
    stats = Stats()
    answer = "".join(m.stream(doc + "\n\nSummarise this.", max_tokens=24, params=params, stats=stats))
    out.print(f"[bold cyan]piped document[/] ({len(doc)} chars) -> [bold green]{answer!r}[/]")
    out.print(f"[dim]  {stats_line(stats)}[/]")
    out.print("[bold]demo ok[/]")


# ---- chat ------------------------------------------------------------------------------------
@app.command()
def chat(
    model: Path = typer.Argument(..., help="HF model directory or .gguf file."),
    system: Optional[str] = typer.Option(None, "--system", "-s", help="System prompt."),
    session: Optional[Path] = typer.Option(None, "--session", help="Resume from this session file when it exists; save to it on exit."),
    max_tokens: int = typer.Option(1024, "--max-tokens", "-n", min=1, help="Most tokens per answer."),
    temperature: float = TempOpt, top_k: int = TopKOpt, top_p: float = TopPOpt, min_p: float = MinPOpt,
    repeat_penalty: float = RepOpt, seed: Optional[int] = SeedOpt,
    device: str = DeviceOpt, ctx: Optional[int] = CtxOpt,
    vram: Optional[str] = typer.Option(None, "--vram", help="Memory budget (e.g. 24GB): routed experts that do not fit live in host RAM and stream in (as in run)."),
    load_in_4bit: bool = typer.Option(False, "--load-in-4bit", help="HF dirs only: quantize linear weights to NF4 with bitsandbytes while loading."),
    kv_cache: str = KvOpt,
):
    """Chat in a REPL. Each turn prefills only its new tokens: the recurrent state carries over.

    [dim]Enter sends, Esc-Enter (or Alt-Enter) inserts a newline, Ctrl-C stops an answer, Ctrl-D
    quits; /help lists the commands.[/]
    """
    from kimi_local.chat import run_chat
    from kimi_local.session import SessionError

    params = _sampling(temperature, top_k, top_p, min_p, repeat_penalty, seed)
    vram_bytes = _vram_budget(vram)
    m = load_model(model, device, load_in_4bit, kv_cache, vram)
    if vram is not None:
        _offload_experts(m, vram, ctx, "lfu", None, kv_cache)
    try:
        code = run_chat(m, params, max_tokens, system, ctx, session, vram_bytes, model.name)
    except SessionError as e:
        fail(str(e))
    raise typer.Exit(code)


def _vram_budget(text: Optional[str]) -> Optional[int]:
    if text is None:
        return None
    from kimi_local.quant.recipe import parse_size

    try:
        return parse_size(text)
    except ModelError as e:
        fail(f"--vram: {e}", 2)


# ---- convert / info ----------------------------------------------------------------------------
@app.command()
def convert(
    src: Path = typer.Argument(..., help="Hugging Face model directory (config.json + safetensors)."),
    out: Path = typer.Argument(..., help="Output .gguf file."),
    quant: Optional[str] = typer.Option(None, "--quant", help="One type for all matrices: Q2_K Q3_K Q4_K Q5_K Q6_K Q8_0 F16 BF16 F32."),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="Mixed preset: Q2_K Q3_K_M Q4_K_M (default) Q5_K_M Q6_K Q8_0 BF16 F16 F32."),
    fit_budget: Optional[str] = typer.Option(None, "--fit", help="Memory budget (24GB, 24GiB): the best recipe whose weights + state + workspace fit."),
    ctx: int = typer.Option(131072, "--ctx", min=1, help="Context length whose MLA cache --fit reserves."),
    device: str = DeviceOpt,
    force: bool = typer.Option(False, "--force", help="Overwrite OUT if it exists."),
):
    """Convert an HF checkpoint to a llama.cpp-compatible kimi-linear GGUF, streaming tensor by tensor.

    [dim]kimi-local convert ~/models/Kimi-Linear-48B-A3B-Instruct kimi.gguf --fit 24GB[/]
    """
    from kimi_local.api import resolve_device
    from kimi_local.quant.convert import choose_recipe
    from kimi_local.quant.convert import convert as run_convert
    from kimi_local.quant.recipe import fmt_bytes
    from kimi_local.ui import err_console
    from kimi_local.weights import HFCheckpoint

    try:
        chosen, mem = choose_recipe(HFCheckpoint(src).cfg, quant, recipe, fit_budget, ctx)
        if mem is not None:
            err_console.print(f"--fit: recipe [bold]{chosen.name}[/] needs {fmt_bytes(mem.total)} at --ctx {ctx} "
                              f"(weights {fmt_bytes(mem.weights)})")
        rep = run_convert(src, out, chosen, device=resolve_device(device), force=force,
                          progress=sys.stderr.isatty())
    except ValueError as e:
        fail(str(e), 2)
    except ModelError as e:
        fail(str(e))
    except KeyboardInterrupt:
        fail("interrupted; no output file was written", 130)
    mbs = rep.nbytes / 1e6 / max(rep.seconds, 1e-9)
    types = ", ".join(f"{n} {q}" for q, n in sorted(rep.types.items(), key=lambda kv: -kv[1]))
    err_console.print(f"wrote {rep.out} ({rep.recipe}): {rep.n_tensors} tensors [{types}], "
                      f"{fmt_bytes(rep.nbytes)} in {rep.seconds:.1f} s ({mbs:.1f} MB/s)")


@app.command()
def info(
    file: Path = typer.Argument(..., help="A .gguf file (first split of a split set) or an HF model directory."),
    ctx: Optional[list[int]] = typer.Option(None, "--ctx", min=1, help="Context length(s) for the memory estimate (default 131072 and 1048576)."),
):
    """Architecture, tensor types, size by group and estimated memory of a model file."""
    from rich.console import Console

    from kimi_local.info import render, summarize

    try:
        s = summarize(file)
    except ModelError as e:
        fail(str(e))
    out = Console(highlight=False)
    for table in render(s, ctx or [131072, 1048576]):
        out.print(table)


# ---- bench -----------------------------------------------------------------------------------
def _ints(text: str) -> list[int]:
    """"4k,128k,1m" -> [4096, 131072, 1048576]."""
    mult = {"k": 1024, "m": 1024 * 1024}
    try:
        return [int(x[:-1]) * mult[x[-1]] if x[-1] in mult else int(x) for x in text.lower().split(",") if x]
    except ValueError:
        fail(f"not a list of token counts: {text!r} (e.g. 4k,128k,1m)", 2)


@app.command()
def bench(
    model: Optional[Path] = typer.Argument(None, help="HF directory or .gguf file (omit with --synthetic)."),
    synthetic: bool = typer.Option(False, "--synthetic", help="Full-size Kimi-Linear with random blocks, built in GPU memory."),
    recipe: str = typer.Option("Q4_K_M", "--recipe", help="Quantization recipe of the synthetic model: Q2_K Q3_K_M Q4_K_M Q5_K_M Q6_K Q8_0 BF16, or Q3_K / Q4_K / Q5_K for one type everywhere (llama.cpp's uniform GGUFs)."),
    device: str = DeviceOpt,
    contexts: str = typer.Option("4k,128k,1m", "--contexts", help="Decode depths to time (tokens in context)."),
    prompts: str = typer.Option("8k,128k", "--prompts", help="Prompt lengths for prefill."),
    decode_tokens: int = typer.Option(64, "--decode-tokens", min=1, help="Tokens decoded per depth."),
    chunks: str = typer.Option("auto", "--chunk", help="Prefill chunk(s) in tokens; a list times each (e.g. 2048,4096,8192). auto: the engine's own (up to 16384, fitted to the free GPU memory or --vram)."),
    kv_cache: str = typer.Option("bf16", "--kv-cache", help="MLA latent cache type: bf16 or fp8."),
    zipf: float = typer.Option(0.0, "--zipf", help="Skew the synthetic routing by Zipf(s) popularity (0 = uniform)."),
    vram: Optional[str] = typer.Option(None, "--vram", help="Enforced GPU memory budget, e.g. 24GB."),
    graph: bool = typer.Option(True, "--graph/--no-graph", help="Replay decode steps from a CUDA graph."),
    offload: bool = typer.Option(True, "--offload/--no-offload", help="With --vram: keep routed experts in host RAM with a GPU expert cache."),
    policy: str = typer.Option("lfu", "--expert-policy", help="With --vram: expert cache eviction, lfu or lru."),
    prefetch: bool = typer.Option(True, "--prefetch/--no-prefetch", help="With --vram: prefetch the next layer's experts."),
    expert_loader: str = typer.Option("device", "--expert-loader", help="With --vram: where cache decisions run: device (inside the decode graph) or host (one sync per MoE layer)."),
    pdl_ab: bool = typer.Option(False, "--pdl-ab", help="Time each decode depth three ways: kernels chained by programmatic dependent launch with each GEMV prefetching its own weights into L2 before the wait, PDL alone (the default), and without PDL."),
    variants: Optional[List[str]] = typer.Option(None, "--variant", help="A/B in one run: also time each decode depth and prompt with these environment settings (repeatable), e.g. --variant KIMI_LOCAL_X8=0 --variant 'KIMI_LOCAL_PREFETCH_NEXT=kda,mla;KIMI_LOCAL_PDL=1'. Each variant captures its own decode graph; rows name their variant."),
    llama_cpp: bool = typer.Option(False, "--llama-cpp", help="Also time llama.cpp (llama-cpp-python) on the same GGUF file, same depths and prompts, and print our speed as a multiple of its (on CUDA it needs a CUDA build of llama-cpp-python)."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
):
    """Decode tok/s at several depths, prefill tok/s, peak VRAM, GB/s and % of the HBM roofline.

    [dim]kimi-local bench --synthetic --recipe Q4_K_M --contexts 4k,128k --prompts 8k[/]
    """
    import torch

    from kimi_local import bench as B
    from kimi_local.api import resolve_device

    if kv_cache not in ("bf16", "fp8"):
        fail("--kv-cache must be bf16 or fp8", 2)
    try:
        prefill_variants = B.parse_variants(variants) if variants else None
        decode_variants = B.PDL_VARIANTS if pdl_ab else prefill_variants
    except ValueError as e:
        fail(str(e), 2)
    if not synthetic and model is None:
        fail("give a MODEL path or --synthetic", 2)
    if llama_cpp:
        if synthetic or model.suffix != ".gguf":
            fail("--llama-cpp times llama.cpp on the same file: give a .gguf MODEL (kimi-local convert makes one)", 2)
        try:
            import llama_cpp as _  # noqa: F401
        except ImportError:
            fail("--llama-cpp needs llama-cpp-python: pip install llama-cpp-python "
                 "(for the GPU: CMAKE_ARGS=-DGGML_CUDA=on pip install llama-cpp-python)", 2)
    dev = resolve_device(device)
    if vram:
        from kimi_local.engine import apply_vram_budget

        apply_vram_budget(dev, _vram_budget(vram))
    if synthetic:
        if dev.type != "cuda":
            fail("--synthetic builds the full-size model in GPU memory: it needs --device cuda", 2)
        from kimi_local.api import build_net
        from kimi_local.config import KimiConfig
        from kimi_local.quant.recipe import QUANT_TYPES, RECIPES, get_recipe, uniform

        cfg = KimiConfig()
        store = "cpu" if vram and offload else None
        try:
            # a quant type that is not also a recipe name (Q3_K, Q4_K, Q5_K): that type everywhere
            uni = recipe.upper() in QUANT_TYPES and recipe.upper() not in RECIPES
            r = uniform(recipe) if uni else get_recipe(recipe)
            w = B.synthetic_weights(cfg, r.qtype, dev, zipf=zipf, expert_device=store)
            net = build_net(cfg, w, dev, torch.bfloat16, kv_cache=kv_cache, use_graph=graph, expert_store=store)
            if store:
                from kimi_local.offload import apply_offload

                apply_offload(net, _vram_budget(vram), max(_ints(contexts) + _ints(prompts)) + decode_tokens + 8,
                              policy, kv_bytes_per_value=1 if kv_cache == "fp8" else 2, prefetch=prefetch,
                              loader=expert_loader)
        except (ModelError, torch.cuda.OutOfMemoryError) as e:
            fail(f"the synthetic {recipe} model does not fit: {e}")
        del w
        torch.cuda.empty_cache()  # hand back what building and repacking freed (see apply_vram_budget)
        label = f"synthetic {recipe}" + (f" zipf={zipf}" if zipf else "") + (f" offload {policy}" if store else "")
    else:
        import kimi_local

        try:
            lm = kimi_local.load(model, device=str(dev), kv_cache=kv_cache, use_graph=graph) if dev.type == "cuda" \
                else kimi_local.load(model, device="cpu")
        except ModelError as e:
            fail(str(e))
        net, cfg, label = lm.net, lm.cfg, str(model)
    res = B.run_bench(net, cfg, _ints(contexts), _ints(prompts), decode_tokens,
                      [None] if chunks.strip().lower() == "auto" else _ints(chunks),
                      1 if kv_cache == "fp8" else 2, label, decode_variants=decode_variants,
                      prefill_variants=prefill_variants)
    if llama_cpp:
        del net, lm  # its memory goes back before llama.cpp loads the file
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        B.add_baseline(res, *B.llama_cpp_rows(model, _ints(contexts), _ints(prompts), decode_tokens, cfg.vocab_size,
                                              gpu=dev.type == "cuda"))
    print(B.to_json(res) if json_out else B.format_table(res))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
