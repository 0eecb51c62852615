"""Python API: `kimi_local.load(path)` -> `LocalModel` (model + tokenizer on one device).

    m = kimi_local.load("tiny-dir-or-model.gguf", device="cpu")
    m.logits([1, 2, 3])                     # float32 [3, vocab], fresh state
    print(m.generate("Hello", max_tokens=20, temperature=0))
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterator

import torch

from kimi_local.config import ModelError
from kimi_local.generate import SamplingParams, Stats, generate
from kimi_local.model import KimiLinear


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError("--device cuda: no CUDA GPU is available (use --device cpu)")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise ModelError(f"unknown device {device!r} (cpu, cuda, auto)")
    return torch.device(device)


def _fingerprint_dir(path: Path) -> str:
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors.index.json"):
        p = path / name
        if p.is_file():
            h.update(p.read_bytes())
    for p in sorted(path.glob("*.safetensors")):
        h.update(f"{p.name}:{p.stat().st_size}".encode())
    return h.hexdigest()[:32]


class LocalModel:
    def __init__(self, net: KimiLinear, tokenizer, source: Path, fingerprint: str):
        self.net, self.tokenizer, self.source, self.fingerprint = net, tokenizer, source, fingerprint
        self.cfg, self.device = net.cfg, net.device

    def new_cache(self, max_ctx: int | None = None):
        return self.net.new_cache(max_ctx)

    def logits(self, token_ids) -> torch.Tensor:
        """float32 [T, vocab] for a fresh sequence."""
        ids = torch.as_tensor(list(token_ids), dtype=torch.int64)
        return self.net.forward(ids, self.new_cache(), logits="all").cpu()

    def chat_ids(self, prompt: str, system: str | None = None) -> list[int]:
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return self.tokenizer.encode_chat(msgs, add_generation_prompt=True)

    def stream(self, prompt: str, system: str | None = None, max_tokens: int = 256,
               params: SamplingParams | None = None, stats: Stats | None = None,
               cache=None) -> Iterator[str]:
        """Yield text pieces of the assistant's answer to one chat message."""
        cache = cache if cache is not None else self.new_cache()
        dec = self.tokenizer.decode_stream()
        for tok in generate(self.net, cache, self.chat_ids(prompt, system), params or SamplingParams(),
                            max_tokens, self.tokenizer.stop_ids, stats):
            if tok in self.tokenizer.stop_ids:
                break
            piece = dec.push(tok)
            if piece:
                yield piece
        tail = dec.flush()
        if tail:
            yield tail

    def generate(self, prompt: str, system: str | None = None, max_tokens: int = 256, **sampling) -> str:
        return "".join(self.stream(prompt, system, max_tokens, SamplingParams(**sampling)))


def load(path, device: str = "auto", dtype: torch.dtype | None = None, load_in_4bit: bool = False,
         **engine_opts) -> LocalModel:
    """Load an HF directory or a GGUF file. dtype defaults to fp32 on CPU, bf16 on CUDA.
    engine_opts (CUDA only): kv_cache="bf16"|"fp8", use_graph=True, expert_store=None|"cpu"
    (routed experts in pinned host memory, for expert offloading under a --vram budget)."""
    from kimi_local.tokenizer import KimiTokenizer
    from kimi_local.weights import HFCheckpoint, load_dense

    path = Path(path).expanduser()
    dev = resolve_device(device)
    dtype = dtype or (torch.float32 if dev.type == "cpu" else torch.bfloat16)
    if path.is_file() or path.suffix == ".gguf":
        from kimi_local.gguf_file import load_gguf_model

        return load_gguf_model(path, dev, dtype, **engine_opts)
    ckpt = HFCheckpoint(path)
    transform = None
    if load_in_4bit:
        from kimi_local.quant.bnb import nf4_transform

        transform = nf4_transform(dev)
    weights = load_dense(ckpt, dev, dtype, transform)
    net = build_net(ckpt.cfg, weights, dev, dtype, **engine_opts)
    return LocalModel(net, KimiTokenizer.from_dir(path), path, _fingerprint_dir(path))


def build_net(cfg, weights: dict, device: torch.device, dtype, kv_cache: str = "bf16", use_graph: bool = True,
              expert_store: str | None = None):
    """The reference model on CPU; on CUDA the Triton engine (weights moved and repacked once; it
    consumes the `weights` dict to keep peak memory low: pass a copy to keep yours)."""
    if device.type != "cuda" or any(_is_custom(w) for w in weights.values()):  # engine options: CUDA only
        return KimiLinear(cfg, {n: _to(w, device) for n, w in weights.items()}, device, dtype)
    from kimi_local.engine import GpuKimi

    kv = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}[kv_cache]
    return GpuKimi(cfg, weights, device, torch.bfloat16, kv_dtype=kv, use_graph=use_graph, expert_store=expert_store)


def _is_custom(w) -> bool:
    """A weight with its own matmul (e.g. bitsandbytes NF4): the engine cannot repack it."""
    return hasattr(w, "matmul") and not isinstance(w, torch.Tensor)


def _to(w, device):
    return w.to(device) if hasattr(w, "to") else w
