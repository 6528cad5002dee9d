"""Gripper conventions against hand-worked values and literal re-implementations of OpenVLA's scans."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vlaprep.transforms.base import TransformError
from vlaprep.transforms.gripper import (
    binarize_gripper_actions,
    invert_gripper_actions,
    rel2abs_gripper_actions,
)


def reference_binarize(a):
    """OpenVLA's tf.scan written as the loop its docstring describes (float32 comparisons)."""
    a = np.asarray(a, dtype=np.float32)
    out = np.empty_like(a)
    if a.size == 0:
        return out
    is_open = a > np.float32(0.95)
    between = ~(is_open | (a < np.float32(0.05)))
    carry = a[-1]
    for i in reversed(range(a.shape[0])):
        carry = carry if between[i] else np.float32(is_open[i])
        out[i] = carry
    return out


def reference_rel2abs(a):
    """OpenVLA's rel2abs: thresholded commands, start = -(first nonzero) or 1, forward carry."""
    a = np.asarray(a, dtype=np.float32)
    thr = [1 if x < np.float32(-0.1) else (-1 if x > np.float32(0.1) else 0) for x in a]
    first = next((v for v in thr if v != 0), 0)
    carry = -first if first != 0 else 1
    out = []
    for v in thr:
        if v != 0:
            carry = v
        out.append(carry / 2 + 0.5)
    return np.asarray(out, dtype=np.float32)


# --- binarize ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "a, expected",
    [
        ([], []),
        ([0.5], [0.5]),  # T=1 in-between: the raw last value seeds the scan and is kept
        ([1.0], [1.0]),
        ([0.0], [0.0]),
        ([0.97], [1.0]),
        ([0.03], [0.0]),
        ([0.0, 0.5, 1.0], [0.0, 1.0, 1.0]),  # in-between takes the state reached after it
        ([1.0, 0.5, 0.3, 0.0], [1.0, 0.0, 0.0, 0.0]),
        ([1.0, 0.5, 0.3, 0.0, 0.2], [1.0, 0.0, 0.0, 0.0, 0.2]),  # trailing in-between keeps raw 0.2
        ([1.0, 0.4, 0.6], [1.0, 0.6, 0.6]),  # trailing run of two: both get the raw last value
        ([0.95, 0.05, 1.0], [1.0, 1.0, 1.0]),  # thresholds are strict: 0.95 and 0.05 are in-between
        ([0.2, 0.3, 0.4], [0.4, 0.4, 0.4]),  # nothing decided anywhere
        ([float("nan"), 0.0], [0.0, 0.0]),  # NaN is neither open nor closed
    ],
)
def test_binarize_hand_values(a, expected):
    out = binarize_gripper_actions(np.asarray(a, dtype=np.float32))
    assert out.dtype == np.float32 and out.shape == (len(a),)
    np.testing.assert_array_equal(out, np.asarray(expected, dtype=np.float32))


def test_binarize_casts_float64_before_thresholding():
    # 0.9500000001 rounds to float32(0.95), which is not > float32(0.95): in-between, like OpenVLA's
    # float32 graph (a float64 comparison would call it open).
    out = binarize_gripper_actions(np.array([0.9500000001, 0.0], dtype=np.float64))
    np.testing.assert_array_equal(out, [0.0, 0.0])
    assert out.dtype == np.float32


def test_binarize_rejects_2d():
    with pytest.raises(TransformError, match=r"expected a 1-D gripper column \[T\], got shape \(3, 1\)"):
        binarize_gripper_actions(np.zeros((3, 1), np.float32))


def test_binarize_does_not_mutate_input():
    a = np.array([1.0, 0.5, 0.0], np.float32)
    binarize_gripper_actions(a)
    np.testing.assert_array_equal(a, [1.0, 0.5, 0.0])


_gripper_values = st.one_of(
    st.sampled_from([0.0, 0.05, 0.0499, 0.0501, 0.5, 0.95, 0.9499, 0.9501, 1.0]),
    st.floats(-0.5, 1.5, width=32),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_gripper_values, min_size=0, max_size=40))
def test_binarize_matches_reference_scan(values):
    a = np.asarray(values, dtype=np.float32)
    np.testing.assert_array_equal(binarize_gripper_actions(a), reference_binarize(a))


@settings(max_examples=200, deadline=None)
@given(st.lists(_gripper_values, min_size=1, max_size=40))
def test_binarize_output_is_binary_or_the_raw_last_value(values):
    a = np.asarray(values, dtype=np.float32)
    out = binarize_gripper_actions(a)
    last_decided = a[-1] > np.float32(0.95) or a[-1] < np.float32(0.05)
    allowed = {0.0, 1.0} if last_decided else {0.0, 1.0, float(a[-1])}
    assert set(out.tolist()) <= allowed


# --- invert --------------------------------------------------------------------------------------
def test_invert_hand_values():
    out = invert_gripper_actions(np.array([0.0, 1.0, 0.25, 2.0], np.float64))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, [1.0, 0.0, 0.75, -1.0])
    assert invert_gripper_actions(np.zeros((0,))).shape == (0,)


@given(st.lists(st.integers(0, 1024), max_size=30))
def test_invert_twice_is_identity(ks):
    a = np.asarray(ks, dtype=np.float32) / np.float32(1024)  # dyadic: 1 - a is exact in float32
    np.testing.assert_array_equal(invert_gripper_actions(invert_gripper_actions(a)), a)


# --- rel2abs -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "a, expected",
    [
        ([], []),
        ([0.0], [1.0]),  # no command at all: open throughout
        ([0.0, 0.05, -0.05], [1.0, 1.0, 1.0]),  # all below the 0.1 threshold: no command
        ([0.1, -0.1], [1.0, 1.0]),  # thresholds are strict
        ([1.0], [0.0]),  # a close command at step 0 applies at step 0
        ([-1.0], [1.0]),
        ([0.0, 1.0, 0.0, -1.0, 0.0], [1.0, 0.0, 0.0, 1.0, 1.0]),  # before the first close: open
        ([0.0, -1.0, 0.0], [0.0, 1.0, 1.0]),  # before the first open: closed
        ([0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]),
        ([0.0, 0.0, -0.2, 0.0, 0.3, 0.0], [0.0, 0.0, 1.0, 1.0, 0.0, 0.0]),
    ],
)
def test_rel2abs_hand_values(a, expected):
    out = rel2abs_gripper_actions(np.asarray(a, dtype=np.float32))
    assert out.dtype == np.float32 and out.shape == (len(a),)
    np.testing.assert_array_equal(out, np.asarray(expected, dtype=np.float32))


def test_rel2abs_compares_in_float32():
    # float32(-0.1) is not < float32(-0.1): no command, so open throughout. In float64,
    # -0.10000000149 < -0.1 would make step 1 an "open" command and step 0 closed.
    out = rel2abs_gripper_actions(np.array([0.0, -0.1], dtype=np.float64))
    np.testing.assert_array_equal(out, [1.0, 1.0])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.sampled_from([0.0, 0.1, -0.1, 1.0, -1.0]), st.floats(-2, 2, width=32)), max_size=40))
def test_rel2abs_matches_reference_scan_and_is_binary(values):
    a = np.asarray(values, dtype=np.float32)
    out = rel2abs_gripper_actions(a)
    np.testing.assert_array_equal(out, reference_rel2abs(a))
    assert set(out.tolist()) <= {0.0, 1.0}
