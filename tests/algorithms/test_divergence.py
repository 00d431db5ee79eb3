"""Token divergences: full vocabulary, top-k + tail, Vision-OPD and DVRP losses."""

import math

import pytest
import torch

from vlreason.algorithms import (
    DIVERGENCES,
    dvrp_regularizer,
    forward_kl,
    generalized_jsd,
    kl_from_logits,
    kl_k3,
    reverse_kl,
    sampled_token_kl,
    token_divergence,
    topk_tail_logprobs,
    topk_token_divergence,
    vision_opd_loss,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: with several intra-op threads on a busy 2-core machine each
    softmax waits milliseconds for the thread pool (gradcheck makes hundreds of calls)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# Hand example: S = [0.5, 0.5], T = [0.9, 0.1]
#   KL(T||S) = 0.9 ln 1.8 + 0.1 ln 0.2          = 0.529008 - 0.160944 = 0.368064
#   KL(S||T) = 0.5 ln(5/9) + 0.5 ln 5           = -0.293893 + 0.804719 = 0.510826
#   JSD_0.5: M = [0.7, 0.3]
#     KL(S||M) = 0.5 ln(5/7) + 0.5 ln(5/3)      = -0.168236 + 0.255413 = 0.087177
#     KL(T||M) = 0.9 ln(9/7) + 0.1 ln(1/3)      =  0.226183 - 0.109861 = 0.116322
#     JSD = 0.5 * 0.087177 + 0.5 * 0.116322     = 0.101749
S = torch.log(torch.tensor([0.5, 0.5], dtype=torch.float64))
T = torch.log(torch.tensor([0.9, 0.1], dtype=torch.float64))


def test_hand_worked():
    assert forward_kl(S, T).item() == pytest.approx(0.368064, abs=1e-6)
    assert reverse_kl(S, T).item() == pytest.approx(0.510826, abs=1e-6)
    assert generalized_jsd(S, T, alpha=0.5).item() == pytest.approx(0.101749, abs=1e-6)


def test_alpha_endpoints_gkd_convention():
    # the formula itself vanishes at both ends; alpha=0 / 1 return forward / reverse KL
    assert generalized_jsd(S, T, alpha=0.0).item() == pytest.approx(0.368064, abs=1e-6)
    assert generalized_jsd(S, T, alpha=1.0).item() == pytest.approx(0.510826, abs=1e-6)
    # ... which are the limits of JSD_a / a (a -> 0) and JSD_a / (1 - a) (a -> 1)
    a = 1e-6
    assert (generalized_jsd(S, T, alpha=a) / a).item() == pytest.approx(0.368064, rel=1e-4)
    assert (generalized_jsd(S, T, alpha=1 - a) / a).item() == pytest.approx(0.510826, rel=1e-4)
    with pytest.raises(ValueError):
        generalized_jsd(S, T, alpha=1.5)


def reference_loop(s_logits, t_logits, kind, alpha):
    """Slow reference over positions and vocabulary entries (float64 python math)."""
    lead = s_logits.shape[:-1]
    s = torch.softmax(s_logits.double(), -1).reshape(-1, s_logits.shape[-1])
    t = torch.softmax(t_logits.double(), -1).reshape(-1, t_logits.shape[-1])
    out = []
    for i in range(s.shape[0]):
        ps, pt = s[i].tolist(), t[i].tolist()

        def kl(p, q):
            return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)

        if kind == "forward_kl" or (kind == "jsd" and alpha == 0):
            out.append(kl(pt, ps))
        elif kind == "reverse_kl" or (kind == "jsd" and alpha == 1):
            out.append(kl(ps, pt))
        else:
            m = [(1 - alpha) * a + alpha * b for a, b in zip(ps, pt)]
            out.append((1 - alpha) * kl(ps, m) + alpha * kl(pt, m))
    return torch.tensor(out, dtype=torch.float64).reshape(lead)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape", [(1, 1, 2), (2, 3, 7), (3, 5, 31)])
@pytest.mark.parametrize(
    "kind,alpha",
    [
        ("forward_kl", 0.5),
        ("reverse_kl", 0.5),
        ("jsd", 0.0),
        ("jsd", 0.1),
        ("jsd", 0.5),
        ("jsd", 0.9),
        ("jsd", 1.0),
    ],
)
def test_full_vocab_matches_loop(seed, shape, kind, alpha):
    g = torch.Generator().manual_seed(seed)
    s = 2 * torch.randn(shape, generator=g, dtype=torch.float64)
    t = 2 * torch.randn(shape, generator=g, dtype=torch.float64)
    torch.testing.assert_close(
        token_divergence(s, t, kind, alpha=alpha), reference_loop(s, t, kind, alpha)
    )


def test_logits_or_logprobs_give_the_same():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 9, generator=g), torch.randn(4, 9, generator=g)
    for kind in DIVERGENCES:
        torch.testing.assert_close(
            token_divergence(s + 3.0, t - 1.0, kind),
            token_divergence(torch.log_softmax(s, -1), torch.log_softmax(t, -1), kind),
        )


@pytest.mark.parametrize("seed", range(5))
def test_jsd_symmetric_and_bounded(seed):
    g = torch.Generator().manual_seed(seed)
    s = torch.log_softmax(5 * torch.randn(6, 20, generator=g, dtype=torch.float64), -1)
    t = torch.log_softmax(5 * torch.randn(6, 20, generator=g, dtype=torch.float64), -1)
    j = generalized_jsd(s, t, alpha=0.5)
    torch.testing.assert_close(j, generalized_jsd(t, s, alpha=0.5))
    assert (j >= -1e-12).all() and (j <= math.log(2) + 1e-12).all()
    for alpha in (0.1, 0.3, 0.8):
        h = -(alpha * math.log(alpha) + (1 - alpha) * math.log(1 - alpha))  # binary entropy
        ja = generalized_jsd(s, t, alpha=alpha)
        assert (ja >= -1e-12).all() and (ja <= h + 1e-12).all()
        # JSD_a(S, T) = JSD_{1-a}(T, S)
        torch.testing.assert_close(ja, generalized_jsd(t, s, alpha=1 - alpha))


def test_jsd_reaches_ln2_for_disjoint_supports():
    s = torch.log(torch.tensor([1.0, 0.0, 0.0, 0.0]))
    t = torch.log(torch.tensor([0.0, 0.0, 0.5, 0.5]))
    assert generalized_jsd(s, t, alpha=0.5).item() == pytest.approx(math.log(2))
    assert forward_kl(s, t).item() == math.inf  # true value, no NaN


def test_zero_probabilities_give_finite_gradients():
    logits = torch.tensor(
        [[0.0, 1.0, -float("inf")], [2.0, -float("inf"), 0.5]], requires_grad=True
    )
    teacher = torch.tensor([[1.0, 0.0, -float("inf")], [0.0, -float("inf"), 0.0]])
    for kind in DIVERGENCES:
        out = token_divergence(logits, teacher, kind)
        assert torch.isfinite(out).all(), kind
        (grad,) = torch.autograd.grad(out.sum(), logits)
        assert torch.isfinite(grad).all(), kind


def test_tail_bucket_hand_worked_and_sums_to_one():
    # top-2 probs [0.5, 0.3] -> tail 0.2
    lp = torch.log(torch.tensor([[0.5, 0.3]], dtype=torch.float64))
    out = topk_tail_logprobs(lp)
    torch.testing.assert_close(out.exp(), torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    for v, k in [(50, 1), (50, 10), (50, 49), (151, 100)]:
        logp = torch.log_softmax(3 * torch.randn(2, 4, v, generator=g), -1)
        top = logp.topk(k, dim=-1).values
        full = topk_tail_logprobs(top)
        assert full.shape == (2, 4, k + 1)
        torch.testing.assert_close(full.exp().sum(-1), torch.ones(2, 4), atol=2e-6, rtol=0)


def test_tail_bucket_stable_when_topk_covers_everything():
    # sum of exp slightly above 1 through rounding, or exactly 1: tail stays finite, no NaN
    lp = torch.log_softmax(torch.randn(3, 8), -1)
    lp_over = lp + 1e-6
    for x in (lp, lp_over):
        x = x.clone().requires_grad_(True)
        out = topk_tail_logprobs(x)
        assert torch.isfinite(out).all()
        assert out[..., -1].max().item() <= math.log(1e-6) + 1e-3
        (g,) = torch.autograd.grad(out.sum(), x)
        assert torch.isfinite(g).all()


@pytest.mark.parametrize(
    "kind,alpha", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.2)]
)
@pytest.mark.parametrize("seed", [0, 1])
def test_topk_with_k_equal_v_equals_full_vocab(kind, alpha, seed):
    g = torch.Generator().manual_seed(seed)
    v = 13
    s_logits = 2 * torch.randn(2, 5, v, generator=g)
    t_logits = 2 * torch.randn(2, 5, v, generator=g)
    s_lp, t_lp = torch.log_softmax(s_logits, -1), torch.log_softmax(t_logits, -1)
    top_s, ids = s_lp.topk(v, dim=-1)  # all ids, in the student's order
    t_at_ids = t_lp.gather(-1, ids)
    torch.testing.assert_close(
        topk_token_divergence(top_s, t_at_ids, kind, alpha=alpha),
        token_divergence(s_logits, t_logits, kind, alpha=alpha),
        atol=1e-5,
        rtol=1e-4,
    )


def test_topk_reference_loop():
    # compare with an explicit (K+1)-way construction in float64
    g = torch.Generator().manual_seed(4)
    s_lp = torch.log_softmax(torch.randn(3, 20, generator=g, dtype=torch.float64), -1)
    t_lp = torch.log_softmax(torch.randn(3, 20, generator=g, dtype=torch.float64), -1)
    top_s, ids = s_lp.topk(5, dim=-1)
    t_at = t_lp.gather(-1, ids)
    got = topk_token_divergence(top_s, t_at, "jsd", alpha=0.5)
    for i in range(3):
        ps = top_s[i].exp().tolist()
        pt = t_at[i].exp().tolist()
        ps.append(1 - sum(ps))
        pt.append(1 - sum(pt))
        m = [0.5 * a + 0.5 * b for a, b in zip(ps, pt)]
        ref = 0.5 * sum(a * math.log(a / c) for a, c in zip(ps, m)) + 0.5 * sum(
            b * math.log(b / c) for b, c in zip(pt, m)
        )
        assert got[i].item() == pytest.approx(ref, rel=1e-9)


def test_gradcheck():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    for kind in DIVERGENCES:
        for alpha in (0.0, 0.3, 1.0):
            assert torch.autograd.gradcheck(
                lambda x, k=kind, a=alpha: token_divergence(x, t, k, alpha=a), (s,)
            )
    top = torch.log_softmax(torch.randn(2, 10, generator=g, dtype=torch.float64), -1).topk(4).values
    t_at = torch.log_softmax(torch.randn(2, 10, generator=g, dtype=torch.float64), -1)[:, :4]
    top.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: topk_token_divergence(x, t_at, "jsd"), (top,))


def test_half_precision_inputs_upcast():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 50, generator=g), torch.randn(2, 3, 50, generator=g)
    out = token_divergence(s.bfloat16(), t.bfloat16(), "jsd")
    assert out.dtype == torch.float32
    torch.testing.assert_close(
        out, token_divergence(s.bfloat16().float(), t.bfloat16().float(), "jsd")
    )


def test_sampled_token_kl_and_full_kl():
    g = torch.Generator().manual_seed(0)
    p_logits = torch.randn(7, generator=g, dtype=torch.float64)
    q_logits = p_logits + 0.5 * torch.randn(7, generator=g, dtype=torch.float64)
    exact = kl_from_logits(p_logits, q_logits).item()
    assert exact == pytest.approx(
        reverse_kl(torch.log_softmax(p_logits, -1), torch.log_softmax(q_logits, -1)).item()
    )
    lp, lq = torch.log_softmax(p_logits, -1), torch.log_softmax(q_logits, -1)
    y = torch.multinomial(lp.exp(), 200_000, replacement=True, generator=g)
    est = sampled_token_kl(lp[y], lq[y]).mean().item()
    assert est == pytest.approx(exact, abs=5e-3)
    torch.testing.assert_close(
        sampled_token_kl(lp[y[:10]], lq[y[:10]]), kl_k3(lp[y[:10]], lq[y[:10]])
    )
    with pytest.raises(ValueError, match="unknown KL estimator"):
        sampled_token_kl(lp, lq, "k4")
    with pytest.raises(ValueError, match="unknown divergence"):
        token_divergence(lp, lq, "tv")


def test_vision_opd_loss_weights_and_gradients():
    g = torch.Generator().manual_seed(0)
    s_lp = torch.log_softmax(torch.randn(2, 3, 30, generator=g), -1)
    t_lp = torch.log_softmax(torch.randn(2, 3, 30, generator=g), -1)
    top, ids = s_lp.topk(4, -1)
    top = top.clone().requires_grad_(True)
    t_at = t_lp.gather(-1, ids).requires_grad_(True)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # ratios exp([1, 0, -1]) -> weights min(., 2) = [2, 1, 0.3679]
    logp = torch.tensor([[1.0, 0.0, -1.0], [0.0, 0.0, 0.0]], requires_grad=True)
    old = torch.zeros(2, 3)
    loss, m = vision_opd_loss(top, t_at, mask, logprobs_BT=logp, old_logprobs_BT=old)
    div = topk_token_divergence(top.detach(), t_at.detach(), "jsd", alpha=0.5)
    w = torch.tensor([[2.0, 1.0, math.exp(-1)], [1.0, 1.0, 1.0]])
    expected = ((w * div) * mask).sum() / 5
    torch.testing.assert_close(loss, expected)
    assert m["weight_mean"].item() == pytest.approx((2 + 1 + math.exp(-1) + 2) / 5, abs=1e-6)
    loss.backward()
    assert top.grad is not None and top.grad.abs().sum() > 0
    assert t_at.grad is None and logp.grad is None  # teacher and weights are detached
    # no ratio given -> weight 1, plain token-mean of the divergence
    loss1, m1 = vision_opd_loss(top.detach(), t_at.detach(), mask)
    torch.testing.assert_close(loss1, (div * mask).sum() / 5)
    assert m1["weight_mean"].item() == 1.0
    assert 0 < m1["student_tail_mass"].item() < 1


def test_dvrp_regularizer_hand_worked():
    # l = -0.01 * 2 + 0.01 * 3 + 0.05 * (1 + 4) = -0.02 + 0.03 + 0.25 = 0.26 per token
    ones = torch.ones(2, 2)
    loss, m = dvrp_regularizer(2 * ones, 3 * ones, ones, 4 * ones, ones)
    assert loss.item() == pytest.approx(0.26)
    assert m["kl_mask"].item() == 2.0 and m["entropy_noise"].item() == 4.0
