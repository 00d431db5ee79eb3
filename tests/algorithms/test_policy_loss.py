"""Clipped surrogate, off-policy PG, NLL."""

import math

import pytest
import torch

from vlreason.algorithms import (
    AGGREGATIONS,
    POLICY_LOSSES,
    aggregate,
    clipped_surrogate,
    nll_loss,
    pg_loss_BT,
    policy_gradient_loss,
)

# Hand example: A = [+1, -1] per sequence; ratios [0.5, 1.0, 1.5] in both rows; eps 0.2/0.2.
# A=+1: l = max(-r, -clip(r)) -> r=.5: max(-.5, -.8) = -.5 ; r=1: -1 ; r=1.5: max(-1.5, -1.2) = -1.2 (clipped)
# A=-1: l = max(r, clip(r))   -> r=.5: max(.5, .8) = .8 (clipped) ; r=1: 1 ; r=1.5: max(1.5, 1.2) = 1.5
RATIOS = torch.tensor([[0.5, 1.0, 1.5], [0.5, 1.0, 1.5]])
OLD = torch.zeros(2, 3)
LOGP = torch.log(RATIOS)
ADV = torch.tensor([1.0, -1.0])
MASK = torch.ones(2, 3)


def test_hand_worked_per_token():
    loss_BT, ratio_BT, clipped_BT = pg_loss_BT(LOGP, OLD, ADV)
    torch.testing.assert_close(loss_BT, torch.tensor([[-0.5, -1.0, -1.2], [0.8, 1.0, 1.5]]))
    torch.testing.assert_close(ratio_BT, RATIOS)
    assert clipped_BT.tolist() == [[False, False, True], [True, False, False]]


def test_hand_worked_metrics_and_loss():
    loss, m = clipped_surrogate(LOGP, OLD, ADV, MASK)
    # token-mean: (-0.5 - 1 - 1.2 + 0.8 + 1 + 1.5) / 6 = 0.6 / 6 = 0.1
    assert loss.item() == pytest.approx(0.1, abs=1e-6)
    assert m["clip_frac"].item() == pytest.approx(2 / 6)
    assert m["clip_frac_high"].item() == pytest.approx(1 / 6)
    assert m["clip_frac_low"].item() == pytest.approx(1 / 6)
    assert m["ratio_mean"].item() == pytest.approx(1.0)
    assert m["ratio_max"].item() == pytest.approx(1.5)
    # masking the last token of row 1 (unclipped): clip_frac = 2 / 5
    mask = MASK.clone()
    mask[1, 2] = 0
    _, m = clipped_surrogate(LOGP, OLD, ADV, mask)
    assert m["clip_frac"].item() == pytest.approx(2 / 5)
    assert not any(v.requires_grad for v in m.values())


def test_clip_higher():
    # eps_high 0.28: row 0, r = 1.5 -> -min(1.5, 1.28) = -1.28, still clipped; r = 1.25 no longer clipped
    loss_BT, _, clipped = pg_loss_BT(LOGP, OLD, ADV, clip_low=0.2, clip_high=0.28)
    assert loss_BT[0, 2].item() == pytest.approx(-1.28)
    logp = torch.log(torch.tensor([[1.25], [1.25]]))
    _, _, c2 = pg_loss_BT(logp, torch.zeros(2, 1), ADV, clip_high=0.28)
    _, _, c1 = pg_loss_BT(logp, torch.zeros(2, 1), ADV, clip_high=0.2)
    assert c1[0, 0] and not c2[0, 0]


def reference_loop(logp, old, adv, clip_low, clip_high):
    out = torch.empty_like(logp)
    for b in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            r = math.exp(logp[b, t].item() - old[b, t].item())
            a = adv[b].item()
            out[b, t] = -min(r * a, min(max(r, 1 - clip_low), 1 + clip_high) * a)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape", [(1, 1), (4, 7), (6, 16)])
@pytest.mark.parametrize("clips", [(0.2, 0.2), (0.2, 0.28)])
def test_matches_loop(seed, shape, clips):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(shape, generator=g, dtype=torch.float64) * 3
    old = logp + 0.4 * torch.randn(shape, generator=g, dtype=torch.float64)
    adv = torch.randn(shape[0], generator=g, dtype=torch.float64)
    loss_BT, _, _ = pg_loss_BT(logp, old, adv, clip_low=clips[0], clip_high=clips[1])
    torch.testing.assert_close(loss_BT, reference_loop(logp, old, adv, *clips))


def test_on_policy_ratio_one_gradient_flows():
    # old=None: ratio == 1 exactly, d loss_t / d logp_t = -A_t (same gradient as plain PG)
    logp = torch.randn(3, 4, requires_grad=True)
    adv = torch.tensor([0.5, -2.0, 1.0])
    mask = torch.ones(3, 4)
    loss, m = clipped_surrogate(logp, None, adv, mask)
    assert m["ratio_mean"].item() == 1.0 and m["clip_frac"].item() == 0.0
    assert loss.item() == pytest.approx(-adv.mean().item(), abs=1e-6)
    (g_clip,) = torch.autograd.grad(loss, logp)
    loss_pg, _ = policy_gradient_loss(logp, None, adv, mask)
    (g_pg,) = torch.autograd.grad(loss_pg, logp)
    torch.testing.assert_close(g_clip, -adv[:, None].expand(3, 4) / 12)
    torch.testing.assert_close(g_clip, g_pg)


def test_clipped_tokens_have_zero_gradient():
    logp = LOGP.clone().requires_grad_(True)
    loss_BT, _, clipped = pg_loss_BT(logp, OLD, ADV)
    loss_BT.sum().backward()
    assert torch.equal(logp.grad[clipped], torch.zeros(2))
    # unclipped tokens: d(-A r)/d logp = -A r
    expected = (-ADV[:, None] * RATIOS)[~clipped]
    torch.testing.assert_close(logp.grad[~clipped], expected)


def test_per_token_advantages_and_agg_modes():
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(3, 5, generator=g)
    adv_BT = torch.randn(3, 5, generator=g)
    mask = torch.rand(3, 5, generator=g) > 0.3
    for mode in AGGREGATIONS:
        loss, _ = clipped_surrogate(logp, logp, adv_BT, mask, agg_mode=mode)
        torch.testing.assert_close(loss, aggregate(-adv_BT, mask, mode))


def test_pg_and_nll():
    # SOPHIA: l_t = -A logp_t. logp = log 0.5 everywhere, A = 1: loss = ln 2 = NLL
    logp = torch.full((2, 3), math.log(0.5))
    adv = torch.ones(2)
    loss, m = POLICY_LOSSES["pg"](logp, torch.zeros(2, 3) - 9.0, adv, MASK)  # old is ignored
    assert loss.item() == pytest.approx(math.log(2))
    nll, mn = nll_loss(logp, MASK)
    assert nll.item() == pytest.approx(math.log(2)) and mn["nll"].item() == pytest.approx(
        math.log(2)
    )
    assert m["advantage_mean"].item() == 1.0


def test_gradcheck():
    g = torch.Generator().manual_seed(1)
    logp = (-torch.rand(3, 4, generator=g, dtype=torch.float64)).requires_grad_(True)
    old = logp.detach() + 0.3 * torch.randn(3, 4, generator=g, dtype=torch.float64)
    adv = torch.randn(3, generator=g, dtype=torch.float64)
    mask = torch.rand(3, 4, generator=g) > 0.2
    for name, fn in POLICY_LOSSES.items():
        assert torch.autograd.gradcheck(lambda x, f=fn: f(x, old, adv, mask)[0], (logp,)), name
    # (old=None is not gradcheck-able by design: the value is constant in logp, the gradient
    # is the surrogate's; see test_on_policy_ratio_one_gradient_flows)
