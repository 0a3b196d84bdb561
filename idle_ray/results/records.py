"""Result records: what every run's result carries, its per-user ranks, and grouping records by variant.

A record is a JSON-able dict: ``variant``, ``seed``, ``config_hash``, ``data_fingerprint``, timing
(``seconds`` / ``train_seconds`` / ``test_seconds``) and, per evaluated split, the evaluation's
output ``{protocol: {metric: mean}, "users": n, "ranks": {"user": [...], protocol: [...]}}`` with
0-based ranks per user sorted by user id (so two records on the same split align by user).
"""
from __future__ import annotations

import numpy as np

from idle_ray.eval.metrics import per_user_metrics
from idle_ray.results.stats import paired_bootstrap


def run_record(*, variant: str, seed: int, config_hash: str, data_fingerprint: str, **fields) -> dict:
    """A record with the fields every result carries first, then ``fields`` (metrics, timing, ...)."""
    return {"variant": variant, "seed": seed, "config_hash": config_hash, "data_fingerprint": data_fingerprint,
            **fields}


def ranks_entry(users, ranks: dict) -> dict:
    """The ``ranks`` field of an evaluation: ``{"user": [...], protocol: [...]}`` sorted by user id.

    ``users``: (n,) user ids; ``ranks``: ``{protocol: (n,) 0-based ranks}`` in the same order."""
    users = np.asarray(users).reshape(-1)
    order = np.argsort(users, kind="stable")
    return {"user": users[order].astype(np.int64).tolist(),
            **{p: np.asarray(r).reshape(-1)[order].astype(np.int64).tolist() for p, r in ranks.items()}}


def user_ranks(record: dict, protocol: str = "full", split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """``(users, ranks)`` of a record's evaluation on ``split``, sorted by user id."""
    entry = record[split].get("ranks")
    if not entry or protocol not in entry:
        raise KeyError(f"record of {record.get('variant')!r} has no per-user {protocol} ranks on {split}")
    return np.asarray(entry["user"]), np.asarray(entry[protocol])


def user_metric(record: dict, metric: str, protocol: str = "full", split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """``(users, values)``: ``metric`` (``hr@k``, ``ndcg@k``, ``mrr``) per user, sorted by user id."""
    users, ranks = user_ranks(record, protocol, split)
    k = int(metric.split("@")[1]) if "@" in metric else None
    per_user = per_user_metrics(ranks, ks_hr=(k,) if metric.startswith("hr@") else (),
                                ks_ndcg=(k,) if metric.startswith("ndcg@") else ())
    return users, per_user[metric]


def compare(a: dict, b: dict, metric: str, protocol: str = "full", split: str = "test", resamples: int = 10_000,
            seed: int = 0) -> tuple[float, float, float]:
    """:func:`paired_bootstrap` of ``metric`` between records ``a`` and ``b`` (a − b), per user."""
    users_a, va = user_metric(a, metric, protocol, split)
    users_b, vb = user_metric(b, metric, protocol, split)
    if not np.array_equal(users_a, users_b):
        raise ValueError(f"records of {a.get('variant')!r} and {b.get('variant')!r} were evaluated on different users")
    return paired_bootstrap(va, vb, resamples=resamples, seed=seed)


def by_variant(records: list[dict], labels: dict | None = None, protocol: str = "full",
               split: str = "test") -> dict[str, list[dict]]:
    """``{label: [metrics of each seed]}`` in first-seen order; ``labels`` renames variants."""
    rows: dict[str, list[dict]] = {}
    for r in records:
        rows.setdefault((labels or {}).get(r["variant"], r["variant"]), []).append(r[split][protocol])
    return rows
