"""Metrics and protocols against hand-computed cases."""

import math

import numpy as np
import pytest
import torch

from idle_ray.eval.metrics import finalize, merge_sums, metric_sums, ranking_metrics, target_ranks
from idle_ray.eval.protocols import (
    NUM_NEGATIVES,
    candidate_ranks,
    exclusion_mask,
    protocol_ranks,
    sample_candidates,
)

NEG_INF = float("-inf")

# N = 5 items; column 0 is padding and holds a huge score that must never count.
SCORES = torch.tensor(
    [
        [9.0, 0.5, 0.9, 0.5, 0.1, 0.7],  # target 1 (0.5): items 2 (0.9), 3 (0.5 tie), 5 (0.7) above -> rank 3
        [9.0, 0.2, 0.9, 0.5, 0.1, 0.7],  # target 2 (0.9): best -> rank 0
        [9.0, 0.3, 0.3, 0.3, 0.3, 0.3],  # target 4, all tied: pessimistic -> rank 4
    ]
)
TARGETS = torch.tensor([1, 2, 4])


def test_target_ranks_pessimistic_ties_and_padding_ignored():
    assert target_ranks(SCORES, TARGETS).tolist() == [3, 0, 4]


def test_target_ranks_exclusion_never_removes_the_target():
    exclude = torch.zeros(3, 6, dtype=torch.bool)
    exclude[0, [1, 2]] = True  # target 1 is in the history: stays; item 2 leaves -> rank 2
    exclude[2, [1, 2, 4]] = True  # target 4 stays; items 1, 2 leave -> rank 2
    assert target_ranks(SCORES, TARGETS, exclude).tolist() == [2, 0, 2]


def test_target_ranks_nan_counts_against_target():
    scores = torch.tensor([[0.0, 0.5, float("nan"), 0.1], [0.0, float("nan"), 0.2, 0.3]])
    # row 0: the NaN item ranks above the target; row 1: NaN target ranks last
    assert target_ranks(scores, torch.tensor([1, 1])).tolist() == [1, 2]


def test_ranking_metrics_hand_case():
    metrics = ranking_metrics(torch.tensor([3, 0, 12, 25]))
    expected = {
        "hr@1": 1 / 4,
        "hr@5": 2 / 4,
        "hr@10": 2 / 4,
        "hr@20": 3 / 4,
        "ndcg@5": (1 / math.log2(5) + 1) / 4,
        "ndcg@10": (1 / math.log2(5) + 1) / 4,
        "ndcg@20": (1 / math.log2(5) + 1 + 1 / math.log2(14)) / 4,
        "mrr": (1 / 4 + 1 + 1 / 13 + 1 / 26) / 4,
        "mrr@10": (1 / 4 + 1) / 4,
    }
    assert metrics.keys() == expected.keys()
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=1e-12), key


def test_sums_merge_across_batches_equals_one_batch():
    ranks = np.array([3, 0, 12, 25, 7, 1, 40])
    whole = ranking_metrics(ranks)
    merged = merge_sums(metric_sums(ranks[:2]), metric_sums(torch.tensor(ranks[2:])))
    assert merged["count"] == 7
    split = finalize(merged)
    for key in whole:
        assert split[key] == pytest.approx(whole[key], abs=1e-12), key
    # the mean of batch means would be wrong here (batches of 2 and 5)
    mean_of_means = (ranking_metrics(ranks[:2])["mrr"] + ranking_metrics(ranks[2:])["mrr"]) / 2
    assert abs(mean_of_means - whole["mrr"]) > 1e-3
    assert finalize({k: v for k, v in merged.items() if k != "count"}, count=7)["mrr"] == pytest.approx(whole["mrr"])


def test_merge_rejects_mismatched_keys():
    with pytest.raises(ValueError):
        merge_sums(metric_sums([1]), metric_sums([1], ks_hr=(1,)))


def test_exclusion_mask_and_full_protocol():
    mask = exclusion_mask([np.array([1, 3, 0]), np.array([], dtype=np.int64), torch.tensor([5, 5])], num_items=5)
    expected = np.zeros((3, 6), dtype=bool)
    expected[:, 0] = True
    expected[0, [1, 3]] = True
    expected[2, 5] = True
    assert np.array_equal(mask.numpy(), expected)
    # full protocol: row 0 history {2, 3} -> only item 5 beats target 1; row 2 history {1, 4}:
    # target 4 is kept, items 2, 3, 5 tie with it -> rank 3
    histories = [np.array([0, 2, 3]), np.array([]), np.array([1, 4])]
    assert protocol_ranks("full", SCORES, TARGETS, histories).tolist() == [1, 0, 3]


def test_sampled_negatives_exclude_history_and_target_and_are_distinct():
    num_items, history, target = 200, np.arange(1, 51), 60
    candidates = sample_candidates([7], [history], [target], 99, num_items, seed=3)
    assert candidates.shape == (1, 100) and candidates.dtype == torch.int64
    row = candidates[0].numpy()
    assert row[0] == target
    negatives = row[1:]
    assert len(set(negatives.tolist())) == 99
    assert negatives.min() >= 51 and negatives.max() <= num_items
    assert target not in negatives


def test_sampled_negatives_deterministic_per_seed_and_user():
    histories = [np.array([0, 0, 4, 9, 2]), np.array([11, 12]), np.array([30])]
    targets = [5, 13, 31]
    users = [7, 8, 9]
    together = sample_candidates(users, histories, targets, 19, 100, seed=0)
    reversed_batch = sample_candidates(users[::-1], histories[::-1], targets[::-1], 19, 100, seed=0)
    assert torch.equal(together, reversed_batch.flip(0))
    alone = sample_candidates([8], [np.array([12, 11, 0, 12])], [13], 19, 100, seed=0)  # same set, other layout
    assert torch.equal(alone[0], together[1])
    other_seed = sample_candidates(users, histories, targets, 19, 100, seed=1)
    assert not torch.equal(other_seed[:, 1:], together[:, 1:])
    other_user = sample_candidates([70], histories[:1], targets[:1], 19, 100, seed=0)
    assert not torch.equal(other_user[0, 1:], together[0, 1:])


def test_sampled_negatives_dense_history_and_too_few_items():
    # 20 of 30 items seen, target 25: exactly 9 allowed items, so all of them are drawn
    candidates = sample_candidates([1], [np.arange(1, 21)], [25], 9, 30, seed=0)
    assert sorted(candidates[0, 1:].tolist()) == [21, 22, 23, 24, 26, 27, 28, 29, 30]
    with pytest.raises(ValueError):
        sample_candidates([1], [np.arange(1, 21)], [25], 10, 30, seed=0)


def test_sampled_negatives_are_uniform():
    # history {1}, target 2: one negative among 8 allowed items, 1600 users -> about 200 each
    candidates = sample_candidates(np.arange(1600), [np.array([1])] * 1600, [2] * 1600, 1, 10, seed=0)
    counts = np.bincount(candidates[:, 1].numpy(), minlength=11)
    assert counts[:3].sum() == 0
    assert counts[3:].min() > 150 and counts[3:].max() < 250


def test_candidate_ranks_and_llara_hr_at_1():
    candidate_scores = torch.tensor([[0.5, 0.9, 0.5, 0.1]])  # 0.9 and the 0.5 tie rank above -> 2
    assert candidate_ranks(candidate_scores).tolist() == [2]
    # LLaRA: 3 users, 20 candidates; user 0 target strictly best, user 1 tied for best (a miss
    # under pessimistic ties), user 2 target strictly best
    scores = torch.zeros(3, 20)
    scores[0, 0] = 1.0
    scores[1, 0], scores[1, 7] = 1.0, 1.0
    scores[2, 0], scores[2, 3] = 2.0, 1.5
    ranks = candidate_ranks(scores)
    assert ranks.tolist() == [0, 1, 0]
    assert ranking_metrics(ranks)["hr@1"] == pytest.approx(2 / 3)


def test_protocol_ranks_llara_uses_sampled_candidates():
    assert NUM_NEGATIVES == {"full": None, "unmasked": None, "sampled": 99, "llara": 19}
    num_items = 50
    scores = torch.arange(num_items + 1, dtype=torch.float32).repeat(2, 1)  # item i scores i
    scores[:, 0] = NEG_INF
    histories = [np.array([48, 49, 50]), np.array([1, 2])]
    targets = torch.tensor([47, 1])
    ranks = protocol_ranks("llara", scores, targets, histories, user_ids=[0, 1], seed=5)
    candidates = sample_candidates([0, 1], histories, targets, 19, num_items, seed=5)
    # user 0's target 47 beats every negative (all allowed items are < 47); user 1's is the worst
    assert ranks.tolist() == [0, 19]
    assert torch.equal(ranks, candidate_ranks(scores, candidates))
    with pytest.raises(ValueError):
        protocol_ranks("llara", scores, targets, histories)
    with pytest.raises(ValueError):
        protocol_ranks("top5", scores, targets, histories)
