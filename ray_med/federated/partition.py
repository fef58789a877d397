"""How a data set is split among hospitals: the 7:1:1:1 FedKIM split and the client partitions. Pure, seeded, no Ray.

Every function takes labels (an int array) and a seed and returns index arrays, so the
driver plans a federation from labels alone and each client loads only its own rows.

* :func:`fedkim_split`: private / public / dev / test in 7:1:1:1 (FedKIM, Sec. 4.1),
  stratified by label. Clients share the private split; the public split is what the
  injection server may train on; dev selects; test reports.
* :func:`partition`: the private split among clients:

  - ``iid``: a seeded shuffle cut into near-equal parts;
  - ``dirichlet``: label skew (Hsu et al., 2019): for each class, client shares drawn
    from Dirichlet(alpha); a small alpha gives each client a few classes;
  - ``quantity``: quantity skew: client sizes drawn from Dirichlet(alpha), labels IID.

A client left with no rows is an error naming it (no silent resampling: the same config
always gives the same clients).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ray_med.errors import ConfigError

SPLITS = ("private", "public", "dev", "test")
FEDKIM_RATIOS = (7, 1, 1, 1)
SCHEMES = ("iid", "dirichlet", "quantity")


def fedkim_split(labels: np.ndarray, seed: int, ratios: Sequence[float] = FEDKIM_RATIOS) -> dict[str, np.ndarray]:
    """Indices of the private, public, dev and test splits, stratified by label (sorted within each split)."""
    labels = np.asarray(labels)
    if len(ratios) != len(SPLITS) or min(ratios) < 0 or sum(ratios) <= 0:
        raise ConfigError(f"split ratios must be 4 non-negative numbers (private, public, dev, test), got {list(ratios)}")
    rng = np.random.default_rng(seed)
    shares = np.asarray(ratios, dtype=float) / float(sum(ratios))
    out: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        # Cumulative rounding: every split gets its share of every class, and the parts add up to the class.
        cuts = np.round(np.cumsum(shares) * len(idx)).astype(int)
        for name, lo, hi in zip(SPLITS, np.r_[0, cuts[:-1]], cuts, strict=True):
            out[name].append(idx[lo:hi])
    return {s: np.sort(np.concatenate(parts)) for s, parts in out.items()}


def partition(labels: np.ndarray, clients: Sequence[str], scheme: str, *, seed: int,
              alpha: float = 0.5) -> dict[str, np.ndarray]:
    """Positions (into ``labels``) of each client's rows; every row goes to exactly one client."""
    labels = np.asarray(labels)
    n_clients = len(clients)
    if n_clients == 0:
        raise ConfigError("a partition needs at least one client")
    if scheme not in SCHEMES:
        raise ConfigError(f"unknown partition {scheme!r}; choose one of {', '.join(SCHEMES)}")
    if scheme != "iid" and alpha <= 0:
        raise ConfigError(f"partition alpha must be > 0, got {alpha}")
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(n_clients)]
    if scheme == "iid":
        for k, chunk in enumerate(np.array_split(rng.permutation(len(labels)), n_clients)):
            parts[k].append(chunk)
    elif scheme == "dirichlet":
        for cls in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == cls))
            shares = rng.dirichlet(np.full(n_clients, alpha))
            cuts = np.round(np.cumsum(shares) * len(idx)).astype(int)[:-1]
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].append(chunk)
    else:  # quantity
        shares = rng.dirichlet(np.full(n_clients, alpha))
        cuts = np.round(np.cumsum(shares) * len(labels)).astype(int)[:-1]
        for k, chunk in enumerate(np.split(rng.permutation(len(labels)), cuts)):
            parts[k].append(chunk)
    out = {name: np.sort(np.concatenate(p)).astype(np.int64) for name, p in zip(clients, parts, strict=True)}
    empty = [name for name, idx in out.items() if len(idx) == 0]
    if empty:
        raise ConfigError(f"partition {scheme} (alpha {alpha}, seed {seed}) leaves client {empty[0]} with no data"
                          + (f" (and {len(empty) - 1} more)" if len(empty) > 1 else "")
                          + f": {len(labels)} rows among {n_clients} clients; use fewer clients, a larger alpha "
                          "or the iid partition")
    return out


def label_counts(labels: np.ndarray, parts: dict[str, np.ndarray]) -> dict[str, dict[str, int]]:
    """Per client, its rows per label (for the run's report)."""
    labels = np.asarray(labels)
    return {name: {str(c): int(n) for c, n in zip(*np.unique(labels[idx], return_counts=True), strict=True)}
            for name, idx in parts.items()}
