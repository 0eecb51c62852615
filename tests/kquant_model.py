"""A small checkpoint whose matrices have rows of 256 values, so that K-quant recipes really use
Q2_K..Q6_K (the default tiny model's rows of 64 fall back to Q8_0): layer 0 KDA + dense FFN,
layer 1 MLA + MoE. Every token uses both experts: no top-k routing flips, so quantization error
shows up smoothly in the logits."""
import dataclasses

from kimi_local.config import tiny_config


def kquant_config():
    return dataclasses.replace(
        tiny_config(), hidden_size=256, intermediate_size=256, num_hidden_layers=2, kda_layers=[1],
        full_attn_layers=[2], kda_num_heads=4, kda_head_dim=64, num_attention_heads=4, qk_nope_head_dim=64,
        qk_rope_head_dim=32, v_head_dim=64, kv_lora_rank=64, num_experts=2, num_experts_per_token=2,
        moe_intermediate_size=256)


def rel_rmse(a, b) -> float:
    return float((a - b).norm() / b.norm())
