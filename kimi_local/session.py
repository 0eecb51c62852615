"""Session files and prompt-cache files: a KimiCache's whole state in one safetensors file.

Tensors: `cache.state_tensors()` (KDA states, conv tails, MLA latent rows, token ids). String
metadata in the safetensors header: format name and version, kind ("session" or "prompt-cache"),
the model's fingerprint, a SHA-256 of the tensor bytes, and a JSON document (`meta`: messages,
system prompt, sampling settings for a session; the prefix hash for a prompt cache).
Files are written atomically (temp file + rename). No pickle: safetensors holds only raw tensors.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

FORMAT = "kimi-local-state"
VERSION = 1
SESSION, PROMPT_CACHE = "session", "prompt-cache"


class SessionError(Exception):
    """A session or prompt-cache file that can't be used here (one-line message for the user)."""


def model_fingerprint(model) -> str:
    """The model's file fingerprint plus a hash of its norm weights, so that two checkpoints of the
    same shape and size (which a file-level fingerprint may not tell apart) differ. The weights are
    hashed as bf16, which does not depend on the dtype they were loaded in."""
    h = hashlib.sha256(str(model.fingerprint).encode())
    weights = getattr(model.net, "w", {})
    for name in ("output_norm.weight", "blk.0.attn_norm.weight"):
        t = weights.get(name)
        if isinstance(t, torch.Tensor):
            h.update(t.detach().to("cpu", torch.bfloat16).reshape(-1).view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:32]


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def write_state(path: Path, cache, kind: str, fingerprint: str, meta: dict) -> None:
    """Write the cache state and `meta` to `path` atomically."""
    path = Path(path)
    tensors = cache.state_tensors()
    for i, scale in _latent_scales(cache).items():
        tensors[f"latent_scale.{i}"] = scale[: cache.pos].detach().cpu().contiguous()
    header = {"format": FORMAT, "version": str(VERSION), "kind": kind, "fingerprint": fingerprint,
              "checksum": _checksum(tensors), "meta": json.dumps(meta, ensure_ascii=False)}
    data = st_save(tensors, metadata=header)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_header(data: bytes) -> dict:
    """The safetensors string metadata; the tensor index is validated by safetensors' own loader."""
    if len(data) < 8:
        raise ValueError("file too short")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise ValueError("header runs past the end of the file")
    return json.loads(data[8 : 8 + n]).get("__metadata__") or {}


def read_state(path: Path, kind: str, fingerprint: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and meta of a file written by write_state; SessionError when it can't be used with
    this model (another model, another kind of file, corrupt or truncated)."""
    path = Path(path)
    what = "session" if kind == SESSION else "prompt cache"
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SessionError(f"can't read {what} file {path}: {e.strerror or e}") from None
    try:
        header = _read_header(data)
        tensors = st_load(data)
    except Exception:
        raise SessionError(f"{path} is not a kimi-local {what} file (corrupt or truncated)") from None
    if header.get("format") != FORMAT or header.get("kind") != kind:
        raise SessionError(f"{path} is not a kimi-local {what} file")
    if header.get("version") != str(VERSION):
        raise SessionError(f"{path}: unsupported {what} format version {header.get('version')!r}")
    if header.get("fingerprint") != fingerprint:
        raise SessionError(f"{path} was saved with another model (fingerprint "
                           f"{str(header.get('fingerprint'))[:12]}, this model is {fingerprint[:12]})")
    if header.get("checksum") != _checksum(tensors) or "tokens" not in tensors:
        raise SessionError(f"{path} is corrupt (checksum mismatch)")
    try:
        meta = json.loads(header.get("meta", "{}"))
    except json.JSONDecodeError:
        raise SessionError(f"{path} is corrupt (bad metadata)") from None
    return tensors, meta


def _latent_scales(cache) -> dict[int, torch.Tensor]:
    """Per-row scales of an fp8 MLA cache (the GPU engine's --kv-cache fp8), else {}."""
    return getattr(cache, "latent_scale", None) or {}


def restore_cache(tensors: dict[str, torch.Tensor], cache, path: Path) -> None:
    """Load tensors into `cache`; SessionError (cache untouched) when they don't fit."""
    n = tensors["tokens"].numel()
    if n > cache.max_ctx:
        raise SessionError(f"{path} holds {n} tokens, more than the context limit {cache.max_ctx} (raise --ctx)")
    scales = _latent_scales(cache)
    for i, t in cache.latent.items():  # an fp8 cache can't take bf16 rows, nor the reverse
        if f"latent.{i}" in tensors and (tensors[f"latent.{i}"].dtype != t.dtype
                                         or (f"latent_scale.{i}" in tensors) != (i in scales)):
            raise SessionError(f"{path} was saved with another MLA cache type (--kv-cache)")
    try:
        cache.load_state_tensors(tensors)  # checks every shape before it changes anything
    except (ValueError, KeyError) as e:
        raise SessionError(f"{path} does not fit this model: {e}") from None
    for i, scale in scales.items():
        scale[:n] = tensors[f"latent_scale.{i}"].to(scale.device)


# ---- sessions ------------------------------------------------------------------------------
def save_session(path: Path, model, cache, meta: dict) -> None:
    write_state(path, cache, SESSION, model_fingerprint(model), meta)


def read_session(path: Path, model) -> tuple[dict[str, torch.Tensor], dict]:
    """A session file's state tensors (for restore_cache) and meta; SessionError if unusable."""
    return read_state(path, SESSION, model_fingerprint(model))


def load_session(path: Path, model, cache) -> dict:
    """Restore `cache` from a session file and return its meta (messages, system, sampling, ...)."""
    tensors, meta = read_session(path, model)
    restore_cache(tensors, cache, path)
    return meta


# ---- prompt caches -------------------------------------------------------------------------
def common_prefix_len(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def prefix_hash(fingerprint: str, ids: list[int]) -> str:
    h = hashlib.sha256(fingerprint.encode())
    h.update(torch.tensor(ids, dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()


def _cached_prefix(path: Path, fingerprint: str, ids: list[int]) -> dict | None:
    """The prompt cache's tensors when it holds a proper prefix of `ids` for this model, else None."""
    if not Path(path).is_file():
        return None
    try:
        tensors, meta = read_state(path, PROMPT_CACHE, fingerprint)
    except SessionError:
        return None
    n = tensors["tokens"].numel()
    if not 0 < n < len(ids) or meta.get("prefix_hash") != prefix_hash(fingerprint, ids[:n]):
        return None
    if tensors["tokens"].tolist() != ids[:n]:
        return None
    return tensors


def document_prefix_len(tokenizer, ids: list[int], doc: str, system: str | None = None) -> int:
    """How many leading tokens of `ids` (the chat of [system] + user "DOC\n\nPROMPT", as `run`
    builds it) depend only on the system prompt and the document, whatever the prompt: the
    common prefix with the chat of the document and separator alone."""
    msgs = [{"role": "system", "content": system}] if system else []
    msgs.append({"role": "user", "content": doc + "\n\n"})
    return common_prefix_len(ids, tokenizer.encode_chat(msgs, add_generation_prompt=False))


def use_prompt_cache(model, cache, ids: list[int], prefix_len: int, path: Path, stats=None,
                     progress: Callable[[int, int], None] | None = None) -> tuple[list[int], str]:
    """Prefix reuse for `run --prompt-cache`. `ids` is the whole prompt, `ids[:prefix_len]` the part
    that does not depend on the instruction. When the file holds a prefix of `ids` for this model
    (checked by a hash of its token ids and the model fingerprint), restore it into `cache`;
    otherwise prefill `ids[:prefix_len]` and (re)write the file. Returns the ids still to prefill
    and a one-line status for the user."""
    from kimi_local.generate import prefill

    fp = model_fingerprint(model)
    tensors = _cached_prefix(path, fp, ids)
    if tensors is not None:
        try:
            restore_cache(tensors, cache, path)  # checks before it changes anything
            n = tensors["tokens"].numel()
            return ids[n:], f"used ({n} tokens not prefilled)"
        except SessionError:
            pass
    prefix_len = min(prefix_len, len(ids) - 1)
    if prefix_len <= 0:
        return ids, "not used (no document prefix to cache)"
    t0 = time.perf_counter()
    prefill(model.net, cache, ids[:prefix_len], progress=progress)
    if stats is not None:
        stats.prefill_tokens += prefix_len
        stats.prefill_s += time.perf_counter() - t0
    try:
        write_state(path, cache, PROMPT_CACHE, fp, {"prefix_hash": prefix_hash(fp, ids[:prefix_len])})
    except OSError as e:
        return ids[prefix_len:], f"not used; could not be written: {e.strerror or e}"
    return ids[prefix_len:], f"not used; saved the state after {prefix_len} tokens"
