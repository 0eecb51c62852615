"""The CUDA path: the same model as `model.py`, on the Triton kernels of `kernels/`.

`GpuKimi(cfg, weights)` takes canonical weights (dense tensors or QTensors, on any device),
moves them to the GPU once (quantized blocks repacked losslessly for the kernels, q/k/v and the
small KDA projections fused row-wise, KDA's low-rank f_b / g_b as dense bf16), and overrides the three mixer/FFN blocks:
  prefill (T > 1): quantized GEMMs, causal-conv kernel + fla `chunk_kda`, MLA through fused attention
                   (cuDNN; PyTorch's memory-efficient kernel as the fallback) over keys decompressed one
                   key block at a time, blocks merged by log-sum-exp, grouped-GEMM MoE;
  decode  (T = 1): GEMVs, the fused KDA step kernel on the persistent fp32 state (f_b / g_b gates computed
                   inside it), split-sequence MLA
                   over the latent cache (W_UK / W_UV absorbed in the first and last of its three
                   launches), fused MoE through expert slots; the whole step is
                   captured in one CUDA graph per cache (`DecodeGraph`), replayed per token,
                   its Triton kernels chained by programmatic dependent launch (`kernels/pdl.py`).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from kimi_local.cache import KimiCache
from kimi_local.generate import eager_steps, lookahead_steps
from kimi_local.kernels import naive, pdl
from kimi_local.kernels.kda import causal_conv_prefill, kda_decode_step, kda_prefill
from kimi_local.kernels.mla import mla_absorb_write, mla_cache_write, mla_decode
from kimi_local.kernels.moe import moe_decode, moe_prefill
from kimi_local.kernels.norm import add_norm_x8n, rms_norm as fused_rms_norm
from kimi_local.kernels.quant_matmul import (QT_ID, WORD_QTYPES, X8_GROUP, NormedX8, embed_gpu, qlinear,
                                             quantize_x8, repack, x8_default, x8_words, x8n_words)
from kimi_local.kernels.router import norm_router_route, route_tokens
from kimi_local.kernels.sample import greedy_next
from kimi_local.model import KimiLinear

KERNEL_QTYPES = {q for q in QT_ID if q != "BF16"}


_VRAM_BUDGET: dict[int, int] = {}  # device index -> enforced budget (bytes), see apply_vram_budget


def apply_vram_budget(device, nbytes: int) -> None:
    """Enforce a GPU memory budget through the caching allocator (allocations past it raise
    OutOfMemoryError), so a 24 GB card can be reproduced on a bigger one."""
    from kimi_local.config import ModelError

    total = torch.cuda.get_device_properties(device).total_memory
    if nbytes > total:
        raise ModelError(f"--vram {nbytes / 2**30:.1f} GiB is more than this GPU has ({total / 2**30:.1f} GiB)")
    index = torch.device(device).index or 0
    _expandable_segments()
    torch.cuda.set_per_process_memory_fraction(nbytes / total, index)
    _VRAM_BUDGET[index] = nbytes


def _expandable_segments() -> None:
    """Under a tight budget the caching allocator's fragmentation decides what fits (run 7: 2.14 GiB
    reserved but unallocated after the weights were built and repacked): grow segments by 2 MiB
    pages instead, so freed memory is unmapped and reused at any size. Left alone if the user set
    PYTORCH_CUDA_ALLOC_CONF / PYTORCH_ALLOC_CONF; applies to segments created from now on."""
    import os

    if os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or os.environ.get("PYTORCH_ALLOC_CONF"):
        return
    try:
        torch.cuda.memory._set_allocator_settings("expandable_segments:True")
    except (AttributeError, RuntimeError):  # older torch / unsupported platform: plain segments
        pass


def budget_of(device) -> int | None:
    """The --vram budget enforced on this CUDA device (bytes), or None."""
    dev = torch.device(device)
    return _VRAM_BUDGET.get(dev.index or 0) if dev.type == "cuda" else None


def _is_q(w) -> bool:
    return hasattr(w, "qtype") and not isinstance(w, torch.Tensor)


class GpuWeight:
    """One matrix [N, K] for the kernels: packed quantized rows, or a dense bf16 matrix (types the
    kernels do not read — F32/F16/Q4_0... — are dequantized to bf16 once, at load)."""

    def __init__(self, w, device, dense_dtype=torch.bfloat16):
        self.N, self.K = w.shape[-2], w.shape[-1]
        self.qtype, self.data, self.dense = None, None, None
        if _is_q(w) and w.qtype in KERNEL_QTYPES:
            self.qtype = w.qtype
            self.data = repack(w.data.to(device), w.qtype).contiguous()
        else:
            d = w.dequantize(torch.float32) if _is_q(w) else w
            self.dense = d.to(device=device, dtype=dense_dtype).contiguous()

    @classmethod
    def cat(cls, ws: list, device) -> "GpuWeight":
        """Row-wise concatenation (one GEMV instead of several) when all share a quantized type."""
        if all(_is_q(w) for w in ws) and len({w.qtype for w in ws}) == 1:
            from kimi_local.quant.formats import QTensor

            data = torch.cat([w.data.to(device) for w in ws], 0)
            return cls(QTensor(data, ws[0].qtype, (sum(w.shape[0] for w in ws), ws[0].shape[1])), device)
        dense = [w.dequantize(torch.float32) if _is_q(w) else w.float() for w in ws]
        return cls(torch.cat([d.to(device) for d in dense], 0), device)

    def matmul(self, x: torch.Tensor, out: torch.Tensor | None = None, x8: torch.Tensor | None = None) -> torch.Tensor:
        """x @ W^T; x8: x's int8-activation buffer (one token) when the caller has it (quant_matmul.qgemv1)."""
        if self.dense is not None:
            y = x.to(self.dense.dtype) @ self.dense.t()
            return y if out is None else out.copy_(y)
        return qlinear(x, self.data, self.qtype, self.N, out=out, x8=x8)

    @property
    def kernel_form(self):
        """(data, qtype) as the MoE kernels take it (dense -> BF16 rows)."""
        if self.dense is not None:
            return repack(self.dense.to(torch.bfloat16), "BF16"), "BF16"
        return self.data, self.qtype

    @property
    def nbytes(self) -> int:
        return (self.data if self.dense is None else self.dense).numel() * (1 if self.dense is None else self.dense.element_size())


def expert_pool(w, device, store: str | None = None) -> tuple[torch.Tensor, str]:
    """A stacked expert tensor [E, rows, cols] -> (uint8 [E, rows, packed_row_bytes], qtype),
    repacked on `device`; store="cpu" keeps the result in pinned host memory (expert offloading:
    the GPU then holds only a slot pool, see kimi_local.offload)."""
    if _is_q(w) and w.qtype in KERNEL_QTYPES:
        pool, qt = repack(w.data.to(device), w.qtype).contiguous(), w.qtype
    else:
        d = w.dequantize(torch.float32) if _is_q(w) else w
        pool, qt = repack(d.to(device=device, dtype=torch.bfloat16), "BF16").contiguous(), "BF16"
    if store == "cpu":
        pool = torch.empty(pool.shape, dtype=pool.dtype, pin_memory=torch.cuda.is_available()).copy_(pool)
    return pool, qt


class GpuExperts:
    """All routed experts resident on the GPU in kernel layout (slot = expert id)."""

    def __init__(self, pools: dict[int, tuple]):
        self._pools = pools  # layer -> ((gate, up, down) uint8 pools, (qtypes))

    def pools(self, layer: int):
        return self._pools[layer][0]

    def qtypes(self, layer: int):
        return self._pools[layer][1]

    def prepare(self, layer: int, ids: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
        return ids


def _same_qtype(ws: list) -> bool:
    """All quantized with one kernel type: their rows can be concatenated into one matrix (one GEMV)."""
    return all(_is_q(w) for w in ws) and len({w.qtype for w in ws}) == 1 and ws[0].qtype in KERNEL_QTYPES


def prepare_weights(cfg, weights: dict, device, expert_store: str | None = None,
                    embed_store: str | None = None) -> tuple[dict, GpuExperts]:
    """Canonical weights -> GPU weights. Linear weights become GpuWeight (fused where possible),
    vectors become fp32/bf16 device tensors, routed experts become kernel pools. Consumes `weights`
    (entries are removed as they are converted) so that peak memory is the model plus one tensor.
    The token embedding keeps its file type (bf16 if it is a float tensor); embed_store="cpu" keeps
    it in (pinned) host memory: only the T rows of a call are copied, see GpuKimi._embed."""
    dev = torch.device(device)
    out, pools = {}, {}
    vec = lambda n, dt=torch.float32: weights.pop(n).to(dev, dt).contiguous()  # noqa: E731
    emb = weights.pop("token_embd.weight")
    home = torch.device("cpu") if embed_store == "cpu" else dev
    if _is_q(emb) and emb.qtype in WORD_QTYPES and home == dev:
        emb = GpuWeight(emb, dev)  # packed: one gather + dequantize launch per step (quant_matmul.embed_gpu)
    else:
        emb = emb.to(home, torch.bfloat16) if isinstance(emb, torch.Tensor) else emb.to(home)
    if home.type == "cpu" and dev.type == "cuda":
        data = emb if isinstance(emb, torch.Tensor) else emb.data
        pinned = data.pin_memory()
        emb = pinned if isinstance(emb, torch.Tensor) else type(emb)(pinned, emb.qtype, emb.shape)
    out["token_embd.weight"] = emb
    out["output_norm.weight"] = vec("output_norm.weight")
    out["output.weight"] = GpuWeight(weights.pop("output.weight"), dev)
    for i in range(cfg.num_hidden_layers):
        b = f"blk.{i}."
        g = lambda n: weights.pop(b + n)  # noqa: E731
        out[b + "attn_norm.weight"] = vec(b + "attn_norm.weight")
        out[b + "ffn_norm.weight"] = vec(b + "ffn_norm.weight")
        out[b + "attn_output.weight"] = GpuWeight(g("attn_output.weight"), dev)
        if cfg.is_kda(i):
            qkv = [g("attn_q.weight"), g("attn_k.weight"), g("attn_v.weight")]
            fgb = [g("ssm_f_a.weight"), g("ssm_g_a.weight"), g("ssm_beta.weight")]
            if _same_qtype(qkv + fgb):  # one GEMV reads all six projections of h
                out[b + "qkvfgb"] = GpuWeight.cat(qkv + fgb, dev)
            else:
                out[b + "qkv"], out[b + "fgb_a"] = GpuWeight.cat(qkv, dev), GpuWeight.cat(fgb, dev)
            # f_b, g_b [P, K] as dense bf16: the decode step computes f = f_b f_a(h) and z = g_b g_a(h) inside the
            # KDA kernel (no GEMV launch for them); prefill multiplies them with torch
            for n in ("ssm_f_b.weight", "ssm_g_b.weight"):
                t = g(n)
                out[b + n] = (t.dequantize(torch.float32) if _is_q(t) else t).to(dev, torch.bfloat16).contiguous()
            out[b + "conv"] = torch.stack([g(f"ssm_conv1d_{n}.weight").float() for n in "qkv"]).to(dev).contiguous()
            out[b + "ssm_a"] = vec(b + "ssm_a")
            out[b + "ssm_dt.bias"] = vec(b + "ssm_dt.bias")
            out[b + "ssm_norm.weight"] = vec(b + "ssm_norm.weight")
        else:
            q_kv = [g("attn_q.weight"), g("attn_kv_a_mqa.weight")]
            if _same_qtype(q_kv):  # q and the latent projection in one GEMV
                out[b + "attn_q_kv_a"] = GpuWeight.cat(q_kv, dev)
            else:
                out[b + "attn_q.weight"], out[b + "attn_kv_a_mqa.weight"] = (GpuWeight(t, dev) for t in q_kv)
            out[b + "attn_kv_a_norm.weight"] = vec(b + "attn_kv_a_norm.weight")
            out[b + "attn_k_b.weight"] = vec(b + "attn_k_b.weight", torch.bfloat16)  # [H, R, Dn]
            out[b + "attn_v_b.weight"] = vec(b + "attn_v_b.weight", torch.bfloat16)  # [H, Dv, R]
        if not cfg.is_moe(i):
            for n in ("gate", "up", "down"):
                out[b + f"ffn_{n}.weight"] = GpuWeight(g(f"ffn_{n}.weight"), dev)
            continue
        out[b + "ffn_gate_inp.weight"] = vec(b + "ffn_gate_inp.weight")
        out[b + "exp_probs_b.bias"] = vec(b + "exp_probs_b.bias")
        gp, gq = expert_pool(g("ffn_gate_exps.weight"), dev, expert_store)
        up, uq = expert_pool(g("ffn_up_exps.weight"), dev, expert_store)
        dp, dq = expert_pool(g("ffn_down_exps.weight"), dev, expert_store)
        pools[i] = ((gp, up, dp), (gq, uq, dq))
        if cfg.num_shared_experts:
            sh = [GpuWeight(g(f"ffn_{n}_shexp.weight"), dev) for n in ("gate", "up", "down")]
            forms = [s.kernel_form for s in sh]
            out[b + "shexp"] = tuple(f[0] for f in forms), tuple(f[1] for f in forms)
            out[b + "shexp_w"] = sh
    return out, GpuExperts(pools)


class GpuKimi(KimiLinear):
    """KimiLinear on CUDA with the Triton kernels; activations bf16, recurrent state fp32."""

    def __init__(self, cfg, weights: dict, device="cuda", dtype=torch.bfloat16, kv_dtype=torch.bfloat16,
                 use_graph: bool = True, prefill_chunk: int = 16384, expert_store: str | None = None,
                 embed_store: str | None = "auto"):
        """expert_store="cpu": routed experts stay in pinned host memory, for kimi_local.offload.
        embed_store="cpu": the token embedding stays in pinned host memory (0.29 GiB at Q6_K); "auto"
        does that under an enforced --vram budget (apply_vram_budget), else keeps it on the GPU."""
        if embed_store == "auto":
            embed_store = "cpu" if budget_of(device) is not None else None
        w, experts = prepare_weights(cfg, weights, device, expert_store, embed_store)
        super().__init__(cfg, w, device, dtype)
        self.experts = experts
        self.kv_dtype = kv_dtype
        self.use_graph = use_graph
        self.prefill_chunk = self.max_prefill_chunk = prefill_chunk
        self.mla_key_block = 4 * prefill_chunk  # keys decompressed at a time by MLA prefill
        self._graphs: dict[int, DecodeGraph] = {}

    def default_ctx(self, reserve: int = 1536 << 20) -> int:
        """The largest context whose MLA cache fits the free GPU memory (within an enforced --vram
        budget), keeping `reserve` bytes for prefill activations; at most the model's limit."""
        free, total = torch.cuda.mem_get_info(self.device)
        budget = _VRAM_BUDGET.get(self.device.index or 0)
        if budget is not None:
            free = min(free, budget - torch.cuda.memory_reserved(self.device))
        per_token = self.cfg.latent_dim * len(self.cfg.mla_layer_ids) * (1 if self.kv_dtype == torch.float8_e4m3fn else 2)
        per_token += 4 if self.kv_dtype == torch.float8_e4m3fn else 0  # fp8 row scales
        n = max(0, free - reserve - self.cfg.kda_state_bytes()) // max(1, per_token)
        return int(min(self.cfg.model_max_length, n))

    def new_cache(self, max_ctx: int | None = None, preallocate: bool = True) -> KimiCache:
        if max_ctx is None:
            max_ctx = self.default_ctx()
            if max_ctx < 1024:
                from kimi_local.config import ModelError

                raise ModelError(f"only {max_ctx} tokens of context fit in the GPU memory left after the weights; "
                                 "use a smaller recipe (kimi-local convert --recipe Q3_K_M / --fit), "
                                 "--kv-cache fp8, or --vram with expert offloading")
        c = KimiCache(self.cfg, self.device, self.dtype, max_ctx=max_ctx, preallocate=True, kv_dtype=self.kv_dtype)
        c.pos_dev = torch.zeros(1, dtype=torch.int32, device=self.device)  # pos, read by graph replays
        c.len_dev = torch.ones(1, dtype=torch.int32, device=self.device)  # pos + 1
        self.fit_prefill_chunk()
        return c

    def fit_prefill_chunk(self, decode_reserve: int = 256 << 20) -> int:
        """The largest prefill chunk (max_prefill_chunk, halved down to 256) whose estimated activations
        (prefill_peak_bytes) fit what the weights and caches leave of the --vram budget (without one: of
        the GPU's free memory), keeping decode_reserve for the decode graph's warm-up and cuBLAS workspaces.
        Default 16384: 8192 was 1.16x the speed of 4096 for an 8K prompt (H200, session 4, run 1); 16384 is 1.11x
        8192 for a 128K prompt (21,423 vs 19,233 tok/s, H200, session 14, run 4)."""
        budget = budget_of(self.device)
        chunk = self.max_prefill_chunk
        free = None
        if budget is not None:
            free = budget - torch.cuda.memory_allocated(self.device) - decode_reserve
        elif torch.device(self.device).type == "cuda":  # what the GPU has free, plus what our allocator holds unused
            free = (torch.cuda.mem_get_info(self.device)[0] + torch.cuda.memory_reserved(self.device)
                    - torch.cuda.memory_allocated(self.device) - decode_reserve)
        if free is not None:
            while chunk > 256 and prefill_peak_bytes(self.cfg, chunk, 4 * chunk) > free:
                chunk //= 2
        self.prefill_chunk, self.mla_key_block = chunk, 4 * chunk
        return chunk

    # ---- top level ---------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, ids: torch.Tensor, cache: KimiCache, logits: str = "last"):
        T = ids.shape[0]
        if T == 1 and self.use_graph and logits != "all":
            out = self._graph(cache).step(ids)
            return None if logits == "none" else out
        cache.reserve(T)
        cache.pos_dev.fill_(cache.pos)
        cache.len_dev.fill_(cache.pos + T)
        out = self.body(self._embed(ids), cache, logits)
        cache.advance(ids.tolist())
        return out

    def _graph(self, cache: KimiCache) -> "DecodeGraph":
        g = self._graphs.get(id(cache))
        if g is None or g.cache is not cache:
            g = self._graphs[id(cache)] = DecodeGraph(self, cache)
        return g

    def decode_stream(self, cache: KimiCache, sampler, tok: int, max_tokens: int, stop_ids=frozenset()):
        """generate's decode loop on the device (DecodeGraph.stream): yields tok, then sampled ids, each fed to
        the cache first. None where the host must see each token before the next step (no graphs, or a host
        embedding table: the next row is gathered on the host): generate then feeds tokens one forward() at a
        time."""
        if not self.use_graph or self.embed_on_host:
            return None
        return self._graph(cache).stream(sampler, tok, max_tokens, stop_ids)

    def decode_body(self, inp: torch.Tensor, cache: KimiCache) -> torch.Tensor:
        """One token with device-side positions (cache.pos_dev / len_dev): the captured region.
        inp: token ids [1] on the device, or the embedded row [1, D] (host embedding table)."""
        return self.body(inp, cache, "last")

    def body(self, inp: torch.Tensor, cache: KimiCache, logits: str) -> torch.Tensor | None:
        """All layers for inp (ids [T], or their embedding rows [T, D] on the device) at the cache's
        device positions; does not advance the cache. The residual stream x is updated in place by
        the fused add + RMSNorm kernel (an embedded input is overwritten)."""
        cfg, w, eps = self.cfg, self.w, self.cfg.rms_norm_eps
        x = inp if inp.is_floating_point() else self._embed(inp)  # [T, D] residual stream
        # one token: each norm also writes its output as int8 activations (h8) for the GEMVs / MoE that read
        # it (dp4a word path, kernels/quant_matmul.py "x8"); KIMI_LOCAL_X8=0 keeps fp activations
        use_x8 = x.shape[0] == 1 and x8_default() and cfg.hidden_size % X8_GROUP == 0

        def new_h8():  # a norm output's int8-activation buffer, or None
            return torch.empty(x8_words(cfg.hidden_size), dtype=torch.int32, device=x.device) if use_x8 else None

        def norm(v, name, residual=None):  # -> (h, h8 or None); with residual: x += v, h = norm(x)
            h8 = new_h8()
            return fused_rms_norm(v, w[name], eps, residual=residual, x8_out=h8), h8

        # one token: a MoE layer's add + RMSNorm runs inside its router launch (router.norm_router_route);
        # KIMI_LOCAL_NORM_ROUTE=0 keeps them two launches
        fuse_route = x.shape[0] == 1 and os.environ.get("KIMI_LOCAL_NORM_ROUTE", "1") != "0"

        # resident experts (slot = expert id): the MoE kernels pick the experts from the router's logits
        # themselves, so the router launch has no top-k tail (KIMI_LOCAL_ROUTE_IN_MOE=0: the router does it)
        topk_in_moe = type(self.experts) is GpuExperts and os.environ.get("KIMI_LOCAL_ROUTE_IN_MOE", "1") != "0"

        def norm_route(v, i):  # -> (h, h8, routed); x += v, h = norm(x), the router's top-k of h (or its logits)
            b = f"blk.{i}."
            h8 = new_h8()
            h, ids, wts = norm_router_route(v, x, w[b + "ffn_norm.weight"], eps, w[b + "ffn_gate_inp.weight"],
                                            w[b + "exp_probs_b.bias"], cfg.num_experts_per_token,
                                            cfg.routed_scaling_factor, x8_out=h8,
                                            biased_weights=cfg.biased_router_weights, renormalize=cfg.moe_renormalize,
                                            topk=not topk_in_moe)
            return h, h8, (("logits", ids) if topk_in_moe else (ids, wts))

        # one token: the residual add + the next layer's attention RMSNorm run inside the FFN's down kernel, which
        # writes a normed x8 buffer (quant_matmul.NormedX8: the projection GEMV applies 1 / rms), where that layer's
        # projections all read x8 on the word path (KIMI_LOCAL_NORM_IN_DOWN=0: a norm launch). H200, session 23, run
        # 4 (interleaved, MLA under PDL): 713.4 / 605.5 tok/s at 4K / 128K against 708.8 / 600.8 (1M: 292.1 against
        # 297.4); run 3: 697.6 / 594.6 against 691.2 / 589.2. Session 15 measured +0.8-0.9 % on an H100 and -0.6 to
        # -1.0 % on an H200, with the Triton down kernel and no o-projection preload (docs/perf-notes.md)
        norm_in_down = use_x8 and os.environ.get("KIMI_LOCAL_NORM_IN_DOWN", "1") != "0"

        h, h8 = norm(x, "blk.0.attn_norm.weight")
        for i in range(cfg.num_hidden_layers):
            b = f"blk.{i}."
            a = self.kda(i, h, cache, h8) if cfg.is_kda(i) else self.mla(i, h, cache, h8)
            res_norm = None
            if norm_in_down and i + 1 < cfg.num_hidden_layers and self._reads_normed_x8(i + 1):
                x8n = torch.empty(x8n_words(cfg.hidden_size), dtype=torch.int32, device=x.device)
                res_norm = (x, w[f"blk.{i + 1}.attn_norm.weight"], x8n)
            if cfg.is_moe(i) and fuse_route:
                h, h8, routed = norm_route(a, i)
                m = self.moe(i, h, h8, routed, res_norm=res_norm)
            else:
                h, h8 = norm(a, b + "ffn_norm.weight", residual=x)
                m = (self.moe(i, h, h8, res_norm=res_norm) if cfg.is_moe(i)
                     else self.dense_mlp(i, h, h8, res_norm=res_norm))
            if res_norm is not None:  # x += m and the norm are done: x stands in for h (shape, dtype, device)
                h, h8 = x, NormedX8(res_norm[2], eps)
            elif i + 1 < cfg.num_hidden_layers:
                h, h8 = norm(m, f"blk.{i + 1}.attn_norm.weight", residual=x)
        if logits == "none":
            return None
        if logits == "last":
            x, m = x[-1:], m[-1:]
        h, h8 = norm(m, "output_norm.weight", residual=x)
        logits_out = torch.empty(h.shape[0], w["output.weight"].N, dtype=torch.float32, device=h.device)
        return w["output.weight"].matmul(h, out=logits_out, x8=h8)  # fp32 from the GEMV: no conversion launch

    def _reads_normed_x8(self, i: int) -> bool:
        """Layer i's attention input projections all run on the x8 word path (quantized, a WORD_QTYPES type), the
        only readers of a normed x8 buffer."""
        w, b = self.w, f"blk.{i}."
        if self.cfg.is_kda(i):
            names = ["qkvfgb"] if b + "qkvfgb" in w else ["qkv", "fgb_a"]
        else:
            names = ["attn_q_kv_a"] if b + "attn_q_kv_a" in w else ["attn_q.weight", "attn_kv_a_mqa.weight"]
        return all(isinstance(w[b + n], GpuWeight) and w[b + n].dense is None and w[b + n].qtype in WORD_QTYPES
                   and w[b + n].K % X8_GROUP == 0 for n in names)

    @property
    def embed_on_host(self) -> bool:
        e = self.w["token_embd.weight"]
        return not isinstance(e, GpuWeight) and e.device.type != self.device.type

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Embedding rows [T, D] on the device: gathered where the table lives (a host table sends
        only the T rows), dequantized on the device (a packed device table: one kernel)."""
        e = self.w["token_embd.weight"]
        if isinstance(e, GpuWeight):
            return embed_gpu(ids.to(e.data.device).reshape(-1), e.data, e.qtype, (e.N, e.K), dtype=self.dtype)
        rows = e[ids.to(e.device)]
        if isinstance(rows, torch.Tensor):
            return rows.to(self.device, self.dtype)
        return type(rows)(rows.data.to(self.device), rows.qtype, rows.shape).dequantize(self.dtype)

    # ---- KDA -----------------------------------------------------------------------------
    def kda(self, i: int, h: torch.Tensor, cache: KimiCache, h8: torch.Tensor | None = None) -> torch.Tensor:
        cfg, w, b = self.cfg, self.w, f"blk.{i}."
        T, H, K, P = h.shape[0], cfg.kda_num_heads, cfg.kda_head_dim, cfg.kda_dim
        if b + "qkvfgb" in w:  # one GEMV: [T, 3P + K + K + H], sliced (row-strided views)
            proj = w[b + "qkvfgb"].matmul(h, x8=h8)
            qkv, fgb = proj[:, : 3 * P], proj[:, 3 * P :]
        else:
            qkv = w[b + "qkv"].matmul(h, x8=h8)  # [T, 3P]
            fgb = w[b + "fgb_a"].matmul(h, x8=h8)  # [T, K + K + H]
        # fgb = [f_a(h) | g_a(h) | beta logits]: f = f_b f_a(h) (decay gate input) and z = g_b g_a(h) (output gate)
        f_b, g_b, beta_logit = w[b + "ssm_f_b.weight"], w[b + "ssm_g_b.weight"], fgb[:, 2 * K :]
        conv_w, tail, state = w[b + "conv"], cache.conv[i], cache.kda_state[i]
        if T == 1:
            o = torch.empty(P, dtype=self.dtype, device=h.device)
            # with int8 activations on (h8), the step also writes o as x8 for the o-projection's dp4a GEMV
            # (KIMI_LOCAL_KDA_X8=0: fp o-projection, for A/B runs)
            o8 = None
            if h8 is not None and K % X8_GROUP == 0 and os.environ.get("KIMI_LOCAL_KDA_X8", "1") != "0":
                o8 = torch.empty(x8_words(P), dtype=torch.int32, device=h.device)
            # f and z are computed inside the step from fg_a = [f_a(h) | g_a(h)] (no GEMV launch for f_b / g_b)
            kda_decode_step(qkv[0, :P], qkv[0, P : 2 * P], qkv[0, 2 * P :], None, beta_logit[0].contiguous(),
                            None, conv_w, tail, w[b + "ssm_a"], w[b + "ssm_dt.bias"], w[b + "ssm_norm.weight"],
                            state, o, eps=cfg.rms_norm_eps, out8=o8, fg_a=fgb[0, : 2 * K], f_b=f_b, g_b=g_b)
            return w[b + "attn_output.weight"].matmul(o[None], x8=o8)
        f = fgb[:, :K] @ f_b.to(fgb.dtype).t()  # [T, P] in the model dtype, as the decode step rounds them
        z = fgb[:, K : 2 * K] @ g_b.to(fgb.dtype).t()
        q, k, v = (causal_conv_prefill(qkv[:, j * P : (j + 1) * P], conv_w[j], tail[j]) for j in range(3))
        q = naive.l2norm(q.view(T, H, K)).to(self.dtype)
        k = naive.l2norm(k.view(T, H, K)).to(self.dtype)
        v = v.view(T, H, K).to(self.dtype)
        g = naive.kda_gate(f.view(T, H, K), w[b + "ssm_a"], w[b + "ssm_dt.bias"].view(H, K))
        beta = torch.sigmoid(beta_logit.float()).to(self.dtype)
        o, _ = kda_prefill(q, k, v, g, beta, state)  # state updated in place
        o = naive.gated_rms_norm(o, z.view(T, H, K), w[b + "ssm_norm.weight"], cfg.rms_norm_eps)
        return w[b + "attn_output.weight"].matmul(o.reshape(T, P).to(self.dtype))

    # ---- MLA -----------------------------------------------------------------------------
    def mla(self, i: int, h: torch.Tensor, cache: KimiCache, h8: torch.Tensor | None = None) -> torch.Tensor:
        cfg, w, b = self.cfg, self.w, f"blk.{i}."
        T, Hm, R, Dn = h.shape[0], cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_nope_head_dim
        if b + "attn_q_kv_a" in w:  # one GEMV: [T, Hm * Dq + R + Dr], sliced (row-strided views)
            proj = w[b + "attn_q_kv_a"].matmul(h, x8=h8)
            q, kv = proj[:, : Hm * cfg.qk_head_dim].view(T, Hm, cfg.qk_head_dim), proj[:, Hm * cfg.qk_head_dim :]
        else:
            q = w[b + "attn_q.weight"].matmul(h, x8=h8).view(T, Hm, cfg.qk_head_dim)
            kv = w[b + "attn_kv_a_mqa.weight"].matmul(h, x8=h8)  # [T, R + Dr]
        lat, lsc = cache.latent[i], getattr(cache, "latent_scale", {}).get(i)
        norm_w, eps = w[b + "attn_kv_a_norm.weight"], cfg.kv_a_norm_eps
        k_b, v_b = w[b + "attn_k_b.weight"], w[b + "attn_v_b.weight"]
        scale = naive.mla_scale(cfg.qk_head_dim)
        if T == 1:  # three launches: cache write + q_abs, split kernel, combine + o = W_UV ctx (+ o's x8)
            q_abs = mla_absorb_write(q[0], k_b, kv, norm_w, eps, lat, cache.pos_dev, lsc,
                                     out=torch.empty(Hm, R, dtype=self.dtype, device=h.device))  # W_UK^T q_nope
            Dv = v_b.shape[1]
            # int8 activations: the combine launch also writes o's x8 groups for the dp4a GEMV (+1.9 % decode at
            # 4K as a separate quantize launch, H200, session 6; KIMI_LOCAL_MLA_X8=0: the fp GEMV)
            x8_on = h8 is not None and os.environ.get("KIMI_LOCAL_MLA_X8", "1") != "0"
            o8 = (torch.empty(x8_words(Hm * Dv), dtype=torch.int32, device=h.device)
                  if x8_on and Dv % X8_GROUP == 0 else None)
            o = mla_decode(q_abs, q[0, :, Dn:], lat, cache.len_dev, scale, latent_scale=lsc, v_b=v_b, o8=o8,
                           o=torch.empty(1, Hm * Dv, dtype=self.dtype, device=h.device))  # [1, H*Dv]
            if x8_on and o8 is None:  # heads not in whole 16-groups: a separate quantize launch
                o8 = quantize_x8(o)
            return w[b + "attn_output.weight"].matmul(o, x8=o8)
        mla_cache_write(kv, norm_w, eps, lat, cache.pos_dev, lsc)
        o = mla_prefill_attention(q, lat, lsc, k_b, v_b, cache.pos, scale, self.mla_key_block).reshape(T, -1)
        return w[b + "attn_output.weight"].matmul(o.to(self.dtype))

    # ---- FFNs ----------------------------------------------------------------------------
    def dense_mlp(self, i: int, h: torch.Tensor, h8: torch.Tensor | None = None, res_norm=None) -> torch.Tensor:
        """res_norm (one token): see moe.moe_decode (the output then goes into the residual, not returned)."""
        w, b = self.w, f"blk.{i}."
        mats = [w[b + f"ffn_{n}.weight"] for n in ("gate", "up", "down")]
        if h.shape[0] == 1 and all(m.qtype in WORD_QTYPES for m in mats) \
                and os.environ.get("KIMI_LOCAL_DENSE_FUSED", "1") != "0":
            # one token: the fused MoE decode kernels with the FFN as the only ("shared") expert: gate + up +
            # SiLU * up in one launch, down in the next (instead of 3 GEMVs and 4 elementwise torch kernels)
            data, qts = tuple(m.data for m in mats), tuple(m.qtype for m in mats)
            out = torch.empty_like(h)
            none_i = torch.empty(0, dtype=torch.int32, device=h.device)
            moe_decode(h[0], none_i, none_i.float(), *(d[None] for d in data), qts, out[0], shared=data,
                       shared_qtypes=qts, x8=h8, res_norm=res_norm)
            return out
        g = w[b + "ffn_gate.weight"].matmul(h, x8=h8)
        u = w[b + "ffn_up.weight"].matmul(h, x8=h8)
        out = w[b + "ffn_down.weight"].matmul((F.silu(g.float()) * u.float()).to(self.dtype))
        if res_norm is not None:
            add_norm_x8n(out, *res_norm)
        return out

    def moe(self, i: int, h: torch.Tensor, h8: torch.Tensor | None = None, routed=None, res_norm=None) -> torch.Tensor:
        """routed: (ids, weights) when the router already ran (norm_router_route), ("logits", logits [1, E]) when
        it left the top-k to the MoE kernels (one token, resident experts), else routed here. res_norm (one
        token): see moe.moe_decode (the output then goes into the residual, not returned)."""
        cfg, w, b = self.cfg, self.w, f"blk.{i}."
        shared, shq = w.get(b + "shexp", (None, None))
        out = torch.empty_like(h)
        if routed is not None and isinstance(routed[0], str):  # ("logits", logits): resident pools, slot = id
            moe_decode(h[0], routed[1][0], None, *self.experts.pools(i), self.experts.qtypes(i), out[0], shared=shared,
                       shared_qtypes=shq, x8=h8, route=(w[b + "exp_probs_b.bias"], cfg.num_experts_per_token,
                                                       cfg.routed_scaling_factor, cfg.biased_router_weights,
                                                       cfg.moe_renormalize), res_norm=res_norm)
            return out
        ids, wts = routed if routed is not None else route_tokens(
            h, w[b + "ffn_gate_inp.weight"], w[b + "exp_probs_b.bias"], cfg.num_experts_per_token,
            cfg.routed_scaling_factor, cfg.biased_router_weights, cfg.moe_renormalize)
        slots = self.experts.prepare(i, ids, h).to(torch.int32)
        pools, qtypes = self.experts.pools(i), self.experts.qtypes(i)  # after prepare: it may stage the slots
        if h.shape[0] == 1:
            moe_decode(h[0], slots[0], wts[0].contiguous(), *pools, qtypes, out[0], shared=shared, shared_qtypes=shq,
                       x8=h8, res_norm=res_norm)
        else:
            assert res_norm is None
            moe_prefill(h, slots, wts, *pools, qtypes, out, shared=shared, shared_qtypes=shq)
        return out


def prefill_peak_bytes(cfg, T: int, key_block: int) -> int:
    """Estimated peak activation bytes of one prefill chunk of T tokens (computed from the code
    paths, not measured): the residual stream + the largest of one layer's KDA, MLA (two key blocks
    of decompressed keys/values alive while the next is built, deep context), MoE and dense-FFN
    temporaries + one dequantized weight scratch (qgemm on cuBLAS)."""
    D, P, I, F, k = cfg.hidden_size, cfg.kda_dim, cfg.intermediate_size, cfg.moe_intermediate_size, \
        cfg.num_experts_per_token
    Hm, Dq, Dv, Dn, L = cfg.num_attention_heads, cfg.qk_head_dim, cfg.v_head_dim, cfg.qk_nope_head_dim, \
        cfg.latent_dim
    S = key_block
    resid = 3 * T * D * 2  # x, h bf16 + one norm output
    # qkv bf16 (6), f, z (4), conv outputs fp32 (12), l2norm/gate temps (8), fla chunk_kda (~16)
    kda = 46 * T * P
    mla = (2 * Hm * S * (Dq + Dv) * 2 + Hm * S * Dn * 2 + 2 * S * L * 4  # 2 blocks of k, v + temps
           + 2 * T * Hm * Dq * 2 + 6 * T * Hm * Dv * 4)  # q (+ contiguous copy), lse merge in fp32
    moe = 2 * k * T * F + 4 * k * T * D + 8 * T * D + 12 * T * F  # h, y fp32, sum, router, shared
    dense = 16 * T * I  # layer 0: g, u bf16 + silu/product in fp32
    scratch = (3 * P + 2 * cfg.kda_head_dim + cfg.kda_num_heads) * D * 2  # fused q/k/v/f/g/b rows as bf16 (cuBLAS)
    return resid + max(kda, mla, moe, dense) + scratch


_CUDNN_FAILED: list = []  # the first error of cuDNN attention on this process (then: memory-efficient kernel)


def prefill_attention_backend() -> str:
    """"cudnn" (default: 3.0-3.4x the memory-efficient kernel at T=4096, H=32, 16K-128K keys on an H200,
    scripts/bench_prefill_attn.py) or "efficient" (KIMI_LOCAL_MLA_PREFILL=efficient, or after cuDNN failed)."""
    b = os.environ.get("KIMI_LOCAL_MLA_PREFILL", "cudnn")
    if b not in ("cudnn", "efficient"):
        raise ValueError(f"KIMI_LOCAL_MLA_PREFILL must be cudnn or efficient, not {b!r}")
    return "efficient" if _CUDNN_FAILED else b


def _sdpa_lse(q, k, v, causal: bool, scale: float, backend: str | None = None):
    """Attention with its log-sum-exp: q [1, H, T, Dq], k [1, H, S, Dq], v [1, H, S, Dv] ->
    (out [1, H, T, Dv], lse [1, H, T] fp32), through cuDNN's fused attention (Dq = 192 != Dv = 128 is
    supported on sm_80+), or PyTorch's memory-efficient kernel (the fallback when cuDNN refuses)."""
    if (backend or prefill_attention_backend()) == "cudnn" and not _CUDNN_FAILED:
        try:
            r = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False,
                                                                   scale=scale)
            return r[0], r[1].reshape(q.shape[0], q.shape[1], -1)[..., : q.shape[2]].float()
        except torch.cuda.OutOfMemoryError:  # a budget problem, not a missing kernel: the caller reports it
            raise
        except RuntimeError as e:  # no cuDNN attention for this GPU / shape: remember, use the fallback
            _CUDNN_FAILED.append(str(e)[:200])
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, causal, scale=scale)[:2]
    return out, lse[..., : q.shape[2]]


def mla_prefill_attention(q, latent, latent_scale, k_b, v_b, p0: int, scale: float, key_block: int = 16384,
                          backend: str | None = None):
    """Causal MLA for a chunk of T queries at positions p0..p0+T-1 over latent rows 0..p0+T-1.
    q [T, H, Dn+Dr]; latent [cap, R+Dr]; k_b [H, R, Dn]; v_b [H, Dv, R]. Returns [T, H, Dv].
    Keys/values are decompressed one key block at a time (memory bounded at any context); the past
    blocks attend fully, the chunk's own keys causally; blocks merge by their log-sum-exp."""
    T, H, _ = q.shape
    R = k_b.shape[1]
    qh = q.transpose(0, 1)[None].to(torch.bfloat16)  # [1, H, T, Dq]

    def kv(a: int, b: int):
        rows = latent[a:b].float() if latent_scale is None else latent[a:b].float() * latent_scale[a:b, None]
        c = rows[:, :R].to(torch.bfloat16)
        k = torch.matmul(c[None], k_b)  # [H, S, Dn]
        k = torch.cat([k, rows[None, :, R:].to(torch.bfloat16).expand(H, -1, -1)], -1)[None]
        v = torch.matmul(c[None], v_b.transpose(1, 2))[None]  # [1, H, S, Dv]
        return k.contiguous(), v.contiguous()

    blocks = [(a, min(a + key_block, p0)) for a in range(0, p0, key_block)] + [(p0, p0 + T)]
    out, lse = None, None
    for a, b in blocks:
        k, v = kv(a, b)
        o_b, l_b = _sdpa_lse(qh, k, v, causal=(a == p0), scale=scale, backend=backend)
        if out is None:
            out, lse = o_b.float(), l_b
            continue
        new = torch.logaddexp(lse, l_b)
        out = out * torch.exp(lse - new)[..., None] + o_b.float() * torch.exp(l_b - new)[..., None]
        lse = new
    return out[0].transpose(0, 1)  # [T, H, Dv]


def _capture(device, fn, warmups: int, pdl_on: bool = False):
    """(CUDA graph of fn(), fn's output in the graph's memory): fn runs `warmups` times eagerly on a side stream
    first (autotuning, workspaces, lazy inits stay out of the capture), then once under capture; pdl_on: with
    programmatic dependent launch (kernels/pdl.py) in both."""
    s = torch.cuda.Stream(device)
    s.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(s), pdl.active(pdl_on):
        for _ in range(warmups):
            fn()
    torch.cuda.current_stream(device).wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), pdl.active(pdl_on):
        out = fn()
    return graph, out


class DecodeGraph:
    """One token's forward captured as a CUDA graph over a preallocated cache. Replays read the
    position from cache.pos_dev / len_dev, so one graph serves every context length."""

    def __init__(self, net: GpuKimi, cache: KimiCache):
        self.net, self.cache = net, cache
        # graph input: the token id, or its embedded row when the table is in host memory
        self.inp = torch.zeros(1, net.cfg.hidden_size, dtype=net.dtype, device=net.device) if net.embed_on_host \
            else torch.zeros(1, dtype=torch.int64, device=net.device)
        saved = self._save_state()
        self._set_pos()
        # programmatic dependent launch between the step's Triton kernels (sm_90+; KIMI_LOCAL_PDL=0: off)
        self.pdl = pdl.supported(net.device)
        self.graph, self.logits = _capture(net.device, lambda: net.decode_body(self.inp, cache), 2, self.pdl)
        self._load_state(saved)
        self._sampler = None  # (sampler or "greedy", whole, its graph, writes host memory), see _sampler_graph
        self._host_tok = self._events = None  # stream(): pinned int64 [2] and two events (double buffered)

    def _save_state(self):
        """What the warm-up steps must not change: recurrent state, conv tails, and the expert
        loader's statistics counters (`device_counters`, when experts are offloaded)."""
        c = self.cache
        counters = getattr(self.net.experts, "device_counters", lambda: [])()
        return ({i: t.clone() for i, t in c.kda_state.items()}, {i: t.clone() for i, t in c.conv.items()},
                [(t, t.clone()) for t in counters])

    def _load_state(self, saved):
        for i, t in saved[0].items():
            self.cache.kda_state[i].copy_(t)
        for i, t in saved[1].items():
            self.cache.conv[i].copy_(t)
        for t, v in saved[2]:
            t.copy_(v)

    def _set_pos(self):
        self.cache.pos_dev.fill_(self.cache.pos)
        self.cache.len_dev.fill_(self.cache.pos + 1)

    def _sampler_graph(self, sampler, whole: bool) -> torch.cuda.CUDAGraph:
        """The CUDA graph of the sampler's pick after the step (one per sampler and form, the last one kept): the
        next id from the logits into self.inp, the positions + 1 on the device. whole: the step itself and the
        pick in one graph (no graph boundary between them; a greedy pick is then one kernels.sample.greedy_next
        launch under PDL, which also writes the id into self._host_tok, pinned host memory, slot position % 2: no
        device-to-host copy after the replay, KIMI_LOCAL_HOST_TOKEN=0 keeps the copy; and one such graph serves
        every greedy sampler: it reads no sampler state), else the pick alone, replayed after self.graph. Captured
        after an eager warm-up whose effects on the sampler's state, the recurrent state and the conv tails are
        undone (stream() sets self.inp and the positions before replays; the warm-up's cache row at the position is
        rewritten by the real step)."""
        greedy = whole and sampler.greedy
        key = ("greedy", whole) if greedy else (sampler, whole)
        if self._sampler is not None and self._sampler[:2] == key:
            return self._sampler[2]
        self._sampler = None  # the last one's graph (and its memory) goes first
        c = self.cache
        host = self._host_ring() if greedy and os.environ.get("KIMI_LOCAL_HOST_TOKEN", "1") != "0" else None

        def sample_next(logits):
            if greedy:
                greedy_next(logits[-1], self.inp, c.pos_dev, c.len_dev, host=host)
                return
            self.inp.copy_(sampler(logits[-1]))
            c.pos_dev.add_(1)
            c.len_dev.add_(1)

        saved_s = sampler.state()
        if whole:  # one warm-up: a second would run the step at the position the first one advanced to
            saved = self._save_state()
            g, _ = _capture(self.net.device, lambda: sample_next(self.net.decode_body(self.inp, c)), 1, self.pdl)
            self._load_state(saved)
        else:
            g, _ = _capture(self.net.device, lambda: sample_next(self.logits), 1)
        sampler.load_state(saved_s)
        self._sampler = (*key, g, host is not None)
        return g

    def _host_ring(self) -> torch.Tensor:
        """The pinned int64 [2] that stream() reads each token from (slot: the position it was sampled at % 2)."""
        if self._host_tok is None:
            self._host_tok = torch.zeros(2, dtype=torch.int64, pin_memory=True)
            self._events = [torch.cuda.Event(), torch.cuda.Event()]
        return self._host_tok

    def stream(self, sampler, tok: int, max_tokens: int, stop_ids=frozenset()):
        """Yield tok, then tokens sampled on the device, until a stop token (yielded) or max_tokens, each fed
        to the cache before it is yielded. Replay n = one graph (_sampler_graph): the step (feeds token n, writes
        the logits) and the sampler's pick (token n + 1 into the step's input, positions + 1; H200, session 23,
        run 6, greedy: 723.7 / 608.2 tok/s at 4K / 128K against 716.1 / 602.2 with a graph each,
        KIMI_LOCAL_ONE_GRAPH=0): nothing passes through the host
        between steps, so replay n + 1 is launched before the host waits for token n + 1 to print token n,
        and the GPU never waits for the host (the token fed ahead is never wasted: a stop token is fed too).
        One host sync per token: an event after token n + 1 is in pinned memory (written by the greedy pick
        itself, else copied there after the replay).
        KIMI_LOCAL_STREAM=0 (A/B runs), or a host embedding table (self.inp is the embedded row: the host gathers
        each token's row, so it must see the token first): one step() and an eager sample per token instead."""
        if os.environ.get("KIMI_LOCAL_STREAM", "1") == "0" or self.inp.is_floating_point():
            return eager_steps(self, self.cache, sampler, tok, max_tokens, stop_ids)
        c = self.cache
        # the step and the pick in one graph (KIMI_LOCAL_ONE_GRAPH=0: two graphs, the step's and the pick's); with
        # offloaded experts (their loader's decisions in the step graph) two graphs, as verified on a GPU so far
        whole = os.environ.get("KIMI_LOCAL_ONE_GRAPH", "1") != "0" and type(self.net.experts) is GpuExperts
        sg = self._sampler_graph(sampler, whole)
        direct = self._sampler[3]  # the graph writes the id into host memory itself
        host, events, p0 = self._host_ring(), self._events, c.pos

        def launch(m: int):  # replay m: feeds the token in self.inp, samples the next into host[(p0 + m) % 2]
            if not whole:
                self.graph.replay()
            sg.replay()
            if not direct:
                host[(p0 + m) % 2 :][:1].copy_(self.inp, non_blocking=True)
            events[m % 2].record()

        def read(m: int) -> int:  # the token replay m sampled (replay m + 2 reuses its slot: read it before)
            events[m % 2].synchronize()
            return int(host[(p0 + m) % 2])

        c.check_room(1)
        self.inp.fill_(tok)
        self._set_pos()
        return lookahead_steps(c, tok, max_tokens, stop_ids, launch, read)

    def forward(self, ids: torch.Tensor, cache: KimiCache, logits: str = "last"):
        """GpuKimi.forward for one token through this graph (generate's one-step-at-a-time loop, stream())."""
        assert cache is self.cache
        out = self.step(ids)
        return None if logits == "none" else out

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        c = self.cache
        c.check_room(1)
        if self.inp.is_floating_point():
            self.inp.copy_(self.net._embed(ids.reshape(1)))
        else:
            self.inp.copy_(ids.reshape(1), non_blocking=True)
        self._set_pos()
        self.graph.replay()
        c.advance(ids.reshape(1).tolist())
        return self.logits
