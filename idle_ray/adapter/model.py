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

How the LLM runs (the decoder fast path ``kv_split``, what "the input of layer 0" is, the
trimming of padded batches): :mod:`idle_ray.adapter.llm_pass`.

Variants (constructor argument ``variant``; everything else is shared):

* ``idle`` — all of the above.
* ``idle_no_refine`` — ``h`` injected at the input of layer 0 only; MMD at that one layer.
* ``idle_no_mmd`` — ``idle`` with ``λ = 0`` (the MMD term is not computed).
* ``llm_only`` — no ID tokens (``k = 0``; ``prompt_length`` is ignored), same head on the
  read-out. Nothing inside the LLM trains, so the LLM runs without autograd.
* ``llara`` — no ID tokens (``k = 0``); each history item's ID embedding (frozen item table)
  mapped by one MLP ``d -> w -> D`` into the slot token after its title (``item_pos`` /
  ``item_ids`` from ``PromptEncoder(item_slots=True)``), at the input of layer 0; no MMD.

Trainable = parameters whose name starts with ``adapter.``; that one predicate sets ``requires_grad``,
builds the optimizer's list and filters the checkpoint (:mod:`idle_ray.adapter.trainable`).

Batch (torch tensors or numpy arrays; from :class:`idle_ray.llm.prompts.PromptEncoder` plus the
sample columns): ``input_ids``, ``attention_mask``, ``text_mask``, ``id_start``,
``num_id_tokens`` (B, T)/(B,); ``history`` (B, H) left-padded item ids for the ID model;
``target`` (B,) in ``1..N`` (omit for scoring only); ``item_pos``, ``item_ids`` for ``llara``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from idle_ray.adapter.alignment import DimensionAlignment
from idle_ray.adapter.head import OutputHead
from idle_ray.adapter.llm_pass import LLMPassMixin
from idle_ray.adapter.refinement import LayerwiseRefinement
from idle_ray.adapter.trainable import AdapterStateMixin, is_trainable
from idle_ray.llm.backbone import Backbone

VARIANTS = ("llm_only", "llara", "idle", "idle_no_refine", "idle_no_mmd")
FUSIONS = ("residual", "none")
PREDICT_CHUNK = 32  # rows per scoring chunk (IDLEModel.full_sort_predict)


def _take_rows(value, idx: Tensor):
    """Rows ``idx`` of a per-row batch value (tensor, numpy array or list)."""
    if isinstance(value, Tensor):
        return value[idx.to(value.device)]
    if isinstance(value, np.ndarray):
        return value[idx.numpy()]
    return [value[i] for i in idx.tolist()]


class _Adapter(nn.Module):
    """Container of everything that trains; its attribute name makes the ``adapter.`` prefix."""

    def __init__(self) -> None:
        super().__init__()
        self.alignment: DimensionAlignment | None = None
        self.refinement: LayerwiseRefinement | None = None
        self.item_proj: nn.Sequential | None = None
        self.head: OutputHead | None = None


class IDLEModel(AdapterStateMixin, LLMPassMixin, nn.Module):
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
        kv_split: decoders run the prefix once without autograd (see :mod:`idle_ray.adapter.llm_pass`).
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

    # ------------------------------------------------------------------ mode

    def train(self, mode: bool = True) -> IDLEModel:
        """Only the adapter switches mode: the frozen LLM and ID model always run in eval mode."""
        super().train(mode)
        self.llm.eval()
        self.id_model.eval()
        return self

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
