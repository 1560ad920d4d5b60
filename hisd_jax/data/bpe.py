"""The byte-level BPE tokenizers of the token data sets (HF `tokenizers`, trained on a data
set's training split only; `pycode.py`, `glue.py`)."""

from __future__ import annotations

from collections.abc import Iterable


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    special_tokens: tuple[str, ...],
    *,
    add_prefix_space: bool,
    length: int | None = None,
):
    """A byte-level BPE `tokenizers.Tokenizer` trained on `texts` (`length`: their count, for
    the trainer's bookkeeping); `special_tokens` take ids 0, 1, ... in order, the second one is
    the unknown token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: PLC0415

    tokenizer = Tokenizer(models.BPE(unk_token=special_tokens[1]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=length)
    return tokenizer
