"""Sampler: excluded tokens are never picked, distributions follow the filtered softmax, seeds repeat."""
import pytest
import torch

from kimi_local.generate import SamplingParams, apply_repeat_penalty, filter_logits, make_generator, sample


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
