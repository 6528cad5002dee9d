"""Mixture sampling, OpenVLA's way: dataset draws with p_i proportional to weight_i x num_transitions_i,
exhausted datasets repeated, OpenVLA's effective epoch length; expectations re-derived here."""

import bisect
import collections
import importlib.util
import itertools
import math
import pathlib

import numpy as np
import pytest

from vlaprep.loader import MixtureError, ShardDataset

_spec = importlib.util.spec_from_file_location("loader_test_module", pathlib.Path(__file__).with_name("test_loader.py"))
tl = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tl)

# (dataset, episodes, steps per episode) per file; every file holds each dataset's rows as one sorted block.
LAYOUT = [
    [("alpha", 3, 4), ("beta", 1, 2), ("gamma", 2, 5)],
    [("alpha", 2, 3), ("gamma", 3, 4)],
    [("beta", 1, 3), ("gamma", 1, 6)],
]
TRANSITIONS = {"alpha": 5000, "beta": 700, "gamma": 2600}  # statistics cover every split: not the train rows


def write_mixture(root, **kw):
    files, ep = [], 0
    for spec in LAYOUT:
        rows = []
        for name, episodes, steps in spec:
            for _ in range(episodes):
                rows += [(ep, t, steps, name) for t in range(steps)]
                ep += 1
        files.append(rows)
    tl.write_shards(root, files, rows_override=True, row_group_size=4, num_transitions=TRANSITIONS, **kw)
    by_dataset = collections.defaultdict(list)  # rows of each dataset in file order
    for rows in files:
        for ep, t, _, name in rows:
            by_dataset[name].append((name, tl.episode_id(ep), t))
    return by_dataset


def reference_probabilities(weights, balance=True):
    raw = {n: w * (TRANSITIONS[n] if balance else 1) for n, w in weights.items() if w > 0}
    total = sum(raw.values())
    return {n: raw[n] / total for n in sorted(raw)}


def reference_draws(p, seed, epoch, worker, count, block=4096):
    """The documented rule, written out with bisect: u from default_rng([seed, epoch, 3, worker, block])."""
    cdf = list(itertools.accumulate(p))
    cdf[-1] = 1.0
    out = []
    for b in range(math.ceil(count / block)):
        u = np.random.default_rng([seed, epoch, 3, worker, b]).random(block)
        out += [bisect.bisect_right(cdf, float(x)) for x in u]
    return out[:count]


def test_probabilities_and_epoch_length_are_openvlas(tmp_path):
    rows = write_mixture(tmp_path)
    weights = {"alpha": 1.0, "beta": 4.0, "gamma": 1.0}
    ds = ShardDataset(tmp_path, mixture=weights)
    p = reference_probabilities(weights)
    assert ds.mixture.names == ("alpha", "beta", "gamma")
    assert ds.mixture.probabilities == pytest.approx(list(p.values()), rel=1e-15)
    # Effective length: max over the primary datasets (weight 1.0) of rows / p.
    assert ds.mixture.epoch_length == int(max(len(rows[n]) / p[n] for n in ("alpha", "gamma")))
    unbalanced = ShardDataset(tmp_path, mixture=weights, balance_weights=False)
    assert unbalanced.mixture.probabilities == pytest.approx([1 / 6, 4 / 6, 1 / 6], rel=1e-15)
    # Weight 0 leaves a dataset out; "manifest" without a recorded mixture: weight 1.0 each.
    assert ShardDataset(tmp_path, mixture={"alpha": 1.0, "beta": 0}).mixture.names == ("alpha",)
    manifest = ShardDataset(tmp_path, mixture="manifest")
    assert manifest.mixture.probabilities == pytest.approx(list(reference_probabilities({n: 1.0 for n in TRANSITIONS}).values()))


def test_recorded_manifest_weights_are_used(tmp_path):
    recorded = {"alpha": {"weight": 2.0, "num_transitions": 10, "sampling_probability": 0.2},
                "beta": {"weight": 1.0, "num_transitions": 40, "sampling_probability": 0.4},
                "gamma": {"weight": 0.5, "num_transitions": 80, "sampling_probability": 0.4}}
    write_mixture(tmp_path, mixture=recorded)
    ds = ShardDataset(tmp_path, mixture="manifest")
    assert ds.mixture.weights == (2.0, 1.0, 0.5)
    assert ds.mixture.probabilities == pytest.approx([0.2, 0.4, 0.4], rel=1e-15)


def test_sampler_shares_within_binomial_bound_and_exact_sequence(tmp_path):
    write_mixture(tmp_path)
    weights = {"alpha": 1.0, "beta": 4.0, "gamma": 0.5}
    ds = ShardDataset(tmp_path, mixture=weights, seed=7, world_size=4, rank=1)
    p = list(reference_probabilities(weights).values())
    n = 120_000
    for worker in (0, 5):
        ids = ds.sampler(worker, num_workers=2).ids(0, n)
        counts = np.bincount(ids, minlength=3)
        for i in range(3):  # 5 standard deviations: a false failure has probability < 1e-6
            assert abs(counts[i] - n * p[i]) <= 5 * math.sqrt(n * p[i] * (1 - p[i])), (i, counts, p)
        assert ids.tolist() == reference_draws(p, 7, 0, worker, n)
    sampler = ds.sampler(3, num_workers=2)
    assert sampler.ids(5000, 9000).tolist() == reference_draws(p, 7, 0, 3, 9000)[5000:]  # any position, no replay
    ds.set_epoch(2)
    assert ds.sampler(0, num_workers=2).ids(0, 100).tolist() == reference_draws(p, 7, 2, 0, 100)


def test_exact_sequence_repeats_an_exhausted_dataset(tmp_path):
    """shuffle=False: no permutations, so the sequence is: draw a dataset, take its next row in file order,
    starting over when its rows run out (OpenVLA's repeat())."""
    rows = write_mixture(tmp_path)
    weights = {"alpha": 1.0, "beta": 6.0, "gamma": 1.0}
    ds = ShardDataset(tmp_path, mixture=weights, shuffle=False, seed=3, history=2)
    p = reference_probabilities(weights)
    names = sorted(p)
    length = int(max(len(rows[n]) / p[n] for n in ("alpha", "gamma")))
    cursor = collections.Counter()
    expected = []
    for i in reference_draws(list(p.values()), 3, 0, 0, length):
        name = names[i]
        expected.append(rows[name][cursor[name] % len(rows[name])])
        cursor[name] += 1
    got = [(it["dataset_name"], it["episode_id"], it["step_index"]) for it in ds]
    assert got == expected
    assert cursor["beta"] > 2 * len(rows["beta"])  # beta (5 rows) was exhausted and repeated
    for item in ShardDataset(tmp_path, mixture=weights, shuffle=False, seed=3, history=2):
        tl.check_item(item, history=2)  # history windows stay inside the episode across repeats


def test_shuffled_mixture_permutes_within_windows_and_splits_the_epoch(tmp_path):
    write_mixture(tmp_path)
    weights = {"alpha": 1.0, "beta": 2.0, "gamma": 1.0}
    ds = ShardDataset(tmp_path, mixture=weights, seed=5, shuffle_buffer=8)
    names = list(ds.mixture.names)
    got = [(it["dataset_name"], it["episode_id"], it["step_index"]) for it in ds]
    assert len(got) == ds.mixture.epoch_length
    assert [(it["dataset_name"], it["episode_id"], it["step_index"]) for it in ShardDataset(tmp_path, mixture=weights, seed=5, shuffle_buffer=8)] == got
    # Within each window of 256 (the read unit: whole windows of 8), the datasets are the draws'.
    draws = ds.sampler(0).ids(0, len(got)).tolist()
    for lo in range(0, len(got), 8):
        assert sorted(names.index(g[0]) for g in got[lo: lo + 8]) == sorted(draws[lo: lo + 8])
    # Ranks x workers: equal shares of the effective length, each rank within num_workers of the others.
    per_rank = [sum(ShardDataset(tmp_path, mixture=weights, rank=r, world_size=3).worker_lengths(2)) for r in range(3)]
    assert sum(per_rank) == ds.mixture.epoch_length and max(per_rank) - min(per_rank) <= 2


def test_mixture_errors_name_the_problem(tmp_path):
    write_mixture(tmp_path)
    with pytest.raises(MixtureError, match="expected datasets of .* got 'delta'.*'alpha', 'beta', 'gamma'"):
        ShardDataset(tmp_path, mixture={"delta": 1.0})
    with pytest.raises(MixtureError, match="expected a finite weight >= 0 for dataset 'alpha'.*got -1"):
        ShardDataset(tmp_path, mixture={"alpha": -1})
    with pytest.raises(MixtureError, match="at least one dataset with weight > 0"):
        ShardDataset(tmp_path, mixture={"alpha": 0})
    with pytest.raises(MixtureError, match="expected mixture 'manifest'"):
        ShardDataset(tmp_path, mixture="uniform")
