"""Normalization: hand-worked values per mode, OpenVLA's zero rule, masks, parsing, and bit equality
with OpenVLA's own TensorFlow expression (when TensorFlow is installed)."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vlaprep.transforms.normalization import (
    NormalizationSpec,
    normalization_mask,
    normalize_actions,
    unnormalize_actions,
)

F32 = np.float32

# Two normalized dims, a masked-out gripper that is constant (min == max == 1), and a masked-in
# constant dim. Values chosen so the float32 arithmetic is exact: 2 + 1e-8 rounds to 2.0 in float32.
STATS = {
    "mean": [0.0, 1.0, 1.0, 3.0],
    "std": [0.5, 0.25, 0.0, 0.0],
    "max": [2.0, 3.0, 1.0, 3.0],
    "min": [-2.0, -1.0, 1.0, 3.0],
    "q01": [-1.0, 0.0, 1.0, 3.0],
    "q99": [1.0, 2.0, 1.0, 3.0],
    "mask": [True, True, False, True],
}


def _norm(rows, spec, stats=STATS):
    return normalize_actions(np.asarray(rows, dtype=F32), stats, spec)


# --- bounds_q99 -------------------------------------------------------------------------------


def test_bounds_q99_hand_values():
    out = _norm([[0.5, 1.0, 1.0, 3.0], [-1.0, 2.0, 1.0, 3.0], [0.0, 0.5, 1.0, 3.0]], "bounds_q99")
    assert out.dtype == np.float32
    # dim 0: 2*(0.5 - -1)/2 - 1 = 0.5;  dim 1: 2*(1 - 0)/2 - 1 = 0;  dims 2, 3: min == max -> 0.
    np.testing.assert_array_equal(out, F32([[0.5, 0.0, 0.0, 0.0], [-1.0, 1.0, 0.0, 0.0], [0.0, -0.5, 0.0, 0.0]]))


def test_bounds_q99_saturates_outside_q01_q99():
    # dim 0 is inside [min, max] = [-2, 2] but outside [q01, q99] = [-1, 1]: it saturates.
    out = _norm([[1.5, 5.0, 1.0, 3.0], [-1.5, -7.0, 1.0, 3.0]], "bounds_q99")
    np.testing.assert_array_equal(out[:, :2], F32([[1.0, 1.0], [-1.0, -1.0]]))


def test_masked_out_gripper_passes_through_raw():
    stats = dict(STATS, min=[-2.0, -1.0, 0.0, 3.0])  # gripper no longer constant
    out = _norm([[0.0, 1.0, 0.7, 3.0], [0.0, 1.0, 5.0, 3.0]], "bounds_q99", stats)
    np.testing.assert_array_equal(out[:, 2], F32([0.7, 5.0]))  # raw, not clipped, not scaled


def test_zero_rule_applies_to_masked_out_constant_gripper_and_any_input_value():
    # The gripper (mask False, min == max == 1) becomes 0 whatever the value, as in OpenVLA.
    out = _norm([[0.0, 1.0, 1.0, 3.0], [0.0, 1.0, 0.25, 99.0]], "bounds_q99")
    np.testing.assert_array_equal(out[:, 2:], F32([[0.0, 0.0], [0.0, 0.0]]))


def test_zero_rule_is_min_eq_max_not_q01_eq_q99():
    # q01 == q99 == 0 but min != max: not zeroed; x == q01 gives 2*0/1e-8 - 1 = -1, above saturates.
    stats = {"min": [-1.0], "max": [1.0], "q01": [0.0], "q99": [0.0], "mean": [0.0], "std": [1.0]}
    out = normalize_actions(F32([[0.0], [0.5], [-0.5]]), stats, "bounds_q99")
    np.testing.assert_array_equal(out, F32([[-1.0], [1.0], [-1.0]]))


def test_epsilon_is_in_the_denominator():
    # q99 - q01 = 1e-6: the 1e-8 matters (1%): 2*1e-6/(1.01e-6) - 1 = 0.980198...
    stats = {"min": [0.0], "max": [2e-6], "q01": [0.0], "q99": [1e-6], "mean": [0.0], "std": [1.0]}
    out = normalize_actions(F32([[1e-6]]), stats, "bounds_q99")
    assert out[0, 0] == pytest.approx(2 / 1.01 - 1, abs=2e-7)
    assert out[0, 0] < F32(0.99)


def test_bounds_uses_min_max():
    out = _norm([[1.0, 0.0, 1.0, 3.0], [-2.0, 3.0, 1.0, 3.0], [9.0, -9.0, 1.0, 3.0]], "bounds")
    # dim 0: 2*(1 + 2)/4 - 1 = 0.5; dim 1: 2*(0 + 1)/4 - 1 = -0.5; then the ends and saturation.
    np.testing.assert_array_equal(out[:, :2], F32([[0.5, -0.5], [-1.0, 1.0], [1.0, -1.0]]))
    np.testing.assert_array_equal(out[:, 2:], 0.0)


def test_bridge_orig_published_bounds():
    q01, q99 = -0.02872725307941437, 0.028309678435325586  # openvla-7b bridge_orig action dim 0
    stats = {"min": [-0.4], "max": [0.4], "q01": [q01], "q99": [q99], "mean": [0.0], "std": [1.0]}
    x = F32([[q01], [q99], [0.0], [1.0]])
    out = normalize_actions(x, stats, "bounds_q99")
    den = F32(q99 - q01 + 1e-8)
    expected = np.clip(F32(2) * (x - F32(q01)) / den - F32(1), -1, 1)
    np.testing.assert_array_equal(out, expected)
    assert out[0, 0] == pytest.approx(-1.0, abs=1e-6) and out[3, 0] == 1.0
    assert out[2, 0] == pytest.approx(2 * (0 - q01) / (q99 - q01 + 1e-8) - 1, abs=1e-6)


# --- normal / fixed ----------------------------------------------------------------------------


def test_normal_hand_values_no_clip_no_zero_rule():
    out = _norm([[1.0, 2.0, 0.3, 3.0], [-2.0, 0.0, 0.3, 5.0]], "normal")
    # dim 0: (1 - 0)/0.5 = 2 (no clip); dim 1: (2 - 1)/0.25 = 4; gripper raw; dim 3: std 0 ->
    # (x - 3)/1e-8, NOT zeroed even though min == max.
    np.testing.assert_allclose(out[:, :2], F32([[2.0, 4.0], [-4.0, -4.0]]), rtol=1e-6)
    np.testing.assert_array_equal(out[:, 2], F32([0.3, 0.3]))
    assert out[0, 3] == 0.0
    assert out[1, 3] == pytest.approx(2.0 / 1e-8, rel=1e-6)


def test_fixed_hand_values():
    out = _norm([[0.25, -0.5, 0.7, 2.0], [2.0, -3.0, 0.7, 3.0]], "fixed:-0.5,0.5")
    # clip to [-0.5, 0.5], then 2*(x + 0.5)/1 - 1; gripper raw; no zero rule (dim 3 is min == max).
    np.testing.assert_array_equal(out, F32([[0.5, -1.0, 0.7, 1.0], [1.0, -1.0, 0.7, 1.0]]))


# --- unnormalize --------------------------------------------------------------------------------


def test_unnormalize_bounds_q99_hand_values():
    y = np.array([[0.0, 0.5, 0.996078431372549, 0.0], [-1.0, 1.0, 0.0, 0.0]])
    out = unnormalize_actions(y, STATS, "bounds_q99", dtype=np.float64)
    # 0.5*(y + 1)*(q99 - q01) + q01; gripper passes through; masked-in constant dim -> q01 (= 3).
    np.testing.assert_array_equal(out, [[0.0, 1.5, 0.996078431372549, 3.0], [-1.0, 2.0, 0.0, 3.0]])
    assert unnormalize_actions(y, STATS, "bounds_q99").dtype == np.float32


def test_unnormalize_matches_openvla_predict_action_float64():
    rng = np.random.default_rng(3)
    stats = {k: rng.normal(size=7).tolist() for k in ("mean", "std", "min", "max")}
    stats["q01"] = (-np.abs(rng.normal(size=7)) * 0.03).tolist()
    stats["q99"] = (np.abs(rng.normal(size=7)) * 0.03).tolist()
    stats["mask"] = [True] * 6 + [False]
    y = np.linspace(-1, 1, 256)[:255][rng.integers(0, 255, size=(32, 7))]  # like decoded bin values
    hi, lo, mask = np.array(stats["q99"]), np.array(stats["q01"]), np.array(stats["mask"])
    reference = np.where(mask, 0.5 * (y + 1) * (hi - lo) + lo, y)  # modeling_prismatic.predict_action
    np.testing.assert_array_equal(unnormalize_actions(y, stats, "bounds_q99", dtype=np.float64), reference)


def test_unnormalize_normal_and_fixed():
    y = np.array([[2.0, 4.0, 0.3, 0.0]])
    np.testing.assert_allclose(
        unnormalize_actions(y, STATS, "normal", dtype=np.float64), [[1.0, 2.0, 0.3, 3.0]], rtol=0, atol=1e-7
    )
    np.testing.assert_array_equal(
        unnormalize_actions(np.array([[0.5, -1.0, 0.7, 1.0]]), STATS, "fixed:-0.5,0.5"),
        F32([[0.25, -0.5, 0.7, 0.5]]),
    )


_finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)


@settings(max_examples=200, deadline=None)
@given(
    lo=st.floats(-10, 10, width=32),
    span=st.floats(0.001953125, 20, width=32),
    u=st.lists(st.floats(0, 1), min_size=1, max_size=16),
    mode=st.sampled_from(["bounds_q99", "bounds", "normal", "fixed:-3,2"]),
)
def test_unnormalize_inverts_normalize_inside_the_bounds(lo, span, u, mode):
    lo = float(lo)
    hi = lo + float(span)
    stats = {"mean": [lo], "std": [span], "min": [lo], "max": [hi], "q01": [lo], "q99": [hi]}
    spec = NormalizationSpec.parse(mode)
    a, b = (spec.low, spec.high) if spec.mode == "fixed" else (lo, hi)
    x = (a + (b - a) * np.asarray(u)).astype(F32)[:, None]
    y = normalize_actions(x, stats, spec)
    back = unnormalize_actions(y, stats, spec, dtype=np.float64)
    # float32 normalization (a few ulps of 1) scaled by (b - a)/2, plus the 1e-8 guard's bias.
    tol = 4 * np.finfo(F32).eps * (b - a) + 4 * np.finfo(F32).eps * np.abs(x.astype(np.float64)) + 1e-7
    assert np.all(np.abs(back - x) <= tol)


@settings(max_examples=200, deadline=None)
@given(x=st.lists(_finite, min_size=2, max_size=32))
def test_bounds_output_in_range_and_monotone(x):
    x = np.sort(np.asarray(x, dtype=F32))[:, None]
    stats = {"mean": [0.0], "std": [1.0], "min": [-2.0], "max": [2.5], "q01": [-0.3], "q99": [0.7]}
    for mode in ("bounds_q99", "bounds", "fixed:-1,1"):
        y = normalize_actions(x, stats, mode)[:, 0]
        assert np.all((y >= -1) & (y <= 1)) and np.all(np.diff(y) >= 0)


# --- precision: bit equality with OpenVLA's TensorFlow expression --------------------------------


def test_matches_openvla_tensorflow_bit_for_bit():
    tf = pytest.importorskip("tensorflow")
    rng = np.random.default_rng(0)
    d, n = 7, 4000
    q01 = rng.normal(size=d) * 0.03 - 0.03
    q99 = q01 + np.abs(rng.normal(size=d)) * 0.05 + 1e-3
    stats_json = {
        "mean": (rng.normal(size=d) * 0.01).tolist(),
        "std": (np.abs(rng.normal(size=d)) * 0.02).tolist(),
        "max": (q99 + 0.01).tolist(),
        "min": (q01 - 0.01).tolist(),
        "q01": q01.tolist(),
        "q99": q99.tolist(),
        "mask": [True] * 6 + [False],
    }
    stats_json["max"][5] = stats_json["min"][5]  # an unused dim
    stats_json = json.loads(json.dumps(stats_json))  # exactly what dataset_statistics.json gives
    x = (rng.normal(size=(n, d)) * 0.04).astype(F32)
    x[:, 6] = rng.integers(0, 2, n)

    # OpenVLA, verbatim: tree_map(np.array, stats), then the lambdas of normalize_action_and_proprio.
    meta = {k: np.array(v) for k, v in stats_json.items()}
    mask = meta["mask"]

    def openvla(x, low, high):
        x = tf.where(mask, tf.clip_by_value(2 * (x - low) / (high - low + 1e-8) - 1, -1, 1), x)
        return tf.where(meta["min"] == meta["max"], 0.0, x)

    def openvla_normal(x):
        return tf.where(mask, (x - meta["mean"]) / (meta["std"] + 1e-8), x)

    def run(fn):
        return next(iter(tf.data.Dataset.from_tensors(tf.constant(x)).map(fn))).numpy()

    np.testing.assert_array_equal(
        normalize_actions(x, stats_json, "bounds_q99"), run(lambda t: openvla(t, meta["q01"], meta["q99"]))
    )
    np.testing.assert_array_equal(
        normalize_actions(x, stats_json, "bounds"), run(lambda t: openvla(t, meta["min"], meta["max"]))
    )
    np.testing.assert_array_equal(normalize_actions(x, stats_json, "normal"), run(openvla_normal))


# --- masks, specs, errors -----------------------------------------------------------------------


def test_normalization_mask():
    np.testing.assert_array_equal(normalization_mask(STATS), [True, True, False, True])
    no_mask = {k: v for k, v in STATS.items() if k != "mask"}
    np.testing.assert_array_equal(normalization_mask(no_mask), [True] * 4)
    assert normalization_mask(no_mask).dtype == bool
    assert normalization_mask(json.loads(json.dumps(STATS))).dtype == bool
    with pytest.raises(ValueError, match="expected 'mask' of 4 bools"):
        normalization_mask(dict(STATS, mask=[True, False]))
    # Without a mask every dim is normalized, the gripper included.
    out = normalize_actions(F32([[0.0, 1.0, 0.3, 3.0]]), dict(no_mask, min=[-2.0, -1.0, 0.0, 3.0]), "bounds_q99")
    assert out[0, 2] == -1.0  # 2*(0.3 - 1)/(0 + 1e-8) - 1, clipped


@pytest.mark.parametrize(
    "text, spec",
    [
        ("bounds_q99", NormalizationSpec("bounds_q99")),
        ("bounds", NormalizationSpec("bounds")),
        ("normal", NormalizationSpec("normal")),
        ("fixed:-1,1", NormalizationSpec("fixed", -1.0, 1.0)),
        (" fixed:-0.5, 0.25 ", NormalizationSpec("fixed", -0.5, 0.25)),
    ],
)
def test_parse(text, spec):
    parsed = NormalizationSpec.parse(text)
    assert parsed == spec
    assert NormalizationSpec.parse(str(parsed)) == parsed
    assert pickle.loads(pickle.dumps(parsed)) == parsed


def test_parse_errors():
    with pytest.raises(ValueError, match=r"expected LOW < HIGH, got fixed:0\.5,0\.1; hint"):
        NormalizationSpec.parse("fixed:0.5,0.1")
    with pytest.raises(ValueError, match=r"expected LOW < HIGH, got fixed:1,1"):
        NormalizationSpec.parse("fixed:1,1")
    for bad in ("fixed:abc", "fixed:1", "fixed:1,2,3", "fixed:"):
        with pytest.raises(ValueError, match="expected fixed:LOW,HIGH with two numbers"):
            NormalizationSpec.parse(bad)
    with pytest.raises(ValueError, match="expected finite"):
        NormalizationSpec.parse("fixed:nan,1")
    for bad in ("bounds_q98", "BOUNDS", "normal:1", ""):
        with pytest.raises(ValueError, match="expected a normalization spec"):
            NormalizationSpec.parse(bad)
    with pytest.raises(ValueError, match="expected LOW < HIGH"):
        NormalizationSpec("fixed", 1.0, 0.0)
    with pytest.raises(ValueError, match="expected no low/high"):
        NormalizationSpec("bounds", 0.0, 1.0)
    with pytest.raises(ValueError, match="expected mode in"):
        NormalizationSpec("q99")


def test_shape_and_key_errors():
    with pytest.raises(ValueError, match=r"expected action of shape \[N, 4\]"):
        normalize_actions(np.zeros((3, 7), F32), STATS, "bounds_q99")
    with pytest.raises(ValueError, match="expected key 'q01'"):
        normalize_actions(np.zeros((3, 1), F32), {"min": [0.0], "max": [1.0]}, "bounds_q99")
    with pytest.raises(ValueError, match=r"expected normalized actions of shape \[N, 4\]"):
        unnormalize_actions(np.zeros((3, 2)), STATS, "bounds_q99")


def test_leading_shapes_and_empty():
    x = np.zeros((2, 3, 4), F32)
    assert normalize_actions(x, STATS, "bounds_q99").shape == (2, 3, 4)
    assert normalize_actions(np.zeros((0, 4), F32), STATS, "bounds_q99").shape == (0, 4)
