"""The study's cells and the plan each Tune trial follows.

A *cell* is one number of a table or one point of a figure before seeds: ``(row, ID model, prompt
length, backbone)``. Table 1 has, in order, ID-only per ID model, LLM-only, LLaRA-style, IDLE per ID model and
the ablations (w/o fusion, w/o refinement, w/o MMD); rows that are not per ID model use the first of
``study.id_models``. Figure 3 is IDLE on the first ID model at each ``study.prompt_lengths``; its
point at ``adapter.prompt_length`` is Table 1's IDLE cell (the same key, trained once), as is Figure 4's
(the representation map of that cell's first seed). Figure 2 is IDLE (first ID model, Table 1's k) and
LLM-only on each of ``study.backbones`` (empty: ``llm.backbone`` alone); on ``llm.backbone`` they are
Table 1's cells, so a cell names its backbone only when it is another one (of the two rows, those that
``study.rows`` has, as Figure 4 needs an IDLE row). Every cell runs once per seed. The ID-only row of a config with ``pretrain.holdout_targets`` > 0 is the ID
model trained on every target (the strongest ID baseline; ``id_only_all`` of the main job), as is
the anchor of an anchored IDLE (``adapter.anchor_weight``).

ID models are pre-trained once per (dataset, ID model, seed) into ``<artifacts>/<dataset>-<model>-
s<seed>-<settings hash>-<data fingerprint>`` (``-all`` beside it for the every-target one) and shared
by every cell that needs them.
"""
from __future__ import annotations

import dataclasses
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from idle_ray import locations
from idle_ray.config import STUDY_ROWS, ExperimentConfig, StudyConfig, config_hash, to_dict
from idle_ray.data.prepare import PreparedDataset
from idle_ray.experiments import row_config
from idle_ray.train import builders
from idle_ray.train import storage as run_storage

MODEL_NAMES = {"sasrec": "SASRec", "gru4rec": "GRU4Rec", "caser": "Caser"}
# study row -> the main experiment's row: its adapter variant and overrides (idle_ray.experiments.ROWS)
MAIN_ROWS = {"id_only": "id_only_all", **{r: r for r in STUDY_ROWS if r != "id_only"}}
PER_ID_MODEL = ("id_only", "idle")
PROMPTED = ("idle", "idle_no_fusion", "idle_no_refine", "idle_no_mmd")  # rows whose prompt length k matters
BASELINES = ("id_only", "llm_only", "llara")
COLUMNS = ("hr@1", "hr@5", "hr@10", "hr@20", "ndcg@5", "ndcg@10", "ndcg@20", "mrr")
FIG3_METRICS = ("hr@5", "ndcg@5")
FIG2_ROWS = ("idle", "llm_only")


@dataclass(frozen=True)
class Cell:
    row: str            # a study row (config.STUDY_ROWS)
    id_model: str       # sasrec / gru4rec / caser
    prompt_length: int  # k, 0 for rows without ID tokens
    backbone: str = ""  # llm.backbone of the cell; "" for the config's own

    @property
    def key(self) -> str:
        return (f"{self.row}-{self.id_model}" + (f"-k{self.prompt_length}" if self.prompt_length else "")
                + (f"-{backbone_key(self.backbone)}" if self.backbone else ""))


def backbone_key(name: str) -> str:
    """A backbone in cell keys and record file names: an alias as it is, a folder by its name and a hash of
    its path."""
    if re.fullmatch(r"[A-Za-z0-9._-]+", name):
        return name
    return f"{Path(name).name or 'model'}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def _cell(row: str, id_model: str, k: int, backbone: str = "") -> Cell:
    return Cell(row, id_model, k if row in PROMPTED else 0, backbone)


def table_cells(cfg: ExperimentConfig) -> list[Cell]:
    """Table 1's rows, in table order."""
    s = cfg.study
    return [_cell(row, m, cfg.adapter.prompt_length) for row in STUDY_ROWS if row in s.rows
            for m in (s.id_models if row in PER_ID_MODEL else s.id_models[:1])]


def figure3_cells(cfg: ExperimentConfig) -> list[Cell]:
    """Figure 3's points (IDLE on the first ID model), in ``study.prompt_lengths`` order."""
    return [_cell("idle", cfg.study.id_models[0], k) for k in cfg.study.prompt_lengths]


def figure4_cell(cfg: ExperimentConfig) -> Cell | None:
    """Figure 4's cell (its first seed is mapped): Table 1's IDLE on the first ID model; None when the
    study has no IDLE row."""
    return _cell("idle", cfg.study.id_models[0], cfg.adapter.prompt_length) if "idle" in cfg.study.rows else None


def figure2_backbones(cfg: ExperimentConfig) -> list[str]:
    """Figure 2's backbones in config order: ``study.backbones``, or ``llm.backbone`` alone."""
    return list(cfg.study.backbones) or [cfg.llm.backbone]


def figure2_cells(cfg: ExperimentConfig) -> dict[str, dict[str, Cell]]:
    """``{backbone: {row: cell}}`` for IDLE and LLM-only (first ID model, Table 1's k; those of the two that
    ``study.rows`` has) on each backbone; empty when the study has neither row (no Figure 2)."""
    m, k = cfg.study.id_models[0], cfg.adapter.prompt_length
    rows = [row for row in FIG2_ROWS if row in cfg.study.rows]
    if not rows:
        return {}
    return {b: {row: _cell(row, m, k, "" if b == cfg.llm.backbone else b) for row in rows}
            for b in figure2_backbones(cfg)}


def all_cells(cfg: ExperimentConfig) -> list[Cell]:
    """Every cell once (a figure point equal to a table cell is the same cell)."""
    fig4 = figure4_cell(cfg)
    fig2 = [c for cells in figure2_cells(cfg).values() for c in cells.values()]
    return list(dict.fromkeys(table_cells(cfg) + figure3_cells(cfg) + ([fig4] if fig4 else []) + fig2))


def label(cfg: ExperimentConfig, cell: Cell) -> str:
    """The cell's name in tables and legends; an anchored adapter says so, with its weight."""
    m = MODEL_NAMES[cell.id_model]
    text = {"id_only": f"{m} (ID-only)", "llm_only": "LLM-only", "llara": "LLaRA-style",
            "idle": f"IDLE-Adapter ({m})", "idle_no_fusion": "IDLE w/o fusion",
            "idle_no_refine": "IDLE w/o refinement", "idle_no_mmd": "IDLE w/o MMD"}[cell.row]
    c = cell_config(cfg, cell, cfg.seed, "", "")
    return text + (f" (anchored, a={c.adapter.anchor_weight:g})" if builders.uses_anchor(c) else "")


def id_config(cfg: ExperimentConfig, id_model: str, seed: int, artifact: str, runs: str) -> ExperimentConfig:
    """``cfg`` with this ID model, seed, artifact folder and Train storage; the ``study`` section reset
    (it is not part of what a cell trains)."""
    return dataclasses.replace(cfg, seed=seed, study=StudyConfig(),
                               id_model=dataclasses.replace(cfg.id_model, name=id_model, artifact=artifact),
                               train=dataclasses.replace(cfg.train, storage_path=runs))


def cell_config(cfg: ExperimentConfig, cell: Cell, seed: int, artifact: str, runs: str) -> ExperimentConfig:
    c = row_config(id_config(cfg, cell.id_model, seed, artifact, runs), MAIN_ROWS[cell.row])
    if cell.prompt_length:
        c = dataclasses.replace(c, adapter=dataclasses.replace(c.adapter, prompt_length=cell.prompt_length))
    if cell.backbone:
        c = dataclasses.replace(c, llm=dataclasses.replace(c.llm, backbone=cell.backbone))
    return c


def artifact_dir(cfg: ExperimentConfig, id_model: str, seed: int, prepared: PreparedDataset, root: str) -> str:
    """The base ID model of (dataset, ``id_model``, ``seed``) for these pre-training settings and data,
    under ``root`` (:func:`artifacts_root`)."""
    derived = builders.id_artifact_dir(id_config(cfg, id_model, seed, "", ""), prepared)
    return locations.join(root, f"{locations.basename(derived)}-{prepared.fingerprint[:8]}")


def artifacts_root(cfg: ExperimentConfig) -> str:
    """The study's ID models: ``<id_model.artifacts_dir>/studies/<name>`` (a local folder made absolute,
    or a URI that every node reads)."""
    return locations.join(locations.absolute(cfg.id_model.artifacts_dir), "studies", cfg.name)


def plan_key(name: str, seed: int) -> str:
    return f"{name}|s{seed}"


def pretrain_plans(cfg: ExperimentConfig, prepared: PreparedDataset, artifacts: str, runs: str) -> dict:
    """``{plan_key(model, seed): {"experiments": [config dicts to pre-train]}}`` for the ID models the
    cells use: the base, and with ``pretrain.holdout_targets`` > 0 the every-target one too."""
    plans = {}
    for model in dict.fromkeys(c.id_model for c in all_cells(cfg)):
        for seed in cfg.study.seeds:
            base = id_config(cfg, model, seed, artifact_dir(cfg, model, seed, prepared, artifacts), runs)
            todo = [base] + ([builders.all_targets_config(base)] if cfg.pretrain.holdout_targets else [])
            plans[plan_key(model, seed)] = {"experiments": [to_dict(c) for c in todo]}
    return plans


def cell_plans(cfg: ExperimentConfig, prepared: PreparedDataset, artifacts: str, runs: str) -> dict:
    """``{plan_key(cell key, seed): plan}``: the cell's config (a dict), the ID-model artifact its run
    reads, the name of its record file, and what the record says about the cell."""
    plans = {}
    for cell in all_cells(cfg):
        for seed in cfg.study.seeds:
            c = cell_config(cfg, cell, seed, artifact_dir(cfg, cell.id_model, seed, prepared, artifacts), runs)
            artifact = c.id_model.artifact
            if cell.row == "id_only" and cfg.pretrain.holdout_targets:
                artifact = builders.all_targets_config(c).id_model.artifact
            plans[plan_key(cell.key, seed)] = {
                "experiment": to_dict(c), "artifact": artifact,
                "record": f"{cell.key}-s{seed}-{config_hash(c)[:8]}.json",
                "about": {"cell": cell.key, "row": cell.row, "id_model": cell.id_model,
                          "prompt_length": c.adapter.prompt_length if cell.prompt_length else None,
                          "backbone": c.llm.backbone}}
    return plans


def study_hash(cfg: ExperimentConfig) -> str:
    """What the study's Tune grids are named by: everything trained plus the grid (``study``). An empty
    ``study.backbones`` (a later field) is left out, so studies begun before it keep their grids."""
    study = {k: v for k, v in to_dict(cfg.study).items() if k != "backbones" or v}
    return config_hash({"experiment": config_hash(cfg), "study": study})[:8]


def work_dir(cfg: ExperimentConfig) -> str:
    """Where a study keeps its Tune grids, Train runs and records: ``<train.storage_path>/study-<name>``."""
    return run_storage.join(run_storage.absolute(cfg.train.storage_path), f"study-{cfg.name}")
