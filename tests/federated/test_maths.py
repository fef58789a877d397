"""The federated maths by hand: partitions, weighted FedAvg, FedProx, per-modality averaging, FedAdam, DP, masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ray_med.errors import ConfigError
from ray_med.federated import secagg
from ray_med.federated.partition import fedkim_split, label_counts, partition
from ray_med.federated.privacy import Accountant, add_noise, clip_update, dp_average, noise_std
from ray_med.federated.strategies import (
    Contribution,
    aggregate,
    make_strategy,
    proximal_term,
    sum_contributions,
    weighted_delta,
)

LABELS = np.array([0] * 70 + [1] * 30)


def test_fedkim_split_is_7_1_1_1_stratified_and_disjoint() -> None:
    s = fedkim_split(LABELS, seed=0)
    assert [len(s[k]) for k in ("private", "public", "dev", "test")] == [70, 10, 10, 10]
    assert sorted(np.concatenate(list(s.values())).tolist()) == list(range(100))
    assert [int(LABELS[s[k]].sum()) for k in ("private", "public", "dev", "test")] == [21, 3, 3, 3]
    assert all(np.array_equal(s[k], fedkim_split(LABELS, seed=0)[k]) for k in s)  # seeded


def test_partitions_cover_every_row_once_and_skew_as_asked() -> None:
    clients = [f"c{i}" for i in range(5)]
    for scheme in ("iid", "dirichlet", "quantity"):
        parts = partition(LABELS, clients, scheme, seed=3, alpha=1.0)
        assert sorted(np.concatenate(list(parts.values())).tolist()) == list(range(100)), scheme
    iid = partition(LABELS, clients, "iid", seed=3)
    assert [len(v) for v in iid.values()] == [20] * 5
    skew = label_counts(LABELS, partition(LABELS, clients, "dirichlet", seed=0, alpha=0.2))
    # Label skew: with alpha 0.2 some client's rows are (almost) all of one class.
    assert any(min(c.get("0", 0), c.get("1", 0)) <= 1 for c in skew.values())


def test_a_client_left_without_data_is_named() -> None:
    with pytest.raises(ConfigError, match=r"leaves client c\d+ with no data"):
        partition(np.array([0, 0, 1, 1]), [f"c{i}" for i in range(8)], "dirichlet", seed=0, alpha=0.05)
    with pytest.raises(ConfigError, match="unknown partition 'zipf'"):
        partition(LABELS, ["a"], "zipf", seed=0)


def test_fedavg_weights_by_sample_count() -> None:
    g = {"image/w": np.array([0.0, 0.0], np.float32)}
    a = weighted_delta({"image/w": np.array([1.0, 2.0])}, g, {"image": 30})
    b = weighted_delta({"image/w": np.array([4.0, 8.0])}, g, {"image": 10})
    total, scale = sum_contributions([a, b])
    # (30·[1, 2] + 10·[4, 8]) / 40 = [1.75, 3.5]; the unweighted mean would be [2.5, 5].
    new = make_strategy("fedavg").apply(g, aggregate(total, scale))
    np.testing.assert_allclose(new["image/w"], [1.75, 3.5])


def test_each_modality_is_averaged_over_its_own_clients() -> None:
    g = {"image/w": np.zeros(1, np.float32), "tabular/w": np.zeros(1, np.float32)}
    both = weighted_delta({"image/w": np.array([2.0]), "tabular/w": np.array([6.0])}, g, {"image": 10, "tabular": 10})
    image_only = weighted_delta({"image/w": np.array([4.0])}, g, {"image": 30})
    tab_only = weighted_delta({"tabular/w": np.array([1.0])}, g, {"tabular": 40})
    new = make_strategy("fedavg").apply(g, aggregate(*sum_contributions([both, image_only, tab_only])))
    # image: (10·2 + 30·4) / 40 = 3.5 (the tabular-only client does not dilute it); tabular: (10·6 + 40·1) / 50 = 2.
    np.testing.assert_allclose(new["image/w"], [3.5])
    np.testing.assert_allclose(new["tabular/w"], [2.0])


def test_a_key_no_client_held_keeps_its_weights() -> None:
    g = {"image/w": np.ones(2, np.float32), "text/w": np.full(2, 7.0, np.float32)}
    c = weighted_delta({"image/w": np.array([3.0, 3.0])}, g, {"image": 5})
    new = make_strategy("fedavg").apply(g, aggregate(*sum_contributions([c])))
    np.testing.assert_allclose(new["text/w"], [7.0, 7.0])
    np.testing.assert_allclose(new["image/w"], [3.0, 3.0])


def test_fedprox_penalty_is_half_mu_squared_distance() -> None:
    w = [torch.tensor([1.0, 2.0], requires_grad=True), torch.tensor([[3.0]], requires_grad=True)]
    anchors = [torch.tensor([0.0, 0.0]), torch.tensor([[1.0]])]
    term = proximal_term(w, anchors, mu=0.1)
    # 0.1/2 · (1 + 4 + 4) = 0.45; its gradient is mu·(w − anchor).
    assert float(term.detach()) == pytest.approx(0.45)
    term.backward()
    np.testing.assert_allclose(w[0].grad.numpy(), [0.1, 0.2])
    with pytest.raises(ConfigError, match="fedprox needs strategy.mu > 0"):
        make_strategy("fedprox")
    with pytest.raises(ConfigError, match="unknown strategy 'fedsgd'"):
        make_strategy("fedsgd")


def test_fedadam_step_by_hand() -> None:
    s = make_strategy("fedadam", server_lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    g = {"image/w": np.array([1.0], np.float32)}
    w1 = s.apply(g, {"image/w": np.array([0.5], np.float32)})
    # m = 0.1·0.5 = 0.05; v = 0.01·0.25 = 0.0025; w = 1 + 0.1·0.05 / (0.05 + 0.001) = 1.0980392
    np.testing.assert_allclose(w1["image/w"], [1 + 0.1 * 0.05 / (0.05 + 1e-3)], rtol=1e-6)
    w2 = s.apply(w1, {"image/w": np.array([-0.5], np.float32)})
    m, v = 0.9 * 0.05 - 0.05, 0.99 * 0.0025 + 0.0025
    np.testing.assert_allclose(w2["image/w"], w1["image/w"] + 0.1 * m / (np.sqrt(v) + 1e-3), rtol=1e-6)
    assert set(s.state) == {"m", "v"}


def test_dp_clip_and_noise_scale() -> None:
    update = {"image/a": np.array([3.0, 0.0]), "image/b": np.array([4.0])}  # norm 5
    clipped, norm = clip_update(update, clip=1.0)
    assert norm == pytest.approx(5.0)
    np.testing.assert_allclose(clipped["image/a"], [0.6, 0.0])
    np.testing.assert_allclose(clipped["image/b"], [0.8])
    same, _ = clip_update({"image/a": np.array([0.3, 0.4])}, clip=1.0)
    np.testing.assert_allclose(same["image/a"], [0.3, 0.4])  # within the bound: unchanged
    # z = 1.1, C = 0.5, 20 expected clients: std on the average 1.1·0.5/20 = 0.0275.
    assert noise_std(1.1, 0.5, 20) == pytest.approx(0.0275)
    total = {"image/w": np.zeros(200_000)}
    avg = dp_average(add_noise(total, noise_multiplier=1.1, clip=0.5, rng=np.random.default_rng(0)), {"image": 20})
    assert float(np.std(avg["image/w"])) == pytest.approx(0.0275, rel=0.01)


def test_accountant_matches_the_published_value() -> None:
    # Opacus's compute_dp_sgd_privacy documentation: sampling rate 1%, noise multiplier 1.0,
    # 300 steps, delta 1e-5, orders [2, 5, 10, 20, 100] -> epsilon 2.39 (optimal order 5).
    acc = Accountant()
    for _ in range(300):
        acc.step(1.0, 0.01)
    assert acc.epsilon(1e-5, alphas=[2, 5, 10, 20, 100]) == pytest.approx(2.39, abs=0.005)
    resumed = Accountant(acc.history)  # the checkpointed history gives the same epsilon
    assert resumed.epsilon(1e-5) == pytest.approx(acc.epsilon(1e-5))
    assert acc.epsilon_after(1.0, 0.01, 1e-5) > acc.epsilon(1e-5)


def _keys(names: list[str], round_: int) -> dict[str, object]:
    return {c: secagg.round_key(c.encode() * 4, round_) for c in names}


def test_masks_cancel_in_the_sum_and_hide_each_update() -> None:
    names = ["a", "b", "c"]
    keys = _keys(names, 1)
    pubs = {c: secagg.public_bytes(k) for c, k in keys.items()}
    rng = np.random.default_rng(0)
    xs = {c: rng.normal(size=50) for c in names}
    masked = {}
    for c in names:
        seeds = {p: secagg.pair_seed(keys[c], pubs[p], b"1/image") for p in names if p != c}
        masked[c] = secagg.mask(secagg.encode(xs[c]), c, seeds)
    # Both ends of a pair derive the same seed from their own key and the other's public key.
    assert secagg.pair_seed(keys["a"], pubs["b"], b"x") == secagg.pair_seed(keys["b"], pubs["a"], b"x")
    total = secagg.decode(secagg.masked_sum(list(masked.values())))
    np.testing.assert_allclose(total, sum(xs.values()), atol=1e-6)
    # What the server sees of one client is uniform noise, not its update.
    seen = secagg.decode(masked["a"])
    assert abs(np.corrcoef(seen, xs["a"])[0, 1]) < 0.5 and np.abs(seen).max() > 1e6


def test_a_dropped_clients_masks_are_removed_with_the_survivors_seeds() -> None:
    names = ["a", "b", "c"]
    keys = _keys(names, 2)
    pubs = {c: secagg.public_bytes(k) for c, k in keys.items()}
    xs = {c: np.full(4, float(i + 1)) for i, c in enumerate(names)}
    masked = {c: secagg.mask(secagg.encode(xs[c]), c, {p: secagg.pair_seed(keys[c], pubs[p], b"2/image")
                                                       for p in names if p != c}) for c in names}
    # b masked for a and c, then dropped: the sum of a and c still carries their masks for b.
    partial = secagg.masked_sum([masked["a"], masked["c"]])
    assert not np.allclose(secagg.decode(partial), xs["a"] + xs["c"])
    revealed = [(s, "b", secagg.pair_seed(keys[s], pubs["b"], b"2/image")) for s in ("a", "c")]
    np.testing.assert_allclose(secagg.decode(secagg.remove_dropped(partial, revealed)), xs["a"] + xs["c"])


def test_fixed_point_round_trip_keeps_negatives() -> None:
    x = np.array([-3.25, 0.0, 1e-6, 12345.5])
    np.testing.assert_allclose(secagg.decode(secagg.encode(x)), x, atol=2**-23)
    assert isinstance(Contribution("a", {}, {}), Contribution)
