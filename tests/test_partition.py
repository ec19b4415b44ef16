"""Partitions: every example on exactly one client; alpha moves them from concentrated to IID."""

from __future__ import annotations

import numpy as np
import pytest

from splitlm.errors import SplitLMError
from splitlm.partition import dirichlet, iid, labels_for, length_buckets, parse_scheme, partition

LABELS = [i % 5 for i in range(2000)]  # five label values, 400 examples each


def assigned_once(parts, n):
    flat = sorted(i for p in parts for i in p)
    return flat == list(range(n))


def label_shares(parts, labels):
    """(clients, values): the share of each label value that each client holds."""
    values = sorted(set(labels))
    counts = np.array([[sum(labels[i] == v for i in p) for v in values] for p in parts], float)
    return counts / counts.sum(0, keepdims=True)


def test_iid_assigns_every_example_once_in_near_equal_parts():
    parts = iid(103, clients=4, seed=0)
    assert assigned_once(parts, 103)
    assert sorted(len(p) for p in parts) == [25, 26, 26, 26]
    assert parts == iid(103, clients=4, seed=0) and parts != iid(103, clients=4, seed=1)


@pytest.mark.parametrize("alpha", [0.05, 1.0, 1e4])
def test_dirichlet_assigns_every_example_exactly_once(alpha):
    parts = dirichlet(LABELS, clients=4, alpha=alpha, seed=3)
    assert assigned_once(parts, len(LABELS))
    assert min(len(p) for p in parts) >= 1
    assert parts == dirichlet(LABELS, clients=4, alpha=alpha, seed=3)  # seeded: reproducible


def test_large_alpha_approaches_iid_proportions():
    shares = label_shares(dirichlet(LABELS, clients=4, alpha=1e4, seed=0), LABELS)
    assert np.abs(shares - 0.25).max() < 0.03, shares


def test_small_alpha_concentrates_each_label_on_few_clients():
    shares = label_shares(dirichlet(LABELS, clients=4, alpha=0.05, seed=0), LABELS)
    # each label value: its largest holder has most of it (IID would give 0.25)
    assert shares.max(0).mean() > 0.8, shares
    iid_shares = label_shares(iid(len(LABELS), clients=4, seed=0), LABELS)
    assert iid_shares.max(0).mean() < 0.3


def test_length_buckets_when_the_field_is_missing():
    records = [{"prompt": "x" * n, "completion": "y"} for n in range(40)]
    labels, what = labels_for(records, "label")
    assert "length" in what and labels == length_buckets([n + 1 for n in range(40)])
    assert sorted(set(labels)) == [0, 1, 2, 3] and all(labels.count(b) == 10 for b in range(4))
    labels, what = labels_for([{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"}], "label")
    assert labels == ["pos", "neg"] and what == "field 'label'"


def test_partition_record_says_how_it_was_made():
    records = [{"text": "t" * (i % 7 + 1)} for i in range(50)]
    made = partition(records, scheme="dirichlet:0.3", clients=3, seed=1)
    assert made["scheme"] == "dirichlet" and made["alpha"] == 0.3 and made["n"] == 50 and made["seed"] == 1
    assert assigned_once(made["clients"], 50)


@pytest.mark.parametrize("bad", ["dirichlet", "dirichlet:0", "dirichlet:-1", "dirichlet:x", "zipf:1"])
def test_bad_schemes_are_refused_with_what_is_expected(bad):
    with pytest.raises(SplitLMError, match="iid or dirichlet:ALPHA"):
        parse_scheme(bad)


def test_too_few_examples_for_the_clients_is_an_error():
    with pytest.raises(SplitLMError, match="3 examples"):
        iid(3, clients=4, seed=0)
