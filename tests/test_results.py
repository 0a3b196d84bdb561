"""idle_ray.results: per-user metrics, the paired bootstrap, records, tables, plots and result files."""
import json
import math

import numpy as np
import pytest

from idle_ray.eval.metrics import metric_sums, per_user_metrics
from idle_ray.results.files import atomic_write, write_json, write_text
from idle_ray.results.plots import bar_plot, curves_plot, scatter_panels
from idle_ray.results.records import by_variant, compare, ranks_entry, run_record, user_metric
from idle_ray.results.stats import mean_std, paired_bootstrap
from idle_ray.results.tables import metrics_table


def test_per_user_metrics_match_the_formulas_and_the_sums():
    ranks = np.array([0, 1, 4, 9, 30])
    m = per_user_metrics(ranks, ks_hr=(1, 5), ks_ndcg=(5,))
    assert m["hr@1"].tolist() == [1, 0, 0, 0, 0] and m["hr@5"].tolist() == [1, 1, 1, 0, 0]
    assert m["ndcg@5"] == pytest.approx([1, 1 / math.log2(3), 1 / math.log2(6), 0, 0])
    assert m["mrr"] == pytest.approx([1, 1 / 2, 1 / 5, 1 / 10, 1 / 31])
    sums = metric_sums(ranks, ks_hr=(1, 5), ks_ndcg=(5,))
    assert sums == {**{k: pytest.approx(v.sum()) for k, v in m.items()}, "count": 5.0}


def test_paired_bootstrap_hand_cases():
    # a constant difference: every resample's mean is it
    assert paired_bootstrap([0.5, 0.3, 0.2], [0.4, 0.2, 0.1], resamples=50) == pytest.approx((0.1, 0.1, 0.1))
    # d = (0, 1): resample means 0, 0.5, 1 with probability 1/4, 1/2, 1/4 -> the 95% interval is [0, 1]
    mean, lo, hi = paired_bootstrap([0.0, 1.0], [0.0, 0.0], resamples=4000, seed=1)
    assert (mean, lo, hi) == (0.5, 0.0, 1.0)


def test_paired_bootstrap_equals_a_brute_force_loop():
    rng = np.random.default_rng(3)
    a, b = rng.random(37), rng.random(37)
    resamples, seed = 1234, 7  # more than one block of draws
    draw = np.random.default_rng(seed)
    means = [np.mean((a - b)[draw.integers(0, 37, size=37)]) for _ in range(resamples)]
    expected = (np.mean(a - b), *np.percentile(means, [2.5, 97.5]))
    assert paired_bootstrap(a, b, resamples=resamples, seed=seed) == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="aligned"):
        paired_bootstrap(a, b[:-1])


def record(variant, ranks, users=(3, 1, 2), seed=0):
    ranks_by_user = ranks_entry(users, {"full": ranks})
    return run_record(variant=variant, seed=seed, config_hash="h", data_fingerprint="f",
                      test={"full": {"hr@1": float(np.mean(np.asarray(ranks) < 1))}, "users": len(users),
                            "ranks": ranks_by_user})


def test_records_align_users_and_compare_per_user():
    a, b = record("idle", [0, 5, 1]), record("id_only", [2, 0, 1], users=(2, 3, 1))
    assert a["test"]["ranks"] == {"user": [1, 2, 3], "full": [5, 1, 0]}
    users, hr = user_metric(a, "hr@1")
    assert users.tolist() == [1, 2, 3] and hr.tolist() == [0, 0, 1]
    mean, lo, hi = compare(a, b, "mrr", resamples=200)
    assert mean == pytest.approx(np.mean([1 / 6 - 1 / 2, 1 / 2 - 1 / 3, 1 - 1]))
    assert lo <= mean <= hi
    with pytest.raises(ValueError, match="different users"):
        compare(a, record("x", [0, 0, 0], users=(1, 2, 4)), "mrr")
    assert list(a)[:4] == ["variant", "seed", "config_hash", "data_fingerprint"]
    assert json.loads(json.dumps(a)) == a


def test_table_mean_std_over_seeds_and_best_in_bold():
    rows = by_variant([record("id_only", [0, 0, 9], seed=s) for s in (0, 1)] + [record("idle", [0, 9, 9])],
                      labels={"id_only": "SASRec"})
    assert list(rows) == ["SASRec", "idle"] and len(rows["SASRec"]) == 2
    rows["SASRec"][1] = {"hr@1": 0.5}
    table = metrics_table(rows, ["hr@1"], title="T")
    mean, std = mean_std([2 / 3, 0.5])
    assert table.splitlines() == ["### T", "", "| model | HR@1 | seeds |", "|---|---|---|",
                                  f"| SASRec | **{mean:.4f} ± {std:.4f}** | 2 |", "| idle | 0.3333 | 1 |"]
    assert "seeds" not in metrics_table({"a": [{"x": 1.0}], "b": [{"x": 2.0}]}, ["x"])
    assert "| b | **2.0000** |" in metrics_table({"a": [{"x": 1.0}], "b": [{"x": 2.0}]}, ["x"])


def test_plots_and_files_are_written_whole(tmp_path):
    bar_plot({"a": [{"x": 0.1}, {"x": 0.2}], "b": [{"x": 0.3}]}, ["x"], tmp_path / "bar.png", "t")
    scatter_panels({"lr": [0.001, 0.01], "k": [2, 8]}, [0.1, 0.2], tmp_path / "s.png", "m", log_x=("lr",))
    curves_plot({"t1": [(1, 0.1), (2, 0.2)]}, tmp_path / "c.png", "epoch", "m")
    for name in ("bar.png", "s.png", "c.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    assert json.loads(write_json(tmp_path / "d" / "r.json", {"a": 1}).read_text()) == {"a": 1}
    assert write_text(tmp_path / "r.md", "x").read_text() == "x"

    def broken(tmp):
        open(tmp, "w").write("half")
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError):
        atomic_write(tmp_path / "r.md", broken)
    assert (tmp_path / "r.md").read_text() == "x"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left
