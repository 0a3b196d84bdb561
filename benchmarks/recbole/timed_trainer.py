"""RecBole's Trainer with per-epoch timing, a time budget and in-memory best weights; timed batch passes."""
from __future__ import annotations

import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from ranking import our_to_recbole_items


class TimeBudgetReached(Exception):
    """Raised from the fit callback when --time-budget-min is used up."""


def make_trainer_class(base, earlier=None):
    """Subclass of RecBole's trainer: best weights in memory, per-epoch timing, and
    pessimistic ranks of every evaluated target (from the same score matrix RecBole uses);
    with ``earlier`` (see :func:`earlier_items_lookup`) also the ranks under our full protocol:
    pessimistic ties *and* the user's earlier items masked."""
    from time import perf_counter

    import numpy as np
    import torch

    class ReferenceTrainer(base):
        def __init__(self, config, model):
            super().__init__(config, model)
            self.epoch_train_seconds = []
            self.epoch_valid_seconds = []
            self.best_epoch = None
            self._best_state = None
            self._rank_chunks = []
            self._masked_chunks = []
            self._tie_count = 0
            uid_field = config["USER_ID_FIELD"]
            collector = self.eval_collector
            orig_collect = collector.eval_batch_collect

            def collect(scores_tensor, interaction, positive_u, positive_i):
                target = scores_tensor[positive_u, positive_i].unsqueeze(1)
                greater = (scores_tensor > target).sum(dim=1)
                ties = (scores_tensor == target).sum(dim=1) - 1
                rank = torch.zeros(scores_tensor.shape[0], dtype=torch.long)
                rank[positive_u.cpu()] = (greater + ties).cpu().long()  # one positive per row
                self._rank_chunks.append(rank)
                self._tie_count += int((ties > 0).sum())
                if earlier is not None:
                    rows, items = positive_u.cpu(), positive_i.cpu()
                    seen = earlier(interaction[uid_field].cpu()[rows].numpy(), items.numpy())
                    mask = torch.zeros(scores_tensor.shape, dtype=torch.bool)
                    mask[torch.repeat_interleave(rows, torch.tensor([len(x) for x in seen])),
                         torch.from_numpy(np.concatenate(seen))] = True
                    mask[rows, items] = False  # the target is never masked
                    keep = ~mask.to(scores_tensor.device)
                    greater_m = ((scores_tensor > target) & keep).sum(dim=1)
                    ties_m = ((scores_tensor == target) & keep).sum(dim=1) - 1
                    masked = torch.zeros(scores_tensor.shape[0], dtype=torch.long)
                    masked[rows] = (greater_m + ties_m).cpu().long()
                    self._masked_chunks.append(masked)
                return orig_collect(scores_tensor, interaction, positive_u, positive_i)

            collector.eval_batch_collect = collect

        # RecBole calls this whenever the valid metric ties/improves (and never
        # otherwise during fit): keep the weights in memory instead of a .pth file.
        def _save_checkpoint(self, epoch, verbose=True, **kwargs):
            self.best_epoch = epoch
            self._best_state = (
                copy.deepcopy(self.model.state_dict()),
                copy.deepcopy(self.model.other_parameter()),
            )

        def restore_best(self):
            state, other = self._best_state
            self.model.load_state_dict(state)
            self.model.load_other_parameter(other)

        def _train_epoch(self, *args, **kwargs):
            t0 = perf_counter()
            out = super()._train_epoch(*args, **kwargs)
            self.epoch_train_seconds.append(perf_counter() - t0)
            return out

        def _valid_epoch(self, *args, **kwargs):
            t0 = perf_counter()
            out = super()._valid_epoch(*args, **kwargs)
            self.epoch_valid_seconds.append(perf_counter() - t0)
            return out

        def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
            self._rank_chunks = []
            self._masked_chunks = []
            self._tie_count = 0
            result = super().evaluate(eval_data, load_best_model=load_best_model,
                                      model_file=model_file, show_progress=show_progress)
            self.last_ranks = torch.cat(self._rank_chunks) if self._rank_chunks else None
            self.last_tie_fraction = (self._tie_count / len(self.last_ranks)) if self._rank_chunks else None
            self.last_masked_ranks = torch.cat(self._masked_chunks) if self._masked_chunks else None
            return result

    return ReferenceTrainer


def write_json_atomic(path: Path, payload: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def time_given_batches(args, trainer, dataset, config, torch, np, log) -> dict:
    """Time RecBole's own training step (``Trainer._train_epoch``: forward, CE loss, backward,
    Adam step) on exactly the batches another implementation is timed on.

    NPZ arrays: ``history`` (S, T) int, right-padded (RecBole's layout), ``length`` (S,),
    ``target`` (S,), ``batch_size`` () -- all in *our* dense item ids, mapped here to RecBole's
    internal ids through its token map (our id ``i`` is RecBole token ``str(i)``).  One
    untimed warm-up step on the first batch, then ``--time-epochs`` timed passes over the
    remaining batches.
    """
    from recbole.data.interaction import Interaction

    data = np.load(args.batches)
    batch_size = int(data["batch_size"])
    history, length, target = data["history"], data["length"], data["target"]
    if history.shape[1] != config["MAX_ITEM_LIST_LENGTH"]:
        raise SystemExit(f"batches have length {history.shape[1]}, RecBole MAX_ITEM_LIST_LENGTH "
                         f"is {config['MAX_ITEM_LIST_LENGTH']}")
    iid = config["ITEM_ID_FIELD"]
    num_items = int(dataset.item_num) - 1
    remap = our_to_recbole_items(dataset, iid, num_items)
    batches = []
    for lo in range(0, len(target), batch_size):
        batches.append(Interaction({
            iid + config["LIST_SUFFIX"]:
                torch.from_numpy(remap[history[lo:lo + batch_size]]),
            config["ITEM_LIST_LENGTH_FIELD"]: torch.from_numpy(length[lo:lo + batch_size].astype(np.int64)),
            iid: torch.from_numpy(remap[target[lo:lo + batch_size]]),
        }))
    warm, timed = batches[:1], batches[1:]
    if not timed:
        raise SystemExit("--batches needs at least 2 batches (1 warm-up + timed ones)")
    trainer.model.train()
    trainer._train_epoch(warm, 0, show_progress=False)
    measured, cpu = [], []
    if args.interleave:
        print("READY", flush=True)
    for rep in range(args.time_epochs):
        if args.interleave and not sys.stdin.readline():
            break
        c0, t0 = time.process_time(), time.perf_counter()
        loss = trainer._train_epoch(timed, rep + 1, show_progress=False)
        measured.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        if args.interleave:
            print(f"PASS {measured[-1]:.6f} {cpu[-1]:.6f}", flush=True)
        log.info("pass %d: %.2fs (CPU %.2fs) for %d batches (%.3fs/step), loss %s", rep, measured[-1],
                 cpu[-1], len(timed), measured[-1] / len(timed), loss)
    del trainer.epoch_train_seconds[:]
    return {
        "mode": "time_batches",
        "batches": len(timed),
        "batch_size": batch_size,
        "pass_seconds": measured,
        "pass_cpu_seconds": cpu,
        "step_seconds": [m / len(timed) for m in measured],
        "step_seconds_median": statistics.median(measured) / len(timed),
        "step_cpu_seconds_median": statistics.median(cpu) / len(timed),
    }
