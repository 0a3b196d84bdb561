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


def grouped_bars(panels: dict[str, dict[str, list[list[float]]]], categories: list[str], path, title: str = "",
                 groups: list[tuple[str, int]] | None = None, references: dict[str, dict[str, float]] | None = None,
                 ylabel_prefix: str = "test ") -> None:
    """One panel per key of ``panels`` (its y label); at each of ``categories`` (x ticks, may hold newlines)
    one bar per series: the mean of its values there (one per seed), the sample std over seeds as error bars
    (none for one seed). ``groups``: ``(name, how many consecutive categories)`` written under the ticks,
    dotted lines between groups. ``references``: ``{label: {panel: value}}`` as dashed horizontal lines. One
    legend for the figure, under the panels."""
    import numpy as np
    _, plt = _pyplot()
    n = len(categories)
    fig, axes = plt.subplots(1, len(panels), figsize=(max(4.2, 1.25 * n + 1.2) * len(panels), 4.2), squeeze=False)
    handles = {}
    for ax, (ylabel, series) in zip(axes[0], panels.items()):
        width = 0.8 / max(1, len(series))
        x = np.arange(n)
        for i, (label, per_category) in enumerate(series.items()):
            stats = [mean_std(v) for v in per_category]
            err = [s[1] or 0.0 for s in stats] if any(len(v) > 1 for v in per_category) else None
            handles[label] = ax.bar(x + (i - (len(series) - 1) / 2) * width, [s[0] for s in stats], width, yerr=err,
                                    capsize=3, label=label)
        for j, (label, values) in enumerate((references or {}).items()):
            if ylabel in values:
                handles[label] = ax.axhline(values[ylabel], ls=("--", ":", "-.")[j % 3], lw=1.2, color="grey",
                                            label=label)
        ax.set_xticks(x, categories, fontsize=8)
        ax.set_xlim(-0.6, n - 0.4)
        start = 0
        for name, count in groups or []:
            if start:
                ax.axvline(start - 0.5, ls=":", lw=1, color="black")
            ax.text(start + (count - 1) / 2, -0.2, name, transform=ax.get_xaxis_transform(), ha="center",
                    va="top", fontsize=9, fontweight="bold")
            start += count
        ax.set_ylabel(ylabel_prefix + ylabel)
        ax.set_ylim(bottom=0)
        ax.grid(axis="y", alpha=0.3)
    fig.legend(handles=list(handles.values()), loc="lower center", ncol=min(4, len(handles)), fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    _save(fig, path, dpi=120)


def category_maps(rows: dict[str, dict[str, dict[str, dict]]], path, title: str = "", category_name: str = "genre",
                  max_categories: int = 8) -> None:
    """A grid of 2-D maps: one row of panels per key of ``rows`` (its y label, e.g. "PCA"), one panel
    per key of a row (its title). A panel is ``{series label: {"points": [[x, y], ...], "categories":
    [one per point] or None, "marker": str}}``: a series with categories is coloured by category (the
    ``max_categories`` most frequent named in the figure's legend, the rest "other"); one without is
    drawn in its own colour, named in the panel's legend. Axes are the projection's, without units."""
    from collections import Counter

    import numpy as np
    _, plt = _pyplot()
    cats = Counter(c for row in rows.values() for panel in row.values() for s in panel.values()
                   for c in (s.get("categories") or []))
    named = [c for c, _ in cats.most_common(max_categories)]
    palette = plt.get_cmap("tab10")
    colour = {c: palette(i % 10) for i, c in enumerate(named)}
    other = (0.75, 0.75, 0.75, 1.0)
    ncols = max(len(r) for r in rows.values())
    fig, axes = plt.subplots(len(rows), ncols, figsize=(3.6 * ncols, 3.3 * len(rows)), squeeze=False)
    own = iter(["tab:blue", "tab:grey", "tab:orange", "tab:green", "tab:purple"])
    series_colour: dict[str, str] = {}
    for r, (ylabel, row) in enumerate(rows.items()):
        for c, (panel_title, panel) in enumerate(row.items()):
            ax = axes[r][c]
            for label, s in panel.items():
                pts = np.asarray(s["points"], dtype=float).reshape(-1, 2)
                if s.get("categories"):
                    ax.scatter(pts[:, 0], pts[:, 1], s=10, marker=s.get("marker", "o"), linewidths=0.5,
                               c=[colour.get(k, other) for k in s["categories"]])
                else:
                    col = series_colour.setdefault(label, next(own, "black"))
                    ax.scatter(pts[:, 0], pts[:, 1], s=10, marker=s.get("marker", "o"), color=col, label=label,
                               alpha=0.8, linewidths=0.8)
            if any(not s.get("categories") for s in panel.values()):
                ax.legend(fontsize=6, loc="best")
            ax.set_title(panel_title, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(ylabel)
        for c in range(len(row), ncols):
            axes[r][c].axis("off")
    handles = [plt.Line2D([], [], ls="", marker="o", color=colour[c], label=c) for c in named]
    if len(cats) > len(named):
        handles.append(plt.Line2D([], [], ls="", marker="o", color=other, label="other"))
    if handles:
        fig.legend(handles=handles, title=category_name, loc="center right", fontsize=7, title_fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.88 if handles else 1, 1))
    _save(fig, path, dpi=110)
