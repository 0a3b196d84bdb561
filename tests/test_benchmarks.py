"""The helpers the ID-model benchmarks rely on: RecBole's batch layout and the masking comparison."""
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from history_masking import split_metrics  # noqa: E402
from sasrec_epoch_speed import right_padded  # noqa: E402


def test_right_padded_moves_the_same_items_to_the_front_in_order():
    left = np.array([[0, 0, 3, 4, 5], [1, 2, 3, 4, 5], [0, 0, 0, 0, 7]])
    got = right_padded(left, np.array([3, 5, 1]))
    assert got.tolist() == [[3, 4, 5, 0, 0], [1, 2, 3, 4, 5], [7, 0, 0, 0, 0]]


class _HistoryLover(torch.nn.Module):
    """Scores every item in the input window above all others, the rest by id."""

    def __init__(self, num_items):
        super().__init__()
        self.num_items = num_items

    def full_sort_predict(self, history):
        scores = torch.arange(self.num_items + 1, dtype=torch.float32).repeat(len(history), 1) / 1000
        scores.scatter_(1, history, 10.0)
        scores[:, 0] = float("-inf")
        return scores


def test_masking_earlier_items_never_lowers_a_metric_and_matters_for_history_lovers(tiny_prepared):
    model = _HistoryLover(tiny_prepared.num_items)
    out = split_metrics(model, tiny_prepared, "test", max_history=50, batch_size=8)
    masked, unmasked = out["masked"], out["unmasked"]
    for key in masked:
        assert masked[key] >= unmasked[key] - 1e-12, key
    # with the window (the user's whole short history here) ranked first, unmasked targets
    # land below len(history) items: HR@1 is 0 unless the history is empty
    assert unmasked["hr@1"] == 0.0
    assert masked["mrr"] > unmasked["mrr"]
