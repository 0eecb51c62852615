"""Sampler: excluded tokens are never picked, distributions follow the filtered softmax, seeds repeat."""
import math

import pytest
import torch

from kimi_local.cache import ContextOverflow, KimiCache
from kimi_local.config import tiny_config
from kimi_local.generate import (Rng, Sampler, SamplingParams, _penalize, apply_repeat_penalty, filter_logits,
                                 lookahead_steps, make_generator, sample)


def _draw(logits, p, n=3000, seed=0, history=None):
    g = make_generator("cpu", seed)
    return torch.stack([sample(logits, p, g, history) for _ in range(n)])


LOGITS = torch.tensor([3.0, 2.5, 2.0, 1.0, 0.5, 0.0, -1.0, -3.0])


def test_greedy_is_argmax():
    assert int(sample(LOGITS, SamplingParams(temperature=0), None)) == 0


def test_top_k_never_picks_excluded():
    picks = _draw(LOGITS, SamplingParams(temperature=1.5, top_k=3))
    assert set(picks.tolist()) == {0, 1, 2}


def test_top_p_keeps_smallest_prefix_reaching_mass():
    p = SamplingParams(temperature=1.0, top_p=0.7)
    probs = torch.softmax(LOGITS, -1)
    cum = torch.cumsum(probs, 0)
    keep = int((cum < 0.7).sum()) + 1  # the prefix whose mass first reaches 0.7
    picks = set(_draw(LOGITS, p).tolist())
    assert picks == set(range(keep))


def test_min_p_drops_tokens_below_threshold():
    p = SamplingParams(temperature=1.0, min_p=0.2)
    probs = torch.softmax(LOGITS, -1)
    allowed = set(torch.nonzero(probs >= 0.2 * probs.max()).flatten().tolist())
    assert set(_draw(LOGITS, p).tolist()) == allowed


def test_distribution_matches_filtered_softmax():
    p = SamplingParams(temperature=0.8, top_k=4)
    picks = _draw(LOGITS, p, n=20000, seed=3)
    freq = torch.bincount(picks, minlength=8).float() / picks.numel()
    want = torch.softmax(filter_logits(LOGITS, p), -1)
    assert torch.allclose(freq, want, atol=0.015)


def test_seed_reproducible_and_differs():
    p = SamplingParams(temperature=1.0)
    a, b, c = _draw(LOGITS, p, 200, seed=7), _draw(LOGITS, p, 200, seed=7), _draw(LOGITS, p, 200, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_repeat_penalty():
    hist = torch.tensor([0, 6])
    out = apply_repeat_penalty(LOGITS, hist, 2.0)
    assert out[0] == pytest.approx(1.5) and out[6] == pytest.approx(-2.0) and out[1] == LOGITS[1]
    # a strong penalty moves greedy off the repeated token
    assert int(sample(LOGITS, SamplingParams(temperature=0, repeat_penalty=10.0), None, hist)) == 1


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0.0), dict(min_p=1.0), dict(top_k=-1),
                                 dict(repeat_penalty=0)])
def test_invalid_params(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad).validate()


def test_gumbel_draws_repeat_and_follow_the_distribution():
    a, b = Rng("cpu", 5), Rng("cpu", 5)
    zero = torch.zeros(1000)
    g = torch.stack([a.add_gumbel(zero) for _ in range(20)])
    assert torch.equal(g, torch.stack([b.add_gumbel(zero) for _ in range(20)]))  # same seed and steps: same bits
    assert int(a.step) == 20 and torch.isfinite(g).all()
    assert abs(float(g.mean()) - 0.5772) < 0.03 and abs(float(g.var()) - math.pi**2 / 6) < 0.1  # Gumbel(0, 1)
    u = torch.exp(-torch.exp(-g))  # back to the uniform draws
    assert abs(float((u < 0.1).float().mean()) - 0.1) < 0.01
    assert not torch.equal(g[0], g[1]) and not torch.equal(g[0], Rng("cpu", 6).add_gumbel(zero))
    # neighbouring entries and steps are not correlated
    assert abs(float(torch.corrcoef(torch.stack([u[:, :-1].flatten(), u[:, 1:].flatten()]))[0, 1])) < 0.03
    assert abs(float(torch.corrcoef(torch.stack([u[:-1].flatten(), u[1:].flatten()]))[0, 1])) < 0.03


def test_device_penalty_equals_reference_and_ignores_padding():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, generator=g)
    hist = torch.tensor([3, 7, 7, 49, 0])
    want = apply_repeat_penalty(logits, hist, 1.7)
    assert torch.equal(_penalize(logits, torch.cat([hist, torch.tensor([50, 50])]), 1.7), want)


def test_sampler_ring_keeps_last_n_and_state_round_trips():
    p = SamplingParams(temperature=0, repeat_penalty=100.0, repeat_last_n=3)
    logits = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
    s = Sampler(p, 5, "cpu", history=[9, 0])  # 9 is not a token of this vocabulary: ignored
    assert s.ring.tolist() == [0, 5, 5] and int(s.head) == 1
    # the penalty pushes greedy off the last 3 tokens: 0 is seen, so 1, 2, then 3 (0 is still in the ring)
    assert [int(s(logits)) for _ in range(3)] == [1, 2, 3]
    assert sorted(s.ring.tolist()) == [1, 2, 3]
    st = s.state()
    a = [int(s(logits)) for _ in range(4)]
    s.load_state(st)
    assert [int(s(logits)) for _ in range(4)] == a == [0, 1, 2, 3]
    t = Sampler(SamplingParams(temperature=1.0, seed=4), 5, "cpu")
    st = t.state()
    a = [int(t(logits)) for _ in range(30)]
    t.load_state(st)
    assert [int(t(logits)) for _ in range(30)] == a and len(set(a)) > 2


class FakeDevice:
    """A device that feeds and samples by itself (lookahead_steps' launch / read): step m feeds `cur` and
    samples nxt(cur)."""

    def __init__(self, tok, nxt=lambda t: (7 * t + 3) % 50):
        self.cur, self.nxt, self.sampled = tok, nxt, []

    def launch(self, m):
        assert m == len(self.sampled)  # steps are launched in order
        self.cur = self.nxt(self.cur)
        self.sampled.append(self.cur)

    def read(self, m):
        return self.sampled[m]


def _cache(max_ctx=100, pos=10):
    c = KimiCache(tiny_config(), max_ctx=max_ctx)
    c.pos, c.tokens = pos, list(range(pos))
    return c


def _eager(tok, n, stop=()):
    out = []
    for _ in range(n):
        out.append(tok)
        if tok in stop:
            break
        tok = (7 * tok + 3) % 50
    return out


@pytest.mark.parametrize("n,stop", [(1, ()), (12, ()), (12, {38}), (5, {1})])
def test_lookahead_yields_what_one_step_at_a_time_does(n, stop):
    c, d = _cache(), FakeDevice(1)
    got = list(lookahead_steps(c, 1, n, stop, d.launch, d.read))
    assert got == _eager(1, n, stop)
    assert c.tokens[10:] == got and c.pos == 10 + len(got)
    assert len(d.sampled) == len(got)  # no step launched that was not needed (a stop token is fed too)


def test_lookahead_closed_early_records_the_token_fed_ahead():
    c, d = _cache(), FakeDevice(1)
    it = lookahead_steps(c, 1, 50, (), d.launch, d.read)
    got = [next(it) for _ in range(4)]
    assert len(d.sampled) == 5  # step 4 was launched before token 3 was yielded
    it.close()
    assert c.tokens[10:] == _eager(1, 5) and c.tokens[10:14] == got and c.pos == 15


def test_lookahead_error_while_waiting_records_all_launched_steps():
    c, d = _cache(), FakeDevice(1)
    calls = []

    def read(m):
        calls.append(m)
        if len(calls) == 3:  # e.g. Ctrl-C while waiting for step 2: steps 2 and 3 were launched
            raise KeyboardInterrupt
        return d.read(m)

    it = lookahead_steps(c, 1, 50, (), d.launch, read)
    assert [next(it) for _ in range(2)] == _eager(1, 2)
    with pytest.raises(KeyboardInterrupt):
        next(it)
    assert len(d.sampled) == 4 and c.tokens[10:] == _eager(1, 4) and c.pos == 14


def test_lookahead_context_overflow():
    c, d = _cache(max_ctx=14), FakeDevice(1)
    it = lookahead_steps(c, 1, 50, (), d.launch, d.read)
    assert [next(it) for _ in range(4)] == _eager(1, 4)
    with pytest.raises(ContextOverflow):
        next(it)
    assert c.pos == 14 and len(d.sampled) == 4 and c.tokens[10:] == _eager(1, 4)


def test_sampler_greedy_means_argmax_alone():
    """Sampler.greedy (the device stream then picks with kernels.sample.greedy_next, which reads no sampler state):
    temperature 0 without a repeat penalty only, and such a sampler's pick is torch.argmax's."""
    logits = torch.tensor([1.0, 7.0, 7.0, -2.0])
    s = Sampler(SamplingParams(temperature=0), 4, "cpu")
    assert s.greedy and int(s(logits)) == int(torch.argmax(logits)) == 1
    assert not Sampler(SamplingParams(temperature=0, repeat_penalty=1.2), 4, "cpu").greedy
    assert not Sampler(SamplingParams(temperature=0.7, seed=1), 4, "cpu").greedy
