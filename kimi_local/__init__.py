"""kimi-local: run Kimi-Linear-48B-A3B on one consumer GPU from the shell."""

__version__ = "0.1.0"


def load(path, device: str = "auto", dtype=None, load_in_4bit: bool = False, **engine_opts):
    """Load an HF directory or GGUF file; see kimi_local.api.load and LocalModel."""
    from kimi_local.api import load as _load

    return _load(path, device=device, dtype=dtype, load_in_4bit=load_in_4bit, **engine_opts)
