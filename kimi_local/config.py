"""Kimi-Linear configuration: the fields of the HF `config.json` the engine uses (spec section 1).

`KimiConfig.from_hf(dict)` validates and raises `ModelError` (one clear line) on anything this
engine does not implement; `KimiConfig.from_gguf(fields)` reads the same values from GGUF metadata.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path


class ModelError(Exception):
    """A model file or directory cannot be used; the message is one line meant for the user."""


@dataclass
class KimiConfig:
    vocab_size: int = 163840
    hidden_size: int = 2304
    num_hidden_layers: int = 27
    num_attention_heads: int = 32
    intermediate_size: int = 9216
    rms_norm_eps: float = 1e-5
    # MLA (no RoPE; q_lora_rank is null)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # MoE
    num_experts: int = 256
    num_experts_per_token: int = 8
    num_shared_experts: int = 1
    moe_intermediate_size: int = 1024
    routed_scaling_factor: float = 2.446
    first_k_dense_replace: int = 1
    moe_renormalize: bool = True
    # KDA; layer lists are 1-indexed exactly as in config.json
    kda_layers: list[int] = field(default_factory=lambda: [i + 1 for i in range(27) if (i + 1) % 4 != 0 and i != 26])
    full_attn_layers: list[int] = field(default_factory=lambda: [4, 8, 12, 16, 20, 24, 27])
    kda_num_heads: int = 32
    kda_head_dim: int = 128
    conv_size: int = 4
    # tokens
    bos_token_id: int = 163584
    eos_token_id: int = 163586
    pad_token_id: int = 163839
    model_max_length: int = 1048576
    tie_word_embeddings: bool = False
    # numerics options (not in config.json)
    kv_a_norm_eps: float = 1e-5  # vLLM / llama.cpp; the HF remote code uses 1e-6 (spec 3.5)
    biased_router_weights: bool = False  # True reproduces the HF remote code's biased top-k weights

    # ---- layer map -------------------------------------------------------------------------
    def is_kda(self, i: int) -> bool:
        return (i + 1) in self.kda_layers

    def is_moe(self, i: int) -> bool:
        return i >= self.first_k_dense_replace

    @property
    def kda_layer_ids(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_kda(i)]

    @property
    def mla_layer_ids(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if not self.is_kda(i)]

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kda_dim(self) -> int:  # P = H * K, width of the q/k/v projections
        return self.kda_num_heads * self.kda_head_dim

    @property
    def latent_dim(self) -> int:  # 576 values per token per MLA layer
        return self.kv_lora_rank + self.qk_rope_head_dim

    # ---- memory model (spec 7.3) -----------------------------------------------------------
    def kda_state_bytes(self) -> int:
        h, d = self.kda_num_heads, self.kda_head_dim
        per_layer = h * d * d * 4 + 3 * self.kda_dim * (self.conv_size - 1) * 2
        return per_layer * len(self.kda_layer_ids)

    def mla_bytes_per_token(self, bytes_per_value: float = 2.0) -> int:
        return int(self.latent_dim * bytes_per_value * len(self.mla_layer_ids))

    # ---- construction ----------------------------------------------------------------------
    @classmethod
    def from_hf(cls, d: dict) -> "KimiConfig":
        arch = d.get("model_type")
        archs = d.get("architectures") or []
        if arch != "kimi_linear" and "KimiLinearForCausalLM" not in archs:
            raise ModelError(
                f"not a Kimi-Linear model: config.json has model_type={arch!r}, architectures={archs!r}"
            )
        lac = d.get("linear_attn_config") or {}

        def need(key, src=d):
            if key not in src or src[key] is None:
                raise ModelError(f"config.json is missing the field {key!r}")
            return src[key]

        cfg = cls(
            vocab_size=need("vocab_size"),
            hidden_size=need("hidden_size"),
            num_hidden_layers=need("num_hidden_layers"),
            num_attention_heads=need("num_attention_heads"),
            intermediate_size=need("intermediate_size"),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            kv_lora_rank=need("kv_lora_rank"),
            qk_nope_head_dim=need("qk_nope_head_dim"),
            qk_rope_head_dim=need("qk_rope_head_dim"),
            v_head_dim=need("v_head_dim"),
            num_experts=need("num_experts"),
            num_experts_per_token=need("num_experts_per_token"),
            num_shared_experts=int(d.get("num_shared_experts", 0)),
            moe_intermediate_size=need("moe_intermediate_size"),
            routed_scaling_factor=float(d.get("routed_scaling_factor", 1.0)),
            first_k_dense_replace=int(d.get("first_k_dense_replace", 0)),
            moe_renormalize=bool(d.get("moe_renormalize", True)),
            kda_layers=list(need("kda_layers", lac)),
            full_attn_layers=list(need("full_attn_layers", lac)),
            kda_num_heads=need("num_heads", lac),
            kda_head_dim=need("head_dim", lac),
            conv_size=int(lac.get("short_conv_kernel_size", 4)),
            bos_token_id=int(d.get("bos_token_id", 163584)),
            eos_token_id=int(d.get("eos_token_id", 163586)),
            pad_token_id=int(d.get("pad_token_id", 163839)),
            model_max_length=int(d.get("model_max_length", d.get("max_position_embeddings", 1048576))),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        )
        unsupported = {
            "q_lora_rank": (d.get("q_lora_rank"), None),
            "mla_use_nope": (d.get("mla_use_nope", True), True),
            "moe_router_activation_func": (d.get("moe_router_activation_func", "sigmoid"), "sigmoid"),
            "num_expert_group": (d.get("num_expert_group", 1), 1),
            "topk_group": (d.get("topk_group", 1), 1),
            "moe_layer_freq": (d.get("moe_layer_freq", 1), 1),
            "num_nextn_predict_layers": (d.get("num_nextn_predict_layers", 0), 0),
        }
        for key, (got, want) in unsupported.items():
            if got != want:
                raise ModelError(f"unsupported config value {key}={got!r} (kimi-local supports {want!r})")
        cfg.validate()
        return cfg

    @classmethod
    def from_dir(cls, path: Path) -> "KimiConfig":
        p = Path(path) / "config.json"
        if not p.is_file():
            raise ModelError(f"{path}: no config.json (not a Hugging Face model directory)")
        try:
            d = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelError(f"{p}: not valid JSON ({e})") from None
        return cls.from_hf(d)

    def validate(self) -> None:
        n = self.num_hidden_layers
        both = set(self.kda_layers) | set(self.full_attn_layers)
        if set(self.kda_layers) & set(self.full_attn_layers) or both != set(range(1, n + 1)):
            raise ModelError(
                "unsupported config: linear_attn_config.kda_layers and full_attn_layers (1-indexed) "
                f"must partition 1..{n}"
            )
        if self.num_shared_experts > 1:
            raise ModelError(f"unsupported config value num_shared_experts={self.num_shared_experts} (0 or 1)")
        if not 1 <= self.num_experts_per_token <= self.num_experts:
            raise ModelError("unsupported config: num_experts_per_token must be in 1..num_experts")
        if self.kv_lora_rank >= self.hidden_size * 4 or self.conv_size < 1:
            raise ModelError("unsupported config: implausible kv_lora_rank or conv kernel size")

    def to_hf(self) -> dict:
        """The HF config.json dict (used by the tiny checkpoint maker)."""
        d = asdict(self)
        for k in ("kda_layers", "full_attn_layers", "kda_num_heads", "kda_head_dim", "conv_size",
                  "kv_a_norm_eps", "biased_router_weights"):
            d.pop(k)
        d.update(
            architectures=["KimiLinearForCausalLM"],
            auto_map={
                "AutoConfig": "configuration_kimi.KimiLinearConfig",
                "AutoModel": "modeling_kimi.KimiLinearModel",
                "AutoModelForCausalLM": "modeling_kimi.KimiLinearForCausalLM",
            },
            model_type="kimi_linear",
            dtype="bfloat16",
            num_key_value_heads=self.num_attention_heads,
            head_dim=self.hidden_size // self.num_attention_heads,
            hidden_act="silu",
            initializer_range=0.02,
            use_cache=True,
            rope_theta=10000.0,
            rope_scaling=None,
            q_lora_rank=None,
            mla_use_nope=True,
            moe_router_activation_func="sigmoid",
            use_grouped_topk=True,
            num_expert_group=1,
            topk_group=1,
            moe_layer_freq=1,
            num_nextn_predict_layers=0,
            linear_attn_config={
                "kda_layers": self.kda_layers,
                "full_attn_layers": self.full_attn_layers,
                "num_heads": self.kda_num_heads,
                "head_dim": self.kda_head_dim,
                "short_conv_kernel_size": self.conv_size,
            },
            transformers_version="4.57.1",
        )
        return d


def tiny_config() -> KimiConfig:
    """A small random-weight model with the real structure: dense layer 0, MoE after it,
    MLA at 1-indexed layers 4 and 6 (0-indexed 3 and 5), conv width 4, several heads."""
    return KimiConfig(
        vocab_size=512 + 256,
        hidden_size=64,
        num_hidden_layers=6,
        num_attention_heads=4,
        intermediate_size=128,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        num_experts=8,
        num_experts_per_token=2,
        num_shared_experts=1,
        moe_intermediate_size=32,
        kda_layers=[1, 2, 3, 5],
        full_attn_layers=[4, 6],
        kda_num_heads=4,
        kda_head_dim=16,
        bos_token_id=512,
        eos_token_id=514,
        pad_token_id=767,
        model_max_length=4096,
    )
