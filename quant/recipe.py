"""Which ggml type each GGUF tensor gets (recipes), what a recipe costs in bytes, and `--fit`.

Tensor classes (by canonical GGUF name):
- kept F32 in every recipe: norms, `ssm_a`, `ssm_dt.bias`, conv taps, `exp_probs_b`, the router
  `ffn_gate_inp` (tiny, and the top-k choice is sensitive to them);
- routed experts `ffn_gate_exps` / `ffn_up_exps`, and `ffn_down_exps` one step above them;
- everything else ("rest": KDA/MLA projections, shared experts, dense FFN, token_embd, output) at
  Q6_K or Q8_0 class.
A row whose length is not a multiple of the chosen type's block falls back like llama.cpp does:
to Q8_0 (32-value blocks) when it fits, else F16.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from kimi_local.config import KimiConfig, ModelError
from kimi_local.quant.formats import QTYPES, row_nbytes

GiB = 1 << 30
QUANT_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "F16", "BF16", "F32")  # --quant


@dataclass(frozen=True)
class Recipe:
    name: str
    experts: str  # ffn_gate_exps, ffn_up_exps
    experts_down: str  # ffn_down_exps
    rest: str  # attention / KDA / MLA projections, shared experts, dense FFN, embeddings, lm_head
    file_type: int  # general.file_type (llama.cpp's LlamaFileType)

    def qtype(self, name: str, shape: tuple[int, ...]) -> str:
        """ggml type of one canonical tensor of this shape (rows = last dim)."""
        if stored_f32(name):
            return "F32"
        if name.endswith(("ffn_gate_exps.weight", "ffn_up_exps.weight")):
            want = self.experts
        elif name.endswith("ffn_down_exps.weight"):
            want = self.experts_down
        else:
            want = self.rest
        return fallback_type(want, shape[-1])


# Named recipes, lowest quality first. Q8_0 cannot go one step up for ffn_down_exps (F16 would double
# those bytes for a gain below Q8_0's own error), so it is uniform.
RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("Q2_K", "Q2_K", "Q3_K", "Q6_K", 10),
        Recipe("Q3_K_M", "Q3_K", "Q4_K", "Q6_K", 12),
        Recipe("Q4_K_M", "Q4_K", "Q5_K", "Q8_0", 15),
        Recipe("Q5_K_M", "Q5_K", "Q6_K", "Q8_0", 17),
        Recipe("Q6_K", "Q6_K", "Q8_0", "Q8_0", 18),
        Recipe("Q8_0", "Q8_0", "Q8_0", "Q8_0", 7),
        Recipe("BF16", "BF16", "BF16", "BF16", 32),
        Recipe("F16", "F16", "F16", "F16", 1),
        Recipe("F32", "F32", "F32", "F32", 0),
    )
}
# --fit tries these, best first. The checkpoint is bf16, so BF16 is already lossless: F16 (range loss)
# and F32 (twice the bytes, same values) are never a better choice.
FIT_ORDER = ("BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K")
_UNIFORM_FILE_TYPE = {"Q2_K": 10, "Q3_K": 11, "Q4_K": 14, "Q5_K": 16, "Q6_K": 18, "Q8_0": 7, "F16": 1, "BF16": 32,
                      "F32": 0}


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name.upper()]
    except KeyError:
        raise ModelError(f"unknown recipe {name!r}; valid recipes: {', '.join(RECIPES)}") from None


def uniform(qtype: str) -> Recipe:
    """--quant TYPE: every matrix at TYPE (with the F32 exceptions and the block fallback)."""
    q = qtype.upper()
    if q not in QUANT_TYPES:
        raise ModelError(f"unknown quant type {qtype!r}; valid types: {', '.join(QUANT_TYPES)}")
    return Recipe(q, q, q, q, _UNIFORM_FILE_TYPE[q])


def fallback_type(qtype: str, row: int) -> str:
    """qtype if a row of `row` values is whole blocks of it, else Q8_0 if that fits, else F16."""
    for q in (qtype, "Q8_0", "F16"):
        if row % QTYPES[q].block_size == 0:
            return q
    return "F16"


# ---- tensor classes ----------------------------------------------------------------------------
_F32_SUFFIXES = ("_norm.weight", "ssm_a", "ssm_dt.bias", "exp_probs_b.bias", "ffn_gate_inp.weight")


def stored_f32(name: str) -> bool:
    """Kept F32 in every file: norms, decay params, conv taps, router and its selection bias."""
    return name.endswith(_F32_SUFFIXES) or ".ssm_conv1d_" in name


def is_linear_weight(name: str) -> bool:
    """Weights only ever used as `x @ W.T` (model.linear / the MoE loop) or as embedding rows: these
    may stay quantized at runtime. Everything else is read as a dense tensor."""
    if stored_f32(name) or name.endswith(("attn_k_b.weight", "attn_v_b.weight", "attn_kv_b.weight")):
        return False
    return name.endswith(".weight")


def tensor_group(name: str) -> str:
    """Size-report group of a canonical tensor name."""
    if name.endswith("_exps.weight"):
        return "routed experts"
    if name.endswith("_shexp.weight"):
        return "shared experts"
    if name in ("token_embd.weight", "output.weight"):
        return "embeddings + head"
    if (".attn_" in name or ".ssm_" in name) and not name.endswith("attn_norm.weight"):
        return "attention + KDA"
    return "other"


GROUPS = ("routed experts", "attention + KDA", "shared experts", "embeddings + head", "other")


# ---- sizes -------------------------------------------------------------------------------------
def canonical_shapes(cfg: KimiConfig) -> dict[str, tuple[int, ...]]:
    """Every canonical tensor (spec 5.2) in file order with its runtime shape (torch order; conv taps
    [P, W], ssm_a [H]). Written from the config, independently of the HF name map."""
    D, P, K, H = cfg.hidden_size, cfg.kda_dim, cfg.kda_head_dim, cfg.kda_num_heads
    Hm, R, E, F = cfg.num_attention_heads, cfg.kv_lora_rank, cfg.num_experts, cfg.moe_intermediate_size
    s = {"token_embd.weight": (cfg.vocab_size, D), "output_norm.weight": (D,), "output.weight": (cfg.vocab_size, D)}
    for i in range(cfg.num_hidden_layers):
        b = f"blk.{i}."
        s[b + "attn_norm.weight"] = (D,)
        s[b + "ffn_norm.weight"] = (D,)
        if cfg.is_kda(i):
            for n in "qkv":
                s[b + f"attn_{n}.weight"] = (P, D)
            for n in "qkv":
                s[b + f"ssm_conv1d_{n}.weight"] = (P, cfg.conv_size)
            s.update({b + "ssm_f_a.weight": (K, D), b + "ssm_f_b.weight": (P, K), b + "ssm_beta.weight": (H, D),
                      b + "ssm_a": (H,), b + "ssm_dt.bias": (P,), b + "ssm_g_a.weight": (K, D),
                      b + "ssm_g_b.weight": (P, K), b + "ssm_norm.weight": (K,), b + "attn_output.weight": (D, P)})
        else:
            s.update({b + "attn_q.weight": (Hm * cfg.qk_head_dim, D), b + "attn_kv_a_mqa.weight": (cfg.latent_dim, D),
                      b + "attn_kv_a_norm.weight": (R,), b + "attn_k_b.weight": (Hm, R, cfg.qk_nope_head_dim),
                      b + "attn_v_b.weight": (Hm, cfg.v_head_dim, R),
                      b + "attn_output.weight": (D, Hm * cfg.v_head_dim)})
        if not cfg.is_moe(i):
            I = cfg.intermediate_size
            s.update({b + "ffn_gate.weight": (I, D), b + "ffn_up.weight": (I, D), b + "ffn_down.weight": (D, I)})
            continue
        s.update({b + "ffn_gate_inp.weight": (E, D), b + "exp_probs_b.bias": (E,), b + "ffn_gate_exps.weight": (E, F, D),
                  b + "ffn_up_exps.weight": (E, F, D), b + "ffn_down_exps.weight": (E, D, F)})
        if cfg.num_shared_experts:
            Fs = F * cfg.num_shared_experts
            s.update({b + "ffn_gate_shexp.weight": (Fs, D), b + "ffn_up_shexp.weight": (Fs, D),
                      b + "ffn_down_shexp.weight": (D, Fs)})
    return s


def tensor_nbytes(qtype: str, shape: tuple[int, ...]) -> int:
    return math.prod(shape[:-1]) * row_nbytes(qtype, shape[-1])


def weight_bytes(recipe: Recipe, cfg: KimiConfig, shapes: dict | None = None) -> int:
    """Exact tensor-data bytes of a GGUF written with this recipe (alignment padding excluded)."""
    shapes = shapes or canonical_shapes(cfg)
    return sum(tensor_nbytes(recipe.qtype(n, s), s) for n, s in shapes.items())


_FUSED = (("attn_q.weight", "attn_k.weight", "attn_v.weight"), ("ssm_f_a.weight", "ssm_g_a.weight", "ssm_beta.weight"))


def engine_weight_bytes(recipe: Recipe, cfg: KimiConfig, shapes: dict | None = None,
                        embed_on_host: bool = False) -> int:
    """Exact GPU bytes of the CUDA engine's prepared weights (kimi_local.engine.prepare_weights) for
    a file written with this recipe. Differs from `weight_bytes` by: the kernels' packed layouts
    (Q5_K/Q4_K/Q3_K unpack their 6-bit scales: +2.3/+2.8/+3.6 %); float matrices held as bf16; MLA
    attn_k_b / attn_v_b and KDA's ssm_f_b / ssm_g_b (read by the KDA decode-step kernel) dequantized to
    bf16; and token_embd in host memory when embed_on_host."""
    from kimi_local.kernels.quant_matmul import PACKED_SIZE, packed_row_bytes

    shapes = shapes or canonical_shapes(cfg)

    def matrix(qtypes: list[str], shps: list[tuple[int, ...]]) -> int:  # one GpuWeight / expert pool
        if len(set(qtypes)) == 1 and qtypes[0] in PACKED_SIZE and qtypes[0] != "BF16":
            q = qtypes[0]
            return sum(math.prod(s[:-1]) * packed_row_bytes(q, s[-1]) for s in shps)
        return sum(2 * math.prod(s) for s in shps)  # dequantized to bf16 once

    total = 0
    for name, s in shapes.items():
        q = recipe.qtype(name, s)
        b, short = name.rsplit(".", 2)[0] + ".", ".".join(name.rsplit(".", 2)[1:])
        group = next((g for g in _FUSED if short in g), None) if b + "attn_k.weight" in shapes else None  # KDA
        if name == "token_embd.weight":
            if not embed_on_host:  # the kernels' packed rows for their types (engine.GpuWeight), else the file's
                if q in PACKED_SIZE and q != "BF16":
                    total += s[0] * packed_row_bytes(q, s[1])
                else:
                    total += tensor_nbytes(q, s) if q not in ("F32", "F16", "BF16") else 2 * math.prod(s)
        elif stored_f32(name):
            total += 4 * math.prod(s)  # fp32 vectors, conv taps, router
        elif short in ("attn_k_b.weight", "attn_v_b.weight", "ssm_f_b.weight", "ssm_g_b.weight"):
            total += 2 * math.prod(s)  # bf16, read by the MLA absorb / combine and the KDA decode-step kernels
        elif group is not None:
            if short == group[0]:  # the fused matrix, counted once
                total += matrix([recipe.qtype(b + n, shapes[b + n]) for n in group], [shapes[b + n] for n in group])
        else:
            total += matrix([q], [s])
    return total


def workspace_bytes(cfg: KimiConfig) -> int:
    """Estimated runtime memory besides weights and state: CUDA context + cuBLAS/Triton workspaces
    (~0.6 GiB) and prefill activations of a 4K-token chunk incl. its logits (~0.9 GiB) = 1.5 GiB on
    the real model (hidden 2304); scaled by the hidden size for smaller models."""
    return int(1.5 * GiB * cfg.hidden_size / 2304)


@dataclass(frozen=True)
class Memory:
    weights: int
    state: int  # KDA recurrent state + conv tails
    cache: int  # MLA latent cache for ctx tokens
    workspace: int

    @property
    def total(self) -> int:
        return self.weights + self.state + self.cache + self.workspace


def memory(weights: int, cfg: KimiConfig, ctx: int) -> Memory:
    return Memory(weights, cfg.kda_state_bytes(), ctx * cfg.mla_bytes_per_token(), workspace_bytes(cfg))


def fit(budget: int, cfg: KimiConfig, ctx: int) -> tuple[Recipe, Memory]:
    """The highest-quality recipe whose weights + state + MLA cache for ctx + workspace fit budget."""
    shapes = canonical_shapes(cfg)
    for name in FIT_ORDER:
        mem = memory(weight_bytes(RECIPES[name], cfg, shapes), cfg, ctx)
        if mem.total <= budget:
            return RECIPES[name], mem
    raise ModelError(
        f"--fit {fmt_bytes(budget)} is too small: the smallest recipe ({name}) needs {fmt_bytes(mem.total)} "
        f"at --ctx {ctx} (weights {fmt_bytes(mem.weights)} + state {fmt_bytes(mem.state)} + MLA cache "
        f"{fmt_bytes(mem.cache)} + workspace {fmt_bytes(mem.workspace)}); give at least {fmt_bytes(mem.total)} "
        "or a smaller --ctx"
    )


# ---- sizes as text -----------------------------------------------------------------------------
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:([kmgt])(i?)b?|b?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'24GB' -> 24e9, '24GiB' / '24Gi' -> 24 * 2**30, '22.5G' -> 22.5e9, '800MB', '1000000' (bytes).
    Suffixes with an 'i' are powers of 1024, without it powers of 1000."""
    m = _SIZE_RE.match(text)
    if not m:
        raise ModelError(f"cannot read the size {text!r} (examples: 24GB, 24GiB, 22.5G, 800MB)")
    value, unit, binary = float(m.group(1)), (m.group(2) or "").lower(), bool(m.group(3))
    power = "kmgt".index(unit) + 1 if unit else 0
    return int(value * (1024 if binary else 1000) ** power)


def fmt_bytes(n: int) -> str:
    """Decimal and binary: '24.00 GB (22.35 GiB)'."""
    if n >= 10**9:
        return f"{n / 1e9:.2f} GB ({n / GiB:.2f} GiB)"
    return f"{n / 1e6:.1f} MB ({n / 2**20:.1f} MiB)"
