"""HF checkpoint -> llama.cpp `kimi-linear` GGUF, streamed tensor by tensor (spec 5.2 / 5.3 / 10).

The GGUF header (metadata + every tensor's name, shape, type, offset) is known before any weight
is read, so it is written first; then each canonical tensor from `HFCheckpoint.iter_canonical()` is
quantized in chunks (one expert at a time for stacked experts) and its bytes appended. Peak memory
is one canonical tensor (an expert stack) plus one quantized chunk.

Everything goes to `OUT.partial` in the output directory, renamed to OUT only when complete:
an interrupt, a crash or a full disk leaves neither file behind.
"""
from __future__ import annotations

import errno
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import gguf
import numpy as np
import torch

from kimi_local.config import KimiConfig, ModelError
from kimi_local.quant.formats import QTYPES, quantize
from kimi_local.quant.recipe import (Memory, Recipe, canonical_shapes, fit, fmt_bytes, get_recipe, parse_size,
                                     tensor_nbytes, uniform)

ARCH = "kimi-linear"
_CHUNK_VALUES = 1 << 22  # values quantized per step for non-expert tensors (16 MB as fp32)
_HEADER_MARGIN = 64 << 20  # room for metadata (the real vocab + merges take ~10 MB) and padding


@dataclass(frozen=True)
class TensorPlan:
    name: str
    shape: tuple[int, ...]  # canonical (runtime) shape
    qtype: str

    @property
    def gguf_shape(self) -> tuple[int, ...]:
        return gguf_shape(self.name, self.shape)

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.qtype, self.shape)


@dataclass
class ConvertReport:
    out: Path
    recipe: str
    n_tensors: int
    nbytes: int
    seconds: float
    types: dict[str, int] = field(default_factory=dict)  # qtype -> tensor count


def gguf_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """numpy-order GGUF shape of a canonical tensor: the same except conv taps [P, W] -> (1, P, 1, W)
    (ggml ne [W, 1, P, 1]) and ssm_a [H] -> (1, 1, H, 1) (ne [1, H, 1, 1]), as llama.cpp writes them.
    The bytes do not change."""
    if ".ssm_conv1d_" in name:
        return (1, shape[0], 1, shape[1])
    if name.endswith(".ssm_a"):
        return (1, 1, shape[0], 1)
    return shape


def choose_recipe(cfg: KimiConfig, quant: str | None = None, recipe: str | None = None,
                  fit_budget: str | None = None, ctx: int = 131072) -> tuple[Recipe, Memory | None]:
    """The recipe asked for by --quant TYPE, --recipe NAME or --fit SIZE (at most one; default Q4_K_M),
    and for --fit the memory it needs."""
    given = [x for x in (quant, recipe, fit_budget) if x is not None]
    if len(given) > 1:
        raise ValueError("give at most one of --quant, --recipe and --fit")
    if quant is not None:
        return uniform(quant), None
    if fit_budget is not None:
        return fit(parse_size(fit_budget), cfg, ctx)
    return get_recipe(recipe or "Q4_K_M"), None


def plan(cfg: KimiConfig, recipe: Recipe) -> list[TensorPlan]:
    return [TensorPlan(n, s, recipe.qtype(n, s)) for n, s in canonical_shapes(cfg).items()]


# ---- metadata ------------------------------------------------------------------------------------
def add_metadata(w: gguf.GGUFWriter, cfg: KimiConfig, tok_fields: dict, name: str, file_type: int) -> None:
    """The keys llama.cpp's converter writes for kimi-linear (spec 5.3) and its loader needs (spec 10)."""
    w.add_name(name)
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.model_max_length)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_vocab_size(cfg.vocab_size)
    w.add_head_count(cfg.num_attention_heads)
    # 1 = MLA (one latent KV head), 0 = recurrent KDA layer; an array, or every layer would be MLA
    w.add_head_count_kv([0 if cfg.is_kda(i) else 1 for i in range(cfg.num_hidden_layers)])
    w.add_key_length(cfg.latent_dim)  # kv_lora_rank + qk_rope_head_dim
    w.add_value_length(cfg.hidden_size // cfg.num_attention_heads)  # config head_dim artifact, as llama.cpp
    w.add_key_length_mla(cfg.qk_head_dim)
    w.add_value_length_mla(cfg.v_head_dim)
    w.add_kv_lora_rank(cfg.kv_lora_rank)
    w.add_rope_dimension_count(cfg.qk_rope_head_dim)  # width of the k_pe slice; no RoPE is applied
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_expert_count(cfg.num_experts)
    w.add_expert_used_count(cfg.num_experts_per_token)
    w.add_expert_group_used_count(1)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    w.add_expert_shared_count(cfg.num_shared_experts)
    w.add_leading_dense_block_count(cfg.first_k_dense_replace)
    w.add_expert_weights_scale(cfg.routed_scaling_factor)
    w.add_ssm_conv_kernel(cfg.conv_size)
    w.add_kda_head_dim(cfg.kda_head_dim)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(tok_fields["pre"])
    w.add_token_list(tok_fields["tokens"])
    w.add_token_types(tok_fields["token_types"])
    w.add_token_merges(tok_fields["merges"])
    w.add_bos_token_id(tok_fields["bos_id"])
    w.add_eos_token_id(tok_fields["eos_id"])
    if tok_fields["pad_id"] is not None:
        w.add_pad_token_id(tok_fields["pad_id"])
    w.add_chat_template(tok_fields["chat_template"])


def tokenizer_fields(src: Path, vocab_size: int) -> dict:
    """gguf_tokenizer_fields() of the checkpoint's tokenizer, padded to the embedding rows (llama.cpp
    needs one token per row: unused ids become [PAD{id}], type UNUSED)."""
    from kimi_local.tokenizer import KimiTokenizer

    try:
        f = KimiTokenizer.from_dir(src).gguf_tokenizer_fields()
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"{src}: cannot read the tokenizer (tiktoken.model, tokenizer_config.json): {e}") from None
    n = len(f["tokens"])
    if n > vocab_size:
        raise ModelError(f"{src}: the tokenizer has {n} tokens but the embedding only {vocab_size} rows")
    f["tokens"] = f["tokens"] + [f"[PAD{i}]" for i in range(n, vocab_size)]
    f["token_types"] = f["token_types"] + [gguf.TokenType.UNUSED] * (vocab_size - n)
    return f


# ---- tensor data ---------------------------------------------------------------------------------
def encode(t: torch.Tensor, qtype: str, device: torch.device) -> Iterator[np.ndarray]:
    """ggml bytes of tensor t in row order, chunk by chunk: one expert of an [E, rows, cols] stack,
    else about _CHUNK_VALUES values. Quantization runs on `device`."""
    rows = t.reshape(-1, t.shape[-1])  # [N, cols]
    step = t.shape[-2] if t.dim() == 3 else max(1, _CHUNK_VALUES // t.shape[-1])
    for chunk in rows.split(step):
        yield quantize(chunk.to(device), qtype).cpu().numpy().reshape(-1)


class _Progress:
    """Rich progress on stderr: tensors done, bytes written, MB/s, ETA."""

    def __init__(self, total_bytes: int, n_tensors: int, enabled: bool):
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                   TransferSpeedColumn)

        from kimi_local.ui import err_console

        self.n = n_tensors
        self.prog = Progress(TextColumn("[bold]convert"), BarColumn(), TextColumn("{task.fields[tensors]}"),
                             DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
                             console=err_console, disable=not enabled)
        self.task = self.prog.add_task("convert", total=total_bytes, tensors=f"0/{n_tensors} tensors")

    def __enter__(self):
        self.prog.start()
        return self

    def __exit__(self, *exc):
        self.prog.stop()

    def advance(self, nbytes: int) -> None:
        self.prog.advance(self.task, nbytes)

    def tensor_done(self, k: int) -> None:
        self.prog.update(self.task, tensors=f"{k}/{self.n} tensors")


def _pad(f, align: int) -> None:
    f.write(b"\0" * (-f.tell() % align))


def _write_tensors(f, ckpt, plans: list[TensorPlan], device, align: int, progress: _Progress) -> None:
    for k, ((name, t), p) in enumerate(zip(ckpt.iter_canonical(), plans, strict=True)):
        if name != p.name or tuple(t.shape) != p.shape:
            raise ModelError(f"internal error: tensor {name} {tuple(t.shape)} does not match the header "
                             f"({p.name} {p.shape})")
        _pad(f, align)
        written = 0
        for chunk in encode(t, p.qtype, device):
            f.write(memoryview(chunk))
            written += chunk.nbytes
            progress.advance(chunk.nbytes)
        if written != p.nbytes:
            raise ModelError(f"internal error: {name} produced {written} bytes, expected {p.nbytes}")
        del t  # free this tensor (an expert stack) before the next one is read
        progress.tensor_done(k + 1)


def _check_disk(out: Path, need: int) -> None:
    free = shutil.disk_usage(out.parent).free
    if free < need:
        raise ModelError(f"not enough free disk space in {out.parent}: the GGUF needs about {fmt_bytes(need)}, "
                         f"{fmt_bytes(free)} is free")


def convert(src, out, recipe: Recipe, device: str | torch.device = "cpu", force: bool = False,
            progress: bool = True) -> ConvertReport:
    """Write `recipe`'s GGUF of the HF checkpoint `src` to `out` (see the module docstring)."""
    from kimi_local.weights import HFCheckpoint

    out = Path(out).expanduser()
    if out.is_dir():
        raise ModelError(f"{out} is a directory; give the output .gguf file name")
    if out.exists() and not force:
        raise ModelError(f"{out} already exists; pass --force to overwrite it")
    if not out.parent.is_dir():
        raise ModelError(f"{out.parent}: no such directory")
    ckpt = HFCheckpoint(src)
    cfg = ckpt.cfg
    plans = plan(cfg, recipe)
    tok = tokenizer_fields(ckpt.path, cfg.vocab_size)
    total = sum(p.nbytes for p in plans)
    _check_disk(out, total + _HEADER_MARGIN)

    w = gguf.GGUFWriter(None, ARCH)
    add_metadata(w, cfg, tok, ckpt.path.name, recipe.file_type)
    for p in plans:
        raw = gguf.GGMLQuantizationType(QTYPES[p.qtype].ggml_id)
        # a non-uint8 dtype tells the writer that the shape is in values, not bytes
        w.add_tensor_info(p.name, p.gguf_shape, np.dtype(np.float32), p.nbytes, raw_dtype=raw)

    tmp = out.with_name(out.name + ".partial")
    t0 = time.perf_counter()
    try:
        w.write_header_to_file(tmp)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        f = w.fout[0]
        with _Progress(total, len(plans), progress) as prog:
            _write_tensors(f, ckpt, plans, torch.device(device), w.data_alignment, prog)
        f.flush()
        os.fsync(f.fileno())
        w.close()
        os.replace(tmp, out)
    except BaseException as e:
        w.close()
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise ModelError(f"disk full while writing {out.name}; the partial file was removed") from None
        if isinstance(e, OSError):
            raise ModelError(f"writing {out.name} failed ({e}); the partial file was removed") from None
        raise
    types: dict[str, int] = {}
    for p in plans:
        types[p.qtype] = types.get(p.qtype, 0) + 1
    return ConvertReport(out, recipe.name, len(plans), out.stat().st_size, time.perf_counter() - t0, types)
