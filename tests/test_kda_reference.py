"""KDA reference ops: recurrence vs fla-core's naive oracle, chunked == recurrent, conv tails."""
import pytest
import torch

from kimi_local.kernels import naive


def _inputs(T, H, K, V, seed, strong=False):
    g = torch.Generator().manual_seed(seed)
    q = naive.l2norm(torch.randn(T, H, K, generator=g, dtype=torch.float64))
    k = naive.l2norm(torch.randn(T, H, K, generator=g, dtype=torch.float64))
    v = torch.randn(T, H, V, generator=g, dtype=torch.float64)
    scale = 20.0 if strong else 1.0
    gate = -scale * torch.rand(T, H, K, generator=g, dtype=torch.float64) ** 2
    beta = torch.sigmoid(torch.randn(T, H, generator=g, dtype=torch.float64))
    s0 = torch.randn(H, K, V, generator=g, dtype=torch.float64)
    return q, k, v, gate, beta, s0


def test_recurrent_matches_fla_naive():
    fla_naive = pytest.importorskip("fla.ops.kda.naive")
    q, k, v, g, beta, s0 = (t.float() for t in _inputs(37, 3, 8, 6, 0))
    o, s = naive.kda_recurrent(q, k, v, g, beta, s0)
    o2, s2 = fla_naive.naive_recurrent_kda(q[None], k[None], v[None], g[None], beta[None],
                                           initial_state=s0[None], output_final_state=True)
    torch.testing.assert_close(o, o2[0].float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s, s2[0].float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T,chunk", [(1, 16), (15, 16), (16, 16), (17, 16), (70, 16), (100, 64), (33, 7)])
def test_chunked_equals_recurrent(T, chunk):
    q, k, v, g, beta, s0 = _inputs(T, 2, 8, 5, T, strong=True)
    o1, s1 = naive.kda_recurrent(q, k, v, g, beta, s0)
    o2, s2 = naive.kda_chunked(q, k, v, g, beta, s0, chunk=chunk)
    # fp64 inputs are cast to fp32 inside: compare at fp32 accuracy
    torch.testing.assert_close(o2, o1, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s2, s1, rtol=1e-4, atol=1e-4)


def test_long_horizon_stays_finite_and_split_anywhere():
    q, k, v, g, beta, _ = _inputs(600, 2, 8, 6, 7, strong=True)
    o_all, s_all = naive.kda_chunked(q, k, v, g, beta, None, chunk=64)
    assert torch.isfinite(o_all).all() and torch.isfinite(s_all).all()
    # split the sequence at odd points, carrying the state: same as one pass
    s, outs = None, []
    for a, b in [(0, 131), (131, 132), (132, 397), (397, 600)]:
        o, s = naive.kda_chunked(q[a:b], k[a:b], v[a:b], g[a:b], beta[a:b], s, chunk=64)
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs), o_all, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s, s_all, rtol=1e-4, atol=1e-4)


def test_short_conv_tail_carry():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(23, 10, generator=g)
    w = torch.randn(10, 4, generator=g)
    y_all, tail_all = naive.short_conv(x, w, None)
    tail, ys = None, []
    for a, b in [(0, 1), (1, 3), (3, 4), (4, 17), (17, 23)]:
        y, tail = naive.short_conv(x[a:b], w, tail)
        ys.append(y)
    torch.testing.assert_close(torch.cat(ys), y_all)
    torch.testing.assert_close(tail, tail_all)
    torch.testing.assert_close(tail_all, x[-3:].t())
    # equals torch's depthwise conv1d with left padding
    ref = torch.nn.functional.conv1d(x.t()[None], w[:, None, :], padding=3, groups=10)[0, :, :23].t()
    torch.testing.assert_close(y_all, torch.nn.functional.silu(ref), rtol=1e-5, atol=1e-5)


def test_gate_and_gated_norm():
    f = torch.randn(5, 3, 4)
    a = -torch.tensor([1.0, 2.0, 16.0])
    dt = torch.randn(3, 4)
    g = naive.kda_gate(f, a, dt)
    assert (g <= 0).all()
    torch.testing.assert_close(g, a[:, None] * torch.log1p(torch.exp(f + dt)))
    o, z, w = torch.randn(5, 3, 4), torch.randn(5, 3, 4), torch.randn(4)
    ref = o / torch.sqrt((o**2).mean(-1, keepdim=True) + 1e-5) * w * torch.sigmoid(z)
    torch.testing.assert_close(naive.gated_rms_norm(o, z, w, 1e-5), ref)
