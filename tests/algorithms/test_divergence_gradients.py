"""Expected gradients of the sampled KL estimators against the exact KL, on both arguments.

Setting: one position, a small categorical P = softmax(z_P) and Q = softmax(z_Q) with the
logits as leaf tensors (float64). The token y is sampled from P (DVRP: rollouts from the
original image; GRPO: from the policy), so an estimator f(log P(y), log Q(y)) used as a
loss has the expected gradient

    E_{y~P}[grad f] = sum_y P(y) grad f(log P(y), log Q(y))      (P(y) as sampling weight)

computed here EXACTLY by summing over all V outcomes with the detached probabilities as
weights: no Monte Carlo noise, so "matches" means to 1e-10. The exact references are
autograd through the full-vocabulary formula (kl_from_logits), itself checked against
the closed forms grad_zP KL(P||Q) = P (log P - log Q - KL) and grad_zQ KL(P||Q) = Q - P.

Findings the tests pin down (why DVRP's sampled mode has a score-function term on the P
side, and what GRPO's k3 reference KL actually differentiates):

| loss term, y ~ P                     | grad on z_Q        | grad on z_P                      |
|--------------------------------------|--------------------|----------------------------------|
| k3(lp, lq), pathwise (old DVRP code) | grad KL(P||Q)  ok  | grad KL(Q||P)   (wrong KL)       |
| k1(lp, lq), pathwise                 | grad KL(P||Q)  ok  | 0                                |
| k2(lp, lq), pathwise                 | not KL's           | grad KL(P||Q)  ok                |
| sampled_token_kl (k1 / k3), new      | grad KL(P||Q)  ok  | grad KL(P||Q)  ok                |
| sampled_token_kl k2, new             | not KL's           | grad KL(P||Q)  ok                |

GRPO (P = pi, Q = ref frozen, gradient through log pi only): k3 gives grad KL(ref||pi),
k2 gives grad KL(pi||ref), k1 gives 0.
"""

from __future__ import annotations

import pytest
import torch

from vlreason.algorithms import KL_ESTIMATORS, kl_from_logits, sampled_token_kl
from vlreason.rollout.chunked import chunked_full_kl, gather_logprobs

SEEDS = range(4)
V = 6


def _logits(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z_p = (1.5 * torch.randn(V, generator=g, dtype=torch.float64)).requires_grad_(True)
    z_q = (1.5 * torch.randn(V, generator=g, dtype=torch.float64)).requires_grad_(True)
    return z_p, z_q


def exact_grads(z_p, z_q, reverse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """grad of KL(P||Q) (or KL(Q||P) with ``reverse``) w.r.t. (z_P, z_Q), full vocabulary."""
    kl = kl_from_logits(z_q, z_p) if reverse else kl_from_logits(z_p, z_q)
    return torch.autograd.grad(kl, (z_p, z_q))


def expected(z_p, z_q, estimator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(E_{y~P} f, E grad_zP f, E grad_zQ f) by summing over all V outcomes."""
    lp, lq = torch.log_softmax(z_p, -1), torch.log_softmax(z_q, -1)
    weight = lp.detach().exp()  # the sampling probability: no gradient through it
    per_outcome = estimator(lp, lq)  # f at y = 0..V-1, elementwise
    total = (weight * per_outcome).sum()
    g_p, g_q = torch.autograd.grad(total, (z_p, z_q), allow_unused=True)
    zeros = torch.zeros_like(z_p)
    return total.detach(), zeros if g_p is None else g_p, zeros if g_q is None else g_q


def close(a, b) -> bool:
    return torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def far(a, b) -> bool:
    """Clearly different: relative L2 error above 5%."""
    return float((a - b).norm() / b.norm()) > 0.05


@pytest.mark.parametrize("seed", SEEDS)
def test_exact_kl_reference_matches_closed_form(seed):
    z_p, z_q = _logits(seed)
    g_p, g_q = exact_grads(z_p, z_q)
    p, q = torch.softmax(z_p, -1).detach(), torch.softmax(z_q, -1).detach()
    kl = (p * (p.log() - q.log())).sum()
    torch.testing.assert_close(g_p, p * (p.log() - q.log() - kl), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_q, q - p, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", ["k1", "k2", "k3"])
def test_sampled_token_kl_gradients_against_exact_kl(seed, name):
    z_p, z_q = _logits(seed)
    value, g_p, g_q = expected(z_p, z_q, lambda lp, lq: sampled_token_kl(lp, lq, name))
    exact_p, exact_q = exact_grads(z_p, z_q)
    kl = kl_from_logits(z_p, z_q).detach()
    # P side (pi_orig in DVRP): exact for every estimator
    assert close(g_p, exact_p), (g_p, exact_p)
    if name in ("k1", "k3"):  # unbiased value and the exact Q-side (view) gradient
        assert close(value, kl) and close(g_q, exact_q)
    else:  # k2: biased value, Q-side gradient is not the KL's
        assert far(g_q, exact_q) and not close(value, kl)


@pytest.mark.parametrize("seed", SEEDS)
def test_sampled_token_kl_detach_p_leaves_only_the_view_gradient(seed):
    z_p, z_q = _logits(seed)
    value, g_p, g_q = expected(z_p, z_q, lambda lp, lq: sampled_token_kl(lp, lq, "k3", detach_p=True))
    assert torch.equal(g_p, torch.zeros_like(g_p))
    assert close(g_q, exact_grads(z_p, z_q)[1]) and close(value, kl_from_logits(z_p, z_q).detach())


@pytest.mark.parametrize("seed", SEEDS)
def test_old_k3_formula_gives_the_reverse_kl_gradient_on_the_sampling_side(seed):
    """The formula DVRP's sampled mode used before the fix: k3 with gradient through both
    log-probs and no score-function term. View side right, original side = grad KL(Q||P)."""
    z_p, z_q = _logits(seed)
    value, g_p, g_q = expected(z_p, z_q, KL_ESTIMATORS["k3"])
    exact_p, exact_q = exact_grads(z_p, z_q)
    assert close(value, kl_from_logits(z_p, z_q).detach()) and close(g_q, exact_q)
    assert far(g_p, exact_p)
    assert close(g_p, exact_grads(z_p, z_q, reverse=True)[0])
    # the score-function term restores it: E[stopgrad(k3) grad log P] is the difference
    lp = torch.log_softmax(z_p, -1)
    k3 = KL_ESTIMATORS["k3"](lp.detach(), torch.log_softmax(z_q, -1).detach())
    (score,) = torch.autograd.grad((lp.detach().exp() * k3 * lp).sum(), z_p)
    assert close(g_p + score, exact_p)


@pytest.mark.parametrize("seed", SEEDS)
def test_old_k1_and_k2_formulas_on_the_sampling_side(seed):
    z_p, z_q = _logits(seed)
    exact_p = exact_grads(z_p, z_q)[0]
    _, g_p1, _ = expected(z_p, z_q, KL_ESTIMATORS["k1"])
    assert torch.allclose(g_p1, torch.zeros(V, dtype=torch.float64), atol=1e-12)  # E[grad log P] = 0
    assert exact_p.norm() > 1e-3
    _, g_p2, _ = expected(z_p, z_q, KL_ESTIMATORS["k2"])
    assert close(g_p2, exact_p)


@pytest.mark.parametrize("seed", SEEDS)
def test_grpo_reference_kl_gradient_on_the_policy(seed):
    """GRPO: y ~ pi, loss beta * kl_fn(log pi(y), log ref(y)), ref frozen. What each
    estimator's expected gradient w.r.t. pi's logits is (docs/algorithms.md)."""
    z_pi, z_ref = _logits(seed)
    z_ref = z_ref.detach().requires_grad_(True)  # only to ask autograd; the loss never uses it

    def grpo_term(name):
        return lambda lp, lq: KL_ESTIMATORS[name](lp, lq.detach())

    kl_pi_ref = exact_grads(z_pi, z_ref)[0]  # grad_pi KL(pi || ref)
    kl_ref_pi = exact_grads(z_pi, z_ref, reverse=True)[0]  # grad_pi KL(ref || pi)
    value3, g3, _ = expected(z_pi, z_ref, grpo_term("k3"))
    assert close(value3, kl_from_logits(z_pi, z_ref).detach())  # unbiased VALUE of KL(pi||ref)
    assert close(g3, kl_ref_pi) and far(g3, kl_pi_ref)  # ... but the gradient of KL(ref||pi)
    _, g2, _ = expected(z_pi, z_ref, grpo_term("k2"))
    assert close(g2, kl_pi_ref)  # k2 as a loss: the exact gradient of KL(pi||ref)
    _, g1, _ = expected(z_pi, z_ref, grpo_term("k1"))
    assert torch.allclose(g1, torch.zeros(V, dtype=torch.float64), atol=1e-12)


def test_grpo_k3_gradient_agrees_with_kl_pi_ref_to_first_order():
    """Near pi = ref the two KLs agree to second order, so their gradients agree to first
    order: the k3 bias is O(|pi - ref|^2) relative to the gradient's O(|pi - ref|)."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(V, generator=g, dtype=torch.float64)
    direction = torch.randn(V, generator=g, dtype=torch.float64)
    errs = []
    for eps in (0.1, 0.01):
        z_pi = (base + eps * direction).requires_grad_(True)
        z_ref = base.clone().requires_grad_(True)
        _, g3, _ = expected(z_pi, z_ref, lambda lp, lq: KL_ESTIMATORS["k3"](lp, lq.detach()))
        exact = exact_grads(z_pi, z_ref)[0]
        errs.append(float((g3 - exact).norm() / exact.norm()))
    assert errs[1] < errs[0] / 5  # relative error shrinks ~linearly with the distance


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", ["k1", "k3"])
def test_recipe_dataflow_hidden_states_and_head(seed, name):
    """The DVRP path: log-probs gathered through the LM head from two views' hidden
    states (chunked), sampled_token_kl, expectation over all tokens; against the exact
    chunked full-vocabulary KL, gradients w.r.t. both hidden states and the head."""
    g = torch.Generator().manual_seed(seed)
    m, h, v = 3, 4, 7
    h_p = torch.randn(m, h, generator=g, dtype=torch.float64, requires_grad=True)
    h_q = torch.randn(m, h, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(v, h, generator=g, dtype=torch.float64, requires_grad=True)
    exact = torch.autograd.grad(chunked_full_kl(h_p, h_q, w, chunk_size=2).sum(), (h_p, h_q, w))
    every = torch.arange(v).expand(m, v)  # each position, each possible sampled token
    lp = gather_logprobs(h_p, w, every, chunk_size=2)
    lq = gather_logprobs(h_q, w, every, chunk_size=2)
    total = (lp.detach().exp() * sampled_token_kl(lp, lq, name)).sum()
    got = torch.autograd.grad(total, (h_p, h_q, w))
    for a, b in zip(got, exact):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
