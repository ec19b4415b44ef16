"""The distill public set, as both sides see it: rows of token positions in one fixed order.

Torch-free and beside the manifest because the device (top-k upload, KD steps) and the server
(aggregation, its own distillation) must agree on what row i is. The public text is packed with
the tokenization contract (`splitlm.data.pack_public`: the text's ids, an eos, cut into the
manifest's `public.seq_len` pieces; the server packs with the same function), and row i is token i of that packed stream: sequence s holds rows
[offsets[s], offsets[s + 1]). A top-k answer for a batch of sequences lists its mask==1
positions in (sequence, position) order, which is the same order.

A public file is accepted only with the sha256 the manifest names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from splitlm.data import Batch, Sequence, collate, load_tokenizer, pack_public
from splitlm.errors import DataError
from splitlm.manifest import Bundle, sha256_file


PUBLIC_FILE = "public.txt"


def default_public() -> Path:
    """The public set shipped with splitlm (splitlm/data/public.txt): export's and the server's default."""
    return Path(__file__).resolve().parent / "data" / PUBLIC_FILE


@dataclass(frozen=True)
class PublicSet:
    sequences: list[Sequence]
    offsets: np.ndarray  # (S + 1,) int64: the first row of each sequence, then the row count
    sha256: str

    @staticmethod
    def from_text(text: str, *, tokenizer_file: str | Path, seq_len: int, eos_id: int, sha256: str) -> "PublicSet":
        sequences = pack_public(text, load_tokenizer(tokenizer_file), seq_len=seq_len, eos_id=eos_id)
        return PublicSet(sequences, np.cumsum([0, *(len(s.ids) for s in sequences)]), sha256)

    @staticmethod
    def from_bundle(bundle: Bundle, path: str | Path | None = None) -> "PublicSet":
        """The bundle's public set, or `path` if given; DataError unless its sha256 is the manifest's."""
        m = bundle.manifest
        if not m.public:
            raise DataError(f"bundle {bundle.path} has no public set: it is a {m.mode} bundle, not distill")
        path = Path(path) if path else bundle.file(m.public["name"])
        digest = sha256_file(path) if path.is_file() else "no such file"
        if digest != m.public["sha256"]:
            raise DataError(f"public set {path}: expected sha256 {m.public['sha256']} (the bundle's), got {digest}")
        return PublicSet.from_text(path.read_text(encoding="utf-8"), tokenizer_file=bundle.file("tokenizer.json"),
                                   seq_len=m.public["seq_len"], eos_id=m.eos_token_id, sha256=digest)

    @property
    def n_rows(self) -> int:
        return int(self.offsets[-1])

    def batch(self, seqs, *, pad_token_id: int) -> Batch:
        """Sequences `seqs` (indices), right-padded: their rows are their mask==1 positions."""
        return collate([self.sequences[i] for i in seqs], pad_token_id=pad_token_id)

    def in_order(self, batch_size: int, *, pad_token_id: int):
        """(first row, Batch) over every sequence in order."""
        for i in range(0, len(self.sequences), batch_size):
            seqs = range(i, min(i + batch_size, len(self.sequences)))
            yield int(self.offsets[i]), self.batch(seqs, pad_token_id=pad_token_id)

    def rows(self, seqs, table: np.ndarray, *, fill=0) -> np.ndarray:
        """Rows of sequences `seqs` from a (N, ...) table, right-padded to (B, T, ...) with `fill`."""
        lengths = [len(self.sequences[i].ids) for i in seqs]
        out = np.full((len(lengths), max(lengths), *table.shape[1:]), fill, table.dtype)
        for row, (i, n) in enumerate(zip(seqs, lengths)):
            out[row, :n] = table[self.offsets[i]:self.offsets[i] + n]
        return out
