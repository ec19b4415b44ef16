"""The chunked tail (edge_client/tail.py) equals one tail.onnx run over the whole batch."""

from __future__ import annotations

import numpy as np
import pytest

from splitlm.edge_client.runtime import HeadRuntime
from splitlm.edge_client.tail import IGNORE_INDEX, MIN_WINDOW, windows

B, T = 3, 40


@pytest.fixture(scope="module")
def runtimes(tiny_bundle):
    bundle = tiny_bundle("device")
    return HeadRuntime(bundle, threads=1, tail_chunk=None), bundle


def batch(vocab: int, hidden_size: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, vocab, (B, T)).astype(np.int64)
    mask = np.ones((B, T), np.int64)
    mask[1, T - 9:] = 0                 # a right-padded row
    labels[2, :17] = IGNORE_INDEX       # a prompt whose tokens do not count
    hidden = rng.standard_normal((B, T, hidden_size)).astype(np.float32)
    return hidden, labels, mask


@pytest.mark.parametrize("chunk", [3, 4, 7, 16, 39, 40, 80, 1000])
def test_chunked_loss_and_gradient_equal_the_whole_batch(runtimes, chunk):
    whole, bundle = runtimes
    hidden, labels, mask = batch(bundle.manifest.model.vocab_size, bundle.manifest.model.hidden_size)
    want_loss, want_grad = whole.tail(hidden, labels, mask)
    chunked = HeadRuntime(bundle, threads=1, tail_chunk=chunk)
    loss, grad = chunked.tail(hidden, labels, mask)
    assert np.abs(want_grad).max() > 1e-4 and want_loss > 1
    assert abs(loss - want_loss) <= 1e-5 * max(1.0, abs(want_loss))
    np.testing.assert_allclose(grad, want_grad, rtol=0, atol=1e-5 * np.abs(want_grad).max())


def test_a_batch_with_no_counted_label_has_zero_loss_and_gradient(runtimes):
    whole, bundle = runtimes
    hidden, labels, mask = batch(bundle.manifest.model.vocab_size, bundle.manifest.model.hidden_size)
    labels[:] = IGNORE_INDEX
    loss, grad = HeadRuntime(bundle, threads=1, tail_chunk=8).tail(hidden, labels, mask)
    want_loss, want_grad = whole.tail(hidden, labels, mask)
    assert loss == want_loss == 0.0 and not grad.any() and not want_grad.any()


@pytest.mark.parametrize("batch_size,seq,chunk", [(1, 512, 64), (2, 10, 64), (5, 10, 25), (1, 66, 64),
                                                  (1, 65, 64), (2, 7, 3), (1, 3, 3)])
def test_windows_cover_every_predicted_label_once_and_fit_the_graph(batch_size, seq, chunk):
    seen = np.zeros((batch_size, seq), int)
    for w in windows(batch_size, seq, chunk):
        length = w.hidden.stop - w.hidden.start
        rows = range(batch_size)[w.rows]
        assert MIN_WINDOW <= length and len(rows) * length <= chunk + 2
        seen[w.rows, w.first:w.last] += 1
    assert (seen[:, 0] == 0).all() and (seen[:, 1:] == 1).all()


def test_a_chunk_under_the_graphs_minimum_is_refused():
    with pytest.raises(ValueError, match="at least 3 tokens, got 2"):
        windows(1, 10, 2)
