"""Token entropy from logits / log-probs."""

import math

import pytest
import torch

from vlreason.algorithms import entropy_from_logits, entropy_from_logprobs


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: with several intra-op threads on a busy 2-core machine each
    softmax waits milliseconds for the thread pool (gradcheck makes hundreds of calls)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_hand_worked():
    # uniform over 4 -> ln 4 = 1.386294; p = [0.5, 0.25, 0.25] -> 1.5 ln 2 = 1.039721
    assert entropy_from_logits(torch.zeros(4)).item() == pytest.approx(math.log(4))
    lp = torch.log(torch.tensor([0.5, 0.25, 0.25]))
    assert entropy_from_logits(lp + 7.0).item() == pytest.approx(1.5 * math.log(2), abs=1e-6)
    assert entropy_from_logprobs(lp).item() == pytest.approx(1.5 * math.log(2), abs=1e-6)


def reference_loop(logits):
    p = torch.softmax(logits.double(), -1).reshape(-1, logits.shape[-1])
    out = [-sum(x * math.log(x) for x in row.tolist() if x > 0) for row in p]
    return torch.tensor(out, dtype=torch.float64).reshape(logits.shape[:-1])


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape", [(1, 2), (2, 3, 7), (4, 5, 64)])
def test_matches_loop_and_chunked(seed, shape):
    g = torch.Generator().manual_seed(seed)
    logits = 4 * torch.randn(shape, generator=g, dtype=torch.float64)
    expected = reference_loop(logits)
    torch.testing.assert_close(entropy_from_logits(logits), expected)
    torch.testing.assert_close(entropy_from_logits(logits, chunk_size=3), expected)
    torch.testing.assert_close(entropy_from_logprobs(torch.log_softmax(logits, -1)), expected)


def test_masked_vocab_and_half_precision():
    logits = torch.tensor([[0.0, 0.0, -float("inf"), -float("inf")]], requires_grad=True)
    h = entropy_from_logits(logits)
    assert h.item() == pytest.approx(math.log(2))
    (g,) = torch.autograd.grad(h.sum(), logits)
    assert torch.isfinite(g).all()
    assert entropy_from_logprobs(torch.log_softmax(logits.detach(), -1)).item() == pytest.approx(
        math.log(2)
    )
    x = torch.randn(3, 100)
    out = entropy_from_logits(x.bfloat16(), chunk_size=2)
    assert out.dtype == torch.float32 and out.shape == (3,)
    torch.testing.assert_close(out, entropy_from_logits(x.bfloat16().float()))
    assert entropy_from_logits(torch.zeros(0, 5), chunk_size=2).shape == (0,)


def test_gradcheck():
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(entropy_from_logits, (x,))
    assert torch.autograd.gradcheck(lambda z: entropy_from_logits(z, chunk_size=4), (x,))
