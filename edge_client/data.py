"""Training data on the device: deterministic batches over `splitlm.data`'s sequences.

The batch of global step `s` is a pure function of `(seed, s)`, so a resumed run and the
centralized PyTorch reference see exactly the same data in the same order. How files are read
and tokenized is the contract in `splitlm.data`, shared with the server.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from splitlm.data import (  # noqa: F401 - the contract, re-exported for the device's callers
    EXPECTED_LINE, IGNORE_INDEX, MIN_TOKENS, SUFFIXES, Batch, Example, PromptExample, Sequence, TextExample,
    collate, encode, keeps_something, load_tokenizer, pack, parse_line, prompt_sequence, read_examples, tokenize)
from splitlm.errors import DataError


class Dataset:
    """Sequences served as batches; `batch(step)` depends only on (seed, step)."""

    def __init__(self, sequences: list[Sequence], *, batch_size: int, pad_token_id: int, seed: int = 0):
        if not sequences:
            raise DataError(f"no training sequences: every example is under {MIN_TOKENS} tokens "
                            "or has nothing to learn")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.sequences = sequences
        self.batch_size = batch_size
        self.pad_token_id = pad_token_id
        self.seed = seed

    @staticmethod
    def from_file(path: str | Path, bundle, *, batch_size: int, seq_len: int | None = None,
                  seed: int = 0) -> "Dataset":
        """Read, tokenize with the bundle's tokenizer and batch `path`; seq_len defaults to the bundle's."""
        m = bundle.manifest
        seq_len = seq_len or m.max_length
        if not MIN_TOKENS <= seq_len <= m.max_length:
            raise DataError(f"seq_len must be in {MIN_TOKENS}..{m.max_length} for this bundle, got {seq_len}")
        tokenizer = load_tokenizer(bundle.file("tokenizer.json"))
        sequences = tokenize(read_examples(path), tokenizer, seq_len=seq_len, eos_id=m.eos_token_id)
        if not sequences:
            raise DataError(f"{path}: no training sequences (every example is under {MIN_TOKENS} tokens "
                            "or has nothing to learn)")
        return Dataset(sequences, batch_size=batch_size, pad_token_id=m.pad_token_id, seed=seed)

    @property
    def n_samples(self) -> int:
        return len(self.sequences)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.n_samples / self.batch_size)  # the last batch of an epoch may be smaller

    def indices(self, step: int) -> np.ndarray:
        """Which sequences make the batch of global `step`."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        epoch, i = divmod(step, self.steps_per_epoch)
        order = np.random.default_rng((self.seed, epoch)).permutation(self.n_samples)
        return order[i * self.batch_size:(i + 1) * self.batch_size]

    def batch(self, step: int) -> Batch:
        return collate([self.sequences[j] for j in self.indices(step)], pad_token_id=self.pad_token_id)
