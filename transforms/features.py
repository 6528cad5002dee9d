"""A dataset's own ``features.json`` (TFDS) against what its registry entry reads (pure Python + JSON).

The registry's per-step shapes (``DatasetSpec.step_shapes``) come from the published layouts; a dataset
on disk may differ (another release, a re-conversion). ``check_step_shapes`` compares the two before any
episode is read, so a wrong width fails once, naming the key, instead of quarantining every episode.
Keys whose width is not established (``None``: ``status: assumed`` layouts) are only checked for presence:
their width is whatever the dataset's features.json says.

``step_features`` flattens the ``steps`` features of a features.json document (TFDS's protobuf JSON:
``featuresDict`` / ``sequence`` / ``tensor`` / ``image`` / ``text`` nodes) into
``{"observation/state": {"kind": "tensor", "shape": (7,), "dtype": "float32", "encoding": "none"}, ...}``
with the same flattened keys as the sources use (``/``-joined; a FeaturesDict key may itself hold ``/``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

from vlaprep.transforms.steps import shape_width


class FeatureMismatchError(ValueError):
    """A dataset's features.json lacks a key its registry entry reads, or stores another width."""


def _leaves(node: Mapping, prefix: str, out: dict) -> None:
    if "featuresDict" in node:
        for name, child in node["featuresDict"]["features"].items():
            _leaves(child, f"{prefix}{name}/", out)
        return
    if "sequence" in node:  # tfds.features.Dataset / Sequence: per-step features
        _leaves(node["sequence"]["feature"], prefix, out)
        return
    key = prefix[:-1]
    if "tensor" in node:
        t = node["tensor"]
        dims = tuple(int(d) for d in t.get("shape", {}).get("dimensions", []))
        out[key] = {"kind": "tensor", "shape": dims, "dtype": t.get("dtype"), "encoding": t.get("encoding", "none")}
    elif "image" in node:
        t = node["image"]
        dims = tuple(int(d) for d in t.get("shape", {}).get("dimensions", []))
        out[key] = {"kind": "image", "shape": dims, "dtype": t.get("dtype"), "encoding": t.get("encodingFormat")}
    elif "text" in node:
        out[key] = {"kind": "text", "shape": (), "dtype": "string", "encoding": "none"}
    else:
        out[key] = {"kind": node.get("pythonClassName", "unknown"), "shape": None, "dtype": None, "encoding": None}


def step_features(features_json: Mapping | str | os.PathLike) -> dict[str, dict]:
    """Flattened ``steps`` features of a features.json document (or of the file at that path)."""
    if not isinstance(features_json, Mapping):
        with open(features_json, encoding="utf-8") as f:
            features_json = json.load(f)
    try:
        steps = features_json["featuresDict"]["features"]["steps"]
    except (KeyError, TypeError) as e:
        top = features_json.get("featuresDict", {}).get("features", {}) if isinstance(features_json, Mapping) else {}
        raise FeatureMismatchError(
            f"expected a TFDS features.json with a top-level 'steps' feature (RLDS), got top-level features "
            f"{sorted(top)!r}; hint: older datasets keep their features in dataset_info.json only"
        ) from e
    out: dict[str, dict] = {}
    _leaves(steps, "", out)
    return out


def check_step_shapes(spec, features_json: Mapping | str | os.PathLike) -> dict[str, int]:
    """Raise ``FeatureMismatchError`` unless every step key ``spec`` reads is in the dataset's features.json
    with the width the spec declares; returns ``{key: width}`` as stored (also for undeclared widths).

    A per-step shape ``()`` and ``(1,)`` are the same width (transforms read both as one column).
    """
    features = step_features(features_json)
    declared = dict(spec.step_shapes)
    widths = {}
    for key in spec.required_keys:
        if key not in features:
            raise FeatureMismatchError(
                f"expected step key {key!r} in the dataset's features.json, got {sorted(features)!r} for dataset "
                f"{spec.name!r}; hint: is this directory the dataset {spec.name!r}?"
            )
        shape = features[key]["shape"]
        if shape is None or len(shape) > 1:
            raise FeatureMismatchError(
                f"expected a per-step vector for key {key!r}, got shape {shape!r} in features.json for dataset "
                f"{spec.name!r}; hint: transforms read [T] or [T, W] keys"
            )
        stored = shape[0] if shape else 1
        want = shape_width(declared.get(key))
        if want is not None and stored != want:
            raise FeatureMismatchError(
                f"expected width {want} (shape {declared[key]!r}), got shape {tuple(shape)!r} for key {key!r} in "
                f"dataset {spec.name!r}'s features.json; hint: the registry entry follows the published layout: "
                f"override it with a --registry YAML entry for this release"
            )
        widths[key] = stored
    return widths
