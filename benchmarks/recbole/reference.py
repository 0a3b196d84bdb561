#!/usr/bin/env python3
"""Reference run of RecBole 1.2.1 (SASRec / GRU4Rec / Caser) on *our* prepared split (see README.md here).

Runs under ``.venv-recbole/bin/python`` (made by ``scripts/setup_recbole_venv.sh`` from
``benchmarks/recbole/requirements.txt``); it must not import ``idle_ray`` (RecBole 1.2.1 needs
numpy<2, idle_ray numpy 2). How the split is reproduced, the config, the output JSON and how
RecBole ranks and breaks ties: ``benchmarks/recbole/README.md``.

Usage::

    .venv-recbole/bin/python benchmarks/recbole/reference.py \\
        --prepared runs/prepared/ml100k --model SASRec --seed 0 --epochs 300 \\
        --out artifacts/recbole/ml100k_SASRec_seed0.json
    # the same on a GPU (any Python with a CUDA torch and RecBole 1.2.1's runtime)
    python benchmarks/recbole/reference.py \\
        --prepared runs/prepared/ml100k --model SASRec --seed 0 --device cuda \\
        --out artifacts/recbole/ml100k_SASRec_seed0.json
    # speed only: N training epochs, no evaluation
    .venv-recbole/bin/python benchmarks/recbole/reference.py \\
        --prepared runs/prepared/ml1m --model SASRec --time-epochs 3 \\
        --out artifacts/recbole/ml1m_SASRec_time.json
"""
from __future__ import annotations

import argparse
import itertools
import logging
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from prepared_io import DATASET_NAME, read_prepared, validate, write_atomic_files
from ranking import earlier_items_lookup, jsonable, pessimistic_metrics, rename_metrics
from recbole_setup import build_config_dict, import_recbole
from timed_trainer import TimeBudgetReached, make_trainer_class, time_given_batches, write_json_atomic


MODELS = ("SASRec", "GRU4Rec", "Caser")


# --------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prepared", required=True, type=Path, help="our prepared dataset dir")
    p.add_argument("--model", required=True, choices=MODELS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=300,
                   help="max epochs (early stopping on valid NDCG@10, patience 10); RecBole default 300")
    p.add_argument("--out", required=True, type=Path, help="result JSON path")
    p.add_argument("--time-epochs", type=int, default=None, metavar="N",
                   help="speed mode: train N epochs without evaluation, report each epoch's wall time")
    p.add_argument("--time-budget-min", type=float, default=None, metavar="MIN",
                   help="stop training (no new epoch) once the next epoch would end past MIN "
                        "minutes; the JSON then says stop_reason 'time_budget', converged false")
    p.add_argument("--max-batches", type=int, default=None, metavar="M",
                   help="with --time-epochs: time only the first M batches of each epoch and "
                        "scale to a full epoch (JSON says extrapolated: true)")
    p.add_argument("--batches", type=Path, default=None, metavar="NPZ",
                   help="with --time-epochs N: instead of RecBole's own loader, train N passes over "
                        "the batches in NPZ (our item ids; written by benchmarks/sasrec_epoch_speed.py) "
                        "after one untimed warm-up step; JSON mode 'time_batches'")
    p.add_argument("--interleave", action="store_true",
                   help="with --batches: print READY after the warm-up, then time one pass per line "
                        "read from stdin and print 'PASS <wall s> <cpu s>' (lets a caller alternate "
                        "its own passes with these, so both see the same machine load)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's default)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where RecBole trains (cuda: a GPU, for quality runs that CPU time cannot finish)")
    p.add_argument("--keep-workdir", action="store_true", help="keep the temp dir with the atomic files")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    log = logging.getLogger("recbole_reference")
    prepared = args.prepared.resolve()
    out_path = args.out.resolve()
    if args.time_epochs is not None and args.time_epochs < 1:
        raise SystemExit("--time-epochs must be >= 1")

    torch, recbole, Config, create_dataset, data_preparation, get_model, get_trainer, init_seed = import_recbole()
    import numpy as np
    if args.threads:
        torch.set_num_threads(args.threads)

    manifest, users, seqs = read_prepared(prepared)
    num_items, num_inter, missing_items = validate(manifest, users, seqs, log)
    write_item_file = missing_items > 0
    if write_item_file:
        log.warning("%d item ids never occur in sequences; writing a .item file so the "
                    "catalogue still has %d items", missing_items, num_items)

    workdir = Path(tempfile.mkdtemp(prefix="recbole_ref_"))
    old_cwd = os.getcwd()
    try:
        data_path = write_atomic_files(workdir, users, seqs, num_items, write_item_file)
        # RecBole writes ./log_tensorboard (and would write ./log) relative to the cwd.
        os.chdir(workdir)
        epochs = args.time_epochs if args.time_epochs is not None else args.epochs
        config_dict = build_config_dict(args, data_path, workdir, write_item_file, epochs)
        saved_argv = sys.argv
        sys.argv = sys.argv[:1]  # keep RecBole from parsing our --flags as config
        try:
            config = Config(model=args.model, dataset=DATASET_NAME, config_dict=config_dict)
        finally:
            sys.argv = saved_argv
        torch.autograd.set_detect_anomaly(False)  # belt and braces (see import_recbole)

        init_seed(config["seed"], config["reproducibility"])
        dataset = create_dataset(config)
        log.info("%s", dataset)
        train_data, valid_data, test_data = data_preparation(config, dataset)
        if dataset.item_num != num_items + 1:  # + RecBole's [PAD] item 0
            log.warning("RecBole item_num %d != num_items %d + 1", dataset.item_num, num_items)

        init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
        model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
        earlier = earlier_items_lookup(dataset, config, users, seqs, num_items)
        trainer = make_trainer_class(get_trainer(config["MODEL_TYPE"], config["model"]), earlier)(config, model)
        assert not torch.is_anomaly_enabled(), "autograd anomaly detection must be off"
        ours = manifest.get("splits") or {}
        theirs = {"train": len(train_data._dataset), "valid": len(valid_data._dataset),
                  "test": len(test_data._dataset)}
        if ours and any(int(ours.get(k, -1)) != v for k, v in theirs.items()):
            log.warning("RecBole's split sizes %s differ from the manifest's %s", theirs, ours)

        common = {
            "model": args.model,
            "seed": args.seed,
            "prepared": str(prepared),
            "dataset": manifest.get("dataset", manifest.get("name")),
            "num_users": int(len(users)),
            "num_items": num_items,
            "num_interactions": num_inter,
            "recbole_item_num": int(dataset.item_num),
            "recbole_user_num": int(dataset.user_num),
            "train_samples": len(train_data._dataset),
            "valid_samples": len(valid_data._dataset),
            "test_samples": len(test_data._dataset),
            "torch_num_threads": torch.get_num_threads(),
            "torch_version": torch.__version__,
            "recbole_version": recbole.__version__,
        }

        if args.time_epochs is not None and args.batches is not None:
            payload = time_given_batches(args, trainer, dataset, config, torch, np, log)
            write_json_atomic(out_path, {**common, **payload, "config": jsonable(config.final_config_dict)})
            log.info("median step %.3fs over %d batches -> %s", payload["step_seconds_median"],
                     payload["batches"], out_path)
            return 0

        if args.time_epochs is not None:
            model.train()
            batches_per_epoch = len(train_data)
            limit = args.max_batches if args.max_batches and args.max_batches < batches_per_epoch else None
            measured, epoch_seconds = [], []
            for epoch_idx in range(args.time_epochs):
                data = train_data if limit is None else itertools.islice(train_data, limit)
                t0 = time.perf_counter()
                loss = trainer._train_epoch(data, epoch_idx, show_progress=False)
                measured.append(time.perf_counter() - t0)
                # a truncated epoch is scaled up to the full number of batches
                epoch_seconds.append(measured[-1] * (batches_per_epoch / limit if limit else 1.0))
                log.info("epoch %d: %.2fs measured (%s batches), %.2fs per full epoch, loss %s",
                         epoch_idx, measured[-1], limit or batches_per_epoch, epoch_seconds[-1], loss)
            payload = {
                "mode": "time_epochs",
                **common,
                "epoch_seconds": epoch_seconds,
                "median": statistics.median(epoch_seconds),
                "batches_per_epoch": batches_per_epoch,
                "extrapolated": limit is not None,
                "batches_timed_per_epoch": limit or batches_per_epoch,
                "measured_seconds": measured,
                "seconds_per_batch_median": statistics.median(measured) / (limit or batches_per_epoch),
                "config": jsonable(config.final_config_dict),
            }
            write_json_atomic(out_path, payload)
            log.info("median epoch %.2fs -> %s", payload["median"], out_path)
            return 0

        topk = list(config["topk"])
        partial_path = out_path.with_name(out_path.stem + ".partial.json")
        budget_s = args.time_budget_min * 60.0 if args.time_budget_min else None
        at_best = {}

        def after_validation(epoch_idx, valid_score):
            """Called by Trainer.fit after every validation (RecBole's callback_fn)."""
            if trainer.best_epoch == epoch_idx:
                # Test metrics of the best-so-far weights, so that a run that is killed
                # or stopped by --time-budget-min still leaves usable numbers.  The torch
                # DataLoader draws a base seed from the global RNG when it is iterated,
                # so the RNG states are saved and restored: training proceeds exactly as
                # it would without this extra evaluation.
                states = (torch.get_rng_state(), np.random.get_state(), random.getstate())
                res = trainer.evaluate(test_data, load_best_model=False)
                torch.set_rng_state(states[0]); np.random.set_state(states[1]); random.setstate(states[2])
                at_best.update(epoch=epoch_idx, test=rename_metrics(res),
                               test_pessimistic=pessimistic_metrics(trainer.last_ranks, topk),
                               test_masked=pessimistic_metrics(trainer.last_masked_ranks, topk))
            elapsed = time.perf_counter() - t0
            write_json_atomic(partial_path, {
                "mode": "train_eval", "complete": False, **common,
                "epochs_run": len(trainer.epoch_train_seconds), "elapsed_seconds": elapsed,
                "best_epoch": trainer.best_epoch,
                "valid": rename_metrics(trainer.best_valid_result),
                "test": at_best.get("test"), "test_pessimistic": at_best.get("test_pessimistic"),
                "test_masked": at_best.get("test_masked"),
                "epoch_train_seconds": trainer.epoch_train_seconds,
            })
            if budget_s is not None:
                per_epoch = elapsed / len(trainer.epoch_train_seconds)
                if elapsed + per_epoch > budget_s and epoch_idx + 1 < trainer.epochs:
                    log.warning("time budget %g min: stopping after epoch %d (not converged)",
                                args.time_budget_min, epoch_idx)
                    raise TimeBudgetReached()

        stop_reason = None
        t0 = time.perf_counter()
        try:
            trainer.fit(train_data, valid_data, verbose=True, saved=True, show_progress=False,
                        callback_fn=after_validation)
        except TimeBudgetReached:
            stop_reason = "time_budget"
        train_seconds = time.perf_counter() - t0
        epochs_run = len(trainer.epoch_train_seconds)
        if stop_reason is None:
            stop_reason = "early_stopping" if epochs_run < args.epochs else "max_epochs"
        best_valid_score, best_valid_result = trainer.best_valid_score, trainer.best_valid_result

        trainer.restore_best()
        valid_again = trainer.evaluate(valid_data, load_best_model=False)
        valid_ranks, valid_ties = trainer.last_ranks, trainer.last_tie_fraction
        valid_masked = trainer.last_masked_ranks
        if dict(valid_again) != dict(best_valid_result):
            log.warning("re-evaluated valid %s != best valid during fit %s",
                        dict(valid_again), dict(best_valid_result))
        test_result = trainer.evaluate(test_data, load_best_model=False)
        test_ranks, test_ties = trainer.last_ranks, trainer.last_tie_fraction
        test_masked = trainer.last_masked_ranks

        payload = {
            "mode": "train_eval",
            "complete": True,
            **common,
            "valid": rename_metrics(best_valid_result),
            "test": rename_metrics(test_result),
            "valid_pessimistic": pessimistic_metrics(valid_ranks, topk),
            "test_pessimistic": pessimistic_metrics(test_ranks, topk),
            "valid_masked": pessimistic_metrics(valid_masked, topk),
            "test_masked": pessimistic_metrics(test_masked, topk),
            "valid_tie_fraction": valid_ties,
            "test_tie_fraction": test_ties,
            "best_epoch": trainer.best_epoch,
            "best_valid_score": float(best_valid_score),
            "epochs_run": epochs_run,
            "max_epochs": args.epochs,
            "stop_reason": stop_reason,
            "converged": stop_reason == "early_stopping",
            "time_budget_min": args.time_budget_min,
            "train_seconds": train_seconds,
            "seconds_per_epoch": statistics.median(trainer.epoch_train_seconds),
            "epoch_train_seconds": trainer.epoch_train_seconds,
            "valid_seconds_per_epoch": (statistics.median(trainer.epoch_valid_seconds)
                                        if trainer.epoch_valid_seconds else None),
            "config": jsonable(config.final_config_dict),
        }
        write_json_atomic(out_path, payload)
        if partial_path.exists():
            partial_path.unlink()
        log.info("best epoch %s (%s); valid %s; test %s -> %s", trainer.best_epoch, stop_reason,
                 payload["valid"], payload["test"], out_path)
        return 0
    finally:
        os.chdir(old_cwd)
        if args.keep_workdir:
            log.info("kept workdir %s", workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
