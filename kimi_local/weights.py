"""Loading weights: HF safetensors directories (through the index json, memory-mapped) into
canonical GGUF-named tensors (see quant/hf_names.py). Errors are one-line `ModelError`s.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import safe_open

from kimi_local.config import KimiConfig, ModelError
from kimi_local.quant.hf_names import canonical_plan, hf_shapes, iter_canonical

_ST_DTYPES = {"BF16", "F16", "F32", "F64", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2"}


def _check_safetensors_header(path: Path) -> dict:
    """Parse a safetensors header ourselves so corruption gives a clear message, not a panic."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ModelError(f"{path.name}: corrupt safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", raw)
        if n == 0 or 8 + n > size:
            raise ModelError(f"{path.name}: corrupt safetensors header (length {n} exceeds file size {size})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ModelError(f"{path.name}: corrupt safetensors header (not valid JSON)") from None
    end = 8 + n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            a, b = info["data_offsets"]
            ok = info["dtype"] in _ST_DTYPES and 0 <= a <= b and end + b <= size
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise ModelError(f"{path.name}: corrupt safetensors header (bad entry for {name!r}, or file truncated)")
    return header


class HFCheckpoint:
    """An HF model directory: config + lazily opened shards. `get(name)` maps one tensor."""

    def __init__(self, path):
        self.path = Path(path).expanduser()
        if not self.path.exists():
            raise ModelError(f"{self.path}: no such file or directory")
        if not self.path.is_dir():
            raise ModelError(f"{self.path}: not a model directory (expected a Hugging Face dir with config.json)")
        self.cfg = KimiConfig.from_dir(self.path)
        self.weight_map = self._weight_map()
        self.headers = {}
        for shard in sorted(set(self.weight_map.values())):
            p = self.path / shard
            if not p.is_file():
                raise ModelError(f"{self.path}: missing shard {shard} (listed in model.safetensors.index.json)")
            self.headers[shard] = _check_safetensors_header(p)
        self._check_tensors()
        self._open: dict[str, object] = {}

    def _weight_map(self) -> dict[str, str]:
        idx = self.path / "model.safetensors.index.json"
        if idx.is_file():
            try:
                return json.loads(idx.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, UnicodeDecodeError):
                raise ModelError(f"{idx}: not a valid safetensors index (no weight_map)") from None
        single = self.path / "model.safetensors"
        if single.is_file():
            return {n: single.name for n in _check_safetensors_header(single) if n != "__metadata__"}
        raise ModelError(f"{self.path}: no model.safetensors.index.json or model.safetensors")

    def _check_tensors(self) -> None:
        for name, shape in hf_shapes(self.cfg).items():
            shard = self.weight_map.get(name)
            if shard is None or name not in self.headers[shard]:
                raise ModelError(f"{self.path}: missing tensor {name}")
            got = tuple(self.headers[shard][name]["shape"])
            if got != shape:
                raise ModelError(f"{self.path}: tensor {name} has shape {list(got)}, expected {list(shape)}")

    def get(self, name: str) -> torch.Tensor:
        shard = self.weight_map[name]
        f = self._open.get(shard)
        if f is None:
            f = self._open[shard] = safe_open(str(self.path / shard), framework="pt")
        return f.get_tensor(name)

    def iter_canonical(self) -> Iterator[tuple[str, torch.Tensor]]:
        return iter_canonical(self.cfg, self.get)

    def canonical_names(self) -> list[str]:
        return [n for n, _, _ in canonical_plan(self.cfg)]


def is_f32_tensor(name: str) -> bool:
    """Tensors kept in fp32 whatever the compute dtype (spec: router, gate params, state math)."""
    return name.endswith(("ssm_a", "ssm_dt.bias", "ffn_gate_inp.weight", "exp_probs_b.bias"))


def load_dense(ckpt: HFCheckpoint, device="cpu", dtype=torch.float32,
               transform: Callable[[str, torch.Tensor], object] | None = None,
               progress: Callable[[int, int], None] | None = None) -> dict:
    """All canonical tensors on `device`, one at a time (peak extra memory: one stacked tensor).
    `transform(name, tensor)` may return something else to store (e.g. an NF4 weight)."""
    out = {}
    names = ckpt.canonical_names()
    for k, (name, t) in enumerate(ckpt.iter_canonical()):
        t = t.to(device=device, dtype=torch.float32 if is_f32_tensor(name) else dtype)
        out[name] = transform(name, t) if transform else t
        if progress:
            progress(k + 1, len(names))
    return out
