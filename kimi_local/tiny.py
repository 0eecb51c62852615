"""Random-weight Kimi-Linear checkpoints laid out exactly like the real HF repo (spec section 2):
config.json, sharded safetensors + model.safetensors.index.json with the real tensor names and
dtypes (A_log and dt_bias fp32, the rest bf16), tiktoken.model, tokenizer_config.json and a chat
template. Used by tests, `kimi-local demo` and `scripts/make_tiny_checkpoint.py`.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from kimi_local.config import KimiConfig, tiny_config
from kimi_local.quant.hf_names import hf_shapes


def _init_tensor(name: str, shape: tuple[int, ...], cfg: KimiConfig, g: torch.Generator) -> torch.Tensor:
    """Scaled so activations stay O(1) through the layers of a random model."""
    if name.endswith("A_log"):  # per-head decay rates exp(A) in [1, 16]
        return torch.empty(shape).uniform_(0.0, math.log(16.0), generator=g).float()
    if name.endswith("dt_bias"):  # softplus^-1 of dt in [1e-3, 1e-1]
        dt = torch.exp(torch.empty(shape).uniform_(math.log(1e-3), math.log(1e-1), generator=g))
        return (dt + torch.log(-torch.expm1(-dt))).float()
    if "norm" in name:
        return (1.0 + 0.1 * torch.randn(shape, generator=g)).bfloat16()
    if name.endswith("e_score_correction_bias"):
        return (0.05 * torch.randn(shape, generator=g)).bfloat16()
    if "conv1d" in name:
        return (0.5 * torch.randn(shape, generator=g)).bfloat16()
    fan_in = shape[-1]
    std = 1.0 if "embed_tokens" in name else fan_in**-0.5
    return (std * torch.randn(shape, generator=g)).bfloat16()


def make_checkpoint(out_dir: Path, cfg: KimiConfig | None = None, seed: int = 0, n_shards: int = 3) -> Path:
    """Write a random-weight checkpoint of `cfg` (default: the tiny config) to out_dir."""
    from kimi_local.tiny_tokenizer import write_tiny_tokenizer

    cfg = cfg or tiny_config()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    shapes = hf_shapes(cfg)
    names = list(shapes)
    per_shard = math.ceil(len(names) / n_shards)
    weight_map, total = {}, 0
    for s in range(n_shards):
        fname = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        chunk = {n: _init_tensor(n, shapes[n], cfg, g) for n in names[s * per_shard : (s + 1) * per_shard]}
        save_file(chunk, str(out / fname), metadata={"format": "pt"})
        for n, t in chunk.items():
            weight_map[n] = fname
            total += t.numel() * t.element_size()
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    (out / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2))
    n_ranks = cfg.vocab_size - 256
    write_tiny_tokenizer(out, n_ranks=n_ranks)
    shutil.copy(Path(__file__).with_name("chat_template.jinja"), out / "chat_template.jinja")
    return out


def tiny_checkpoint_dir(seed: int = 0) -> Path:
    """The demo checkpoint in the user's cache dir, made once."""
    from kimi_local.paths import cache_dir

    d = cache_dir() / f"tiny-kimi-linear-seed{seed}"
    if not (d / "model.safetensors.index.json").is_file():
        tmp = d.with_name(d.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        make_checkpoint(tmp, seed=seed)
        shutil.rmtree(d, ignore_errors=True)
        tmp.rename(d)
    return d
