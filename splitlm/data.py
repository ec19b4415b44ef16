"""The tokenization contract both sides share: how a data file becomes (B, T) token batches.

The device trains on these batches (`edge_client.data.Dataset` serves them by step) and the server
evaluates and distills on the same ones, so this module is torch-free and lives beside the
manifest.

    mine.txt | mine.jsonl  --read_examples-->  [TextExample | PromptExample]
      --tokenize-->  [Sequence(ids, labels)]  --collate-->  Batch (B, T) int64

Formats: `.txt` is one text; `.jsonl` has one `{"text": str}` or `{"prompt": str, "completion": str}`
per line (blank lines skipped, other keys ignored). Text examples are packed: all token ids, an
eos after each example, cut into `seq_len` pieces. A prompt/completion pair is one sequence,
`prompt + completion + eos` truncated to `seq_len`, learning only the completion.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from splitlm.errors import DataError

IGNORE_INDEX = -100  # label of a position that does not count in the loss
MIN_TOKENS = 3       # the tail graph's shortest sequence; shorter ones carry no next-token pair
SUFFIXES = (".txt", ".jsonl")
EXPECTED_LINE = 'expected {"text": str} or {"prompt": str, "completion": str}'


@dataclass(frozen=True)
class TextExample:
    text: str


@dataclass(frozen=True)
class PromptExample:
    prompt: str
    completion: str


Example = TextExample | PromptExample


@dataclass(frozen=True)
class Sequence:
    """One training sequence before padding; labels aligned with ids (HF convention)."""

    ids: np.ndarray     # (L,) int64
    labels: np.ndarray  # (L,) int64, IGNORE_INDEX where nothing is learned


@dataclass(frozen=True)
class Batch:
    """Right-padded: pads have the pad id, mask 0 and label IGNORE_INDEX."""

    input_ids: np.ndarray       # (B, T) int64
    attention_mask: np.ndarray  # (B, T) int64
    labels: np.ndarray          # (B, T) int64

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())


# --- reading -----------------------------------------------------------------------------------

def read_examples(path: str | Path) -> list[Example]:
    """The examples of a .txt or .jsonl file; DataError (naming file and line) otherwise."""
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise DataError(f"{path}: unknown data format {path.suffix!r}: expected one of {', '.join(SUFFIXES)}")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read it as UTF-8 text ({e})") from e
    if path.suffix == ".txt":
        examples = [TextExample(text)] if text.strip() else []
    else:
        examples = [parse_line(line, where=f"{path} line {n}")
                    for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not examples:
        raise DataError(f"{path}: no examples in the file")
    return examples


def parse_line(line: str, *, where: str) -> Example:
    """One JSONL line as an example; `where` ("FILE line N") starts every error message."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: {EXPECTED_LINE}, got a JSON {type(obj).__name__}")
    keys = ("text",) if "text" in obj else ("prompt", "completion")
    if not all(k in obj for k in keys):
        raise DataError(f"{where}: {EXPECTED_LINE}, got keys {sorted(obj)}")
    for k in keys:
        if not isinstance(obj[k], str):
            raise DataError(f"{where}: {k!r} must be a string, got {type(obj[k]).__name__}")
    return TextExample(obj["text"]) if keys == ("text",) else PromptExample(obj["prompt"], obj["completion"])


# --- tokenizing --------------------------------------------------------------------------------

def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer of tokenizer.json, with no truncation and no padding of its own."""
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def tokenize(examples: list[Example], tokenizer: Tokenizer, *, seq_len: int, eos_id: int) -> list[Sequence]:
    """Packed text sequences first, then one sequence per prompt/completion pair."""
    texts = [e.text for e in examples if isinstance(e, TextExample)]
    pairs = [e for e in examples if isinstance(e, PromptExample)]
    sequences = pack(encode(tokenizer, texts), seq_len=seq_len, eos_id=eos_id)
    prompts = encode(tokenizer, [p.prompt for p in pairs])
    completions = encode(tokenizer, [p.completion for p in pairs])
    sequences += [prompt_sequence(p, c, seq_len=seq_len, eos_id=eos_id) for p, c in zip(prompts, completions)]
    return [s for s in sequences if keeps_something(s)]


def encode(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without the special tokens a tokenizer may add (we add eos)."""
    return [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]


def pack(token_lists: list[list[int]], *, seq_len: int, eos_id: int) -> list[Sequence]:
    """Concatenate with an eos after each text and cut into `seq_len` pieces (labels = ids)."""
    stream = np.fromiter((t for ids in token_lists for t in (*ids, eos_id)), dtype=np.int64)
    pieces = [stream[i:i + seq_len] for i in range(0, len(stream), seq_len)]
    return [Sequence(p, p.copy()) for p in pieces]


def prompt_sequence(prompt: list[int], completion: list[int], *, seq_len: int, eos_id: int) -> Sequence:
    """prompt + completion + eos, truncated to `seq_len`; only the completion and eos are learned."""
    ids = np.array([*prompt, *completion, eos_id], dtype=np.int64)[:seq_len]
    labels = ids.copy()
    labels[:len(prompt)] = IGNORE_INDEX
    return Sequence(ids, labels)


def keeps_something(s: Sequence) -> bool:
    """At least MIN_TOKENS tokens and one learned next-token target (labels[0] is never one)."""
    return len(s.ids) >= MIN_TOKENS and bool((s.labels[1:] != IGNORE_INDEX).any())


def collate(sequences: list[Sequence], *, pad_token_id: int) -> Batch:
    """Right-pad to the longest sequence: (B, T) ids, mask and labels."""
    T = max(len(s.ids) for s in sequences)
    ids = np.full((len(sequences), T), pad_token_id, dtype=np.int64)
    mask = np.zeros((len(sequences), T), dtype=np.int64)
    labels = np.full((len(sequences), T), IGNORE_INDEX, dtype=np.int64)
    for row, s in enumerate(sequences):
        ids[row, :len(s.ids)] = s.ids
        mask[row, :len(s.ids)] = 1
        labels[row, :len(s.ids)] = s.labels
    return Batch(ids, mask, labels)



def pack_public(text: str, tokenizer: Tokenizer, *, seq_len: int, eos_id: int) -> list[Sequence]:
    """The distill public set: the whole text as one example packed into `seq_len` pieces (an eos
    after it), as training text is. Row i of a top-k exchange is token i of this packed stream, on
    the device and on the server alike."""
    return pack(encode(tokenizer, [text]), seq_len=seq_len, eos_id=eos_id)
