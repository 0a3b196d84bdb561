"""Candidate rows against the best baseline row: per-user metrics averaged over seeds, a paired bootstrap
interval of the difference, and its Markdown table."""
from __future__ import annotations

import numpy as np

from idle_ray.results.records import user_metric
from idle_ray.results.stats import paired_bootstrap
from idle_ray.results.tables import markdown_table


def seed_averaged(records: list[dict], row: str, metric: str) -> np.ndarray:
    """Per-user ``metric`` of ``row`` (records' ``"row"`` field), averaged over its seeds (users sorted by id)."""
    values = [user_metric(r, metric) for r in records if r["row"] == row]
    users = values[0][0]
    if any(not np.array_equal(u, users) for u, _ in values):
        raise ValueError(f"the seeds of {row!r} were evaluated on different users")
    return np.mean([v for _, v in values], axis=0)


def versus_best_baseline(records: list[dict], candidates, baselines, metrics, resamples: int = 10_000) -> list[dict]:
    """Each present candidate row minus the best present baseline row (by mean over seeds), per metric:
    ratio of means and a paired per-user bootstrap of the difference (each user's metric averaged
    over the seeds). One dict per (candidate, metric), candidates outermost."""
    present = {r["row"] for r in records}

    def mean(row, metric):
        return float(np.mean([r["test"]["full"][metric] for r in records if r["row"] == row]))

    out = []
    for candidate in [c for c in candidates if c in present]:
        for metric in metrics:
            means = {row: mean(row, metric) for row in baselines if row in present}
            if not means:
                continue
            best = max(means, key=means.get)
            value = mean(candidate, metric)
            diff, lo, hi = paired_bootstrap(seed_averaged(records, candidate, metric),
                                            seed_averaged(records, best, metric), resamples=resamples)
            out.append({"row": candidate, "metric": metric, "baseline": best, "idle": value,
                        "baseline_value": means[best], "ratio": value / means[best] if means[best] else float("nan"),
                        "diff": diff, "lo": lo, "hi": hi, "resamples": resamples})
    return out


def comparison_table(rows: list[dict], labels: dict[str, str]) -> str:
    """Markdown of :func:`versus_best_baseline`'s rows; ``labels`` names each row key."""
    resamples = rows[0].get("resamples", 10_000) if rows else 10_000
    body = [[labels[c["row"]], c["metric"].upper(), labels[c["baseline"]], f"{c['idle']:.4f}",
             f"{c['baseline_value']:.4f}", f"{c['ratio']:.3f}x", f"{c['diff']:+.4f} [{c['lo']:+.4f}, {c['hi']:+.4f}]"]
            for c in rows]
    return "\n".join(markdown_table(["row", "metric", "best baseline", "IDLE", "baseline", "IDLE / baseline",
                                     f"IDLE − baseline, paired bootstrap 95% (users, {resamples:,} resamples)"], body))
