"""Which examples each client holds: IID, or non-IID by a Dirichlet draw over a label.

Pure functions of (labels or n, clients, seed): the same arguments give the same partition on
any machine, and `splitlm compare` writes the result out (indices per client) beside the run.

    iid(n, clients=C, seed=s)                      -> C lists of indices, sizes within one
    dirichlet(labels, clients=C, alpha=a, seed=s)  -> per label value, shares q ~ Dir(a, ..., a)
                                                      over the clients; its examples split by q
    length_buckets(lengths, buckets=b)             -> a label per example: its length quantile
    labels_for(records, field)                     -> the field's values, or length buckets when
                                                      some record lacks the field

Small alpha gives each client a few label values (alpha -> 0: one client per value); large
alpha gives every client every value in proportion (alpha -> infinity: IID proportions). Every
example goes to exactly one client. A draw that leaves a client under `min_size` examples is
redrawn (seeded, up to 100 times), as in the FedML/NIID-Bench recipe; a client with no data
could not train at all.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np

from splitlm.errors import SplitLMError


def parse_scheme(text: str) -> tuple[str, float | None]:
    """'iid' -> ('iid', None); 'dirichlet:0.5' -> ('dirichlet', 0.5); anything else is an error."""
    if text == "iid":
        return "iid", None
    name, _, alpha = text.partition(":")
    try:
        value = float(alpha)
    except ValueError:
        value = float("nan")
    if name != "dirichlet" or not value > 0:
        raise SplitLMError(f"--partition: expected iid or dirichlet:ALPHA with ALPHA > 0, got {text!r}")
    return "dirichlet", value


def iid(n: int, *, clients: int, seed: int) -> list[list[int]]:
    """A seeded shuffle of 0..n-1 cut into `clients` runs whose sizes differ by at most one."""
    if n < clients:
        raise SplitLMError(f"partition: {n} examples cannot give {clients} clients one each")
    order = np.random.default_rng(seed).permutation(n)
    return [sorted(part.tolist()) for part in np.array_split(order, clients)]


def dirichlet(labels: Sequence[Hashable], *, clients: int, alpha: float, seed: int,
              min_size: int = 1) -> list[list[int]]:
    """Each label value's examples spread over the clients in Dirichlet(alpha) shares."""
    if len(labels) < clients * min_size:
        raise SplitLMError(f"partition: {len(labels)} examples cannot give {clients} clients {min_size} each")
    rng = np.random.default_rng(seed)
    values = sorted(set(labels), key=repr)
    by_value = [np.flatnonzero(np.array([lab == v for lab in labels])) for v in values]
    for _ in range(100):
        parts: list[list[int]] = [[] for _ in range(clients)]
        for idx in by_value:
            idx = rng.permutation(idx)
            shares = rng.dirichlet(np.full(clients, alpha))
            cuts = np.round(np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for client, piece in enumerate(np.split(idx, cuts)):
                parts[client] += piece.tolist()
        if min(len(p) for p in parts) >= min_size:
            return [sorted(p) for p in parts]
    raise SplitLMError(f"partition: 100 Dirichlet draws at alpha={alpha} all left a client with under {min_size} "
                       "examples; use a larger alpha or fewer clients")


def length_buckets(lengths: Sequence[int], *, buckets: int = 4) -> list[int]:
    """Each example's length quantile bucket, 0..buckets-1 (ties stay in one bucket)."""
    edges = np.quantile(np.asarray(lengths, float), np.linspace(0, 1, buckets + 1)[1:-1])
    return np.searchsorted(edges, lengths, side="right").tolist()


def labels_for(records: Sequence[dict], field: str, *, buckets: int = 4) -> tuple[list, str]:
    """The label of every record and what it is: `field`'s value where every record has one,
    else the length bucket of its text (prompt + completion, or text)."""
    if records and all(field in r for r in records):
        return [_hashable(r[field]) for r in records], f"field {field!r}"
    lengths = [len(r.get("text", "")) + len(r.get("prompt", "")) + len(r.get("completion", "")) for r in records]
    return length_buckets(lengths, buckets=buckets), f"length bucket (of {buckets}; no {field!r} in every record)"


def _hashable(value):
    return value if isinstance(value, Hashable) else repr(value)


def partition(records: Sequence[dict], *, scheme: str, clients: int, seed: int, field: str = "label") -> dict:
    """The partition of `records` as it is written out: scheme, alpha, what the label was, seed, and
    the indices (into `records`) of each client."""
    name, alpha = parse_scheme(scheme)
    if name == "iid":
        parts, label = iid(len(records), clients=clients, seed=seed), None
    else:
        labels, label = labels_for(records, field)
        parts = dirichlet(labels, clients=clients, alpha=alpha, seed=seed)
    return {"scheme": name, "alpha": alpha, "label": label, "seed": seed, "n": len(records), "clients": parts}
