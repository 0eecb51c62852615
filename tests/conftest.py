"""Test set-up. TRITON_INTERPRET must be set before any @triton.jit runs, so it is set here,
at import time of the first conftest, when no CUDA device is present."""
import os

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not _HAS_CUDA:
            item.add_marker(skip_cuda)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny random-weight checkpoint in the real HF layout (made once per test session)."""
    from kimi_local.tiny import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    import kimi_local

    return kimi_local.load(tiny_dir, device="cpu")
