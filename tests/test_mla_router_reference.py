"""MLA absorbed == expanded; router selects by biased score, weights by unbiased score."""
import torch

from kimi_local.kernels import naive


def test_mla_absorbed_equals_expanded():
    g = torch.Generator().manual_seed(0)
    H, R, Dn, Dr, Dv, S, T = 3, 12, 5, 4, 7, 19, 6
    q = torch.randn(T, H, Dn + Dr, generator=g, dtype=torch.float64)
    c = torch.randn(S, R, generator=g, dtype=torch.float64)
    kpe = torch.randn(S, Dr, generator=g, dtype=torch.float64)
    k_b = torch.randn(H, R, Dn, generator=g, dtype=torch.float64)
    v_b = torch.randn(H, Dv, R, generator=g, dtype=torch.float64)
    q_pos = torch.arange(S - T, S)
    a = naive.mla_absorbed(q, c, kpe, k_b, v_b, q_pos, 0.3)
    b = naive.mla_expanded(q, c, kpe, k_b, v_b, q_pos, 0.3)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # explicit multi-head attention with K = [k_nope || k_pe], V = W_UV c
    h, t = 1, 2
    k_nope = c @ k_b[h]  # [S, Dn]
    keys = torch.cat([k_nope, kpe], -1)[: q_pos[t] + 1]
    p = torch.softmax(keys.float() @ q[t, h].float() * 0.3, 0)
    vals = (c @ v_b[h].t())[: q_pos[t] + 1]
    torch.testing.assert_close(a[t, h], p @ vals.float(), rtol=1e-5, atol=1e-5)


def test_router_biased_selection_unbiased_weights():
    # 4 experts; logits give scores s = sigmoid(l); the bias promotes expert 3 into the top-2
    w = torch.eye(4)
    x = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    bias = torch.tensor([0.0, 0.0, 0.0, 0.9])
    ids, wts = naive.route(x, w, bias, k=2, scale=2.0)
    s = torch.sigmoid(x[0])
    assert sorted(ids[0].tolist()) == [0, 3]  # s+bias: [.88, .73, .5, 1.17]
    expect = {0: s[0] / (s[0] + s[3]) * 2, 3: s[3] / (s[0] + s[3]) * 2}
    for i, e in enumerate(ids[0].tolist()):
        torch.testing.assert_close(wts[0, i], expect[e])
    # the HF remote code's variant weights by the biased scores
    _, wb = naive.route(x, w, bias, k=2, scale=2.0, biased_weights=True)
    sb = s + bias
    for i, e in enumerate(ids[0].tolist()):
        torch.testing.assert_close(wb[0, i], sb[e] / (sb[0] + sb[3]) * 2)
