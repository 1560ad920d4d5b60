"""GLUE text classification through `tfds.data_source` (random access, no TensorFlow) and grain.

`glue(config="sst2")` reads the TFDS `glue/<config>` data set (prepared beforehand: nothing is
downloaded; pass `data_dir` if it is not TFDS's default directory). GLUE's test labels are
hidden, so the splits are: 'train' the first records of the TFDS train split, 'val' its last
round(n * val_fraction) records, 'test' the TFDS validation split (`validation_matched` for
mnli). 'index' is the record's position in its full TFDS split.

Input 'tokens' int32 [max_len]: [CLS], the first text's tokens, and for a sentence-pair task
[SEP] and the second text's, truncated to `max_len` and padded with 0 (`pycode.PAD_ID`). The
tokenizer is a byte-level BPE from HF `tokenizers` trained on the training split's texts only,
cached in `<cache_dir>/glue/<config>_<TFDS version>_n<train size>_v<vocab_size>/tokenizer.json`
(`cache_dir` defaults to ~/.cache/hisd_jax). Records are tokenized as they are read.

Task `label`: classification with the data set's classes (cola, sst2, mrpc, qqp, mnli, qnli,
rte, wnli), or regression for stsb (a similarity score in [0, 5]).

Wang et al. 2019, "GLUE: A Multi-Task Benchmark and Analysis Platform for Natural Language
Understanding" (ICLR); the TFDS builder `tensorflow_datasets/text/glue.py`.
"""

from __future__ import annotations

import functools
import os

import grain
import numpy as np

from hisd_jax.data import Dataset, TaskInfo
from hisd_jax.data.bpe import train_bpe
from hisd_jax.data.tfds_sources import GrainSource, data_source

# config -> its text fields (one, or a pair)
TEXTS = {
    "cola": ("sentence",),
    "sst2": ("sentence",),
    "mrpc": ("sentence1", "sentence2"),
    "qqp": ("question1", "question2"),
    "stsb": ("sentence1", "sentence2"),
    "mnli": ("premise", "hypothesis"),
    "qnli": ("question", "sentence"),
    "rte": ("sentence1", "sentence2"),
    "wnli": ("sentence1", "sentence2"),
}
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")  # ids 0-3; 0-2 as in pycode
PAD_ID, UNK_ID, CLS_ID, SEP_ID = 0, 1, 2, 3


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def train_tokenizer(texts, vocab_size: int):
    """A byte-level BPE tokenizer trained on `texts`; `SPECIAL_TOKENS` take ids 0-3."""
    return train_bpe(texts, vocab_size, SPECIAL_TOKENS, add_prefix_space=True)


def encode(tokenizer, texts: tuple[str, ...], max_len: int) -> np.ndarray:
    """int32 [max_len]: [CLS] text0 ([SEP] text1), truncated and padded with PAD_ID."""
    ids = [CLS_ID]
    for i, text in enumerate(texts):
        if i:
            ids.append(SEP_ID)
        ids += tokenizer.encode(text, add_special_tokens=False).ids
    out = np.full(max_len, PAD_ID, np.int32)
    ids = ids[:max_len]
    out[: len(ids)] = ids
    return out


def _decode(position, record, *, first, tokenizer, fields, max_len, regression):
    label = np.float32(record["label"]) if regression else np.int32(record["label"])
    return {
        "tokens": encode(tokenizer, tuple(_text(record[f]) for f in fields), max_len),
        "index": np.int32(first + position),
        "label": label,
    }


def _tokenizer(train, first, stop, fields, vocab_size, name, cache_dir):
    """The BPE tokenizer of records [first, stop) of `train`, trained once and cached."""
    from tokenizers import Tokenizer  # noqa: PLC0415

    from hisd_jax import jsonio  # noqa: PLC0415

    version = train.dataset_info.version
    directory = os.path.join(
        cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "hisd_jax"),
        "glue",
        f"{name}_{version}_n{stop - first}_v{vocab_size}",
    )
    path = os.path.join(directory, "tokenizer.json")
    if os.path.exists(path):
        try:
            return Tokenizer.from_file(path)
        except Exception:  # noqa: BLE001 - a damaged cache file: train again
            pass
    texts = (_text(train[i][f]) for i in range(first, stop) for f in fields)
    tokenizer = train_tokenizer(texts, vocab_size)
    os.makedirs(directory, exist_ok=True)
    jsonio.write_text(path, tokenizer.to_str())
    return tokenizer


def glue(
    *,
    seed: int = 0,
    config: str = "sst2",
    data_dir=None,
    cache_dir=None,
    max_len: int = 128,
    vocab_size: int = 8192,
    val_fraction: float = 0.1,
) -> Dataset:
    """The GLUE task `config` as a token-sequence `Dataset` (module docstring). `seed` is unused
    (the splits are fixed). ValueError naming the argument for an unknown config, a max_len
    outside [2, 4096] or a val_fraction that leaves a split empty."""
    del seed
    import tensorflow_datasets.text.glue  # noqa: F401, PLC0415 - registers the glue builder

    if config not in TEXTS:
        raise ValueError(f"data.kwargs.config={config!r} is not one of {', '.join(TEXTS)}")
    if not 2 <= int(max_len) <= 4096:
        raise ValueError(f"data.kwargs.max_len={max_len} must be in [2, 4096]")
    name = f"glue/{config}"
    test_split = "validation_matched" if config == "mnli" else "validation"
    train, test = (data_source(name, s, data_dir) for s in ("train", test_split))
    n_val = round(len(train) * val_fraction)
    if not 0 < n_val < len(train):
        raise ValueError(
            f"data.kwargs.val_fraction={val_fraction} leaves no train or no val records out of "
            f"{len(train)}"
        )
    fields = TEXTS[config]
    regression = config == "stsb"
    bounds = {"train": (train, 0, len(train) - n_val), "val": (train, len(train) - n_val,
              len(train)), "test": (test, 0, len(test))}  # fmt: skip
    tokenizer = _tokenizer(train, 0, len(train) - n_val, fields, vocab_size, config, cache_dir)
    sources = {
        split: GrainSource(
            grain.MapDataset.source(data)[first:stop].map_with_index(
                functools.partial(
                    _decode,
                    first=first,
                    tokenizer=tokenizer,
                    fields=fields,
                    max_len=int(max_len),
                    regression=regression,
                )  # fmt: skip
            )
        )
        for split, (data, first, stop) in bounds.items()
    }
    feature = train.dataset_info.features["label"]
    task = (
        TaskInfo("label", "regression", 0, "label")
        if regression
        else TaskInfo("label", "classification", feature.num_classes, "label")
    )
    return Dataset(
        "glue",
        sources,
        (int(max_len),),
        {"label": task},
        input_key="tokens",
        input_dtype="int32",
        vocab_size=tokenizer.get_vocab_size(),
        metadata={"tfds": name, "version": str(train.dataset_info.version)},
    )
