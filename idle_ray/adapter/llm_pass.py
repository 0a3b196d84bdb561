"""IDLEModel's pass through the frozen LLM: ID tokens injected at layer inputs, MMD text states, read-out.

Decoder fast path (``kv_split=True``): with ``{id_tokens}`` after the history, the prefix does
not depend on the adapter. It runs once under ``torch.no_grad`` with ``use_cache=True``; only
the tail (``k`` ID tokens + suffix) runs with autograd, on top of the prefix's KV cache, with
``position_ids = cumsum(attention_mask) - 1`` (left padding) and the full attention mask. This
equals one full forward with the same hooks (tested to 1e-5 in fp32). Encoders
(bidirectional) and LLaRA (slots inside the prefix) run one full forward with autograd.

"The input layer" is the input of transformer block 0, i.e. after token + position embeddings
(and BERT's embedding LayerNorm): at initialisation ``idle_no_refine`` and ``idle`` feed
block 0 the same tokens ``h``. Batches padded to a fixed width (``PromptEncoder``'s default,
so Ray Data can re-batch) are first trimmed of columns that are padding in every row.
"""

from __future__ import annotations

import torch
from torch import Tensor

from idle_ray.adapter.mmd import mmd2_layers
from idle_ray.adapter.refinement import block_positions, capture_layer_inputs, inject_layer_inputs

TEXT_KEYS = ("input_ids", "attention_mask", "text_mask")


class LLMPassMixin:
    """The LLM-pass methods of :class:`idle_ray.adapter.model.IDLEModel`, which sets every attribute
    they read: ``backbone``, ``llm``, ``kind``, ``variant``, ``kv_split``, ``prompt_length``,
    ``mmd_layers``, ``mmd_weight``, ``mmd_max_text_states``, ``mmd_within_sample_cap``, ``adapter``
    and ``item_table_frozen``."""

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
