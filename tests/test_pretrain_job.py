"""jobs/pretrain.py end to end on tiny data: both ranking rules (ours, history masked; RecBole's, history
rankable) reported by the job, each as mean ± one standard error over users, and the pre-training's epochs,
early-stopping epoch and wall time in its record."""
import json
import math

import numpy as np
import pytest

from idle_ray.eval.metrics import per_user_metrics
from idle_ray.results.stats import mean_se
from idle_ray.results.tables import protocols_table
from tiny_jobs import ROOT, run_job, write_tiny_config, write_tiny_data


def test_mean_se_and_protocols_table_match_a_hand_computed_case():
    mean, se = mean_se([1.0, 0.0, 0.0, 0.0])
    assert mean == 0.25 and se == pytest.approx(math.sqrt(0.25) / 2)  # std (ddof 1) = 0.5, n = 4
    assert mean_se([0.3]) == (0.3, None)
    # ranks 0 and 3: HR@10 [1, 1], NDCG@10 [1, 1/log2(5)], MRR@10 [1, 1/4]
    table = protocols_table({"ranks": {"user": [1, 2], "full": [0, 3], "unmasked": [0, 12]}})
    lines = table.splitlines()
    assert lines[0] == "| protocol | HR@10 | NDCG@10 | MRR@10 |"
    ndcg = [1.0, 1 / math.log2(5)]
    assert lines[2] == (f"| full (history masked, ours) | 1.0000 ± 0.0000 | {np.mean(ndcg):.4f} ± "
                        f"{np.std(ndcg, ddof=1) / math.sqrt(2):.4f} | 0.6250 ± 0.3750 |")
    assert lines[3].startswith("| unmasked (history rankable, RecBole's rule) | 0.5000 ± 0.5000 |")


def test_pretrain_job_reports_both_ranking_rules_and_its_epochs(tmp_path):
    inter, items = write_tiny_data(tmp_path)
    config = write_tiny_config(tmp_path / "tiny.yaml", inter, items, tmp_path, str(tmp_path / "runs"),
                               id_model={"name": "gru4rec", "num_layers": 2},
                               pretrain={"epochs": 2, "sample_mode": "prefix"},
                               eval={"protocols": ["full", "unmasked"], "select_protocol": "unmasked"})
    r = run_job("pretrain.py", "--config", config, "--output", tmp_path / "record.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    record = json.loads((tmp_path / "record.json").read_text())
    assert record["epochs"] == 2 and record["best_epoch"] in (1, 2) and record["wall_seconds"] > 0
    test = record["test"]
    full, unmasked = np.array(test["ranks"]["full"]), np.array(test["ranks"]["unmasked"])
    # history items rankable can only push a target down, never up
    assert (unmasked >= full).all() and test["unmasked"]["hr@10"] <= test["full"]["hr@10"]
    assert "mrr@10" in test["full"] and "mrr@10" in test["unmasked"]
    for protocol, ranks in (("full", full), ("unmasked", unmasked)):
        mean, se = mean_se(per_user_metrics(ranks)["ndcg@10"])
        assert mean == pytest.approx(test[protocol]["ndcg@10"])
        assert f" {mean:.4f} ± {se:.4f} " in r.stdout
    assert "| unmasked (history rankable, RecBole's rule) |" in r.stdout
    assert "| full (history masked, ours) |" in r.stdout
    assert f"at epoch {record['best_epoch']} (unmasked)" in r.stdout
    # the epoch lines show the selection protocol's HR@10 and the epoch's wall time
    epoch_lines = [line for line in r.stdout.splitlines() if "[eval] epoch " in line]
    assert len(epoch_lines) == 2 and all("(unmasked) hr@10" in line and line.rstrip().endswith(" s")
                                         for line in epoch_lines), epoch_lines


def test_benchmark_caser_config_builds_recboles_caser_and_old_hashes_stay():
    import hashlib

    from idle_ray.config import config_hash, load_config, to_dict
    from idle_ray.models.registry import build_id_model
    from idle_ray.train.builders import id_model_kwargs

    cfg = load_config(ROOT / "configs" / "pretrain_caser_ml1m_recbole_bench.yaml")
    kwargs = id_model_kwargs(cfg)
    assert kwargs == {"hidden_size": 64, "dropout": 0.4, "max_len": 50, "num_vertical": 4, "num_horizontal": 8}
    model = build_id_model("caser", 30, **kwargs)
    assert model.conv_v.kernel_size == (50, 1) and model.conv_v.out_channels == 4
    assert len(model.conv_h) == 50 and model.conv_h[-1].kernel_size == (50, 64) and model.conv_h[0].out_channels == 8
    # the Caser fields at their defaults leave a config's hash (its run and artifact names) as it was before them
    for name in ("pretrain_gru4rec_ml1m_recbole_bench", "pretrain_caser_ml100k", "main_ml100k"):
        c = load_config(ROOT / "configs" / f"{name}.yaml")
        d = {k: v for k, v in to_dict(c).items() if k not in ("serve", "study")}
        d["adapter"].pop("anchor_weight")
        d["data"].pop("build_dir")  # a later field, never hashed (where a dataset is built)
        for k in ("artifacts_dir", "caser_window", "caser_vertical", "caser_horizontal"):
            d["id_model"].pop(k)
        before = hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]
        assert config_hash(c) == before, name
    assert config_hash(cfg) != config_hash(load_config(ROOT / "configs" / "pretrain_caser_ml1m_recbole_bench.yaml",
                                                       ["id_model.caser_window=5"]))
