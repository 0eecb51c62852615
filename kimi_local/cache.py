"""Per-sequence state: KDA recurrent states + conv tails, MLA latent cache, token ids (spec 3.7).

KDA state: [H, K, V] fp32 per KDA layer (K-major, decay on the key axis).
Conv tails: [3, P, W-1] per KDA layer (q, k, v; the last W-1 raw projections, oldest first).
MLA latent: [capacity, R + Dr] per MLA layer (normalised latent || raw k_pe), the first `pos` rows valid.
"""
from __future__ import annotations

import torch

from kimi_local.config import KimiConfig


class ContextOverflow(Exception):
    """More tokens than the context the cache was made for."""


class KimiCache:
    def __init__(self, cfg: KimiConfig, device="cpu", dtype=torch.float32, max_ctx: int | None = None,
                 preallocate: bool = False, kv_dtype: torch.dtype | None = None):
        """max_ctx: hard limit (default: the model's). preallocate: allocate the MLA cache for max_ctx
        up front (GPU path, stable addresses for CUDA graphs); otherwise it grows by doubling.
        kv_dtype: dtype of the MLA latent cache (default: dtype; float8_e4m3fn adds per-row scales)."""
        self.cfg, self.device, self.dtype = cfg, torch.device(device), dtype
        self.max_ctx = max_ctx or cfg.model_max_length
        H, K, P, W = cfg.kda_num_heads, cfg.kda_head_dim, cfg.kda_dim, cfg.conv_size
        self.kda_state = {i: torch.zeros(H, K, K, dtype=torch.float32, device=self.device) for i in cfg.kda_layer_ids}
        self.conv = {i: torch.zeros(3, P, W - 1, dtype=dtype, device=self.device) for i in cfg.kda_layer_ids}
        cap = self.max_ctx if preallocate else min(self.max_ctx, 256)
        kv = kv_dtype or dtype
        self.latent = {i: torch.zeros(cap, cfg.latent_dim, dtype=kv, device=self.device) for i in cfg.mla_layer_ids}
        if kv == torch.float8_e4m3fn:  # row = stored * scale (see kernels/mla.py)
            self.latent_scale = {i: torch.ones(cap, dtype=torch.float32, device=self.device) for i in self.latent}
        self.pos = 0
        self.tokens: list[int] = []

    @property
    def capacity(self) -> int:
        return next(iter(self.latent.values())).shape[0] if self.latent else self.max_ctx

    def check_room(self, n: int) -> None:
        if self.pos + n > self.max_ctx:
            raise ContextOverflow(
                f"context overflow: {self.pos} tokens in context + {n} new > limit {self.max_ctx} "
                f"(by {self.pos + n - self.max_ctx} tokens); raise --ctx or /reset"
            )

    def reserve(self, n: int) -> None:
        """Make room for n more tokens (grows the MLA cache by doubling when not preallocated)."""
        self.check_room(n)
        need = self.pos + n
        if need <= self.capacity:
            return
        cap = self.capacity
        while cap < need:
            cap *= 2
        cap = min(cap, self.max_ctx)
        for i, old in self.latent.items():
            new = torch.zeros(cap, old.shape[1], dtype=old.dtype, device=old.device)
            new[: self.pos] = old[: self.pos]
            self.latent[i] = new

    def advance(self, token_ids) -> None:
        self.tokens.extend(int(t) for t in token_ids)
        self.pos += len(token_ids)

    def clone(self) -> "KimiCache":
        """A snapshot (used by /retry and by prompt caches)."""
        c = KimiCache.__new__(KimiCache)
        c.cfg, c.device, c.dtype, c.max_ctx = self.cfg, self.device, self.dtype, self.max_ctx
        c.kda_state = {i: t.clone() for i, t in self.kda_state.items()}
        c.conv = {i: t.clone() for i, t in self.conv.items()}
        c.latent = {i: t.clone() for i, t in self.latent.items()}
        c.pos, c.tokens = self.pos, list(self.tokens)
        return c

    def restore(self, snap: "KimiCache") -> None:
        """Copy a snapshot's contents into this cache in place (keeps tensor addresses when sizes agree)."""
        for name in ("kda_state", "conv"):
            for i, t in getattr(self, name).items():
                t.copy_(getattr(snap, name)[i])
        self.pos = 0
        self.reserve(snap.pos)
        for i, t in self.latent.items():
            t[: snap.pos] = snap.latent[i][: snap.pos]
        self.pos, self.tokens = snap.pos, list(snap.tokens)

    # ---- serialisation (safetensors-friendly: flat dict of tensors) -----------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        d = {}
        for i, t in self.kda_state.items():
            d[f"kda_state.{i}"] = t.detach().cpu().contiguous()
        for i, t in self.conv.items():
            d[f"conv.{i}"] = t.detach().cpu().contiguous()
        for i, t in self.latent.items():
            d[f"latent.{i}"] = t[: self.pos].detach().cpu().contiguous()
        d["tokens"] = torch.tensor(self.tokens, dtype=torch.int64)
        return d

    def load_state_tensors(self, d: dict[str, torch.Tensor]) -> None:
        """Inverse of state_tensors; raises ValueError when the tensors do not fit this model."""
        tokens = d["tokens"].tolist()
        for name, store in (("kda_state", self.kda_state), ("conv", self.conv)):
            for i, t in store.items():
                src = d.get(f"{name}.{i}")
                if src is None or src.shape != t.shape:
                    raise ValueError(f"state tensor {name}.{i} missing or of the wrong shape")
        for i, t in self.latent.items():
            src = d.get(f"latent.{i}")
            if src is None or src.shape != (len(tokens), t.shape[1]):
                raise ValueError(f"state tensor latent.{i} missing or of the wrong shape")
        self.pos = 0
        self.reserve(len(tokens))
        for name, store in (("kda_state", self.kda_state), ("conv", self.conv)):
            for i, t in store.items():
                t.copy_(d[f"{name}.{i}"])
        for i, t in self.latent.items():
            t[: len(tokens)] = d[f"latent.{i}"].to(t.dtype)
        self.pos, self.tokens = len(tokens), tokens
