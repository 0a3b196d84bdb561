"""Models built in code from a fixed seed: the tiny test backbones, their character tokenizer, and random weights for a stored architecture."""

from __future__ import annotations

import string
from pathlib import Path

import torch

TINY_SEED = 1234
TINY_HIDDEN = 32
TINY_LAYERS = 2
TINY_HEADS = 4
TINY_MAX_POSITIONS = 1024
TINY_NAMES = ("tiny-decoder", "tiny-gpt2", "tiny-encoder")

TINY_SPECIALS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]", "[CLS]", "[SEP]", "[MASK]")


def build_char_tokenizer(add_cls_sep: bool):
    """Character-level fast tokenizer over lower-cased printable ASCII, built in code (offline).

    Encoders get a ``[CLS] … [SEP]`` post-processor; decoders get no special tokens.
    """
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.printable.lower()) - set("\t\n\r\x0b\x0c"))
    vocab = {tok: i for i, tok in enumerate(list(TINY_SPECIALS) + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    if add_cls_sep:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]",
        cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
        model_max_length=TINY_MAX_POSITIONS,
    )
    return fast


def build_tiny(name: str, dtype: torch.dtype):
    """``(model, tokenizer)`` of a 2-layer tiny backbone (``name`` in :data:`TINY_NAMES`), hidden 32, weights from
    :data:`TINY_SEED` (the caller's RNG untouched)."""
    from transformers import AutoModel, BertConfig, GPT2Config, LlamaConfig

    tokenizer = build_char_tokenizer(add_cls_sep=(name == "tiny-encoder"))
    vocab = len(tokenizer)
    if name == "tiny-decoder":
        config = LlamaConfig(
            vocab_size=vocab, hidden_size=TINY_HIDDEN, intermediate_size=2 * TINY_HIDDEN,
            num_hidden_layers=TINY_LAYERS, num_attention_heads=TINY_HEADS, num_key_value_heads=2,
            max_position_embeddings=TINY_MAX_POSITIONS, pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        )
    elif name == "tiny-gpt2":
        config = GPT2Config(
            vocab_size=vocab, n_embd=TINY_HIDDEN, n_layer=TINY_LAYERS, n_head=TINY_HEADS,
            n_positions=TINY_MAX_POSITIONS, pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        )
    else:
        config = BertConfig(
            vocab_size=vocab, hidden_size=TINY_HIDDEN, num_hidden_layers=TINY_LAYERS,
            num_attention_heads=TINY_HEADS, intermediate_size=2 * TINY_HIDDEN,
            max_position_embeddings=TINY_MAX_POSITIONS, pad_token_id=tokenizer.pad_token_id,
        )
    with torch.random.fork_rng(devices=[]):  # fixed weights, caller's RNG untouched
        torch.manual_seed(TINY_SEED)
        model = AutoModel.from_config(config)
    return model.to(dtype), tokenizer


def build_random(path: Path, dtype: torch.dtype):
    """The architecture in ``path/config.json`` with random weights from a fixed seed."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    with torch.random.fork_rng(devices=[]):  # fixed weights, caller's RNG untouched
        torch.manual_seed(TINY_SEED)
        model = AutoModel.from_config(config)
    return model.to(dtype), tokenizer
