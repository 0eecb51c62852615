"""The only place that knows Hugging Face tensor names (spec section 2) and how they map to the
llama.cpp `kimi-linear` GGUF names the runtime uses (spec section 5.2).

Runtime ("canonical") tensors are in torch order with two simplifications that GGUF readers and
writers undo: conv weights are [P, W] and `ssm_a` is [H]. Transforms applied here:
A_log -> -exp(A_log); kv_b_proj split into attn_k_b [H, R, Dn] and attn_v_b [H, Dv, R];
routed experts stacked into [E, rows, cols].
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch

from kimi_local.config import KimiConfig


def hf_shapes(cfg: KimiConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Kimi-Linear HF checkpoint and its shape."""
    D, P, K, H = cfg.hidden_size, cfg.kda_dim, cfg.kda_head_dim, cfg.kda_num_heads
    Hm, R, Dr = cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    F, E = cfg.moe_intermediate_size, cfg.num_experts
    s = {
        "model.embed_tokens.weight": (cfg.vocab_size, D),
        "model.norm.weight": (D,),
        "lm_head.weight": (cfg.vocab_size, D),
    }
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        s[p + "input_layernorm.weight"] = (D,)
        s[p + "post_attention_layernorm.weight"] = (D,)
        a = p + "self_attn."
        if cfg.is_kda(i):
            s[a + "o_proj.weight"] = (D, P)
            for n in "qkv":
                s[a + f"{n}_proj.weight"] = (P, D)
                s[a + f"{n}_conv1d.weight"] = (P, 1, cfg.conv_size)
            s[a + "f_a_proj.weight"] = (K, D)
            s[a + "f_b_proj.weight"] = (P, K)
            s[a + "dt_bias"] = (P,)
            s[a + "A_log"] = (1, 1, H, 1)
            s[a + "b_proj.weight"] = (H, D)
            s[a + "g_a_proj.weight"] = (K, D)
            s[a + "g_b_proj.weight"] = (P, K)
            s[a + "o_norm.weight"] = (K,)
        else:
            s[a + "o_proj.weight"] = (D, Hm * cfg.v_head_dim)
            s[a + "q_proj.weight"] = (Hm * cfg.qk_head_dim, D)
            s[a + "kv_a_proj_with_mqa.weight"] = (R + Dr, D)
            s[a + "kv_a_layernorm.weight"] = (R,)
            s[a + "kv_b_proj.weight"] = (Hm * (cfg.qk_nope_head_dim + cfg.v_head_dim), R)
        if not cfg.is_moe(i):
            s[p + "mlp.gate_proj.weight"] = (cfg.intermediate_size, D)
            s[p + "mlp.up_proj.weight"] = (cfg.intermediate_size, D)
            s[p + "mlp.down_proj.weight"] = (D, cfg.intermediate_size)
            continue
        m = p + "block_sparse_moe."
        s[m + "gate.weight"] = (E, D)
        s[m + "gate.e_score_correction_bias"] = (E,)
        for e in range(E):
            s[m + f"experts.{e}.w1.weight"] = (F, D)
            s[m + f"experts.{e}.w2.weight"] = (D, F)
            s[m + f"experts.{e}.w3.weight"] = (F, D)
        if cfg.num_shared_experts:
            Fs = F * cfg.num_shared_experts
            s[m + "shared_experts.gate_proj.weight"] = (Fs, D)
            s[m + "shared_experts.up_proj.weight"] = (Fs, D)
            s[m + "shared_experts.down_proj.weight"] = (D, Fs)
    return s


def canonical_plan(cfg: KimiConfig) -> list[tuple[str, list[str], Callable]]:
    """(canonical name, HF source names, transform(list of tensors) -> tensor), in file order."""
    one = lambda ts: ts[0]  # noqa: E731
    plan = [
        ("token_embd.weight", ["model.embed_tokens.weight"], one),
        ("output_norm.weight", ["model.norm.weight"], one),
        ("output.weight", ["lm_head.weight"], one),
    ]
    Hm, Dn = cfg.num_attention_heads, cfg.qk_nope_head_dim
    R = cfg.kv_lora_rank

    def k_b(ts):  # [H*(Dn+Dv), R] -> [H, R, Dn]
        return ts[0].view(Hm, -1, R)[:, :Dn, :].transpose(1, 2).contiguous()

    def v_b(ts):  # -> [H, Dv, R]
        return ts[0].view(Hm, -1, R)[:, Dn:, :].contiguous()

    for i in range(cfg.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        a = p + "self_attn."
        plan += [
            (b + "attn_norm.weight", [p + "input_layernorm.weight"], one),
            (b + "ffn_norm.weight", [p + "post_attention_layernorm.weight"], one),
        ]
        if cfg.is_kda(i):
            for n in "qkv":
                plan.append((b + f"attn_{n}.weight", [a + f"{n}_proj.weight"], one))
            for n in "qkv":
                plan.append((b + f"ssm_conv1d_{n}.weight", [a + f"{n}_conv1d.weight"], lambda ts: ts[0][:, 0, :]))
            plan += [
                (b + "ssm_f_a.weight", [a + "f_a_proj.weight"], one),
                (b + "ssm_f_b.weight", [a + "f_b_proj.weight"], one),
                (b + "ssm_beta.weight", [a + "b_proj.weight"], one),
                (b + "ssm_a", [a + "A_log"], lambda ts: -torch.exp(ts[0].float().reshape(-1))),
                (b + "ssm_dt.bias", [a + "dt_bias"], lambda ts: ts[0].float()),
                (b + "ssm_g_a.weight", [a + "g_a_proj.weight"], one),
                (b + "ssm_g_b.weight", [a + "g_b_proj.weight"], one),
                (b + "ssm_norm.weight", [a + "o_norm.weight"], one),
            ]
        else:
            plan += [
                (b + "attn_q.weight", [a + "q_proj.weight"], one),
                (b + "attn_kv_a_mqa.weight", [a + "kv_a_proj_with_mqa.weight"], one),
                (b + "attn_kv_a_norm.weight", [a + "kv_a_layernorm.weight"], one),
                (b + "attn_k_b.weight", [a + "kv_b_proj.weight"], k_b),
                (b + "attn_v_b.weight", [a + "kv_b_proj.weight"], v_b),
            ]
        plan.append((b + "attn_output.weight", [a + "o_proj.weight"], one))
        if not cfg.is_moe(i):
            for n in ("gate", "up", "down"):
                plan.append((b + f"ffn_{n}.weight", [p + f"mlp.{n}_proj.weight"], one))
            continue
        m = p + "block_sparse_moe."
        plan += [
            (b + "ffn_gate_inp.weight", [m + "gate.weight"], lambda ts: ts[0].float()),
            (b + "exp_probs_b.bias", [m + "gate.e_score_correction_bias"], lambda ts: ts[0].float()),
        ]
        stack = lambda ts: torch.stack(ts)  # noqa: E731
        for n, w in (("gate", "w1"), ("up", "w3"), ("down", "w2")):
            srcs = [m + f"experts.{e}.{w}.weight" for e in range(cfg.num_experts)]
            plan.append((b + f"ffn_{n}_exps.weight", srcs, stack))
        if cfg.num_shared_experts:
            for n in ("gate", "up", "down"):
                plan.append((b + f"ffn_{n}_shexp.weight", [m + f"shared_experts.{n}_proj.weight"], one))
    return plan


def iter_canonical(cfg: KimiConfig, get: Callable[[str], torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (canonical name, tensor) one at a time; `get` loads one HF tensor by name."""
    for name, srcs, fn in canonical_plan(cfg):
        yield name, fn([get(s) for s in srcs])
