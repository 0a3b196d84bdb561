"""Result plots (matplotlib, Agg backend), each written atomically as PNG."""
from __future__ import annotations

from idle_ray.results.files import atomic_write
from idle_ray.results.stats import mean_std


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return matplotlib, plt


def _save(fig, path, dpi: int):
    _, plt = _pyplot()
    atomic_write(path, lambda t: fig.savefig(t, format="png", dpi=dpi))
    plt.close(fig)


def bar_plot(rows: dict[str, list[dict]], columns, path, title: str = "") -> None:
    """Grouped bars: one group per column, one bar per row label (mean over seeds; std as error bar)."""
    import numpy as np
    _, plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / max(1, len(rows))
    x = np.arange(len(columns))
    for i, (label, ms) in enumerate(rows.items()):
        stats = [mean_std([m[c] for m in ms]) for c in columns]
        err = [s[1] for s in stats] if len(ms) > 1 else None
        ax.bar(x + i * width, [s[0] for s in stats], width, yerr=err, label=label)
    ax.set_xticks(x + width * (len(rows) - 1) / 2, [c.upper() for c in columns])
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path, dpi=120)


def scatter_panels(xs: dict[str, list], ys: list, path, ylabel: str, log_x=()) -> None:
    """One scatter panel per key of ``xs`` (x values) against the shared ``ys``; keys in ``log_x`` on a
    log axis."""
    matplotlib, plt = _pyplot()
    fig, axes = plt.subplots(1, len(xs), figsize=(3.2 * len(xs), 3), sharey=True, squeeze=False)
    for ax, (key, x) in zip(axes[0], xs.items()):
        ax.scatter(x, ys, s=18)
        if key in log_x:
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel(key)
    axes[0][0].set_ylabel(ylabel)
    fig.tight_layout()
    _save(fig, path, dpi=110)


def curves_plot(curves: dict[str, list[tuple]], path, xlabel: str, ylabel: str, max_legend: int = 12) -> None:
    """One line per label through its ``(x, y)`` points; a legend when there are few lines."""
    _, plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, points in curves.items():
        ax.plot([x for x, _ in points], [y for _, y in points], marker="o", ms=3, lw=1, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if len(curves) <= max_legend:
        ax.legend(fontsize=6)
    fig.tight_layout()
    _save(fig, path, dpi=110)


def errorbar_panels(panels: dict[str, dict[str, list[tuple]]], path, xlabel: str, title: str = "",
                    references: dict[str, dict[str, float]] | None = None, log_x: bool = False) -> None:
    """One panel per key of ``panels`` (its y label), one line per series through ``(x, [value per seed])``
    points: the mean, with the sample std over seeds as error bars (none for one seed).
    ``references``: ``{label: {panel: value}}`` drawn as dashed horizontal lines (e.g. the ID model)."""
    matplotlib, plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (ylabel, series) in zip(axes[0], panels.items()):
        for label, points in series.items():
            stats = [mean_std(values) for _, values in points]
            err = [s[1] or 0.0 for s in stats] if any(len(v) > 1 for _, v in points) else None
            ax.errorbar([x for x, _ in points], [s[0] for s in stats], yerr=err, marker="o", ms=4, capsize=3,
                        label=label)
        for label, values in (references or {}).items():
            if ylabel in values:
                ax.axhline(values[ylabel], ls="--", lw=1, color="grey", label=label)
        if log_x:
            ax.set_xscale("log", base=2)
            xs = sorted({x for points in series.values() for x, _ in points})
            ax.set_xticks(xs, [str(x) for x in xs])
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path, dpi=120)
