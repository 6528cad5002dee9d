"""Quaternion -> Euler angles as OpenVLA computes them, in NumPy float32 (no TensorFlow).

OpenVLA's ``furniture_bench``, ``iamlab_cmu_pickup_insert`` and ``cmu_playing_with_food`` transforms call
``tensorflow_graphics.geometry.transformation.euler.from_quaternion`` on ``action[:, 3:7]`` (x, y, z, w),
in float32. ``euler_from_quaternion`` evaluates the same formula, operation by operation, in float32:

  t{x,y,z} = (2 q) * (1 - e)                       # safe_shrink, e = 2 * float32 eps = 2**-22
  r00 = (1 - (tyy + tzz)) (1 - e)   r10 = (txy + twz) (1 - e)   r20 = (txz - twy) (1 - e)
  r21 = (tyz + twx) (1 - e)         r22 = (1 - (txx + tyy)) (1 - e)
  r01 = (txy - twz) (1 - e)         r02 = (txz + twy) (1 - e)
  general:  y = -asin(r20); s = sign0(cos y); z = atan2(r10 s, (r00 + sign0(r00) e) s);
            x = atan2(r21 s, (r22 + sign0(r22) e) s)
  gimbal lock (| |r20| - 1 | < 1e-6):  s = sign0(r20); x = atan2(-s r01, -s (r02 + sign0(r02) e));
            y = -s * float32(pi / 2); z = 0
  sign0(v) = +1 for v >= 0 else -1

Exactness: every +, -, * above is IEEE float32 and bit-identical to TensorFlow's. ``asin``, ``atan2`` and
``cos`` are evaluated in float64 and rounded once to float32 (the correctly rounded angle, identical on
every CPU), while TensorFlow's float32 kernels are Eigen polynomials up to 4 ulps away from it (measured
on 10**6 arguments: only ~40 % of TF's ``asin`` results are correctly rounded). The angles therefore match
OpenVLA's within 4 float32 ulps of their magnitude (tests check it against TensorFlow's own kernels), not
bit for bit; gimbal-lock outputs (+-float32(pi/2), 0) and the identity are exact. ``cos`` only decides a
sign: where the general branch is used (``|r20| <= 1 - 1e-6``), ``|theta_y| < pi/2 - 1e-3`` and the sign
is +1 in both.
"""

from __future__ import annotations

import numpy as np

from vlaprep.transforms.base import TransformError

_F = np.float32
_EPS = _F(2.0 * np.finfo(np.float32).eps)  # tensorflow_graphics asserts.select_eps_for_addition(float32)
_SHRINK = _F(1.0) - _EPS  # safe_shrink's factor, computed in float32 as TF does
_HALF_PI = _F(np.pi / 2.0)
_GIMBAL_TOL = _F(1.0e-6)


def _sign0(v: np.ndarray) -> np.ndarray:
    """tensorflow_graphics ``safe_ops.nonzero_sign``: +1 where v >= 0 (also -0.0), else -1; float32."""
    return np.where(v >= _F(0.0), _F(1.0), _F(-1.0)).astype(np.float32)


# The transcendental steps: evaluated in float64 on the float32 arguments and rounded once to float32, i.e.
# the (almost always) correctly rounded float32 result, the same on every CPU; TensorFlow's float32 kernels
# (Eigen polynomials) are themselves up to 4 ulps from it.
def _asin(v: np.ndarray) -> np.ndarray:
    return np.arcsin(v.astype(np.float64)).astype(np.float32)


def _cos(v: np.ndarray) -> np.ndarray:
    return np.cos(v.astype(np.float64)).astype(np.float32)


def _atan2(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    return np.arctan2(y.astype(np.float64), x.astype(np.float64)).astype(np.float32)


def euler_from_quaternion(quaternions) -> np.ndarray:
    """``[T, 4]`` quaternions (x, y, z, w) -> ``[T, 3] float32`` angles (about x, y, z), see the module doc.

    The input is cast to float32 first (OpenVLA's graph holds float32); it is assumed normalized, as
    tensorflow_graphics assumes (nothing is renormalized).
    """
    q = np.asarray(quaternions)
    if q.ndim != 2 or q.shape[1] != 4:
        raise TransformError(
            f"expected quaternions [T, 4] (x, y, z, w), got shape {q.shape!r} for euler_from_quaternion; "
            f"hint: pass action[:, 3:7]"
        )
    q = q.astype(np.float32)
    x, y, z, w = q[:, 0], q[:, 1], q[:, 2], q[:, 3]
    with np.errstate(invalid="ignore"):  # NaN inputs stay NaN, as in TF; pipelines reject them
        tx = (_F(2.0) * x) * _SHRINK
        ty = (_F(2.0) * y) * _SHRINK
        tz = (_F(2.0) * z) * _SHRINK
        twx, twy, twz = tx * w, ty * w, tz * w
        txx, txy, txz = tx * x, ty * x, tz * x
        tyy, tyz, tzz = ty * y, tz * y, tz * z
        r00 = (_F(1.0) - (tyy + tzz)) * _SHRINK
        r10 = (txy + twz) * _SHRINK
        r21 = (tyz + twx) * _SHRINK
        r22 = (_F(1.0) - (txx + tyy)) * _SHRINK
        r20 = (txz - twy) * _SHRINK
        r01 = (txy - twz) * _SHRINK
        r02 = (txz + twy) * _SHRINK

        # General case.
        theta_y = -_asin(r20)
        s = _sign0(_cos(theta_y))
        r00e = _sign0(r00) * _EPS + r00
        r22e = _sign0(r22) * _EPS + r22
        general = np.stack([_atan2(r21 * s, r22e * s), theta_y, _atan2(r10 * s, r00e * s)], axis=-1)
        # Gimbal lock.
        s20 = _sign0(r20)
        r02e = _sign0(r02) * _EPS + r02
        gimbal = np.stack([_atan2(-s20 * r01, -s20 * r02e), -s20 * _HALF_PI, np.zeros_like(r20)], axis=-1)
        is_gimbal = np.abs(np.abs(r20) - _F(1.0)) < _GIMBAL_TOL
    return np.where(is_gimbal[:, None], gimbal, general).astype(np.float32)
