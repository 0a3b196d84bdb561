#!/usr/bin/env python3
"""Reference run of RecBole 1.2.1 (SASRec / GRU4Rec / Caser) on *our* prepared split.

Runs under ``.venv-recbole/bin/python`` (made by ``scripts/setup_recbole_venv.sh``);
it must not import ``idle_ray`` (RecBole 1.2.1 needs numpy<2, idle_ray numpy 2).

Usage::

    .venv-recbole/bin/python benchmarks/recbole_reference.py \\
        --prepared runs/prepared/ml100k --model SASRec --seed 0 --epochs 300 \\
        --out artifacts/recbole/ml100k_SASRec_seed0.json
    # the same on a GPU, for quality runs that CPU time cannot finish (any Python with a CUDA
    # torch and RecBole 1.2.1's runtime; figures agree with CPU runs up to RNG/float differences)
    python benchmarks/recbole_reference.py \\
        --prepared runs/prepared/ml100k --model SASRec --seed 0 --device cuda \\
        --out artifacts/recbole/ml100k_SASRec_seed0.json
    # speed only: N training epochs, no evaluation
    .venv-recbole/bin/python benchmarks/recbole_reference.py \\
        --prepared runs/prepared/ml1m --model SASRec --time-epochs 3 \\
        --out artifacts/recbole/ml1m_SASRec_time.json

Input (the lead's ``jobs/prepare.py`` output): ``DIR/manifest.json`` (``num_users``,
``num_items``), ``DIR/sequences/part-*.parquet`` with ``user`` (dense 1..U) and ``items``
(dense 1..N, chronological, full sequence; last = test target, second-to-last = valid
target).

How the split is reproduced exactly
-----------------------------------
A RecBole atomic file ``<name>.inter`` is written to a temp dir with columns
``user_id:token item_id:token timestamp:float`` where ``timestamp`` is the item's
*position* in the user's sequence (0, 1, 2, ...).  Our dense ids are used as tokens.
RecBole sorts by (user, timestamp) -- unique per user, so no tie ambiguity -- and
its sequential data augmentation turns each user's sequence ``i_0 .. i_{n-1}`` into
samples ``(i_0..i_{t-1}) -> i_t`` for ``t = 1..n-1`` (history truncated to the last
``MAX_ITEM_LIST_LENGTH = 50`` items).  ``eval_args.split = {LS: valid_and_test}``,
``order TO``, ``group_by user`` then makes the sample with target ``i_{n-2}`` the valid
one and target ``i_{n-1}`` the test one (history = everything before, truncated to 50),
all others training -- the same leave-last-two-out split our prepared data defines.
No filtering is applied (our data is already k-core filtered).  If some item id in
1..num_items never occurs in a sequence, a ``<name>.item`` file listing every id is
also written so that RecBole's catalogue has exactly ``num_items`` items.

Config: RecBole's documented defaults (``properties/overall.yaml``,
``properties/dataset/sample.yaml`` and the model's ``properties/model/<Model>.yaml``:
e.g. SASRec 2 layers, 2 heads, hidden 64, inner 256, dropout 0.5/0.5; GRU4Rec emb 64,
hidden 128, 1 layer, dropout 0.3; Caser emb 64, nv 4, nh 8, dropout 0.4, reg 1e-4;
Adam lr 1e-3, no weight decay) plus the standard sequential protocol: CE loss with no
negative sampling, full ranking, metrics Hit/NDCG/MRR @ 1,5,10,20, early stopping on
valid NDCG@10 with ``stopping_step 10`` (evaluated every epoch), ``train_batch_size``
2048, ``eval_batch_size`` 4096, CPU, ``seed``.  Deviations that do not change the
algorithm: ``show_progress False`` (no tqdm bars), the best model's weights are kept
in memory instead of a checkpoint file (RecBole 1.2.1's own reload uses ``torch.load``
without ``weights_only=False`` and fails on torch >= 2.6), and RecBole's command-line
config parsing is disabled (it would otherwise pick up ``--key=value`` flags).

Output JSON (written atomically: temp file + rename)::

    {model, seed, valid: {...}, test: {...}, best_epoch, train_seconds,
     seconds_per_epoch, recbole_version, config, ...}

``valid``/``test`` are RecBole's own numbers (rounded by RecBole to
``metric_decimal_place = 4``), keys lower-case: ``hr@k`` (RecBole's ``Hit``),
``ndcg@k``, ``mrr@k`` for k in 1, 5, 10, 20.  RecBole only has truncated MRR@k (0 when
the target is outside the top k); there is no untruncated MRR in RecBole.
``valid_pessimistic``/``test_pessimistic`` are recomputed by this script from the very
same score matrices at full precision with *pessimistic* ties (our protocol):
``rank = #{scores > s_target} + #{other items with score == s_target}`` (0-based),
``hr@k = rank < k``, ``ndcg@k = 1/log2(rank+2)`` if ``rank < k``, ``mrr@k`` likewise,
and full ``mrr = 1/(rank+1)``; ``tie_fraction`` is the share of users whose target
shares its score with at least one other item.  ``valid_masked``/``test_masked`` apply our
*whole* protocol to the same scores: pessimistic ties and every item of the user's sequence
before the target masked (RecBole masks none) -- the figures to set beside ours.
``best_epoch`` is RecBole's 0-based epoch index of the best valid NDCG@10 (RecBole keeps
the *later* epoch on equal rounded scores: ``value >= best``).  ``train_seconds`` is the
wall time of ``Trainer.fit`` (training + per-epoch validation); ``seconds_per_epoch``
is the median wall time of the training part of one epoch (no evaluation);
``epoch_train_seconds`` lists them all.  ``stop_reason`` is ``early_stopping`` (then
``converged: true``), ``max_epochs`` or ``time_budget`` (``--time-budget-min``: no new
epoch is started once it would end past the budget; the best-so-far weights are then
evaluated as usual -- an unconverged reference, flagged ``converged: false``).  While
training, ``<out stem>.partial.json`` is rewritten after every epoch (best valid so far
and the test metrics of those best weights) so a killed run still leaves numbers; it is
removed when the final JSON is written.

``--time-epochs N``: trains N epochs (no evaluation, no early stopping) and writes
``{epoch_seconds: [...], median, ...}``.  With ``--max-batches M`` each of the N epochs
trains only its first M batches; ``measured_seconds`` holds those wall times and
``epoch_seconds``/``median`` are scaled to a full epoch (``x batches_per_epoch / M``),
flagged ``extrapolated: true`` -- for data sets whose full epochs take too long here.
With ``--batches NPZ`` the N passes go over the batches in that file instead of RecBole's
loader (``benchmarks/sasrec_epoch_speed.py`` writes it, so both implementations are timed on
the very same samples); mode ``time_batches``, ``step_seconds_median``.

Under numpy >= 2 (e.g. a GPU image) three aliases RecBole 1.2.1 needs are restored first
(``numpy2_compat``); nothing else differs.

How RecBole 1.2.1 ranks and breaks ties (read from recbole/evaluator/collector.py,
recbole/evaluator/metrics.py, recbole/trainer/trainer.py, recbole/data/dataloader/)
------------------------------------------------------------------------------------
* Scores: ``Trainer._full_sort_batch_eval`` gets ``model.full_sort_predict`` scores for
  every item, sets the padding item 0 to ``-inf`` and, for *sequential* models, masks
  nothing else: ``FullSortEvalDataLoader.collate_fn`` returns ``history_index = None``
  when ``MODEL_TYPE`` is SEQUENTIAL, so items already in the user's history stay
  rankable (the valid target is also rankable in the test ranking).
* Top-k: ``Collector.eval_batch_collect`` takes ``torch.topk(scores, max(topk))`` and
  marks the positions of the positive item in that list (``pos_index``).  Hit, NDCG and
  MRR are then computed from ``pos_index`` alone.  Ties are therefore **not handled
  deliberately at all**: among items with equal scores, the target's position is
  whatever order ``torch.topk`` returns them in -- unspecified by PyTorch (on CPU it is
  a partial sort, not a stable one), in effect arbitrary: with torch 2.13 on CPU an
  all-zero score row of 1350 items comes back as indices 18, 10, 4, 16, 12, ... -- not
  by index, not by anything meaningful.  It is neither our
  pessimistic rule (a tied target counted below every item it ties with) nor an
  optimistic one, and it can differ from the pessimistic rank only when the target ties
  with another item; ``tie_fraction`` in the output measures how often that happens
  (with float32 scores from these models it is normally 0).
* Hit@k = 1 if the target is in the top k; NDCG@k = 1/log2(p+1) for 1-based position p
  <= k (one positive, so IDCG = 1); MRR@k = 1/p if p <= k else 0.  Per-user values are
  averaged over users and rounded to ``metric_decimal_place`` (4) decimals;
  ``valid_metric`` comparisons for early stopping use the rounded value.
* (Not used here: ``_average_rank`` in the collector, which averages tied ranks, feeds
  only the AUC/GAUC "rec.meanrank" metrics.)
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import logging
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

MODELS = ("SASRec", "GRU4Rec", "Caser")


class _TimeBudgetReached(Exception):
    """Raised from the fit callback when --time-budget-min is used up."""


DATASET_NAME = "idle_prepared"  # no recbole/properties/dataset/<name>.yaml applies


# --------------------------------------------------------------------------- input
def read_prepared(prepared: Path):
    """Return (manifest, users int64[U], list of int64 item arrays) from our prepared dir."""
    import numpy as np
    import pyarrow.parquet as pq

    manifest = json.loads((prepared / "manifest.json").read_text())
    parts = sorted((prepared / "sequences").glob("part-*.parquet"))
    if not parts:
        raise SystemExit(f"no sequences/part-*.parquet under {prepared}")
    users, seqs = [], []
    for part in parts:
        table = pq.read_table(part, columns=["user", "items"])
        users.append(table.column("user").to_numpy().astype(np.int64))
        col = table.column("items").combine_chunks()
        offsets = col.offsets.to_numpy()
        values = col.values.to_numpy().astype(np.int64)
        seqs.extend(values[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1))
    users = np.concatenate(users)
    return manifest, users, seqs


def validate(manifest, users, seqs, log):
    import numpy as np

    if len(np.unique(users)) != len(users):
        raise SystemExit("duplicate user ids in sequences")
    num_users = int(manifest.get("num_users", len(users)))
    num_items = int(manifest["num_items"])
    if len(users) != num_users:
        log.warning("manifest num_users=%d but %d sequences", num_users, len(users))
    lens = np.array([len(s) for s in seqs])
    if (lens < 3).any():
        log.warning("%d users have < 3 items (no training sample under leave-two-out)",
                    int((lens < 3).sum()))
    lo = min(int(s.min()) for s in seqs)
    hi = max(int(s.max()) for s in seqs)
    if lo < 1 or hi > num_items:
        raise SystemExit(f"item ids outside 1..{num_items}: min {lo}, max {hi}")
    present = np.zeros(num_items + 1, dtype=bool)
    for s in seqs:
        present[s] = True
    missing = int((~present[1:]).sum())
    return num_items, int(lens.sum()), missing


def write_atomic_files(workdir: Path, users, seqs, num_items: int, write_item_file: bool):
    """Write <data_path>/<name>/<name>.inter (timestamp = position in sequence)."""
    import numpy as np

    ddir = workdir / "data" / DATASET_NAME
    ddir.mkdir(parents=True)
    lens = np.array([len(s) for s in seqs], dtype=np.int64)
    u = np.repeat(users, lens)
    it = np.concatenate(seqs)
    starts = np.repeat(np.cumsum(lens) - lens, lens)
    pos = np.arange(len(it), dtype=np.int64) - starts
    with open(ddir / f"{DATASET_NAME}.inter", "w") as f:
        f.write("user_id:token\titem_id:token\ttimestamp:float\n")
        np.savetxt(f, np.stack([u, it, pos], axis=1), fmt="%d", delimiter="\t")
    if write_item_file:
        with open(ddir / f"{DATASET_NAME}.item", "w") as f:
            f.write("item_id:token\n")
            np.savetxt(f, np.arange(1, num_items + 1), fmt="%d")
    return workdir / "data"


# ----------------------------------------------------------------------- RecBole
def numpy2_compat():
    """Let RecBole 1.2.1 import under numpy >= 2 (e.g. a GPU image whose numpy is 2.x).

    RecBole's ``Config.compatibility_settings`` aliases ``np.float = np.float_`` etc.; numpy 2
    removed ``float_``, ``complex_`` and ``unicode_``.  Restoring those three aliases (to the
    types they always named) is all it needs; nothing about the algorithm changes.  A no-op
    under numpy 1.x (``.venv-recbole``).
    """
    import numpy as np

    if int(np.__version__.split(".")[0]) >= 2:
        for old, new in (("float_", np.float64), ("complex_", np.complex128), ("unicode_", np.str_)):
            if old not in np.__dict__:
                setattr(np, old, new)


def import_recbole():
    numpy2_compat()
    import torch
    import recbole
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import get_model, get_trainer, init_seed

    # Importing RecBole's sequential models imports recbole/model/sequential_recommender/
    # sine.py, which calls torch.autograd.set_detect_anomaly(True) at module level, i.e.
    # globally for the whole process (~25% slower training).  Import the package
    # explicitly now and switch anomaly detection back off right after.
    import recbole.model.sequential_recommender  # noqa: F401

    torch.autograd.set_detect_anomaly(False)
    return torch, recbole, Config, create_dataset, data_preparation, get_model, get_trainer, init_seed


def build_config_dict(args, data_path: Path, workdir: Path, write_item_file: bool, epochs: int):
    load_col = {"inter": ["user_id", "item_id", "timestamp"]}
    if write_item_file:
        load_col["item"] = ["item_id"]
    return {
        # data
        "data_path": str(data_path),
        "checkpoint_dir": str(workdir / "saved"),
        "USER_ID_FIELD": "user_id",
        "ITEM_ID_FIELD": "item_id",
        "TIME_FIELD": "timestamp",
        "load_col": load_col,
        # no filtering: our data is already k-core filtered
        "rm_dup_inter": None,
        "val_interval": None,
        "filter_inter_by_user_or_item": False,
        "user_inter_num_interval": "[0,inf)",
        "item_inter_num_interval": "[0,inf)",
        "MAX_ITEM_LIST_LENGTH": 50,
        # standard sequential protocol
        "eval_args": {
            "split": {"LS": "valid_and_test"},
            "order": "TO",
            "group_by": "user",
            "mode": "full",
        },
        "train_neg_sample_args": None,
        "loss_type": "CE",
        "metrics": ["Hit", "NDCG", "MRR"],
        "topk": [1, 5, 10, 20],
        "valid_metric": "NDCG@10",
        "stopping_step": 10,
        "epochs": epochs,
        "train_batch_size": 2048,
        "eval_batch_size": 4096,
        # environment
        "device": args.device,
        "use_gpu": args.device == "cuda",
        "gpu_id": "0" if args.device == "cuda" else "",
        "seed": args.seed,
        "reproducibility": True,
        "show_progress": False,
        "log_wandb": False,
        "state": "INFO",
    }


def jsonable(value):
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return str(value)


def rename_metrics(result) -> dict:
    out = {}
    for key, val in result.items():
        key = key.lower()
        if key.startswith("hit@"):
            key = "hr@" + key[4:]
        out[key] = float(val)
    return out


def pessimistic_metrics(ranks, topk) -> dict:
    """ranks: 0-based pessimistic ranks (torch int64 tensor, one per user)."""
    import torch

    r = ranks.double()
    out = {}
    for k in topk:
        hit = (r < k).double()
        out[f"hr@{k}"] = float(hit.mean())
    for k in topk:
        out[f"ndcg@{k}"] = float(torch.where(r < k, 1.0 / torch.log2(r + 2.0), torch.zeros_like(r)).mean())
    for k in topk:
        out[f"mrr@{k}"] = float(torch.where(r < k, 1.0 / (r + 1.0), torch.zeros_like(r)).mean())
    out["mrr"] = float((1.0 / (r + 1.0)).mean())
    return out


def our_to_recbole_items(dataset, iid_field: str, num_items: int):
    """int64 array mapping our dense item id ``i`` (RecBole token ``str(i)``) to RecBole's own id."""
    import numpy as np

    remap = np.zeros(num_items + 1, dtype=np.int64)
    remap[1:] = dataset.token2id(iid_field, [str(i) for i in range(1, num_items + 1)])
    return remap


def earlier_items_lookup(dataset, config, users, seqs, num_items: int):
    """``f(recbole_user_ids, recbole_targets) -> [earlier items of each user, RecBole ids]``.

    "Earlier items" is our protocol's mask: every item of the user's full sequence before the
    target (the valid target sits at position n-2, the test target at n-1).
    """
    import numpy as np

    remap = our_to_recbole_items(dataset, config["ITEM_ID_FIELD"], num_items)
    tokens = dataset.id2token(config["USER_ID_FIELD"], np.arange(1, dataset.user_num))
    by_user = {int(u): s for u, s in zip(users, seqs)}
    rb_seqs = [None] + [remap[by_user[int(t)]] for t in tokens]

    def earlier(user_ids, targets):
        out = []
        for u, t in zip(user_ids, targets):
            seq = rb_seqs[int(u)]
            if seq[-1] == t:
                out.append(seq[:-1])
            elif seq[-2] == t:
                out.append(seq[:-2])
            else:
                raise RuntimeError(f"target {t} of RecBole user {u} is neither its valid nor its test item")
        return out

    return earlier


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
                    raise _TimeBudgetReached()

        stop_reason = None
        t0 = time.perf_counter()
        try:
            trainer.fit(train_data, valid_data, verbose=True, saved=True, show_progress=False,
                        callback_fn=after_validation)
        except _TimeBudgetReached:
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
