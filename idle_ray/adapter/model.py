"""IDLEModel: a frozen LLM + a frozen ID model + the trainable IDLE-Adapter (DESIGN §1).

Forward (variant ``idle``):

1. ``u = F(history)`` — the frozen ID model's user state ``(B, d)`` (no grad, eval mode).
2. ``h = DimensionAlignment(u)`` — ``(B, k, D)``.
3. ``p^(l) = h + G_l(LN(h))`` for every refined layer ``l``; forward pre-hooks replace the
   hidden states at the ``k`` ID-token positions by ``p^(l)`` at the input of layer ``l``.
   Layer 0 always receives ID tokens: ``p^(0)`` if layer 0 is refined, else ``h`` (the
   placeholder token's own embedding never reaches the model).
4. ``r`` = read-out state: the last column (decoders) or mean pooling over real tokens
   (encoders; ID tokens included), of the LLM's final hidden states.
5. ``z = W_o r + b_o`` ``(B, d)``; ``scores = z · item_tableᵀ + item_bias`` ``(B, N + 1)``, column
   0 (padding) ``-inf``. With **score fusion** (``fusion="residual"``, the default; our addition,
   DESIGN §5b) ``z = u + W_o r + b_o`` with ``W_o``, ``b_o`` (and the item bias) zero-initialised:
   at step 0 the scores equal the ID model's ``u · item_tableᵀ`` exactly, so validation before the
   first update can keep the ID model's ranking, and training only adds what the LLM contributes.
   ``fusion="none"`` is the paper's head (random ``W_o``). Fusion applies to the variants that
   take ID input (``idle*``, ``llara``); ``llm_only`` never sees ``u``.
6. ``loss = CE(scores, target) + λ · mean_l MMD²(p^(l), sg(x^(l)))`` with ``x^(l)`` the layer-``l``
   inputs at text positions (``text_mask``), a random subsample of at most
   ``mmd_max_text_states`` shared by all layers. For decoders the text positions are those of
   the prefix (before the ID tokens), captured during the no-grad prefix pass. The CE's
   softmax runs over items ``1..N`` (the padding column is no class); the text-text kernel
   mean is estimated on at most ``mmd_within_sample_cap`` of the text states (unbiased, same
   gradient; see :mod:`idle_ray.adapter.mmd`).

Decoder fast path (``kv_split=True``): with ``{id_tokens}`` after the history, the prefix does
not depend on the adapter. It runs once under ``torch.no_grad`` with ``use_cache=True``; only
the tail (``k`` ID tokens + suffix) runs with autograd, on top of the prefix's KV cache, with
``position_ids = cumsum(attention_mask) - 1`` (left padding) and the full attention mask. This
equals one full forward with the same hooks (tested to 1e-5 in fp32). Encoders
(bidirectional) and LLaRA (slots inside the prefix) run one full forward with autograd.

Variants (constructor argument ``variant``; everything else is shared):

* ``idle`` — all of the above.
* ``idle_no_refine`` — ``h`` injected at the input of layer 0 only; MMD at that one layer.
* ``idle_no_mmd`` — ``idle`` with ``λ = 0`` (the MMD term is not computed).
* ``llm_only`` — no ID tokens (``k = 0``; ``prompt_length`` is ignored), same head on the
  read-out. Nothing inside the LLM trains, so the LLM runs without autograd.
* ``llara`` — no ID tokens (``k = 0``); each history item's ID embedding (frozen item table)
  mapped by one MLP ``d -> w -> D`` into the slot token after its title (``item_pos`` /
  ``item_ids`` from ``PromptEncoder(item_slots=True)``), at the input of layer 0; no MMD.

"The input layer" is the input of transformer block 0, i.e. after token + position embeddings
(and BERT's embedding LayerNorm): at initialisation ``idle_no_refine`` and ``idle`` feed
block 0 the same tokens ``h``. Batches padded to a fixed width (``PromptEncoder``'s default,
so Ray Data can re-batch) are first trimmed of columns that are padding in every row.

Trainable = parameters whose name starts with ``adapter.`` (:func:`is_trainable`); the same
predicate sets ``requires_grad``, builds the optimizer's list and filters the checkpoint.

Batch (torch tensors or numpy arrays; from :class:`idle_ray.llm.prompts.PromptEncoder` plus the
sample columns): ``input_ids``, ``attention_mask``, ``text_mask``, ``id_start``,
``num_id_tokens`` (B, T)/(B,); ``history`` (B, H) left-padded item ids for the ID model;
``target`` (B,) in ``1..N`` (omit for scoring only); ``item_pos``, ``item_ids`` for ``llara``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from idle_ray.adapter.alignment import DimensionAlignment
from idle_ray.adapter.mmd import mmd2_layers
from idle_ray.adapter.refinement import (
    LayerwiseRefinement,
    block_positions,
    capture_layer_inputs,
    inject_layer_inputs,
)
from idle_ray.llm.backbone import Backbone

VARIANTS = ("llm_only", "llara", "idle", "idle_no_refine", "idle_no_mmd")
FUSIONS = ("residual", "none")
ADAPTER_PREFIX = "adapter."
TEXT_KEYS = ("input_ids", "attention_mask", "text_mask")
PREDICT_CHUNK = 32  # rows per scoring chunk (IDLEModel.full_sort_predict)


def _take_rows(value, idx: Tensor):
    """Rows ``idx`` of a per-row batch value (tensor, numpy array or list)."""
    if isinstance(value, Tensor):
        return value[idx.to(value.device)]
    if isinstance(value, np.ndarray):
        return value[idx.numpy()]
    return [value[i] for i in idx.tolist()]


def is_trainable(name: str) -> bool:
    """THE predicate: a parameter (or checkpoint entry) trains iff it belongs to the adapter."""
    return name.startswith(ADAPTER_PREFIX)


class OutputHead(nn.Module):
    """``z = W_o r + b_o`` and ``scores = z · item_tableᵀ + item_bias``, padding column ``-inf``.

    The item bias lives here (not loose on the container) so that it is used inside a module
    forward, where DeepSpeed ZeRO-3 gathers a partitioned parameter.

    Args:
        hidden_size: ``D``, width of the read-out state.
        id_dim: ``d``, width of the ID model's item table.
        num_rows: ``N + 1``, rows of the item table.
        use_item_bias: add a trainable per-item bias (zero-initialised).
    """

    def __init__(self, hidden_size: int, id_dim: int, num_rows: int, use_item_bias: bool, zero_init: bool = False):
        super().__init__()
        self.proj = nn.Linear(hidden_size, id_dim)  # W_o, b_o
        if zero_init:  # score fusion: the head starts as "no correction" of the ID model's state
            nn.init.zeros_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)
        self.item_bias = nn.Parameter(torch.zeros(num_rows)) if use_item_bias else None

    def forward(self, readout: Tensor, item_table: Tensor, user_state: Tensor | None = None) -> Tensor:
        """``readout (B, D)``, ``item_table (N + 1, d)``, optional fused ``user_state (B, d)`` ->
        ``scores (B, N + 1)``."""
        z = self.proj(readout.to(self.proj.weight.dtype))  # (B, d)
        if user_state is not None:
            z = user_state.to(z.dtype) + z
        scores = z @ item_table.to(z.dtype).transpose(0, 1)  # (B, N + 1)
        if self.item_bias is not None:
            scores = scores + self.item_bias.to(scores.dtype)
        pad = torch.zeros_like(scores[0], dtype=torch.bool)
        pad[0] = True
        return scores.masked_fill(pad, float("-inf"))


class _Adapter(nn.Module):
    """Container of everything that trains; its attribute name makes the ``adapter.`` prefix."""

    def __init__(self) -> None:
        super().__init__()
        self.alignment: DimensionAlignment | None = None
        self.refinement: LayerwiseRefinement | None = None
        self.item_proj: nn.Sequential | None = None
        self.head: OutputHead | None = None


class IDLEModel(nn.Module):
    """Frozen backbone + frozen ID model + trainable adapter and output head.

    Args:
        backbone: the frozen LLM (:func:`idle_ray.llm.backbone.load_backbone`).
        id_model: frozen ID model with ``user_state(history (B, T)) -> (B, d)`` and
            ``item_table() -> (N + 1, d)`` (row 0 padding). Load its weights before building
            this model: the item table is copied once, here (it is frozen).
        variant: one of ``VARIANTS`` (see module docstring).
        prompt_length: ``k``, number of ID tokens (ignored, i.e. 0, for ``llm_only``/``llara``).
        projection_width: ``w``, inner width of the alignment MLP (and of LLaRA's item MLP).
        refine_layers: indices of the refined layers (``idle``/``idle_no_mmd``); ``None`` = all.
        refine_width: bottleneck width ``r`` of each ``G_l``.
        mmd_weight: ``λ``; forced to 0 for ``idle_no_mmd``, ``llm_only``, ``llara``.
        mmd_max_text_states: at most this many text hidden states per batch enter the MMD.
        mmd_within_sample_cap: each within-sample kernel mean of the MMD uses at most this
            many random rows (:func:`idle_ray.adapter.mmd.mmd2_layers`). It bites on the text side,
            whose term has no gradient (stop-gradient): the estimate stays unbiased, the
            gradient is unchanged, and the work per layer drops from (text states)² to cap².
            ``None``: every row.
        use_item_bias: add a trainable per-item bias to the scores (zero-initialised).
        kv_split: decoders run the prefix once without autograd (see module docstring).
        fusion: ``"residual"`` (``z = u + W_o r + b_o``, zero-initialised head) or ``"none"``
            (``z = W_o r + b_o``); ignored (``"none"``) for ``llm_only``.
    """

    def __init__(
        self,
        backbone: Backbone,
        id_model: nn.Module,
        variant: str = "idle",
        prompt_length: int = 8,
        projection_width: int = 256,
        refine_layers: Sequence[int] | None = None,
        refine_width: int = 64,
        mmd_weight: float = 0.1,
        mmd_max_text_states: int = 2048,
        mmd_within_sample_cap: int | None = 512,
        use_item_bias: bool = True,
        kv_split: bool = True,
        fusion: str = "residual",
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if mmd_weight < 0:
            raise ValueError(f"mmd_weight must be >= 0, got {mmd_weight}")
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        self.fusion = fusion if variant != "llm_only" else "none"
        self.backbone = backbone  # plain attribute (dataclass); its model is registered as `llm`
        self.llm = backbone.model
        self.id_model = id_model
        object.__setattr__(self, "anchor", None)  # see set_anchor
        self.anchor_weight = 0.0
        self.variant = variant
        self.kind = backbone.kind
        self.kv_split = kv_split
        self.mmd_max_text_states = int(mmd_max_text_states)
        self.mmd_within_sample_cap = mmd_within_sample_cap
        hidden = backbone.hidden_size
        with torch.no_grad():
            # A frozen copy as a buffer: buffers are never partitioned by ZeRO-3, so scoring works
            # outside the engine's forward (evaluation) and needs no parameter gather.
            self.register_buffer("item_table_frozen", id_model.item_table().detach().clone(), persistent=False)
            num_rows, id_dim = self.item_table_frozen.shape
        self.num_items = num_rows - 1
        self.id_dim = id_dim

        uses_id_tokens = variant in ("idle", "idle_no_refine", "idle_no_mmd")
        self.prompt_length = int(prompt_length) if uses_id_tokens else 0
        self.mmd_weight = float(mmd_weight) if variant in ("idle", "idle_no_refine") else 0.0

        self.adapter = _Adapter()
        if uses_id_tokens:
            self.adapter.alignment = DimensionAlignment(id_dim, hidden, self.prompt_length, projection_width)
        if variant in ("idle", "idle_no_mmd"):
            layers = range(backbone.num_layers) if refine_layers is None else refine_layers
            for layer in layers:
                if not 0 <= int(layer) < backbone.num_layers:
                    raise ValueError(f"refine layer {layer} out of range 0..{backbone.num_layers - 1}")
            self.adapter.refinement = LayerwiseRefinement(hidden, sorted(int(l) for l in layers), refine_width)
        if variant == "llara":
            self.adapter.item_proj = nn.Sequential(
                nn.Linear(id_dim, projection_width), nn.GELU(), nn.Linear(projection_width, hidden)
            )
        self.adapter.head = OutputHead(hidden, id_dim, num_rows, use_item_bias, zero_init=self.fusion == "residual")

        if variant == "idle_no_refine":
            self.mmd_layers: tuple[int, ...] = (0,)
        elif self.adapter.refinement is not None:
            self.mmd_layers = self.adapter.refinement.layer_ids
        else:
            self.mmd_layers = ()
        for name, param in self.named_parameters():
            param.requires_grad_(is_trainable(name))
        self.train(False)

    # ------------------------------------------------------------------ trainable part

    def is_trainable(self, name: str) -> bool:
        return is_trainable(name)

    def train(self, mode: bool = True) -> IDLEModel:
        """Only the adapter switches mode: the frozen LLM and ID model always run in eval mode."""
        super().train(mode)
        self.llm.eval()
        self.id_model.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The optimizer's parameter list (same predicate as ``requires_grad`` and checkpoints)."""
        return [p for n, p in self.named_parameters() if is_trainable(n)]

    def parameter_counts(self) -> dict[str, int]:
        counts = {"trainable": 0, "frozen": 0}
        for name, param in self.named_parameters():
            counts["trainable" if is_trainable(name) else "frozen"] += param.numel()
        return counts

    def adapter_state_dict(self) -> dict[str, Tensor]:
        """Checkpoint content: the trainable entries of ``state_dict()``, full names."""
        return {k: v for k, v in self.state_dict().items() if is_trainable(k)}

    def load_adapter_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Load an :meth:`adapter_state_dict`; keys must match exactly."""
        expected = set(self.adapter_state_dict())
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            raise KeyError(f"adapter checkpoint mismatch: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
        self.load_state_dict(dict(state), strict=False)

    def checkpoint_metadata(self) -> dict[str, str]:
        return {
            "variant": self.variant,
            "prompt_length": str(self.prompt_length),
            "hidden_size": str(self.backbone.hidden_size),
            "backbone": self.backbone.name,
            "mmd_layers": json.dumps(list(self.mmd_layers)),
            "fusion": self.fusion,
        }

    def save_adapter(self, path: str) -> None:
        """Write the trainable part as safetensors (with variant/shape metadata)."""
        from safetensors.torch import save_file

        tensors = {k: v.detach().contiguous().cpu() for k, v in self.adapter_state_dict().items()}
        save_file(tensors, str(path), metadata=self.checkpoint_metadata())

    def load_adapter(self, path: str) -> None:
        """Read :meth:`save_adapter` output; the variant and prompt length must match."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        mine = self.checkpoint_metadata()
        for key in ("variant", "prompt_length", "hidden_size", "fusion"):
            if key in meta and meta[key] != mine[key]:
                raise ValueError(f"adapter checkpoint {key}={meta[key]!r} does not match this model's {mine[key]!r}")
        device = next(self.adapter.parameters()).device
        self.load_adapter_state_dict(load_file(str(path), device=str(device)))

    # ------------------------------------------------------------------ forward

    def forward(self, batch: Mapping, return_scores: bool = False) -> dict[str, Tensor]:
        """``batch`` (see module docstring) -> ``{loss, ce, mmd}`` (+ ``scores (B, N + 1)`` when
        ``return_scores`` or when the batch has no ``target``, in which case only ``scores``)."""
        batch = self._prepare(batch)
        user_state = None
        if self.prompt_length > 0 or self.fusion == "residual":
            with torch.no_grad():
                user_state = self.id_model.user_state(batch["history"])  # (B, d), frozen
        if "target" not in batch and self._correction_is_zero():
            # score fusion before any update: W_o = 0, b_o = 0, so z = u exactly and the LLM's read-out
            # cannot change a score; skip the frozen LLM (the step-0 validation costs no LLM pass)
            readout = torch.zeros(len(user_state), self.adapter.head.proj.in_features,
                                  dtype=self.adapter.head.proj.weight.dtype, device=user_state.device)
            return {"scores": self._scores(readout, user_state)}
        # scoring only (no target): no MMD, so evaluation neither pays for it nor draws from the
        # global RNG (its text subsample), and training after a validation is the same as without
        readout, mmd = self._encode(batch, user_state, with_mmd="target" in batch)  # (B, D), scalar
        scores = self._scores(readout, user_state if self.fusion == "residual" else None)  # (B, N + 1)
        if "target" not in batch:
            return {"scores": scores}
        target = batch["target"]
        ce = F.cross_entropy(scores[:, 1:], target - 1)  # the padding column is not a class
        loss = ce + self.mmd_weight * mmd if self.mmd_weight > 0 else ce
        out = {"loss": loss, "ce": ce, "mmd": mmd}
        if return_scores:
            out["scores"] = scores
        return out

    @torch.no_grad()
    def full_sort_predict(self, batch: Mapping) -> Tensor:
        """``(B, N + 1)`` scores over all items (column 0 ``-inf``), no autograd; anchored when
        :meth:`set_anchor` gave an anchor.

        Rows are scored in chunks of :data:`PREDICT_CHUNK` rows of similar prompt length (sorted by
        their number of real tokens), each trimmed to its own longest row: an evaluation batch of
        256 prompts is padded to its longest, and on MovieLens-100K with 10 titles the sorted chunks
        run ~20% fewer tokens through the frozen LLM. Scores are returned in the batch's row order."""
        rows = len(batch["history"])
        if "attention_mask" not in batch or rows <= PREDICT_CHUNK:
            return self._predict(batch)
        mask = batch["attention_mask"]
        lengths = mask.sum(1) if isinstance(mask, Tensor) else torch.from_numpy(np.asarray(mask).sum(1))
        order = torch.argsort(lengths.cpu(), stable=True)
        out = None
        for start in range(0, rows, PREDICT_CHUNK):
            idx = order[start:start + PREDICT_CHUNK]
            part = {k: _take_rows(v, idx) for k, v in batch.items()}
            scores = self._predict(part)
            if out is None:
                out = scores.new_empty((rows, scores.shape[1]))
            out[idx.to(out.device)] = scores
        return out

    def _predict(self, batch: Mapping) -> Tensor:
        scores = self.forward({k: v for k, v in batch.items() if k != "target"})["scores"]
        if self.anchor is None:
            return scores
        history = batch["history"]
        history = torch.from_numpy(np.asarray(history, dtype=np.int64)) if not isinstance(history, Tensor) else history
        history = history.long().to(scores.device)
        base = self.id_model.user_state(history).to(scores.dtype) @ self.item_table_frozen.to(scores.dtype).T
        correction = scores - base  # (W_o r + b_o) E^T + item bias: what the adapter adds to its base
        self.anchor.to(history.device)
        anchored = self.anchor.full_sort_predict({"history": history}).to(scores.dtype) + self.anchor_weight * correction
        anchored[:, 0] = float("-inf")
        return anchored

    def set_anchor(self, anchor: nn.Module | None, weight: float = 1.0) -> None:
        """Test-time anchor (our addition, DESIGN 5c): score ``s_anchor + weight * (s_IDLE - s_base)``,
        the adapter's correction of its own (held-out) base ID model added to the scores of
        ``anchor`` (the same ID model trained on every target; ``full_sort_predict(batch) -> (B, N+1)``).
        Only for score fusion (``residual``), where the correction is zero at step 0, so an untrained
        adapter ranks exactly as the anchor. ``None`` removes it. Frozen, never trained or saved."""
        if anchor is not None and self.fusion != "residual":
            raise ValueError(f"an anchor needs score fusion ('residual'); this model's is {self.fusion!r} "
                             f"(variant {self.variant!r})")
        if anchor is not None:
            anchor.eval()
            for p in anchor.parameters():
                p.requires_grad_(False)
        object.__setattr__(self, "anchor", anchor)  # not a submodule: not in state_dict, optimizer or ZeRO
        self.anchor_weight = float(weight)

    def _correction_is_zero(self) -> bool:
        """Score fusion with ``W_o`` and ``b_o`` exactly zero (the zero-initialised head before its
        first update): the scores are ``u · Eᵀ`` (+ item bias) whatever the LLM reads out. False when
        the head's parameters are not all on this process (ZeRO-3 partitions them), so every rank
        takes the same path."""
        proj = self.adapter.head.proj
        if self.fusion != "residual" or proj.weight.numel() != proj.in_features * proj.out_features:
            return False
        return not bool(proj.weight.any()) and not bool(proj.bias.any())

    def _scores(self, readout: Tensor, user_state: Tensor | None = None) -> Tensor:
        return self.adapter.head(readout, self.item_table_frozen, user_state)  # (B, N + 1)

    def _prepare(self, batch: Mapping) -> dict[str, Tensor]:
        device = self.adapter.head.proj.weight.device
        out = {}
        for key, value in batch.items():
            if isinstance(value, np.ndarray) and value.dtype.kind in "iu":
                value = torch.from_numpy(value.astype(np.int64))
            if isinstance(value, Tensor):
                if not value.is_floating_point():
                    value = value.long()
                out[key] = value.to(device)
        if "num_id_tokens" in out and bool((out["num_id_tokens"] != self.prompt_length).any()):
            found = sorted(set(out["num_id_tokens"].tolist()))
            raise ValueError(f"batch has {found} ID tokens per row, the model expects {self.prompt_length}")
        if self.variant == "llara" and ("item_pos" not in out or "item_ids" not in out):
            raise ValueError("variant 'llara' needs item_pos/item_ids: use PromptEncoder(item_slots=True)")
        return self._trim_padding(out)

    def _trim_padding(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Drop columns that are padding in every row (fixed-width batches from Ray Data)."""
        real = batch["attention_mask"].bool().any(dim=0)  # (T,)
        cols = torch.nonzero(real).flatten()
        first, last = int(cols[0]), int(cols[-1]) + 1
        if first == 0 and last == real.shape[0]:
            return batch
        for key in TEXT_KEYS:
            if key in batch:
                batch[key] = batch[key][:, first:last]
        batch["id_start"] = batch["id_start"] - first
        if "item_pos" in batch:
            batch["item_pos"] = torch.where(batch["item_pos"] >= 0, batch["item_pos"] - first, -1)
        return batch

    def _position_ids(self, attention_mask: Tensor) -> Tensor | None:
        if self.kind != "decoder":
            return None  # encoders are right-padded: the model's default positions are right
        return (attention_mask.cumsum(dim=1) - 1).clamp_min(0)  # (B, T); left padding

    def _sample_text_positions(self, text_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Flat (batch, time) indices of at most ``mmd_max_text_states`` random text positions."""
        b_idx, t_idx = torch.nonzero(text_mask, as_tuple=True)
        if b_idx.numel() > self.mmd_max_text_states:
            keep = torch.randperm(b_idx.numel(), device=b_idx.device)[: self.mmd_max_text_states]
            keep = keep.sort().values
            b_idx, t_idx = b_idx[keep], t_idx[keep]
        return b_idx, t_idx

    def _id_token_values(self, user_state: Tensor, with_mmd: bool = True) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
        """``(inject, mmd_tokens)``: per layer, the (B·k, D) values written at the ID positions,
        and the ID-token sets that enter the MMD."""
        align = self.adapter.alignment
        h = align(user_state.to(align.fc_in.weight.dtype))  # (B, k, D)
        batch_size, k, hidden = h.shape
        refinement = self.adapter.refinement
        per_layer = dict(zip(refinement.layer_ids, refinement(h))) if refinement is not None else {}
        inject = {layer: p.reshape(batch_size * k, hidden) for layer, p in per_layer.items()}
        if 0 not in inject:
            inject[0] = h.reshape(batch_size * k, hidden)  # layer 0 always sees ID tokens
        wanted = with_mmd and self.mmd_weight > 0
        mmd_tokens = {layer: inject[layer] for layer in self.mmd_layers} if wanted else {}
        return inject, mmd_tokens

    def _llara_values(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        item_pos, item_ids = batch["item_pos"], batch["item_ids"]
        b_idx, h_idx = torch.nonzero(item_pos >= 0, as_tuple=True)
        with torch.no_grad():
            emb = self.item_table_frozen[item_ids[b_idx, h_idx]]  # (M, d)
        values = self.adapter.item_proj(emb.to(self.adapter.head.proj.weight.dtype))  # (M, D)
        return b_idx, item_pos[b_idx, h_idx], values

    def _encode(
        self, batch: dict[str, Tensor], user_state: Tensor | None, with_mmd: bool = True
    ) -> tuple[Tensor, Tensor]:
        """Run the LLM with the adapter attached -> ``(readout (B, D), mmd scalar)``; the MMD is
        0 (not computed, no random text sample drawn) when ``with_mmd`` is false."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        layers = self.backbone.layers
        zero = torch.zeros((), device=ids.device)
        if self.variant == "llm_only":
            with torch.no_grad():
                out = self.llm(input_ids=ids, attention_mask=mask, position_ids=self._position_ids(mask))
            return self._readout(out.last_hidden_state, mask), zero
        if self.variant == "llara":
            b_idx, t_idx, values = self._llara_values(batch)
            with inject_layer_inputs(layers, {0: values}, b_idx, t_idx):
                out = self.llm(input_ids=ids, attention_mask=mask, position_ids=self._position_ids(mask))
            return self._readout(out.last_hidden_state, mask), zero

        inject, mmd_tokens = self._id_token_values(user_state, with_mmd)
        k = self.prompt_length
        id_start = batch["id_start"]
        if self.kind == "decoder" and self.kv_split:
            prefix = int(id_start[0])
            if bool((id_start != prefix).any()):
                raise ValueError("decoder batches must align the ID tokens at one column (left-pad the prefix)")
            if prefix > 0:
                hidden, text_states = self._split_forward(batch, inject, prefix, bool(mmd_tokens))
                return self._readout(hidden, mask), self._mmd(mmd_tokens, text_states)
        text_mask = batch["text_mask"]
        if self.kind == "decoder":
            # decoders: the MMD text states are prefix states (as in the split path)
            cols = torch.arange(ids.shape[1], device=ids.device)
            text_mask = text_mask * (cols.unsqueeze(0) < id_start.unsqueeze(1))
        b_txt, t_txt = self._sample_text_positions(text_mask) if mmd_tokens else (None, None)
        b_ids, t_ids = block_positions(id_start, k)
        with capture_layer_inputs(layers, list(mmd_tokens), b_txt, t_txt) as text_states:
            with inject_layer_inputs(layers, inject, b_ids, t_ids):
                out = self.llm(input_ids=ids, attention_mask=mask, position_ids=self._position_ids(mask))
        return self._readout(out.last_hidden_state, mask), self._mmd(mmd_tokens, text_states)

    def _split_forward(
        self, batch: dict[str, Tensor], inject: dict[int, Tensor], prefix: int, want_text: bool
    ) -> tuple[Tensor, dict[int, Tensor]]:
        """Decoder: no-grad prefix pass (KV cache + MMD text states), then the tail with grad."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        layers = self.backbone.layers
        positions = self._position_ids(mask)  # (B, T)
        mmd_layers = list(self.mmd_layers) if want_text else []
        b_txt, t_txt = self._sample_text_positions(batch["text_mask"][:, :prefix]) if want_text else (None, None)
        with torch.no_grad(), capture_layer_inputs(layers, mmd_layers, b_txt, t_txt) as text_states:
            out = self.llm(
                input_ids=ids[:, :prefix],
                attention_mask=mask[:, :prefix],
                position_ids=positions[:, :prefix],
                use_cache=True,
            )
        tail_embeds = self.backbone.embed_tokens(ids[:, prefix:])  # (B, T - P, D)
        batch_size = ids.shape[0]
        zeros = torch.zeros(batch_size, dtype=torch.long, device=ids.device)
        b_ids, t_ids = block_positions(zeros, self.prompt_length)  # ID tokens open the tail
        with inject_layer_inputs(layers, inject, b_ids, t_ids):
            out = self.llm(
                inputs_embeds=tail_embeds,
                attention_mask=mask,
                position_ids=positions[:, prefix:],
                past_key_values=out.past_key_values,
                use_cache=True,
            )
        return out.last_hidden_state, text_states  # (B, T - P, D)

    def _readout(self, hidden: Tensor, mask: Tensor) -> Tensor:
        """``(B, T', D)`` final hidden states -> ``r (B, D)``: last column (decoder; the
        layout puts a real token there) or mean over real tokens (encoder)."""
        if self.kind == "decoder":
            return hidden[:, -1]
        weights = mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)

    def _mmd(self, mmd_tokens: dict[int, Tensor], text_states: dict[int, Tensor]) -> Tensor:
        if not mmd_tokens:
            device = self.adapter.head.proj.weight.device
            return torch.zeros((), device=device)
        layers = list(mmd_tokens)
        tokens = torch.stack([mmd_tokens[layer] for layer in layers])  # (L, B·k, D)
        text = torch.stack([text_states[layer] for layer in layers])  # (L, m, D): one subsample
        return mmd2_layers(tokens, text, within_sample_cap=self.mmd_within_sample_cap).mean()
