"""Markdown tables of results: one row per model, mean ± std over seeds, the best value per column in bold;
one row per protocol of one evaluation, mean ± standard error over users."""
from __future__ import annotations

from idle_ray.eval.metrics import per_user_metrics
from idle_ray.results.stats import mean_se, mean_std

PROTOCOL_LABELS = {"full": "full (history masked, ours)", "unmasked": "unmasked (history rankable, RecBole's rule)",
                   "sampled": "sampled (99 negatives)", "llara": "llara (19 negatives)"}


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Lines of a Markdown table (cells already formatted)."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
           ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def metrics_table(rows: dict[str, list[dict]], columns, title: str = "", digits: int = 4,
                  first_header: str = "model") -> str:
    """``rows``: ``{label: [metrics dict per seed]}`` (e.g. :func:`idle_ray.results.records.by_variant`).

    A cell is the mean over seeds, ``mean ± std`` (sample std) when there are several; the highest
    mean of each column is bold (higher is better for every ranking metric). A ``seeds`` column
    appears when some row has more than one seed."""
    stats = {label: {c: mean_std([m[c] for m in ms]) for c in columns} for label, ms in rows.items()}
    best = {c: max(s[c][0] for s in stats.values()) for c in columns} if stats else {}
    several = any(len(ms) > 1 for ms in rows.values())

    def cell(c, mean, std):
        text = f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")
        return f"**{text}**" if len(stats) > 1 and mean == best[c] else text

    header = [first_header] + [c.upper() for c in columns] + (["seeds"] if several else [])
    body = [[label] + [cell(c, *stats[label][c]) for c in columns] + ([str(len(rows[label]))] if several else [])
            for label in rows]
    return "\n".join(([f"### {title}", ""] if title else []) + markdown_table(header, body))


def protocols_table(evaluation: dict, columns=("hr@10", "ndcg@10", "mrr@10"), digits: int = 4) -> str:
    """One row per protocol of ``evaluation`` (a record's ``test``: ``{protocol: metrics, "ranks": ...}``),
    each cell the mean over users ± one standard error, from the per-user ranks."""
    ranks = evaluation["ranks"]
    protocols = [p for p in ranks if p != "user"]
    body = []
    for p in protocols:
        per_user = per_user_metrics(ranks[p])
        cells = []
        for c in columns:
            mean, se = mean_se(per_user[c])
            cells.append(f"{mean:.{digits}f}" + (f" ± {se:.{digits}f}" if se is not None else ""))
        body.append([PROTOCOL_LABELS.get(p, p)] + cells)
    return "\n".join(markdown_table(["protocol"] + [c.upper() for c in columns], body))
