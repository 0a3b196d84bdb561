"""Benchmark: one SASRec training epoch on CPU, ours vs RecBole 1.2.1, on the very same batches.

    python benchmarks/sasrec_epoch_speed.py --config configs/pretrain_sasrec_ml1m.yaml \\
        --batch 2048 --steps 5 --repeats 5 --threads 1

Settings shared by both sides: RecBole-style prefix samples (``pretrain.sample_mode=prefix``: one
sample per training target, history = the previous <= ``max_history`` items), batch ``--batch``,
SASRec d=64, 2 layers, 2 heads, inner 256, dropout 0.5/0.5, max length 50, Adam(W) lr 1e-3 with
no weight decay, fp32, ``torch.set_num_threads(--threads)``.

What is timed: one optimisation step from a batch of host tensors -- forward, full-softmax
cross-entropy, backward, optimizer step. Ours is the pre-training job's own step
(``steps.train_step`` on the job's DeepSpeed engine, ZeRO-0); RecBole's is its own
``Trainer._train_epoch`` (run by ``benchmarks/recbole/reference.py --batches --interleave`` under
``.venv-recbole``, in a second process). Neither side's data loading is timed: both get the same
``--steps`` batches, drawn from one seeded shuffle of the whole training split (ours
left-padded, RecBole's the same rows right-padded with its own item ids). One untimed warm-up
step each, then ``--repeats`` timed passes over the ``--steps`` batches, **alternating** ours and
RecBole's pass by pass, so that a change in machine load hits both sides alike; the step time
is the median pass / ``--steps``. Process CPU time per pass is reported beside wall time: with
one thread it is much less sensitive to other work on the machine.

A full ML-1M epoch is ~480 steps of 2048 and takes tens of minutes per side on a small CPU, so
the per-epoch figure is **extrapolated**: ``steps_per_epoch x median step time`` (stated in the
table). ``--steps 0`` times whole epochs instead (every batch of the shuffle).

The 1-, 5- and 15-minute load averages are printed before and after the timed passes: on a
shared machine they say how far to trust the numbers. Do not run it under ``nice``.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from idle_ray import cli  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def prefix_samples(prepared, max_history: int) -> dict[str, np.ndarray]:
    """Every training sample of the split as RecBole builds them (our ``prefix`` mode)."""
    from idle_ray.data.pipeline import local_numpy_reader
    blocks = list(local_numpy_reader(prepared, "train", max_history, 0, windows=False))
    return {k: np.concatenate([b[k] for b in blocks]) for k in ("history", "history_len", "target")}


def right_padded(history: np.ndarray, length: np.ndarray) -> np.ndarray:
    """Left-padded (most recent last) rows -> the same items right-padded (RecBole's layout)."""
    width = history.shape[1]
    cols = np.arange(width)[None, :]
    src = cols + (width - length)[:, None]  # position j of the real items
    return np.where(cols < length[:, None], np.take_along_axis(history, np.clip(src, 0, width - 1), 1), 0)


def load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def our_pass(cfg, prepared, batches: list[dict]):
    """Our pre-training step, warmed up on ``batches[0]``; returns ``run()`` -> (wall s, CPU s)
    of one pass over ``batches[1:]``."""
    import torch

    from idle_ray.train.builders import build_pretrain_task
    from idle_ray.train.engine import init_single_process_group
    from idle_ray.train.steps import make_engine, train_step

    init_single_process_group()
    task, _ = build_pretrain_task(cfg, prepared)
    device = torch.device("cpu")
    engine = make_engine(task, cfg, device, True, cfg.pretrain.batch_size)
    engine.train()
    train_step(engine, batches[0], device)

    def run() -> tuple[float, float]:
        c0, t0 = time.process_time(), time.perf_counter()
        for b in batches[1:]:
            out = train_step(engine, b, device)
        out["loss"].item()
        return time.perf_counter() - t0, time.process_time() - c0

    return run


class RecBolePasses:
    """``recbole/reference.py --batches NPZ --interleave`` in a second process: ``run()`` times
    one pass there and returns (wall s, CPU s)."""

    def __init__(self, python: str, prepared, npz: Path, repeats: int, threads: int, seed: int):
        workdir = Path(tempfile.mkdtemp(prefix="sasrec_speed_"))
        self.out, self.log = workdir / "recbole.json", open(workdir / "recbole.log", "w+")
        cmd = [python, str(REPO / "benchmarks" / "recbole" / "reference.py"), "--prepared", str(prepared.path),
               "--model", "SASRec", "--seed", str(seed), "--batches", str(npz), "--time-epochs", str(repeats),
               "--interleave", "--threads", str(threads), "--out", str(self.out)]
        print("[recbole]", " ".join(cmd), flush=True)
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self._expect("READY")

    def _expect(self, word: str) -> list[str]:
        for line in self.proc.stdout:  # RecBole may print other lines; skip them
            if line.startswith(word):
                return line.split()
        self.log.seek(0)
        sys.stderr.write(self.log.read()[-4000:])
        raise SystemExit(f"RecBole reference stopped (exit {self.proc.wait()}) before {word}")

    def run(self) -> tuple[float, float]:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        _, wall, cpu = self._expect("PASS")
        return float(wall), float(cpu)

    def finish(self) -> dict:
        self.proc.stdin.close()
        if self.proc.wait() != 0:
            raise SystemExit(f"RecBole reference failed (exit {self.proc.returncode})")
        return json.loads(self.out.read_text())


def main(argv=None):
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=2048, help="samples per step, both sides (RecBole default 2048)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per pass (0: a whole epoch)")
    p.add_argument("--repeats", type=int, default=5, help="timed passes per side; the median is reported")
    p.add_argument("--threads", type=int, default=1, help="torch threads, both sides")
    p.add_argument("--recbole-python", default=str(REPO / ".venv-recbole" / "bin" / "python"),
                   help="interpreter with RecBole 1.2.1 (scripts/setup_recbole_venv.sh); '' skips RecBole")
    p.add_argument("--json", default="", help="also write the results here")
    args, cfg = cli.parse(p, argv)
    import torch

    from idle_ray.config import load_config
    from idle_ray.train import builders

    cfg = load_config(args.config, list(args.overrides) + [
        "pretrain.sample_mode=prefix", f"pretrain.batch_size={args.batch}", "pretrain.num_workers=1"])
    if cfg.id_model.name != "sasrec":
        raise SystemExit("this benchmark times SASRec (id_model.name: sasrec)")
    torch.set_num_threads(args.threads)
    prepared = builders.prepare_from_config(cfg)
    samples = prefix_samples(prepared, cfg.data.max_history)
    n = len(samples["target"])
    steps_per_epoch = math.ceil(n / args.batch)
    steps = steps_per_epoch if args.steps <= 0 else min(args.steps, steps_per_epoch - 1)
    order = np.random.default_rng(cfg.seed).permutation(n)[: (steps + 1) * args.batch]
    batches = [{"history": samples["history"][idx], "history_len": samples["history_len"][idx],
                "target": samples["target"][idx]} for idx in np.array_split(order, steps + 1)]
    print(f"{prepared.manifest['dataset']}: {n} prefix samples, {steps_per_epoch} steps of {args.batch} per "
          f"epoch; timing {steps} steps x {args.repeats} passes per side, {args.threads} thread(s)", flush=True)

    sides = {"ours (jobs/pretrain.py step)": our_pass(cfg, prepared, batches)}
    reference = None
    if args.recbole_python:
        npz = Path(tempfile.mkdtemp(prefix="sasrec_speed_")) / "batches.npz"
        hist = np.concatenate([b["history"] for b in batches]).astype(np.int64)
        length = np.concatenate([b["history_len"] for b in batches]).astype(np.int64)
        np.savez(npz, history=right_padded(hist, length), length=length,
                 target=np.concatenate([b["target"] for b in batches]).astype(np.int64),
                 batch_size=np.int64(len(batches[0]["target"])))
        reference = RecBolePasses(args.recbole_python, prepared, npz, args.repeats, args.threads, cfg.seed)
        sides["RecBole 1.2.1 (Trainer._train_epoch)"] = reference.run

    load_before = load_avg()
    passes = {name: [] for name in sides}
    for rep in range(args.repeats):
        for name, run in sides.items():
            wall, cpu = run()
            passes[name].append((wall, cpu))
            print(f"[{name.split()[0]}] pass {rep}: {wall:.2f}s wall, {cpu:.2f}s CPU "
                  f"({wall / steps:.3f}s/step)", flush=True)
    load_after = load_avg()
    if reference is not None:
        reference.finish()

    rows = [(name, statistics.median(w for w, _ in p) / steps, statistics.median(c for _, c in p) / steps)
            for name, p in passes.items()]
    base_wall, base_cpu = rows[-1][1], rows[-1][2]
    print(f"\nSASRec training step on {prepared.manifest['dataset']}, batch {args.batch}, max length "
          f"{cfg.data.max_history}, d {cfg.id_model.hidden_size}, {args.threads} thread(s); median of "
          f"{args.repeats} alternating passes of {steps} steps; epoch = {steps_per_epoch} steps x median step"
          + (" (extrapolated)" if steps < steps_per_epoch else "")
          + f"; load average {load_before} before, {load_after} after")
    print("| implementation | s / step | s / epoch | CPU s / step | ratio (wall) | ratio (CPU) |")
    print("|---|---|---|---|---|---|")
    for name, wall, cpu in rows:
        print(f"| {name} | {wall:.3f} | {wall * steps_per_epoch:.0f} | {cpu:.3f} | {wall / base_wall:.2f} | "
              f"{cpu / base_cpu:.2f} |")
    if args.json:
        from idle_ray.results.files import write_json
        write_json(args.json, {"dataset": prepared.manifest["dataset"], "batch": args.batch, "threads": args.threads,
                               "steps_timed": steps, "repeats": args.repeats, "steps_per_epoch": steps_per_epoch,
                               "load_before": load_before, "load_after": load_after,
                               "passes": {name: [{"wall": w, "cpu": c} for w, c in p] for name, p in passes.items()},
                               "rows": [{"implementation": name, "step_seconds": wall, "step_cpu_seconds": cpu,
                                         "epoch_seconds": wall * steps_per_epoch, "ratio_wall": wall / base_wall,
                                         "ratio_cpu": cpu / base_cpu} for name, wall, cpu in rows]})


if __name__ == "__main__":
    cli.run_main(main)
