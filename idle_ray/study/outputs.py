"""The study's outputs from its records alone: Table 1 (mean ± std over seeds, best per column in bold,
IDLE minus the best baseline with a paired per-user bootstrap), Figure 2 (HR@5 and NDCG@5 of IDLE and
LLM-only per backbone, grouped by kind and size, error bars over seeds, the best ID-only model as a
reference), Figure 3 (HR@5 and NDCG@5 against the prompt length, error bars over seeds), Figure 4 (the representation map, drawn from its saved 2-D series,
:mod:`idle_ray.study.representations`) and ``results.json`` holding every record (per-user ranks, seed,
config hash, data fingerprint) and Figure 4's series, so the tables and figures can be recomputed without
training (:func:`results_from_file`)."""
from __future__ import annotations

import json
import os

from idle_ray.config import ConfigError, ExperimentConfig, config_hash, experiment_from_dict, to_dict
from idle_ray.results.comparison import comparison_table, versus_best_baseline
from idle_ray.results.files import write_json, write_text
from idle_ray.llm.catalog import figure_order, size_label
from idle_ray.results.plots import category_maps, errorbar_panels, grouped_bars
from idle_ray.results.stats import mean_std
from idle_ray.results.tables import metrics_table
from idle_ray.study.cells import (BASELINES, COLUMNS, FIG3_METRICS, MODEL_NAMES, figure2_cells,
                                  figure3_cells, label, study_hash, table_cells)


def data_summary(manifest: dict) -> dict:
    """What the outputs say about the data (from a prepared dataset's manifest)."""
    return {k: manifest[k] for k in ("dataset", "num_users", "num_items", "fingerprint")}


def _by_cell(records: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in records:
        out.setdefault(r["cell"], []).append(r)
    return out


def _stats(recs: list[dict], columns) -> dict:
    stats = {c: mean_std([r["test"]["full"][c] for r in recs]) for c in columns}
    return {"mean": {c: s[0] for c, s in stats.items()}, "std": {c: s[1] for c, s in stats.items()}}


def table1(cfg: ExperimentConfig, data: dict, records: list[dict]) -> dict:
    """Rows (cell, label, seeds, mean, std), the comparison, and the Markdown of both."""
    by_cell, cells = _by_cell(records), table_cells(cfg)
    missing = [c.key for c in cells if c.key not in by_cell]
    if missing:
        raise ValueError(f"no records for Table 1 row(s) {missing}")
    labels = {c.key: label(cfg, c) for c in cells}
    rows = [{"cell": c.key, "row": c.row, "id_model": c.id_model, "label": labels[c.key],
             "seeds": [r["seed"] for r in by_cell[c.key]], **_stats(by_cell[c.key], COLUMNS)} for c in cells]
    keyed = [{**r, "row": c.key} for c in cells for r in by_cell[c.key]]
    compared = versus_best_baseline(keyed, [c.key for c in cells if c.row == "idle"],
                                    [c.key for c in cells if c.row in BASELINES], COLUMNS,
                                    resamples=cfg.study.bootstrap_resamples)
    title = (f"Table 1: {data['dataset']} test, full ranking over {data['num_items']:,} items, "
             f"{data['num_users']:,} users; backbone {cfg.llm.backbone}; mean ± std over seeds "
             f"{', '.join(map(str, cfg.study.seeds))}; LLM-only, LLaRA and ablations on "
             f"{MODEL_NAMES[cfg.study.id_models[0]]}")
    text = metrics_table({labels[c.key]: [r["test"]["full"] for r in by_cell[c.key]] for c in cells}, COLUMNS, title)
    if compared:
        text += "\n\n#### IDLE minus the best baseline (per column)\n\n" + comparison_table(compared, labels)
    text += (f"\n\nconfig hash {config_hash(cfg)}, study hash {study_hash(cfg)}, data fingerprint "
             f"{data['fingerprint'][:12]}; per-user ranks behind every number in results.json\n")
    return {"columns": list(COLUMNS), "rows": rows, "comparison": compared, "markdown": text}


def figure3(cfg: ExperimentConfig, data: dict, records: list[dict]) -> dict | None:
    """Series per metric over the prompt lengths (values per seed, mean, std), the ID-only reference."""
    cells = figure3_cells(cfg)
    if not cells:
        return None
    by_cell = _by_cell(records)
    missing = [c.key for c in cells if c.key not in by_cell]
    if missing:
        raise ValueError(f"no records for Figure 3 point(s) {missing}")
    series = {}
    for m in FIG3_METRICS:
        values = [[r["test"]["full"][m] for r in by_cell[c.key]] for c in cells]
        stats = [mean_std(v) for v in values]
        series[m] = {"label": label(cfg, cells[0]), "cells": [c.key for c in cells], "values": values,
                     "mean": [s[0] for s in stats], "std": [s[1] for s in stats]}
    ref_key = f"id_only-{cells[0].id_model}"
    reference = None
    if ref_key in by_cell:
        reference = {"label": f"{MODEL_NAMES[cells[0].id_model]} (ID-only)", "cell": ref_key,
                     "mean": _stats(by_cell[ref_key], FIG3_METRICS)["mean"]}
    return {"x": [c.prompt_length for c in cells], "xlabel": "prompt length k (ID tokens in the prompt)",
            "series": series, "reference": reference,
            "title": f"Figure 3: prompt length, {data['dataset']} test, backbone {cfg.llm.backbone}; mean ± std "
                     f"over seeds {', '.join(map(str, cfg.study.seeds))}"}


def figure2(cfg: ExperimentConfig, data: dict, records: list[dict]) -> dict | None:
    """IDLE and LLM-only per backbone (values per seed, mean, std per metric), the backbones in plot order
    (:func:`idle_ray.llm.catalog.figure_order`: decoders then encoders, smallest first), and the best
    ID-only model per metric (highest mean among Table 1's ID-only rows; None without them). None when
    the study has neither row."""
    cells, by_cell = figure2_cells(cfg), _by_cell(records)
    if not cells:
        return None
    missing = [c.key for row_cells in cells.values() for c in row_cells.values() if c.key not in by_cell]
    if missing:
        raise ValueError(f"no records for Figure 2 point(s) {missing}")
    backbones = figure_order(list(cells))
    series = {}
    for m in FIG3_METRICS:
        series[m] = {}
        for row in next(iter(cells.values())):
            keys = [cells[b["name"]][row].key for b in backbones]
            values = [[r["test"]["full"][m] for r in by_cell[k]] for k in keys]
            stats = [mean_std(v) for v in values]
            series[m][row] = {"label": label(cfg, cells[backbones[0]["name"]][row]), "cells": keys, "values": values,
                              "mean": [st[0] for st in stats], "std": [st[1] for st in stats]}
    id_only = [c for c in table_cells(cfg) if c.row == "id_only" and c.key in by_cell]
    reference = None
    if id_only:
        means = {c.key: _stats(by_cell[c.key], FIG3_METRICS)["mean"] for c in id_only}
        reference = {}
        for m in FIG3_METRICS:
            best = max(id_only, key=lambda c: means[c.key][m])
            reference[m] = {"label": f"best ID-only: {MODEL_NAMES[best.id_model]}", "cell": best.key,
                            "mean": means[best.key][m]}
    return {"x": [b["name"] for b in backbones], "backbones": backbones, "series": series, "reference": reference,
            "title": f"Figure 2: backbones, {data['dataset']} test; IDLE on {MODEL_NAMES[cfg.study.id_models[0]]}, "
                     f"k = {cfg.adapter.prompt_length}; mean ± std over seeds {', '.join(map(str, cfg.study.seeds))}"}


def draw_figure2(fig: dict, path: str) -> None:
    """Two panels (HR@5, NDCG@5): bars per backbone for IDLE and LLM-only, decoders and encoders grouped,
    the best ID-only model per metric as a dashed line."""
    ticks = [b["label"] + (f"\n{size_label(b['parameters'])} params" if b["parameters"] else "") for b in fig["backbones"]]
    kinds = [b["kind"] for b in fig["backbones"]]
    groups = [(f"{kind}s", kinds.count(kind)) for kind in dict.fromkeys(kinds)]
    panels = {m.upper(): {s["label"]: s["values"] for s in rows.values()} for m, rows in fig["series"].items()}
    references = {}
    for m, ref in (fig["reference"] or {}).items():
        references.setdefault(ref["label"], {})[m.upper()] = ref["mean"]
    grouped_bars(panels, ticks, path, fig["title"], groups=groups, references=references)


def figure4(cfg: ExperimentConfig, data: dict, series: dict | None) -> dict | None:
    """Figure 4's series (:func:`idle_ray.study.representations.representation_map`, computed from the
    models once, after training) with its title; None when the study has none."""
    if not series:
        return None
    m = series["mmd"]
    title = (f"Figure 4: item representations, {data['dataset']} ({series['items']:,} items), backbone "
             f"{cfg.llm.backbone}, {series['cell']} seed {series['seed']}; MMD² adapter tokens vs title tokens "
             f"(layer {m['layer']}): {m['before']:.4f} before, {m['after']:.4f} after training")
    return {**series, "title": title}


def study_results(cfg: ExperimentConfig, data: dict, records: list[dict], wall_seconds: float | None = None,
                  fig4: dict | None = None) -> dict:
    """Everything the outputs hold, computed from ``records`` (one per cell and seed) alone, and Figure 4's
    series (``fig4``, from the models)."""
    other = {r.get("data_fingerprint") for r in records} - {data["fingerprint"]}
    if other:
        raise ValueError(f"records from other data ({sorted(map(str, other))}) than {data['fingerprint'][:12]}")
    return {"name": cfg.name, "study_hash": study_hash(cfg), "config_hash": config_hash(cfg),
            "seeds": list(cfg.study.seeds), "data": data, "data_fingerprint": data["fingerprint"],
            "wall_seconds": None if wall_seconds is None else round(wall_seconds, 1), "config": to_dict(cfg),
            "table1": table1(cfg, data, records), "fig2": figure2(cfg, data, records),
            "fig3": figure3(cfg, data, records),
            "fig4": figure4(cfg, data, fig4), "records": records}


def write_outputs(results: dict, out: str, log=print) -> None:
    """``out/table1.md``, ``out/fig2.png``, ``out/fig3.png``, ``out/fig4.png`` (each when the study has that
    figure) and ``out/results.json``, each written to a temp file and renamed into place."""
    write_text(os.path.join(out, "table1.md"), results["table1"]["markdown"])
    if results.get("fig2"):
        draw_figure2(results["fig2"], os.path.join(out, "fig2.png"))
    fig = results["fig3"]
    if fig:
        panels = {m.upper(): {s["label"]: list(zip(fig["x"], s["values"]))} for m, s in fig["series"].items()}
        ref = fig["reference"]
        errorbar_panels(panels, os.path.join(out, "fig3.png"), fig["xlabel"], fig["title"], log_x=True,
                        references={ref["label"]: {m.upper(): v for m, v in ref["mean"].items()}} if ref else None)
    if results.get("fig4"):
        draw_figure4(results["fig4"], os.path.join(out, "fig4.png"))
    write_json(os.path.join(out, "results.json"), results)
    log("\n" + results["table1"]["markdown"])
    figures = [f"fig{n}.png" for n in (2, 3, 4) if results.get(f"fig{n}")]
    log(f"[study] wrote {out}/" + ", ".join(["table1.md", *figures, "results.json"]))


MAP_TITLES = {"pca": "PCA", "tsne": "t-SNE"}


def draw_figure4(fig: dict, path: str) -> None:
    """Per map method a row: the ID model's item table, the LLM's title embeddings, the adapter's ID
    tokens (each coloured by genre), and the LLM and adapter clouds in one projection (before/after)."""
    genres, k = fig["genres"], fig["prompt_length"]
    rows = {}
    for method, maps in fig["maps"].items():
        joint = maps["joint"]
        rows[MAP_TITLES.get(method, method)] = {
            "ID model: item table": {"items": {"points": maps["id_model"], "categories": genres}},
            "LLM: title embeddings (layer 0)": {"items": {"points": maps["llm"], "categories": genres}},
            f"adapter: ID tokens (mean of k={k}), trained": {"items": {"points": maps["adapter"],
                                                                        "categories": genres}},
            "LLM vs adapter, one projection": {
                "LLM titles": {"points": joint["llm"], "marker": "o"},
                "adapter, before training": {"points": joint["adapter_before"], "marker": "x"},
                "adapter, after training": {"points": joint["adapter_after"], "marker": "^"}}}
    category_maps(rows, path, fig["title"], category_name="genre (first listed)")


def results_from_file(path: str) -> dict:
    """:func:`study_results` again from a saved ``results.json`` (its config and records), no training."""
    try:
        with open(path) as f:
            saved = json.load(f)
        cfg = experiment_from_dict(saved["config"], source=path)
        data, records = saved["data"], saved["records"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"--from-results: cannot read {path} ({type(e).__name__}: {e}); pass a results.json "
                          f"written by jobs/study.py") from None
    if config_hash(cfg) != saved.get("config_hash") or study_hash(cfg) != saved.get("study_hash"):
        raise ConfigError(f"--from-results: {path} was edited (its config no longer hashes to "
                          f"{saved.get('config_hash')}); use the file jobs/study.py wrote")
    fig4 = saved.get("fig4")
    fig4 = {k: v for k, v in fig4.items() if k != "title"} if fig4 else None
    return study_results(cfg, data, records, saved.get("wall_seconds"), fig4=fig4)
