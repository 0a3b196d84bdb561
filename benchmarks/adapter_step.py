"""Training-step cost of each adapter variant against the bare frozen backbone.

    python benchmarks/adapter_step.py --backbone smollm2-135m --batch 16 --repeats 5

``bare`` = the frozen backbone's forward + activation-backward on the same batch (input
embeddings require grad, weights do not; loss = sum of the read-out state): the least any
method that back-propagates through the LLM pays. Each variant's step = forward + backward of
``IDLEModel`` (no optimizer step). Runs are interleaved (bare, idle, …, bare, idle, …) so load
from other processes hits all rows alike; the table shows medians. Memory: ``saved MiB`` is what
autograd keeps for the backward pass (tensors saved by the forward, parameters excluded) — the
part of a step's memory the adapter design changes; on GPU also the CUDA peak allocation
during the step. (CPU peak RSS says little: the allocator keeps freed memory.) The ID model
is an untrained SASRec (timing only). On a shared, loaded CPU use ``--threads 1``: OpenMP
barriers then stall small ops and penalise the short tail pass unfairly.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from idle_ray.adapter.model import IDLEModel  # noqa: E402
from idle_ray.llm.backbone import load_backbone  # noqa: E402
from idle_ray.llm.prompts import PromptEncoder  # noqa: E402
from idle_ray.models.sasrec import SASRec  # noqa: E402

TEMPLATE = "A user watched these movies in order: {history}. {id_tokens} The next movie the user will watch is"
WORDS = ("star dark night love return city last man story king lost house war blue dead game "
         "summer secret river girl time heart ghost wild road fire world").split()


def synthetic_titles(num_items: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    titles = ["<pad>"]
    for i in range(1, num_items + 1):
        words = " ".join(w.capitalize() for w in rng.choice(WORDS, size=int(rng.integers(2, 5))))
        titles.append(f"{words} ({int(rng.integers(1950, 2020))})")
    return titles


class StepMemory:
    """Autograd-saved bytes (parameters excluded) and, on CUDA, peak allocation rise, in MiB."""

    def __init__(self, device: torch.device, parameters):
        self.device = device
        self.param_storages = {p.untyped_storage().data_ptr() for p in parameters}
        self.saved_mib = 0.0
        self.peak_mib = float("nan")

    def __enter__(self):
        self.storages: dict[int, int] = {}

        def pack(tensor):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in self.param_storages:
                self.storages[storage.data_ptr()] = storage.nbytes()
            return tensor

        self.hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)
        self.hooks.__enter__()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)
        self.saved_mib = sum(self.storages.values()) / 2**20
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_mib = (torch.cuda.max_memory_allocated() - self.start) / 2**20


def bare_step(backbone, ids: torch.Tensor, mask: torch.Tensor) -> None:
    """Frozen forward + activation-backward of ``ids``/``mask (B, T)``: input embeddings require
    grad, weights do not; loss = sum of the read-out state (last token, or mean for encoders)."""
    positions = (mask.cumsum(1) - 1).clamp_min(0) if backbone.kind == "decoder" else None
    embeds = backbone.embed_tokens(ids).detach().requires_grad_(True)
    hidden = backbone.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).last_hidden_state
    readout = hidden[:, -1] if backbone.kind == "decoder" else hidden.mean(1)
    readout.sum().backward()


def timed(step, device: torch.device, clock=time.perf_counter) -> float:
    """Seconds of one call of ``step()`` on ``clock``, the device synchronised on both sides."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = clock()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return clock() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompt-length", type=int, default=8)
    parser.add_argument("--projection-width", type=int, default=256)
    parser.add_argument("--refine-width", type=int, default=64)
    parser.add_argument("--max-history", type=int, default=10)
    parser.add_argument("--num-items", type=int, default=3000)
    parser.add_argument("--variants", default="idle,idle_no_refine,idle_no_mmd,llm_only,llara")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)

    backbone = load_backbone(args.backbone)
    backbone.model.to(device)
    id_model = SASRec(args.num_items, hidden_size=64, max_len=50).to(device)
    titles = synthetic_titles(args.num_items)
    rng = np.random.default_rng(0)
    history = rng.integers(1, args.num_items + 1, (args.batch, 50))
    for b in range(args.batch):  # ragged histories: 3..50 items
        history[b, : 50 - int(rng.integers(3, 51))] = 0
    target = rng.integers(1, args.num_items + 1, args.batch)
    variants = [v for v in args.variants.split(",") if v]

    models, batches = {}, {}
    for variant in variants:
        k = 0 if variant in ("llm_only", "llara") else args.prompt_length
        encoder = PromptEncoder(backbone.tokenizer, TEMPLATE, k, args.max_history, 512, titles, backbone.kind,
                                item_slots=(variant == "llara"), pad_to_max_tokens=False)
        batches[variant] = encoder({"history": history, "target": target})
        models[variant] = IDLEModel(backbone, id_model, variant=variant, prompt_length=args.prompt_length,
                                    projection_width=args.projection_width, refine_width=args.refine_width).to(device).train()
    bare_batch = batches.get("idle", next(iter(batches.values())))
    ids = torch.as_tensor(bare_batch["input_ids"], device=device)
    mask = torch.as_tensor(bare_batch["attention_mask"], device=device)

    def variant_step(variant):
        model = models[variant]
        model.zero_grad(set_to_none=True)
        model(batches[variant])["loss"].backward()

    steps = {"bare": lambda: bare_step(backbone, ids, mask), **{v: (lambda v=v: variant_step(v)) for v in variants}}
    times = {name: [] for name in steps}
    memory = {name: [] for name in steps}
    peaks = {name: [] for name in steps}
    all_params = list(backbone.model.parameters()) + [p for m in models.values() for p in m.parameters()]
    for name, step in steps.items():  # warm-up
        step()
    for _ in range(args.repeats):
        for name, step in steps.items():
            with StepMemory(device, all_params) as mem:
                times[name].append(timed(step, device))
            memory[name].append(mem.saved_mib)
            peaks[name].append(mem.peak_mib)

    print(f"backbone={args.backbone} device={device} threads={torch.get_num_threads()} batch={args.batch} "
          f"k={args.prompt_length} w={args.projection_width} r={args.refine_width} "
          f"tokens/row={ids.shape[1]} (prefix {int(bare_batch['id_start'][0])}) repeats={args.repeats}")
    bare = statistics.median(times["bare"])
    header = f"{'variant':<16}{'trainable':>12}{'frozen(LLM+ID)':>16}{'step s':>9}{'ms/sample':>11}{'vs bare':>9}{'saved MiB':>11}{'peak MiB':>10}"
    print(header)
    print("-" * len(header))
    for name in steps:
        if name == "bare":
            trainable, frozen = 0, sum(p.numel() for p in backbone.model.parameters())
        else:
            counts = models[name].parameter_counts()
            trainable, frozen = counts["trainable"], counts["frozen"]
        med = statistics.median(times[name])
        print(f"{name:<16}{trainable:>12,}{frozen:>16,}{med:>9.3f}{1000 * med / args.batch:>11.1f}"
              f"{med / bare:>9.2f}{statistics.median(memory[name]):>11.1f}{statistics.median(peaks[name]):>10.0f}")


if __name__ == "__main__":
    main()
