"""Training throughput: the worker's real adapter step against the bare frozen backbone, same batches.

    python benchmarks/train_throughput.py --config configs/train_ml100k.yaml --threads 1

(CPU, SmolLM2-135M real weights, the shipped training config.) On one GPU without Ray, with a
SmolLM2-135M-shaped random-weight backbone, batch 128 x 128 tokens: ``benchmarks/gpu_throughput.sh``.

Rows (``--rows``, comma list; ``bare`` is always measured):

* ``bare`` — the frozen backbone's forward + activation-backward of the batch's tokens
  (``adapter_step.bare_step``: input embeddings require grad, weights do not): the least a method
  that back-propagates through the LLM pays.
* ``worker`` — the training step as the worker runs it: the next batch from the worker's own data
  feed (:class:`~idle_ray.train.contexts.LocalContext`: windowing of the prepared Parquet shards +
  prompt tokenisation, the functions the Ray Data pipeline runs), then
  :func:`~idle_ray.train.steps.train_step` (tensors, DeepSpeed engine forward with adapter + MMD,
  backward, optimizer step) on the engine :func:`~idle_ray.train.steps.make_engine` builds from
  the config (ZeRO stage, precision, AdamW, gradient clipping). The feed's time is included.
* ``feed`` — the data feed alone (windowing + tokenisation of one batch).
* ``torch`` — the same model and batch with a plain ``torch.optim.AdamW`` (+ gradient clipping),
  no DeepSpeed, no feed.
* ``nommd`` — the worker's engine without the MMD term (``adapter.mmd_weight = 0``), no feed.
* ``ds<stage>`` / ``ds<stage>-bf16`` — the step in a DeepSpeed engine of that ZeRO stage (0-2),
  precision ``bf16-frozen`` on GPU (``fp32`` on CPU) / DeepSpeed's own ``bf16`` mode, no feed.
* ``<row>/full`` (``torch``, ``nommd``, ``ds…``) — that row with the whole prompt under autograd
  (``IDLEModel(kv_split=False)``) instead of the no-grad prefix pass + KV cache.

Every batch runs through every row in turn (interleaved, so load from other processes hits all
rows alike); a repeat is ``--steps`` batches; the table shows, per row, the median over repeats
of seconds per step, samples/s and tokens/s (real tokens, padding excluded), and the throughput
ratio to ``bare``. Batches are cut to the columns that hold a real token in some row, as the model
does. ``--standalone N`` then runs :func:`~idle_ray.train.worker.run_standalone` (the whole
worker function, world size 1, no Ray) for ``N`` steps and reports its own training throughput.
The device follows ``train.use_gpu``. Time: on GPU wall-clock, the device synchronised; on CPU
this process's CPU time by default (``--clock``): with ``--threads 1`` that is what an idle core
takes, however loaded the shared machine is. ``--json`` writes every figure.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.adapter_step import bare_step, timed  # noqa: E402
from idle_ray import cli  # noqa: E402
from idle_ray.config import to_dict  # noqa: E402

WHAT = {"bare": "frozen forward + activation-backward", "worker": "data feed + DeepSpeed step (the worker's)",
        "feed": "data feed (windowing + tokenisation)", "torch": "adapter step, plain torch AdamW",
        "nommd": "DeepSpeed step without MMD"}


def trimmed(batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids``, ``attention_mask`` cut to the columns with a real token in some row."""
    mask = torch.as_tensor(batch["attention_mask"])
    cols = torch.nonzero(mask.bool().any(0)).flatten()
    lo, hi = int(cols[0]), int(cols[-1]) + 1
    return torch.as_tensor(batch["input_ids"])[:, lo:hi].to(device), mask[:, lo:hi].to(device)


def torch_step_fn(model, cfg, device):
    """The adapter step with a plain torch AdamW and the engine's gradient clipping (1.0)."""
    from idle_ray.train.contexts import to_tensors
    params = [p for n, p in model.named_parameters() if model.is_trainable(n)]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)

    def step(batch):
        out = model(to_tensors(batch, device))
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def build_rows(names: list[str], cfg, prepared, artifact, device):
    """``{row: step(batch)}`` and ``{row: error}``; the adapters share one backbone and ID model."""
    from idle_ray.train.builders import adapter_model, build_adapter_task
    from idle_ray.train.steps import make_engine, train_step

    batch_size = cfg.train.batch_size
    worker_model = build_adapter_task(cfg, prepared, artifact)
    backbone, id_model = worker_model.backbone, worker_model.id_model
    frozen = "bf16-frozen" if device.type == "cuda" else "fp32"

    def engine_step(model, **kw):
        engine = make_engine(model, cfg, device, False, batch_size, **kw)
        engine.train()
        return lambda batch: train_step(engine, batch, device)

    def build(name):
        base, _, mode = name.partition("/")
        if mode and (mode != "full" or base in ("bare", "worker")):
            raise ValueError(f"unknown row {name!r}")

        def adapter(config=cfg):
            model = adapter_model(config, backbone, id_model)
            model.kv_split = not mode  # "/full": the whole prompt under autograd
            return model

        if base == "bare":
            return lambda batch: bare_step(backbone, *trimmed(batch, device))
        if base == "worker":
            return engine_step(worker_model)
        if base == "torch":
            model = adapter().to(device).train()
            if device.type == "cuda":  # as the worker's default precision: frozen bf16, trainable fp32
                backbone.model.to(torch.bfloat16)
                id_model.to(torch.bfloat16)
            return torch_step_fn(model, cfg, device)
        if base == "nommd":
            return engine_step(adapter(dataclasses.replace(cfg, adapter=dataclasses.replace(cfg.adapter,
                                                                                              mmd_weight=0.0))))
        if base.startswith("ds") and base[2:3].isdigit():
            stage, _, precision = base[2:].partition("-")
            return engine_step(adapter(), zero_stage=int(stage), precision=precision or frozen)
        raise ValueError(f"unknown row {name!r}")

    steps, errors = {}, {}
    for name in names:
        if name == "feed":
            continue
        try:
            steps[name] = build(name)
        except Exception as e:  # noqa: BLE001 - one broken variant must not hide the others
            errors[name] = f"{type(e).__name__}: {e}"
    return steps, errors


def feed_forever(cfg, prepared):
    """Full training batches from the worker's own feed, epoch after epoch (new shuffle each)."""
    from idle_ray.train.contexts import LocalContext
    from idle_ray.train.worker import local_stage
    ctx = LocalContext(prepared, cfg, local_stage("adapter", cfg, prepared), Path(tempfile.mkdtemp()))
    for epoch in itertools.count():
        for batch in ctx.batches("train", cfg.train.batch_size, seed=cfg.seed * 1000 + epoch):
            if len(batch["target"]) == cfg.train.batch_size:
                yield batch


def measure(steps: dict, feed, device, warmup: int, repeats: int, per_repeat: int, errors: dict, clock):
    """Per row, per repeat: ``(seconds, samples, tokens)`` summed over ``per_repeat`` batches."""
    totals = {name: [] for name in ["feed", *steps]}
    for r in range(warmup + repeats):
        acc = {name: [0.0, 0, 0] for name in totals}
        for _ in range(per_repeat):
            t0 = clock()
            batch = next(feed)
            feed_s = clock() - t0
            tokens, size = int(batch["attention_mask"].sum()), len(batch["target"])
            acc["feed"] = [acc["feed"][0] + feed_s, acc["feed"][1] + size, acc["feed"][2] + tokens]
            for name, step in list(steps.items()):
                try:
                    seconds = timed(lambda: step(batch), device, clock) + (feed_s if name == "worker" else 0.0)
                except Exception as e:  # noqa: BLE001
                    errors[name] = f"{type(e).__name__}: {e}"
                    del steps[name], totals[name], acc[name]
                    continue
                a = acc[name]
                acc[name] = [a[0] + seconds, a[1] + size, a[2] + tokens]
        if r >= warmup:
            for name in totals:
                totals[name].append(tuple(acc[name]))
    return totals


def describe(name: str) -> str:
    base, _, mode = name.partition("/")
    if base in WHAT:
        text = WHAT[base]
    else:
        stage, _, precision = base[2:].partition("-")
        text = f"DeepSpeed ZeRO-{stage} step, " + ("bf16 engine" if precision == "bf16" else "fp32 trainable")
    return text + (", no KV split" if mode else "")


def summarise(totals: dict, per_repeat: int) -> list[dict]:
    """Medians over repeats; ``vs_bare`` = throughput ratio to the bare backbone."""
    rows = [{"row": name, "what": describe(name),
             "step_s": statistics.median(s for s, _, _ in reps) / per_repeat,
             "samples_per_s": statistics.median(n / max(s, 1e-9) for s, n, _ in reps),
             "tokens_per_s": statistics.median(t / max(s, 1e-9) for s, _, t in reps)} for name, reps in totals.items()]
    bare = next(r["samples_per_s"] for r in rows if r["row"] == "bare")
    for r in rows:
        r["vs_bare"] = r["samples_per_s"] / bare
    return rows


def run_worker(cfg, prepared, artifact, max_steps: int) -> dict:
    """The whole standalone worker function for ``max_steps`` steps; its own throughput figures."""
    from idle_ray.train.worker import run_standalone
    exp = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=max_steps, epochs=1))
    result = run_standalone({"experiment": to_dict(exp), "task": "adapter", "prepared": str(prepared.path),
                             "id_artifact": str(artifact), "run_dir": tempfile.mkdtemp(prefix="idle_ray_bench_")})
    return {"row": "standalone", "what": f"run_standalone, {result['step']} steps (first excluded)",
            "step_s": cfg.train.batch_size / result["train_samples_per_s"],
            "samples_per_s": result["train_samples_per_s"], "tokens_per_s": result["train_tokens_per_s"]}


def main(argv=None) -> None:
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--rows", default="worker,feed,torch,torch/full,nommd,ds0,ds1,ds2",
                   help="comma list (module docstring)")
    p.add_argument("--steps", type=int, default=2, help="batches per repeat")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1, help="repeats run first and not counted")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument("--clock", choices=("auto", "wall", "cpu"), default="auto",
                   help="wall: elapsed time; cpu: this process's CPU time (a shared, loaded machine: with "
                        "--threads 1 it is what an idle core would take); auto: cpu on CPU, wall on GPU")
    p.add_argument("--prepared", default="", help="a prepared dataset folder (default: prepare from the config)")
    p.add_argument("--standalone", type=int, default=0, help="also run the standalone worker for N steps")
    p.add_argument("--json", default="", help="write the figures here")
    args, cfg = cli.parse(p, argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from idle_ray.data.prepare import load_prepared
    from idle_ray.train.builders import id_artifact_dir, prepare_from_config
    from idle_ray.train.engine import init_single_process_group
    from idle_ray.train.steps import worker_device

    device = worker_device(cfg)
    init_single_process_group()
    prepared = load_prepared(args.prepared) if args.prepared else prepare_from_config(cfg, log=lambda *a: None)
    artifact = id_artifact_dir(cfg, prepared)
    if not (artifact / "model.json").is_file():
        cli.fail(f"no pre-trained ID model at {artifact}: run jobs/pretrain.py with this config first "
                 "(or --set id_model.artifact=FOLDER)")
    names = ["bare", *[n for n in args.rows.split(",") if n and n != "bare"]]
    torch.manual_seed(cfg.seed)
    steps, errors = build_rows(names, cfg, prepared, artifact, device)
    feed = feed_forever(cfg, prepared)
    first = next(feed)
    ids, _ = trimmed(first, torch.device("cpu"))
    clock_name = args.clock if args.clock != "auto" else ("wall" if device.type == "cuda" else "cpu")
    clock = time.process_time if clock_name == "cpu" else time.perf_counter
    totals = measure(steps, itertools.chain([first], feed), device, args.warmup, args.repeats, args.steps, errors,
                     clock)
    rows = sorted((r for r in summarise(totals, args.steps) if r["row"] in names), key=lambda r: names.index(r["row"]))
    if args.standalone:
        try:
            worker = run_worker(cfg, prepared, artifact, args.standalone)
            rows.append({**worker, "vs_bare": worker["samples_per_s"] / rows[0]["samples_per_s"]})
        except Exception as e:  # noqa: BLE001
            errors["standalone"] = f"{type(e).__name__}: {e}"

    meta = {"backbone": cfg.llm.backbone, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "threads": torch.get_num_threads(), "batch": cfg.train.batch_size, "tokens_per_row": int(ids.shape[1]),
            "real_tokens_per_row": round(float(first["attention_mask"].sum()) / len(first["target"]), 1),
            "prefix": int(first["id_start"][0]) - (int(first["input_ids"].shape[1]) - int(ids.shape[1])),
            "k": cfg.adapter.prompt_length, "zero_stage": cfg.train.zero_stage, "llm_dtype": cfg.llm.dtype,
            "clock": clock_name, "steps": args.steps, "repeats": args.repeats, "torch": torch.__version__}
    print(" ".join(f"{k}={v}" for k, v in meta.items()))
    header = f"{'row':<16}{'what':<52}{'s/step':>9}{'samples/s':>11}{'tokens/s':>11}{'vs bare':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['row']:<16}{r['what']:<52}{r['step_s']:>9.3f}{r['samples_per_s']:>11,.1f}"
              f"{r['tokens_per_s']:>11,.0f}{r['vs_bare']:>9.2f}")
    for name, err in errors.items():
        print(f"{name:<16}FAILED: {err}")
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows, "errors": errors}, indent=2))


if __name__ == "__main__":
    cli.run_main(main)
