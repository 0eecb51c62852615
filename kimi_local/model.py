"""Kimi-Linear-48B-A3B: the whole architecture (spec section 3) in one file.

`KimiLinear(cfg, weights)` holds canonical (llama.cpp GGUF-named) tensors: dense torch tensors or
quantized `QTensor`s. `forward(ids, cache)` runs one chunk of any length for one sequence and
updates the cache in place; a chunk of 1 token is a decode step. The ops are the pure-torch
references of `kernels/naive.py`; on CUDA, `kimi_local.engine` swaps in the Triton kernels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kimi_local.cache import KimiCache
from kimi_local.config import KimiConfig
from kimi_local.kernels import naive


def linear(x: torch.Tensor, w) -> torch.Tensor:
    """y = x @ w.T for a dense weight [N, K], a QTensor, or anything with a `.matmul(x)`.
    x [T, K] -> [T, N] in x's dtype."""
    if isinstance(w, torch.Tensor):
        return x @ w.to(x.dtype).t()
    if hasattr(w, "matmul"):
        return w.matmul(x)
    return x @ w.dequantize(x.dtype).t()  # QTensor on the reference path


def embed(w, ids: torch.Tensor, dtype) -> torch.Tensor:
    """Rows of the embedding table (dense or quantized) -> [T, D]."""
    if isinstance(w, torch.Tensor):
        return w[ids].to(dtype)
    return w[ids].dequantize(dtype)


class ResidentExperts:
    """All routed experts resident: the slot of expert e is e. `kimi_local.offload` provides the
    same interface over a smaller pool of slots filled from a host store."""

    def __init__(self, weights: dict):
        self.w = weights

    def pools(self, layer: int):
        """(gate [S, F, D], up [S, F, D], down [S, D, F]) stacks indexable by slot."""
        b = f"blk.{layer}."
        return tuple(self.w[b + f"ffn_{n}_exps.weight"] for n in ("gate", "up", "down"))

    def prepare(self, layer: int, ids: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
        """Make the experts in ids [T, k] resident; returns their slots (same shape)."""
        return ids


class KimiLinear:
    def __init__(self, cfg: KimiConfig, weights: dict, device="cpu", dtype=torch.float32):
        self.cfg, self.w, self.device, self.dtype = cfg, weights, torch.device(device), dtype
        self.experts = ResidentExperts(weights)

    def new_cache(self, max_ctx: int | None = None, preallocate: bool = False) -> KimiCache:
        return KimiCache(self.cfg, self.device, self.dtype, max_ctx=max_ctx, preallocate=preallocate)

    # ---- top level ---------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, ids: torch.Tensor, cache: KimiCache, logits: str = "last") -> torch.Tensor | None:
        """ids [T] int64. logits: "last" -> [1, vocab] fp32, "all" -> [T, vocab], "none" -> None."""
        cfg, w = self.cfg, self.w
        ids = ids.to(self.device)
        T = ids.shape[0]
        cache.reserve(T)
        x = embed(w["token_embd.weight"], ids, self.dtype)  # [T, D]
        for i in range(cfg.num_hidden_layers):
            b = f"blk.{i}."
            h = naive.rms_norm(x, w[b + "attn_norm.weight"], cfg.rms_norm_eps)
            x = x + (self.kda(i, h, cache) if cfg.is_kda(i) else self.mla(i, h, cache))
            h = naive.rms_norm(x, w[b + "ffn_norm.weight"], cfg.rms_norm_eps)
            x = x + (self.moe(i, h) if cfg.is_moe(i) else self.dense_mlp(i, h))
        cache.advance(ids.tolist())
        if logits == "none":
            return None
        if logits == "last":
            x = x[-1:]
        h = naive.rms_norm(x, w["output_norm.weight"], cfg.rms_norm_eps)
        return linear(h, w["output.weight"]).float()

    # ---- KDA (spec 3.3) ------------------------------------------------------------------
    def kda(self, i: int, h: torch.Tensor, cache: KimiCache) -> torch.Tensor:
        cfg, w, b = self.cfg, self.w, f"blk.{i}."
        T, H, K = h.shape[0], cfg.kda_num_heads, cfg.kda_head_dim
        conv = cache.conv[i]  # [3, P, W-1]
        qkv = []
        for j, n in enumerate("qkv"):
            raw = linear(h, w[b + f"attn_{n}.weight"])  # [T, P]
            y, conv[j] = naive.short_conv(raw, w[b + f"ssm_conv1d_{n}.weight"], conv[j])
            qkv.append(y.view(T, H, K))
        q, k, v = naive.l2norm(qkv[0]), naive.l2norm(qkv[1]), qkv[2]
        f = linear(linear(h, w[b + "ssm_f_a.weight"]), w[b + "ssm_f_b.weight"]).view(T, H, K)
        g = naive.kda_gate(f, w[b + "ssm_a"], w[b + "ssm_dt.bias"].view(H, K))
        beta = torch.sigmoid(linear(h, w[b + "ssm_beta.weight"]).float())  # [T, H]
        step = naive.kda_recurrent if T == 1 else naive.kda_chunked
        o, cache.kda_state[i] = step(q, k, v, g, beta, cache.kda_state[i])
        z = linear(linear(h, w[b + "ssm_g_a.weight"]), w[b + "ssm_g_b.weight"]).view(T, H, K)
        o = naive.gated_rms_norm(o, z, w[b + "ssm_norm.weight"], cfg.rms_norm_eps)
        return linear(o.reshape(T, H * K).to(self.dtype), w[b + "attn_output.weight"])

    # ---- MLA without RoPE (spec 3.5) -----------------------------------------------------
    def mla(self, i: int, h: torch.Tensor, cache: KimiCache) -> torch.Tensor:
        cfg, w, b = self.cfg, self.w, f"blk.{i}."
        T, Hm, R = h.shape[0], cfg.num_attention_heads, cfg.kv_lora_rank
        q = linear(h, w[b + "attn_q.weight"]).view(T, Hm, cfg.qk_head_dim)
        kv = linear(h, w[b + "attn_kv_a_mqa.weight"])  # [T, R + Dr]
        c = naive.rms_norm(kv[:, :R], w[b + "attn_kv_a_norm.weight"], cfg.kv_a_norm_eps)
        p0 = cache.pos
        lat = cache.latent[i]
        lat[p0 : p0 + T, :R] = c.to(lat.dtype)
        lat[p0 : p0 + T, R:] = kv[:, R:].to(lat.dtype)
        S = p0 + T
        q_pos = torch.arange(p0, S, device=h.device)
        attn = naive.mla_absorbed if T == 1 else naive.mla_expanded
        o = attn(q, lat[:S, :R], lat[:S, R:], w[b + "attn_k_b.weight"], w[b + "attn_v_b.weight"],
                 q_pos, naive.mla_scale(cfg.qk_head_dim))  # [T, H, Dv]
        return linear(o.reshape(T, -1).to(self.dtype), w[b + "attn_output.weight"])

    # ---- FFNs (spec 3.4) -------------------------------------------------------------------
    def dense_mlp(self, i: int, h: torch.Tensor) -> torch.Tensor:
        w, b = self.w, f"blk.{i}."
        return self._swiglu(h, w[b + "ffn_gate.weight"], w[b + "ffn_up.weight"], w[b + "ffn_down.weight"])

    @staticmethod
    def _swiglu(h, wg, wu, wd):
        return linear(F.silu(linear(h, wg)) * linear(h, wu), wd)

    def moe(self, i: int, h: torch.Tensor) -> torch.Tensor:
        cfg, w, b = self.cfg, self.w, f"blk.{i}."
        ids, wts = naive.route(h, w[b + "ffn_gate_inp.weight"], w[b + "exp_probs_b.bias"],
                               cfg.num_experts_per_token, cfg.routed_scaling_factor,
                               cfg.biased_router_weights, cfg.moe_renormalize)
        slots = self.experts.prepare(i, ids, h)  # [T, k] pool slots of the chosen experts
        gate, up, down = self.experts.pools(i)
        out = torch.zeros(h.shape[0], h.shape[1], dtype=torch.float32, device=h.device)
        for s in torch.unique(slots).tolist():
            rows, j = (slots == s).nonzero(as_tuple=True)
            y = self._swiglu(h[rows], gate[s], up[s], down[s])
            out.index_add_(0, rows, y.float() * wts[rows, j, None])
        out = out.to(h.dtype)  # HF: routed sum in fp32, cast, then add the shared expert
        if cfg.num_shared_experts:
            out = out + self._swiglu(h, w[b + "ffn_gate_shexp.weight"], w[b + "ffn_up_shexp.weight"],
                                     w[b + "ffn_down_shexp.weight"])
        return out
