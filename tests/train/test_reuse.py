"""vlreason/train/reuse.py: which rollout and mini-batch each update trains on, when
logp_old is recorded, and the two keys' validation (shared by GRPO and Vision-OPD; their
recipe tests run it end to end)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from vlreason.train.metrics import StepTimer
from vlreason.train.reuse import ReuseConfig, Rollout, RolloutReuse, capture_old_logprobs


def _sampler(made: list[Rollout]):
    def sample() -> Rollout:
        rollout = Rollout(minis=[[f"r{len(made)}m{m}"] for m in range(2)], normalisers=[10.0, 20.0],
                          metrics={"reward": float(len(made))})
        made.append(rollout)
        return rollout

    return sample


def test_k_updates_cycle_through_m_mini_batches_then_sample_again():
    reuse, made = RolloutReuse(updates_per_rollout=4, mini_batches=2), []
    turns = [reuse.next(step, _sampler(made)) for step in range(8)]
    assert len(made) == 2  # steps 0-3 on the first rollout, 4-7 on the second
    assert [t.batch for t in turns] == [["r0m0"], ["r0m1"], ["r0m0"], ["r0m1"],
                                        ["r1m0"], ["r1m1"], ["r1m0"], ["r1m1"]]
    assert [t.normaliser for t in turns[:2]] == [10.0, 20.0]
    assert [t.capture_old for t in turns] == [True, False, False, False] * 2
    assert turns[3].metrics() == {"rollout/update": 3, "rollout/mini_batch": 1, "rollout/reused": 1.0}


def test_one_update_per_rollout_is_on_policy_with_no_reuse_metrics():
    reuse, made = RolloutReuse(updates_per_rollout=1, mini_batches=1), []
    turns = [reuse.next(step, _sampler(made)) for step in range(3)]
    assert len(made) == 3
    assert not any(t.capture_old for t in turns) and turns[0].metrics() == {}


def test_a_new_key_samples_a_new_rollout():
    """GRPO keys a rollout by (G, length limit): a PTST stage change samples anew even in
    the middle of a rollout's updates."""
    reuse, made = RolloutReuse(updates_per_rollout=4, mini_batches=2), []
    reuse.next(0, _sampler(made), key=(8, 32))
    turn = reuse.next(1, _sampler(made), key=(8, 32))
    assert len(made) == 1 and turn.update == 1
    turn = reuse.next(2, _sampler(made), key=(4, 64))
    assert len(made) == 2 and turn.update == 0 and turn.rollout.key == (4, 64)


def test_a_resume_inside_a_rollout_samples_a_new_one_and_says_so(caplog):
    reuse, made = RolloutReuse(updates_per_rollout=4, mini_batches=2), []
    with caplog.at_level(logging.WARNING, logger="vlreason.train.reuse"):
        turn = reuse.next(6, _sampler(made))  # a fresh process at step 6 of a K=4 run
    assert turn.update == 0 and len(made) == 1
    assert "step 7: no rollout to reuse (resumed inside a rollout's 4 updates)" in caplog.text


@pytest.mark.parametrize("k, m, message", [(0, 1, "must be >= 1"), (2, 0, "must be >= 1"),
                                            (3, 2, "mini_batches=2 must divide updates_per_rollout=3")])
def test_invalid_counts_are_refused(k, m, message):
    with pytest.raises(ValueError, match=message):
        ReuseConfig(updates_per_rollout=k, mini_batches=m).validate_reuse()


@pytest.mark.parametrize("k, m, filled", [(1, 1, []), (2, 1, []), (4, 2, [1])])
def test_old_logprobs_are_taken_for_the_mini_batches_after_the_first(k, m, filled):
    """Mini-batch 0's logp_old comes from the first update's own forward; the later
    mini-batches' from one pass before it (timed as old_logprobs); none without them."""
    minis = [[SimpleNamespace(old_logprobs_NT=None, n=i)] for i in range(m)]
    timer = StepTimer()
    capture_old_logprobs(minis, lambda micro: torch.full((1, 2), float(micro.n), requires_grad=True),
                         ReuseConfig(updates_per_rollout=k, mini_batches=m), timer)
    assert [i for i, mini in enumerate(minis) if mini[0].old_logprobs_NT is not None] == filled
    for i in filled:
        assert not minis[i][0].old_logprobs_NT.requires_grad and float(minis[i][0].old_logprobs_NT[0, 0]) == i
    assert ("time/old_logprobs" in timer.pop()) == bool(filled)
