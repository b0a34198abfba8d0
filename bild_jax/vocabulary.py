"""Pairs whose checkpoints pad one tokenizer's vocabulary to different sizes (e.g. Qwen2.5/Qwen3: 151936 rows
up to 7B, 152064 above): both decode over the rows they share.

Padding rows carry no token, so cutting every logit row past the shared size changes nothing a tokenizer
can produce, and BiLD's exact mode then equals the large model's greedy decoding over that vocabulary.
Whether the extra rows are padding only the tokenizers can tell: the models know nothing but their sizes.
"""

from __future__ import annotations

from bild_jax.errors import InputError
from bild_jax.model import Model


def vocabulary_mismatch(small_tokenizer, large_tokenizer) -> str | None:
    """How two tokenizers' vocabularies differ (tokens only one has, tokens with different ids), as one line;
    None when every token has the same id in both. Takes transformers tokenizers (`get_vocab()`)."""
    small_vocab, large_vocab = small_tokenizer.get_vocab(), large_tokenizer.get_vocab()
    if small_vocab == large_vocab:
        return None
    only_small = sorted(set(small_vocab) - set(large_vocab))
    only_large = sorted(set(large_vocab) - set(small_vocab))
    moved = sorted(t for t in set(small_vocab) & set(large_vocab) if small_vocab[t] != large_vocab[t])
    parts = [f"{len(tokens)} {what} (e.g. {tokens[:3]})"
             for tokens, what in ((only_small, "tokens only in the small tokenizer"),
                                  (only_large, "tokens only in the large tokenizer"),
                                  (moved, "tokens with different ids"))
             if tokens]
    return "; ".join(parts)


def shared_vocabulary(small: Model, large: Model, small_tokenizer, large_tokenizer) -> tuple[Model, Model]:
    """(small, large) decoding over the vocabulary rows both have, after checking with their tokenizers that
    the rows they do not share are padding.

    Equal sizes come back unchanged. A ValueError names the case otherwise: the tokenizers differ in real
    tokens, or a real token id lies past one model's rows.
    """
    mismatch = vocabulary_mismatch(small_tokenizer, large_tokenizer)
    if mismatch is not None:
        raise InputError(f"the small and large tokenizers differ in real tokens ({mismatch}); BiLD needs one "
                         "shared vocabulary")
    shared = min(small.vocab_size, large.vocab_size)
    highest = max(small_tokenizer.get_vocab().values())
    if highest >= shared:
        raise InputError(f"the tokenizer has token id {highest}, past the {shared} rows of the "
                         f"{'small' if small.vocab_size == shared else 'large'} model: the vocabularies differ in "
                         "real tokens, not only in padding")
    return small.with_vocab_size(shared), large.with_vocab_size(shared)
