"""KL estimators k1/k2/k3."""

import math

import pytest
import torch

from vlreason.algorithms import KL_ESTIMATORS, kl_k1, kl_k2, kl_k3


def test_hand_worked():
    # logp = log 1 = 0, ref = log 0.5: log-ratio = 0.693147
    # k1 = 0.693147, k2 = 0.5 * 0.693147^2 = 0.240227, k3 = 0.5 + 0.693147 - 1 = 0.193147
    cur = torch.tensor([0.0])
    ref = torch.tensor([math.log(0.5)])
    assert kl_k1(cur, ref).item() == pytest.approx(0.693147, abs=1e-6)
    assert kl_k2(cur, ref).item() == pytest.approx(0.240227, abs=1e-6)
    assert kl_k3(cur, ref).item() == pytest.approx(0.193147, abs=1e-6)
    # k3 formula as written in METHODS.md: exp(ref - cur) - (ref - cur) - 1
    d = ref - cur
    torch.testing.assert_close(kl_k3(cur, ref), torch.exp(d) - d - 1)


def test_zero_when_equal_and_k3_nonnegative():
    x = torch.randn(4, 5)
    for fn in KL_ESTIMATORS.values():
        assert torch.equal(fn(x, x), torch.zeros(4, 5))
    y = torch.randn(4, 5) * 3
    assert (kl_k3(x, y) >= 0).all() and (kl_k2(x, y) >= 0).all()


def test_unbiased_monte_carlo():
    # E_{y ~ p}[k1] = E[k3] = KL(p || q); k2 is close for close p, q
    g = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(torch.randn(6, generator=g), -1)
    logq = torch.log_softmax(logp + 0.3 * torch.randn(6, generator=g), -1)
    exact = (logp.exp() * (logp - logq)).sum().item()
    y = torch.multinomial(logp.exp(), 400_000, replacement=True, generator=g)
    k1 = kl_k1(logp[y], logq[y]).mean().item()
    k3 = kl_k3(logp[y], logq[y]).mean().item()
    k2 = kl_k2(logp[y], logq[y]).mean().item()
    assert k1 == pytest.approx(exact, abs=3e-3)
    assert k3 == pytest.approx(exact, abs=3e-3)
    assert k2 == pytest.approx(exact, rel=0.25)


def test_clamp_keeps_finite():
    cur = torch.tensor([0.0, 0.0], requires_grad=True)
    ref = torch.tensor([-float("inf"), 1000.0])
    for fn in KL_ESTIMATORS.values():
        out = fn(cur, ref)
        assert torch.isfinite(out).all()
        out.sum().backward()
        assert torch.isfinite(cur.grad).all()
        cur.grad = None
    # k3 at log-ratio -20 (cur far below ref): exp(20) - 20 - 1
    assert kl_k3(torch.tensor([0.0]), torch.tensor([50.0])).item() == pytest.approx(
        math.exp(20) - 21, rel=1e-5
    )


def test_gradcheck():
    cur = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    ref = torch.randn(3, 4, dtype=torch.float64)
    for fn in KL_ESTIMATORS.values():
        assert torch.autograd.gradcheck(lambda x, f=fn: f(x, ref), (cur,))
