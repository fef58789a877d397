"""Secure aggregation by pairwise masks (Bonawitz et al., 2017, without the secret sharing). No Ray.

Every pair of clients in a round agrees on a seed by X25519 key agreement (each sends
only its public key through the server) and expands it into a mask. The lower client id
adds the mask, the higher subtracts it, so the masks cancel in the sum and the server
learns ``Σ_k x_k`` but no single ``x_k``:

* :func:`encode` turns a float vector into fixed point in the ring of integers mod 2^64
  (numpy's uint64 wraps), so masking and cancelling are exact, not approximate;
* :func:`mask` adds the pairwise masks (run by the client);
* :func:`decode` turns the unmasked sum back into floats (two's complement).

**Dropouts** (the documented recovery step). A client that was sent its peers' keys but
never delivered its masked vector leaves its peers' masks for it uncancelled. Each
surviving client then reveals the seed it shares with each dropped client
(:func:`pair_seed`), and the server removes those masks (:func:`remove_dropped`). Only
seeds with clients whose vectors the server never received are revealed, so no
delivered vector is unmasked. (SecAgg proper secret-shares each client's key so the
server needs no survivor's help; with no threshold scheme here, a survivor that also
drops makes the round fail, and the round is redone without it.)

In the simulation each client derives its round key from its own secret and the round
(:func:`round_key`); on a deployment each hospital keeps that secret.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

SCALE_BITS = 24
"""Fixed-point fraction bits: 2^-24 ≈ 6e-8 resolution; |sums| up to 2^39 fit in int64."""


def round_key(secret: bytes, round_: int) -> X25519PrivateKey:
    """A client's X25519 key for one round, derived from its secret (fresh keys every round)."""
    return X25519PrivateKey.from_private_bytes(hashlib.sha256(secret + round_.to_bytes(8, "big")).digest())


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def pair_seed(key: X25519PrivateKey, peer_public: bytes, context: bytes) -> int:
    """The 128-bit seed two clients share: HKDF-SHA256 of their X25519 secret, bound to the round's context."""
    shared = key.exchange(X25519PublicKey.from_public_bytes(peer_public))
    okm = HKDF(algorithm=hashes.SHA256(), length=16, salt=None, info=b"ray_med secagg " + context).derive(shared)
    return int.from_bytes(okm, "big")


def _prg(seed: int, n: int) -> np.ndarray:
    return np.random.Generator(np.random.PCG64(seed)).integers(0, 2**64, size=n, dtype=np.uint64, endpoint=False)


def encode(x: np.ndarray) -> np.ndarray:
    """Floats to fixed point mod 2^64."""
    return np.round(np.asarray(x, np.float64) * (1 << SCALE_BITS)).astype(np.int64).view(np.uint64)


def decode(q: np.ndarray) -> np.ndarray:
    """Fixed point mod 2^64 (a sum of encodings) back to floats."""
    return q.view(np.int64).astype(np.float64) / (1 << SCALE_BITS)


def mask(q: np.ndarray, me: str, seeds: Mapping[str, int]) -> np.ndarray:
    """``q`` plus the mask of every peer: added when ``me`` sorts before the peer, subtracted after."""
    out = q.copy()
    with np.errstate(over="ignore"):
        for peer in sorted(seeds):
            m = _prg(seeds[peer], len(q))
            out = out + m if me < peer else out - m
    return out


def masked_sum(vectors: Sequence[np.ndarray]) -> np.ndarray:
    total = np.zeros_like(vectors[0])
    with np.errstate(over="ignore"):
        for v in vectors:
            total = total + v
    return total


def remove_dropped(total: np.ndarray, revealed: Sequence[tuple[str, str, int]]) -> np.ndarray:
    """The sum with the masks survivors added for dropped peers taken out; ``revealed`` is (survivor, dropped, seed)."""
    out = total.copy()
    with np.errstate(over="ignore"):
        for survivor, dropped, seed in revealed:
            m = _prg(seed, len(total))
            out = out - m if survivor < dropped else out + m
    return out
