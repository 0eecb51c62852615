"""bitsandbytes NF4 weights for `--load-in-4bit`: linear weights are quantized one tensor (one expert)
at a time while the HF checkpoint streams in, with no convert step. Works on CPU and CUDA
(bitsandbytes >= 0.45 has CPU NF4 kernels).

`nf4_transform(device)` is the `transform(name, tensor)` hook of `weights.load_dense`: 2-D linear
weights become `NF4Linear` (model.linear() calls `.matmul(x)`), stacked experts [E, out, in] become
`NF4Experts` (the MoE loop indexes `w[e]`). Norms, router, embeddings, conv taps, decay parameters
and the MLA k_b / v_b blocks stay dense.
"""
from __future__ import annotations

import warnings

import torch

from kimi_local.quant.recipe import is_linear_weight

BLOCKSIZE = 64  # values per absmax scale (bitsandbytes' default for NF4)


def _bnb():
    with warnings.catch_warnings():  # bitsandbytes warns at import about optional packages it lacks
        warnings.simplefilter("ignore")
        import bitsandbytes
        import bitsandbytes.functional
    return bitsandbytes


class NF4Linear:
    """One [out, in] weight as NF4 blocks + bitsandbytes quant state."""

    def __init__(self, w: torch.Tensor):
        bnb = _bnb()
        self.shape = tuple(w.shape)
        self.dtype = w.dtype
        self.data, self.state = bnb.functional.quantize_4bit(w, blocksize=BLOCKSIZE, quant_type="nf4")

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, in] -> x @ W.T [T, out] in x's dtype."""
        bnb = _bnb()
        y = bnb.matmul_4bit(x.to(self.dtype), self.data.t(), quant_state=self.state)
        return y.to(x.dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return _bnb().functional.dequantize_4bit(self.data, self.state).to(dtype)

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.state.absmax.numel() * 4


class NF4Experts:
    """A stack of E expert weights [E, out, in], each its own NF4Linear (quantized one at a time)."""

    def __init__(self, w: torch.Tensor):
        self.shape = tuple(w.shape)
        self.experts = [NF4Linear(w[e]) for e in range(w.shape[0])]

    def __getitem__(self, e: int) -> NF4Linear:
        return self.experts[e]

    def __len__(self) -> int:
        return len(self.experts)

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for x in self.experts)


def nf4_transform(device):
    """transform(name, tensor) for load_dense: NF4 for linear weights, the tensor unchanged otherwise.
    Tensors arrive on `device` already (quantization runs where they are)."""
    _bnb()  # fail early (ImportError) rather than on the first tensor

    def transform(name: str, t: torch.Tensor):
        if name == "token_embd.weight" or not is_linear_weight(name):
            return t
        if t.dim() == 3:
            return NF4Experts(t)
        if t.dim() == 2:
            return NF4Linear(t)
        return t

    return transform
