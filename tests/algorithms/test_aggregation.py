"""Aggregation modes: hand-worked values, empty rows, micro-batch equivalence."""

import pytest
import torch

from vlreason.algorithms import AGGREGATIONS, aggregate, aggregate_sum_and_count

# loss rows [1, 2, 3, 4] with 3 valid tokens and [5, 6, 7, 8] with 1 valid token
LOSS = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])


def test_token_mean():
    # (1 + 2 + 3 + 5) / 4 = 2.75
    assert aggregate(LOSS, MASK, "token-mean").item() == pytest.approx(2.75)


def test_seq_mean_token_mean():
    # mean(6 / 3, 5 / 1) = mean(2, 5) = 3.5
    assert aggregate(LOSS, MASK, "seq-mean-token-mean").item() == pytest.approx(3.5)


def test_seq_mean_token_sum_norm():
    # default max_tokens = T = 4: mean(6 / 4, 5 / 4) = 1.375; max_tokens = 10: 0.55
    assert aggregate(LOSS, MASK, "seq-mean-token-sum-norm").item() == pytest.approx(1.375)
    assert aggregate(LOSS, MASK, "seq-mean-token-sum-norm", max_tokens=10).item() == pytest.approx(
        0.55
    )


def reference(loss, mask, mode, max_tokens=None):
    rows = []
    for b in range(loss.shape[0]):
        valid = loss[b][mask[b].bool()]
        if len(valid) == 0:
            continue
        if mode == "seq-mean-token-mean":
            rows.append(valid.mean())
        elif mode == "seq-mean-token-sum-norm":
            rows.append(valid.sum() / (max_tokens or loss.shape[1]))
        else:
            rows.append(valid)
    if not rows:
        return torch.tensor(0.0, dtype=loss.dtype)
    if mode == "token-mean":
        return torch.cat(rows).mean()
    return torch.stack(rows).mean()


@pytest.mark.parametrize("mode", list(AGGREGATIONS))
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (8, 33)])
def test_matches_loop(mode, seed, shape):
    g = torch.Generator().manual_seed(seed)
    loss = torch.randn(shape, generator=g, dtype=torch.float64)
    mask = torch.rand(shape, generator=g) > 0.4
    mask[0] = False  # always one empty row
    torch.testing.assert_close(aggregate(loss, mask, mode), reference(loss, mask, mode))


@pytest.mark.parametrize("mode", list(AGGREGATIONS))
def test_empty_rows_and_empty_mask(mode):
    mask = MASK.clone()
    mask = torch.cat([mask, torch.zeros(1, 4, dtype=mask.dtype)])
    loss = torch.cat([LOSS, torch.full((1, 4), 100.0)])
    # an appended empty row changes nothing (except sum-norm's default T, unchanged here)
    torch.testing.assert_close(aggregate(loss, mask, mode), aggregate(LOSS, MASK, mode))
    # all-empty mask: exactly 0, backward works, zero grads
    x = torch.randn(2, 3, requires_grad=True)
    out = aggregate(x, torch.zeros(2, 3), mode)
    assert out.item() == 0.0 and not torch.isnan(out)
    out.backward()
    assert torch.equal(x.grad, torch.zeros(2, 3))


@pytest.mark.parametrize("mode", list(AGGREGATIONS))
def test_micro_batches_with_global_count_equal_full_batch(mode):
    g = torch.Generator().manual_seed(7)
    loss = torch.randn(6, 9, generator=g, dtype=torch.float64)
    lengths = torch.tensor([9, 1, 4, 0, 7, 2])
    mask = torch.arange(9)[None, :] < lengths[:, None]
    full = aggregate(loss, mask, mode, max_tokens=9)
    chunks = [(0, 2), (2, 5), (5, 6)]
    total = sum(
        aggregate_sum_and_count(loss[a:b], mask[a:b], mode, max_tokens=9)[1] for a, b in chunks
    )
    summed = sum(
        aggregate(loss[a:b], mask[a:b], mode, max_tokens=9, global_count=total) for a, b in chunks
    )
    torch.testing.assert_close(summed, full)
    # the naive mean of micro-batch means differs (uneven micro-batches)
    naive = sum(aggregate(loss[a:b], mask[a:b], mode, max_tokens=9) for a, b in chunks) / 3
    assert not torch.allclose(naive, full)


def test_float_mask_weights_and_errors():
    w = torch.tensor([[0.5, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    # (0.5 * 1 + 0.5 * 2 + 5) / 2 = 3.25
    assert aggregate(LOSS, w, "token-mean").item() == pytest.approx(3.25)
    with pytest.raises(ValueError, match="unknown aggregation"):
        aggregate(LOSS, MASK, "mean")
    with pytest.raises(ValueError):
        aggregate(LOSS, MASK[:, :2])


def test_gradcheck():
    loss = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
    for mode in AGGREGATIONS:
        assert torch.autograd.gradcheck(lambda x, m=mode: aggregate(x, mask, m), (loss,))


@pytest.mark.parametrize("mode", list(AGGREGATIONS))
def test_count_of_a_bool_mask(mode):
    # counting only: aggregate_sum_and_count(mask, mask, mode)[1] is a float count
    mask = torch.tensor([[True, True, False], [False, False, False], [True, False, False]])
    count = aggregate_sum_and_count(mask, mask, mode)[1]
    assert count.dtype == torch.float32
    assert count.item() == (3.0 if mode == "token-mean" else 2.0)
