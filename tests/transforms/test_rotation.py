"""Quaternion -> Euler (furniture_bench, iamlab_cmu_pickup_insert, cmu_playing_with_food) against
tensorflow_graphics' formula evaluated with TensorFlow's own float32 kernels, as OpenVLA ran it."""

import math

import numpy as np
import pytest
import tensorflow as tf

from vlaprep.transforms.base import TransformError
from vlaprep.transforms.rotation import euler_from_quaternion

f32 = np.float32
ULPS = 4  # the documented bound (rotation.py); measured maximum on 10**6 quaternions


def tf_graphics_euler(q):
    """tensorflow_graphics.geometry.transformation.euler.from_quaternion, op by op, in TF float32."""
    q = tf.constant(np.asarray(q, f32))
    eps = 2.0 * np.finfo(np.float32).eps

    def shrink(v):  # safe_ops.safe_shrink
        return v * (1.0 - tf.constant(eps, tf.float32))

    def sign(v):  # safe_ops.nonzero_sign
        return tf.where(v >= 0.0, tf.ones_like(v), -tf.ones_like(v))

    x, y, z, w = tf.unstack(q, axis=-1)
    tx, ty, tz = shrink(2.0 * x), shrink(2.0 * y), shrink(2.0 * z)
    r00 = shrink(1.0 - (ty * y + tz * z))
    r10 = shrink(ty * x + tz * w)
    r21 = shrink(tz * y + tx * w)
    r22 = shrink(1.0 - (tx * x + ty * y))
    r20 = shrink(tz * x - ty * w)
    r01 = shrink(ty * x - tz * w)
    r02 = shrink(tz * x + ty * w)
    theta_y = -tf.asin(r20)
    s = sign(tf.cos(theta_y))
    general = tf.stack([tf.atan2(r21 * s, (sign(r22) * eps + r22) * s), theta_y,
                        tf.atan2(r10 * s, (sign(r00) * eps + r00) * s)], axis=-1)
    s20 = sign(r20)
    gimbal = tf.stack([tf.atan2(-s20 * r01, -s20 * (sign(r02) * eps + r02)),
                       -s20 * tf.constant(math.pi / 2.0, tf.float32), tf.zeros_like(r20)], axis=-1)
    lock = tf.less(tf.abs(tf.abs(r20) - 1.0), 1.0e-6)
    return tf.where(tf.stack([lock] * 3, axis=-1), gimbal, general).numpy()


def ulps_apart(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, f32)
    return np.abs(a - b) / np.spacing(np.maximum(np.abs(b), np.finfo(f32).tiny)).astype(np.float64)


def test_random_unit_quaternions_within_four_ulps_of_tensorflow():
    rng = np.random.default_rng(3)
    q = rng.normal(size=(200_000, 4))
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(f32)
    got, want = euler_from_quaternion(q), tf_graphics_euler(q)
    assert got.dtype == np.float32 and got.shape == (200_000, 3)
    assert ulps_apart(got, want).max() <= ULPS
    assert (got == want).mean() > 0.3  # most components are bit-identical


S = math.sqrt(0.5)


@pytest.mark.parametrize(
    "q, euler, exact",
    [
        ([0, 0, 0, 1], [0, 0, 0], True),  # identity
        ([1, 0, 0, 0], [math.pi, 0, 0], False),  # 180 degrees about x
        ([0, 0, 1, 0], [0, 0, math.pi], False),  # 180 degrees about z
        ([0, S, 0, S], [0, math.pi / 2, 0], True),  # gimbal lock, r20 = -1
        ([0, -S, 0, S], [0, -math.pi / 2, 0], True),  # gimbal lock, r20 = +1
        ([math.sin(0.25), 0, 0, math.cos(0.25)], [0.5, 0, 0], False),  # 0.5 rad about x
    ],
)
def test_special_rotations(q, euler, exact):
    got, want = euler_from_quaternion(np.array([q]))[0], tf_graphics_euler([q])[0]
    if exact:
        np.testing.assert_array_equal(got, want)
    assert ulps_apart(got, want).max() <= ULPS
    np.testing.assert_allclose(got, euler, atol=2e-6)


def test_gimbal_branch_is_exact_and_constant():
    q = np.array([[0, S, 0, S], [0.1, S, 0.1, S]], np.float64)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    got = euler_from_quaternion(q)
    assert got[0, 1] == f32(math.pi / 2) and got[0, 2] == 0.0  # theta_y = float32(pi / 2), theta_z = 0
    assert ulps_apart(got, tf_graphics_euler(q)).max() <= ULPS


def test_shape_is_checked():
    with pytest.raises(TransformError, match=r"expected quaternions \[T, 4\] \(x, y, z, w\), got shape \(2, 3\)"):
        euler_from_quaternion(np.zeros((2, 3)))
    assert euler_from_quaternion(np.zeros((0, 4))).shape == (0, 3)
