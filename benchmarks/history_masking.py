"""Our exported ID model under our ranking rule and under RecBole's, side by side.

    python benchmarks/history_masking.py --config configs/pretrain_sasrec_ml100k.yaml

Our protocol ranks the target among all items *except the user's earlier items*; RecBole 1.2.1
masks nothing for sequential models (only the padding item), so a model is also "charged" for
scoring items the user has already seen. This prints the same artifact's valid and test metrics
under both rules (ties pessimistic in both), so that our figures can be set beside RecBole's
(``benchmarks/recbole/reference.py``: its ``test_pessimistic`` is RecBole's unmasked rule with
our tie rule). Single process, no Ray: it reads the prepared shards directly.

``--artifact`` defaults to the folder ``jobs/pretrain.py`` exports for the config.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from idle_ray import cli  # noqa: E402

KEYS = ("hr@5", "hr@10", "hr@20", "ndcg@5", "ndcg@10", "ndcg@20", "mrr")


def split_metrics(model, prepared, split: str, max_history: int, batch_size: int) -> dict[str, dict]:
    """{"masked": metrics, "unmasked": metrics} over every user of ``split``."""
    from idle_ray.data.pipeline import local_numpy_reader
    from idle_ray.eval.metrics import ranking_metrics, target_ranks
    from idle_ray.eval.protocols import exclusion_mask

    ranks = {"masked": [], "unmasked": []}
    for block in local_numpy_reader(prepared, split, max_history):
        for lo in range(0, len(block["target"]), batch_size):
            history = torch.from_numpy(block["history"][lo:lo + batch_size]).long()
            target = torch.from_numpy(block["target"][lo:lo + batch_size]).long()
            with torch.no_grad():
                scores = model.full_sort_predict(history)  # (B, N + 1)
            seen = exclusion_mask(block["seen"][lo:lo + batch_size], prepared.num_items)
            ranks["masked"].append(target_ranks(scores, target, seen))
            ranks["unmasked"].append(target_ranks(scores, target))
    return {rule: ranking_metrics(torch.cat(r)) for rule, r in ranks.items()}


def main(argv=None):
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--artifact", default="", help="ID-model artifact folder (default: the config's export)")
    p.add_argument("--batch", type=int, default=256, help="users per scoring batch")
    p.add_argument("--json", default="", help="also write the results here")
    args, cfg = cli.parse(p, argv)
    from idle_ray.models.artifact import load_id_artifact
    from idle_ray.train import builders

    prepared = builders.prepare_from_config(cfg)
    artifact = args.artifact or str(builders.id_artifact_dir(cfg, prepared))
    model, meta = load_id_artifact(artifact, prepared.manifest["vocab_fingerprint"])
    out = {split: split_metrics(model, prepared, split, cfg.data.max_history, args.batch)
           for split in ("valid", "test")}
    print(f"\n{meta['name']} on {prepared.manifest['dataset']} ({artifact}), full ranking, ties pessimistic")
    print("| split | earlier items | " + " | ".join(KEYS) + " |")
    print("|---" * (len(KEYS) + 2) + "|")
    for split, rules in out.items():
        for rule, m in rules.items():
            label = "masked (ours)" if rule == "masked" else "rankable (RecBole)"
            print(f"| {split} | {label} | " + " | ".join(f"{m[k]:.4f}" for k in KEYS) + " |")
    if args.json:
        from idle_ray.results.files import write_json
        write_json(args.json, {"artifact": artifact, "model": meta["name"],
                               "dataset": prepared.manifest["dataset"], **out})


if __name__ == "__main__":
    cli.run_main(main)
