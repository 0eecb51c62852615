"""kernels/sample.py's gumbel_add against naive.gumbel_ref (CPU: Triton interpreter; CUDA: real vocabulary),
and the device sampler through it."""
import pytest
import torch

from kimi_local.kernels.naive import gumbel_ref
from kimi_local.kernels.sample import greedy_next, gumbel_add


DEV = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the Triton interpreter (tests/conftest.py)


@pytest.mark.parametrize("seed,step,n", [(0, 0, 1), (1, 1, 1023), (2**32 - 1, 12345, 3001), (7, 2**33 + 5, 17),
                                         (123456789, 999, 163840)])
def test_gumbel_add_equals_reference(seed, step, n):
    device = DEV
    g = torch.Generator().manual_seed(n)
    logits = (torch.randn(n + 5, generator=g) * 4).to(device)[3 : 3 + n]  # an offset view
    st = torch.tensor([step], dtype=torch.int64, device=device)
    out = torch.full((n,), float("nan"), device=device)
    got = gumbel_add(logits, seed, st, out=out)
    want = logits.float() + gumbel_ref(seed, st, n)
    assert got is out and int(st) == step  # read, not advanced
    # the same 24-bit uniforms; only the two logs may round differently
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), (got - want).abs().max()


@pytest.mark.cuda
def test_cuda_sampler_uses_the_kernel_and_matches_the_cpu_draws():
    """The CUDA sampler (one gumbel_add launch) picks the same tokens as the CPU reference path for the same seed
    (ties apart), over 300 steps of a 163840-entry vocabulary, also when replayed from a CUDA graph."""
    from kimi_local.generate import Sampler, SamplingParams

    V = 163840
    logits = torch.randn(V, generator=torch.Generator().manual_seed(1)) * 3
    p = SamplingParams(temperature=0.7, top_k=50, seed=11)
    cpu = Sampler(p, V, "cpu")
    want = [int(cpu(logits)) for _ in range(300)]
    gpu = Sampler(p, V, "cuda")
    lg = logits.cuda()
    assert [int(gpu(lg)) for _ in range(150)] == want[:150]
    g = torch.cuda.CUDAGraph()
    out = torch.zeros(1, dtype=torch.int64, device="cuda")
    st = gpu.state()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        gpu(lg)
    torch.cuda.current_stream().wait_stream(s)
    gpu.load_state(st)
    with torch.cuda.graph(g):
        out.copy_(gpu(lg))
    got = []
    for _ in range(150):
        g.replay()
        got.append(int(out))
    assert got == want[150:]


@pytest.mark.parametrize("n", [1, 2047, 2048, 5000, 163840])
def test_greedy_next_equals_argmax(n):
    """greedy_next: torch.argmax's index (the first of tied maxima, across its programs' blocks too), the positions
    + 1, and a counter re-armed for the next call (three calls in a row)."""
    g = torch.Generator().manual_seed(n)
    logits = torch.randn(n, generator=g).to(DEV)
    pos = torch.tensor([7], dtype=torch.int32, device=DEV)
    length = torch.tensor([8], dtype=torch.int32, device=DEV)
    tok = torch.full((1,), -1, dtype=torch.int64, device=DEV)
    cases = [logits, logits.clone().fill_(-3.0), logits.clone()]
    cases[2][n // 3] = cases[2][n - 1] = 99.0  # a tie, possibly in two programs' blocks
    host = torch.full((3,), -1, dtype=torch.int64, pin_memory=DEV == "cuda")  # a ring: slot = position % 3
    for i, x in enumerate(cases):
        greedy_next(x, tok, pos, length, host=host if i else None)
        if DEV == "cuda":
            torch.cuda.synchronize()
        assert int(tok) == int(torch.argmax(x)) and int(pos) == 8 + i and int(length) == 9 + i
        assert host[(7 + i) % 3] == (int(tok) if i else -1)
    assert int(tok) == n // 3 and host.tolist() == [n // 3, -1, int(torch.argmax(cases[1]))]
