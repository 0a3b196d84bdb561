"""Hard prompts: item histories -> token arrays laid out for the adapter (DESIGN §1 (0)).

A template holds ``{history}`` (the titles of the last ``max_history`` items, oldest first,
joined by ``", "``) and, after it, ``{id_tokens}`` (``k`` placeholder positions the adapter fills;
``k = 0`` for the LLM-only and LLaRA variants), e.g.
``"A user watched these movies in order: {history}. {id_tokens} The next movie the user will watch is"``.

:class:`PromptEncoder` runs inside a Ray Data ``map_batches``: numpy in, numpy out, picklable.
Every title is tokenised once, at construction; a call only concatenates token ids, so the
tokenizer itself is not kept (nothing heavy to pickle, nothing to load per worker).

Tokenisation is piecewise — template text, each title, the joiner — which makes truncation
and the LLaRA slot positions exact. Whitespace that ends a text piece is carried to the start
of the next one (``"order: "`` + ``"Toy Story"`` is tokenised as ``"order:"`` + ``" Toy Story"``),
the way byte-level BPE tokenisers (GPT-2, SmolLM2) split whole sentences. Special tokens
(``[CLS]``/``[SEP]``, a BOS) are those the tokenizer adds around a single text.

Truncation: a row must fit in ``max_tokens`` columns; the oldest titles are dropped first
until it does (possibly all of them). Titles can also be capped at ``max_title_tokens``.

Layouts (``B`` rows, ``T`` columns; ``T = max_tokens`` when ``pad_to_max_tokens``, else the
longest row of the batch):

* decoder — ``[pad… | prefix (template head, titles, middle) | k ID tokens | suffix]``. The
  prefix is **left**-padded so every row's ID tokens start at the same column ``P``; the suffix
  is constant text, hence the same length in every row; the read-out is column ``T - 1``. The
  prefix does not depend on the adapter, so the model runs it once without autograd (KV cache).
* encoder — ``[CLS prefix | k ID tokens | suffix SEP | pad…]``, right-padded; ``id_start``
  varies per row; the read-out is mean pooling over real tokens.

Output (all ``int64`` numpy):

* ``input_ids (B, T)``, ``attention_mask (B, T)`` (1 = real token, ID tokens included).
* ``id_start (B,)`` — column of the first ID token (``P`` in every row for decoders).
* ``prefix_len (B,)`` — number of columns before the ID tokens (``= id_start``).
* ``num_id_tokens (B,)`` — ``k``, so the model can check the batch matches its prompt length.
* ``text_mask (B, T)`` — 1 at template and title tokens (not pads, specials, ID tokens or
  slots): the text positions the MMD term samples.
* with ``item_slots=True`` (LLaRA): one slot token right after each kept title;
  ``item_pos (B, max_history)`` the slot's column and ``item_ids (B, max_history)`` its item,
  right-aligned (newest item in the last column), ``-1`` / ``0`` where there is none.

Called with a dict (Ray Data ``batch_format="numpy"``), the history is read from
``batch[history_key]`` and the output is the input dict plus the arrays above.
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence

import numpy as np

KINDS = ("decoder", "encoder")


def split_template(template: str) -> tuple[str, str, str]:
    """Validate ``template`` and return its literal ``(head, middle, tail)`` around
    ``{history}`` and ``{id_tokens}``. Raises ``ValueError`` naming the problem."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"prompt template is not a valid format string: {exc}") from None
    fields = [field for _, field, _, _ in parsed if field is not None]
    for name in ("history", "id_tokens"):
        if fields.count(name) != 1:
            raise ValueError(f"prompt template must contain {{{name}}} exactly once, got {template!r}")
    others = sorted(set(fields) - {"history", "id_tokens"})
    if others:
        raise ValueError(f"prompt template has unknown fields {others}: only {{history}} and {{id_tokens}}")
    for _, field, spec, conversion in parsed:
        if field is not None and (spec or conversion):
            raise ValueError(f"prompt template field {{{field}}} takes no format spec or conversion")
    if fields.index("id_tokens") < fields.index("history"):
        raise ValueError(
            "prompt template must put {id_tokens} after {history}: the text before the ID tokens "
            "then does not depend on the adapter"
        )
    literals = [literal for literal, _, _, _ in parsed]
    # parse() yields (literal before field, field) pairs, plus a trailing literal-only item.
    head = literals[0]
    middle = literals[1]
    tail = "".join(literals[2:])
    return head, middle, tail


def _split_trailing_ws(text: str) -> tuple[str, str]:
    stripped = text.rstrip()
    return stripped, text[len(stripped):]


def _flat(lists: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(lists) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(x) for x in lists])
    flat = np.fromiter((t for x in lists for t in x), dtype=np.int64, count=int(offsets[-1]))
    return flat, offsets


class PromptEncoder:
    """Turn item histories into the token arrays described in the module docstring.

    Args:
        tokenizer: a Hugging Face tokenizer (only used during construction).
        template: text with ``{history}`` then ``{id_tokens}``.
        prompt_length: ``k``, the number of ID-token placeholders (0 for LLM-only / LLaRA).
        max_history: at most this many most recent items are shown.
        max_tokens: the hard cap on a row's length (and the width ``T`` when padding to it).
        titles: ``titles[i]`` is item ``i``'s title; index 0 (padding) is never read; a missing
            (``None``/empty) title is shown as ``"item <i>"``.
        kind: ``"decoder"`` (left-padded prefix, read-out last) or ``"encoder"`` (right padding).
        item_slots: insert one slot token after each title (LLaRA) and emit ``item_pos``/``item_ids``.
        pad_to_max_tokens: pad every batch to ``max_tokens`` columns (fixed width: Ray Data can
            re-batch freely; the model trims all-padding columns), else to the batch's longest row.
        history_joiner: text between two titles.
        max_title_tokens: cap each title at this many tokens (``None``: no cap).
        history_key: the dict key read when called with a dict batch.
    """

    def __init__(
        self,
        tokenizer,
        template: str,
        prompt_length: int,
        max_history: int,
        max_tokens: int,
        titles: Sequence[str],
        kind: str,
        item_slots: bool = False,
        pad_to_max_tokens: bool = True,
        history_joiner: str = ", ",
        max_title_tokens: int | None = None,
        history_key: str = "history",
    ):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if prompt_length < 0:
            raise ValueError(f"prompt_length must be >= 0, got {prompt_length}")
        if max_history < 1:
            raise ValueError(f"max_history must be >= 1, got {max_history}")
        if max_title_tokens is not None and max_title_tokens < 1:
            raise ValueError(f"max_title_tokens must be >= 1 or None, got {max_title_tokens}")
        head, middle, tail = split_template(template)
        self.template = template
        self.kind = kind
        self.prompt_length = int(prompt_length)
        self.max_history = int(max_history)
        self.max_tokens = int(max_tokens)
        self.item_slots = bool(item_slots)
        self.pad_to_max_tokens = bool(pad_to_max_tokens)
        self.history_key = history_key

        def encode(text: str) -> list[int]:
            return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

        self.pad_id = self._first_id(tokenizer, ("pad_token_id", "unk_token_id", "eos_token_id"))
        # ID tokens and slots get their hidden states replaced before layer 0: any id will do.
        self.placeholder_id = self._first_id(tokenizer, ("unk_token_id", "pad_token_id", "eos_token_id"))
        self.lead, self.trail = self._special_tokens(tokenizer, encode)

        head_text, head_ws = _split_trailing_ws(head)
        joiner_text, joiner_ws = _split_trailing_ws(history_joiner)
        middle_text, middle_ws = _split_trailing_ws(middle)
        if self.prompt_length == 0 and not tail[:1].isspace():
            tail = middle_ws + tail  # nothing sits between middle and tail: keep their space
        self.head = encode(head_text)
        self.joiner = encode(joiner_text)
        self.middle = encode(middle_text)
        self.tail = encode(tail)

        def encode_titles(ws: str) -> tuple[np.ndarray, np.ndarray]:
            texts = [ws + ((str(t).strip() if t is not None else "") or f"item {i}") for i, t in enumerate(titles)]
            encoded = tokenizer(texts[1:], add_special_tokens=False)["input_ids"] if len(texts) > 1 else []
            ids = [[]] + [list(x) for x in encoded]
            if max_title_tokens is not None:
                ids = [x[:max_title_tokens] for x in ids]
            return _flat(ids)

        self.num_titles = len(titles)
        self.title_ids_next, self.title_offsets_next = encode_titles(joiner_ws)
        if head_ws == joiner_ws:
            self.title_ids_first, self.title_offsets_first = self.title_ids_next, self.title_offsets_next
        else:
            self.title_ids_first, self.title_offsets_first = encode_titles(head_ws)

        # Suffix = everything after the ID tokens; constant, so one length for every row.
        self.suffix = self.tail + self.trail
        self.fixed_len = len(self.lead) + len(self.head) + len(self.middle) + self.prompt_length
        self.fixed_len += len(self.tail) + len(self.trail)
        if self.fixed_len > self.max_tokens:
            raise ValueError(
                f"max_tokens={self.max_tokens} cannot hold the template without history "
                f"({self.fixed_len} tokens with prompt_length={self.prompt_length})"
            )

    # ------------------------------------------------------------------ construction helpers

    @staticmethod
    def _first_id(tokenizer, attrs: Sequence[str]) -> int:
        for attr in attrs:
            value = getattr(tokenizer, attr, None)
            if value is not None:
                return int(value)
        return 0

    @staticmethod
    def _special_tokens(tokenizer, encode) -> tuple[list[int], list[int]]:
        """Special tokens the tokenizer puts before/after a single text (e.g. [CLS] / [SEP])."""
        plain = encode("a")
        full = list(tokenizer("a", add_special_tokens=True)["input_ids"])
        for start in range(len(full) - len(plain) + 1):
            if full[start : start + len(plain)] == plain:
                return full[:start], full[start + len(plain) :]
        return [], []

    def _title(self, item: int, first: bool) -> np.ndarray:
        if not 0 < item < self.num_titles:
            raise IndexError(f"item id {item} has no title (titles cover 1..{self.num_titles - 1})")
        if first:
            return self.title_ids_first[self.title_offsets_first[item] : self.title_offsets_first[item + 1]]
        return self.title_ids_next[self.title_offsets_next[item] : self.title_offsets_next[item + 1]]

    # ------------------------------------------------------------------ per row

    def _history_pieces(self, row: np.ndarray) -> tuple[list[int], list[int], list[int]]:
        """Tokens, text flags and slot items of the history part of one row, truncated."""
        items = [int(i) for i in row[row != 0][-self.max_history :]]
        slot = 1 if self.item_slots else 0
        budget = self.max_tokens - self.fixed_len
        # cost of keeping items[j:], for every j; drop the oldest until it fits
        later = 0  # cost of items[j+1:] when each is preceded by the joiner
        start = len(items)
        costs = [0] * len(items)
        for j in range(len(items) - 1, -1, -1):
            costs[j] = len(self._title(items[j], first=True)) + slot + later
            later += len(self.joiner) + len(self._title(items[j], first=False)) + slot
        for j in range(len(items)):
            if costs[j] <= budget:
                start = j
                break
        tokens: list[int] = []
        is_text: list[int] = []
        slot_items: list[int] = []
        for n, item in enumerate(items[start:]):
            if n:
                tokens += self.joiner
                is_text += [1] * len(self.joiner)
            title = self._title(item, first=(n == 0))
            tokens += title.tolist()
            is_text += [1] * len(title)
            if slot:
                tokens.append(self.placeholder_id)
                is_text.append(0)
                slot_items.append(item)
        return tokens, is_text, slot_items

    def _prefix(self, row: np.ndarray):
        hist, hist_text, slot_items = self._history_pieces(row)
        tokens = self.lead + self.head + hist + self.middle
        is_text = [0] * len(self.lead) + [1] * len(self.head) + hist_text + [1] * len(self.middle)
        base = len(self.lead) + len(self.head)
        slots = [base + i for i, txt in enumerate(hist_text) if txt == 0]  # slot columns in the prefix
        return tokens, is_text, slots, slot_items

    # ------------------------------------------------------------------ batch

    def __call__(self, batch):
        if isinstance(batch, Mapping):
            out = dict(batch)
            out.update(self.encode(np.asarray(batch[self.history_key])))
            return out
        return self.encode(np.asarray(batch))

    def encode(self, histories: np.ndarray) -> dict[str, np.ndarray]:
        """``histories (B, H)`` left-padded item ids (0 = pad) -> dict of ``(B, …)`` int64 arrays."""
        if histories.ndim != 2:
            raise ValueError(f"histories must be (B, H), got shape {histories.shape}")
        rows = [self._prefix(row) for row in histories]
        batch = len(rows)
        k = self.prompt_length
        suffix = self.suffix
        suffix_text = [1] * len(self.tail) + [0] * (len(suffix) - len(self.tail))
        longest = max((len(r[0]) for r in rows), default=0) + k + len(suffix)
        width = self.max_tokens if self.pad_to_max_tokens else longest

        input_ids = np.full((batch, width), self.pad_id, dtype=np.int64)
        attention_mask = np.zeros((batch, width), dtype=np.int64)
        text_mask = np.zeros((batch, width), dtype=np.int64)
        id_start = np.zeros(batch, dtype=np.int64)
        item_pos = np.full((batch, self.max_history), -1, dtype=np.int64)
        item_ids = np.zeros((batch, self.max_history), dtype=np.int64)
        for b, (tokens, is_text, slots, slot_items) in enumerate(rows):
            if self.kind == "decoder":
                start = width - len(suffix) - k - len(tokens)  # left-pad the prefix to P
            else:
                start = 0
            p = start + len(tokens)
            row = tokens + [self.placeholder_id] * k + suffix
            input_ids[b, start : start + len(row)] = row
            attention_mask[b, start : start + len(row)] = 1
            text_mask[b, start : start + len(row)] = is_text + [0] * k + suffix_text
            id_start[b] = p
            if slots:
                n = len(slots)
                item_pos[b, self.max_history - n :] = np.asarray(slots) + start
                item_ids[b, self.max_history - n :] = slot_items
        out = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "text_mask": text_mask,
            "id_start": id_start,
            "prefix_len": id_start.copy(),
            "num_id_tokens": np.full(batch, k, dtype=np.int64),
        }
        if self.item_slots:
            out["item_pos"] = item_pos
            out["item_ids"] = item_ids
        return out
