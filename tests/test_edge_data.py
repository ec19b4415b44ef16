"""edge_client.data: reading data files, tokenizing, and the deterministic batch of each step."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from splitlm.edge_client.data import (IGNORE_INDEX, Dataset, PromptExample, Sequence, TextExample, collate,
                                      load_tokenizer, read_examples, tokenize)
from splitlm.errors import DataError
from splitlm.manifest import Bundle

EOS = 0  # "<|endoftext|>" in the tiny tokenizer of conftest.py


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    return load_tokenizer(tiny_llama / "tokenizer.json")


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False).ids


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


# --- reading -----------------------------------------------------------------------------------

def test_a_missing_file_is_a_data_error_naming_it(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: no such file"):
        read_examples(tmp_path / "nope.jsonl")


def test_an_unknown_suffix_is_a_data_error_naming_the_file(tmp_path):
    (tmp_path / "mine.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"mine\.csv: unknown data format '\.csv'"):
        read_examples(tmp_path / "mine.csv")


def test_bad_json_names_the_file_and_its_line_counting_blank_lines(tmp_path):
    path = write_jsonl(tmp_path / "mine.jsonl", [{"text": "fine"}, "", '{"text": "unterminated'])
    with pytest.raises(DataError, match=r"mine\.jsonl line 3: not valid JSON"):
        read_examples(path)


def test_a_line_of_neither_shape_names_file_line_and_its_keys(tmp_path):
    path = write_jsonl(tmp_path / "mine.jsonl", [{"text": "ok"}, {"prompt": "p"}, {"foo": 1}])
    with pytest.raises(DataError, match=r"mine\.jsonl line 2: expected .*got keys \['prompt'\]"):
        read_examples(path)


def test_a_non_string_value_names_file_line_and_type(tmp_path):
    path = write_jsonl(tmp_path / "mine.jsonl", [{"prompt": "p", "completion": 7}])
    with pytest.raises(DataError, match=r"mine\.jsonl line 1: 'completion' must be a string, got int"):
        read_examples(path)


def test_a_line_that_is_not_an_object_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "mine.jsonl", [["text", "x"]])
    with pytest.raises(DataError, match=r"line 1: expected .*got a JSON list"):
        read_examples(path)


def test_a_file_without_examples_is_a_data_error(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n  \n")
    (tmp_path / "empty.txt").write_text("   ")
    for name in ("empty.jsonl", "empty.txt"):
        with pytest.raises(DataError, match=f"{name}: no examples"):
            read_examples(tmp_path / name)


def test_a_txt_file_is_one_text(tmp_path):
    (tmp_path / "book.txt").write_text("line one\n\nline two\n")
    assert read_examples(tmp_path / "book.txt") == [TextExample("line one\n\nline two\n")]


def test_jsonl_reads_both_shapes_skips_blank_lines_and_ignores_extra_keys(tmp_path):
    path = write_jsonl(tmp_path / "mine.jsonl", [{"text": "a", "id": 1}, "", {"prompt": "q", "completion": "r"}])
    assert read_examples(path) == [TextExample("a"), PromptExample("q", "r")]


# --- tokenizing --------------------------------------------------------------------------------

def test_text_is_packed_with_eos_after_each_example_and_cut_into_seq_len(tokenizer):
    texts = ["The quick brown fox jumps over the lazy dog.", "Numbers such as 12 appear.", "A lighthouse."]
    stream = [t for text in texts for t in (*ids_of(tokenizer, text), EOS)]
    n = next(n for n in range(8, 20) if len(stream) % n >= 3)  # a short last piece worth keeping
    seqs = tokenize([TextExample(t) for t in texts], tokenizer, seq_len=n, eos_id=EOS)
    assert [s.ids.tolist() for s in seqs] == [stream[i:i + n] for i in range(0, len(stream), n)]
    assert all(np.array_equal(s.labels, s.ids) for s in seqs)
    assert len(seqs[-1].ids) == len(stream) % n  # the short last piece is kept (padded at batching)


def test_prompt_positions_get_ignored_labels_and_the_completion_ends_with_eos(tokenizer):
    prompt, completion = ids_of(tokenizer, "Split learning keeps"), ids_of(tokenizer, " private text")
    (seq,) = tokenize([PromptExample("Split learning keeps", " private text")], tokenizer, seq_len=64, eos_id=EOS)
    assert seq.ids.tolist() == prompt + completion + [EOS]
    assert seq.labels.tolist() == [IGNORE_INDEX] * len(prompt) + completion + [EOS]


def test_a_long_pair_is_truncated_to_seq_len(tokenizer):
    prompt = ids_of(tokenizer, "Gradients")
    n = len(prompt) + 3
    (seq,) = tokenize([PromptExample("Gradients", " come back from the server and update the adapters")],
                      tokenizer, seq_len=n, eos_id=EOS)
    assert len(seq.ids) == n and seq.ids[-1] != EOS
    assert (seq.labels[:len(prompt)] == IGNORE_INDEX).all() and (seq.labels[len(prompt):] != IGNORE_INDEX).all()


def test_sequences_under_three_tokens_or_with_nothing_to_learn_are_dropped(tokenizer):
    examples = [PromptExample("", "a"),  # 2 tokens: "a" + eos
                PromptExample("The quick brown fox jumps over the lazy dog", " x"),  # prompt fills seq_len
                PromptExample("The", " quick brown")]
    seqs = tokenize(examples, tokenizer, seq_len=8, eos_id=EOS)
    assert len(seqs) == 1 and seqs[0].ids[0] == ids_of(tokenizer, "The")[0]


# --- batching ----------------------------------------------------------------------------------

def make_sequences(n: int) -> list[Sequence]:
    rng = np.random.default_rng(1)
    out = []
    for i in range(n):
        ids = rng.integers(1, 300, 3 + i % 5).astype(np.int64)
        labels = ids.copy()
        labels[:i % 2] = IGNORE_INDEX
        out.append(Sequence(ids, labels))
    return out


def test_pads_have_the_pad_id_mask_zero_and_ignored_labels():
    seqs = make_sequences(3)
    batch = collate(seqs, pad_token_id=7)
    T = max(len(s.ids) for s in seqs)
    assert batch.input_ids.shape == batch.attention_mask.shape == batch.labels.shape == (3, T)
    assert batch.input_ids.dtype == batch.attention_mask.dtype == batch.labels.dtype == np.int64
    for row, s in enumerate(seqs):
        n = len(s.ids)
        assert batch.input_ids[row, :n].tolist() == s.ids.tolist() and (batch.input_ids[row, n:] == 7).all()
        assert (batch.attention_mask[row, :n] == 1).all() and (batch.attention_mask[row, n:] == 0).all()
        assert batch.labels[row, :n].tolist() == s.labels.tolist()
        assert (batch.labels[row, n:] == IGNORE_INDEX).all()


def test_the_batch_of_a_step_is_a_pure_function_of_seed_and_step():
    a = Dataset(make_sequences(10), batch_size=3, pad_token_id=0, seed=5)
    b = Dataset(make_sequences(10), batch_size=3, pad_token_id=0, seed=5)
    for step in (7, 0, 3, 7, 11):  # any order, any repeat: a resumed run sees the same data
        x, y = a.batch(step), b.batch(step)
        assert all(np.array_equal(getattr(x, f), getattr(y, f)) for f in ("input_ids", "attention_mask", "labels"))
    other = Dataset(make_sequences(10), batch_size=3, pad_token_id=0, seed=6)
    assert not all(np.array_equal(a.indices(s), other.indices(s)) for s in range(4))


def test_each_epoch_covers_every_sequence_exactly_once_in_a_new_order():
    data = Dataset(make_sequences(10), batch_size=3, pad_token_id=0, seed=0)
    assert data.n_samples == 10 and data.steps_per_epoch == 4
    epochs = [np.concatenate([data.indices(e * 4 + i) for i in range(4)]) for e in range(3)]
    for order in epochs:
        assert sorted(order.tolist()) == list(range(10))
    assert not np.array_equal(epochs[0], epochs[1])
    assert [len(data.indices(i)) for i in range(4)] == [3, 3, 3, 1]  # the last batch is the remainder


def test_the_epoch_order_is_the_documented_permutation():
    data = Dataset(make_sequences(10), batch_size=4, pad_token_id=0, seed=3)
    order = np.random.default_rng((3, 2)).permutation(10)
    assert data.indices(2 * 3 + 1).tolist() == order[4:8].tolist()


def test_a_batch_is_as_long_as_its_longest_sequence():
    data = Dataset(make_sequences(10), batch_size=4, pad_token_id=0, seed=0)
    for step in range(6):
        batch = data.batch(step)
        assert batch.input_ids.shape[1] == max(len(data.sequences[j].ids) for j in data.indices(step))


def test_dataset_from_file_uses_the_bundles_tokenizer_and_ids(tiny_llama, tmp_path):
    @dataclass(frozen=True)
    class Manifest:  # the three fields data reads from a bundle's manifest
        max_length: int = 16
        pad_token_id: int = 5
        eos_token_id: int = EOS

    shutil.copy(tiny_llama / "tokenizer.json", tmp_path / "tokenizer.json")
    bundle = Bundle(tmp_path, Manifest())
    path = write_jsonl(tmp_path / "mine.jsonl", [{"text": "The quick brown fox jumps over the lazy dog."}] * 4)
    data = Dataset.from_file(path, bundle, batch_size=2)
    assert data.n_samples >= 4 and max(len(s.ids) for s in data.sequences) == 16  # seq_len: the bundle's
    assert (data.batch(0).input_ids[data.batch(0).attention_mask == 0] == 5).all()
    with pytest.raises(DataError, match="seq_len must be in 3..16"):
        Dataset.from_file(path, bundle, batch_size=2, seq_len=17)
