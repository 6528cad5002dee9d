"""The dataset registry: an explicit dict of frozen ``DatasetSpec``s, one per dataset name.

A spec says how to read a dataset (source format, camera / language / numeric step keys) and how to
turn its steps into a ``Trajectory`` (the transform, action encoding, normalization mask). Built-in
entries mirror OpenVLA's ``oxe/configs.py`` (keys are flattened RLDS step keys: ``observation/image_0``).
Users add datasets without code through a YAML file (``load_registry_yaml``), whose entries become
``GenericTransform`` specs. Registering a name twice is an error.

Everything here pickles (plain functions referenced by module + name, frozen dataclasses): specs
travel to Beam workers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from vlaprep.transforms import calvin, oxe
from vlaprep.transforms.base import ActionEncoding, Trajectory, TransformError
from vlaprep.transforms.gripper import (
    binarize_gripper_actions,
    invert_gripper_actions,
    rel2abs_gripper_actions,
)

SOURCE_FORMATS = ("rlds", "calvin")
GRIPPER_MODES = ("binarize", "invert", "rel2abs", "clip01", "none")
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
# Directory whose *.py sources are hashed into every fingerprint (module-level so tests can point it
# at a modified copy).
_TRANSFORMS_DIR = Path(__file__).resolve().parent


def default_normalization_mask(encoding: ActionEncoding, action_dim: int) -> tuple[bool, ...]:
    """OpenVLA's ``action_normalization_mask``: every dim but the gripper is normalized.

    EEF_POS / JOINT_POS / EEF_R6: all True but the last (EEF_POS, 7 dims: 6 x True + False).
    JOINT_POS_BIMANUAL: each arm's half all True but its last (its gripper).
    """
    if encoding is ActionEncoding.JOINT_POS_BIMANUAL:
        if action_dim % 2:
            raise ValueError(f"expected an even action_dim for {encoding.value}, got {action_dim}")
        half = (True,) * (action_dim // 2 - 1) + (False,)
        return half + half
    return (True,) * (action_dim - 1) + (False,)


def _transform_identity(fn: Callable) -> str:
    """Stable text naming a transform: module + qualname, or the repr of a callable dataclass."""
    if dataclasses.is_dataclass(fn) and not isinstance(fn, type):
        return f"{type(fn).__module__}.{type(fn).__qualname__}:{fn!r}"
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None)
    if module and qualname:
        return f"{module}.{qualname}"
    return f"{type(fn).__module__}.{type(fn).__qualname__}:{fn!r}"


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """How to read one dataset and standardize its steps.

    name:               registry key, also the statistics key (``^[A-Za-z0-9_][A-Za-z0-9_.-]*$``, no "..")
    transform:          ``fn(steps) -> Trajectory``
    source_format:      "rlds" or "calvin"
    primary_image:      step key of the primary camera (``observation/image_0``; CALVIN ``rgb_static``)
    wrist_image:        step key of the wrist camera, or None
    language_key:       per-step key holding the instruction, or None (CALVIN: from annotations)
    required_keys:      every step key the transform reads; sources decode only these (+ images, language)
    action_encoding:    what the action vector means
    action_dim:         D of the transform's ``action: [T, D]``
    normalization_mask: ``[D]`` bools, False = left raw by normalization (the gripper)
    """

    name: str
    transform: Callable[[Mapping[str, np.ndarray]], Trajectory]
    source_format: str
    primary_image: str | None
    wrist_image: str | None
    language_key: str | None
    required_keys: tuple[str, ...]
    action_encoding: ActionEncoding
    action_dim: int
    normalization_mask: tuple[bool, ...]

    def __post_init__(self):
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name) or ".." in self.name:
            raise ValueError(
                f"expected a dataset name matching {_NAME_RE.pattern} without '..', got {self.name!r}; "
                f"hint: names become file and statistics keys"
            )
        where = f"for dataset {self.name!r}"
        if not callable(self.transform):
            raise ValueError(f"expected a callable transform, got {self.transform!r} {where}")
        if self.source_format not in SOURCE_FORMATS:
            raise ValueError(f"expected source_format one of {list(SOURCE_FORMATS)!r}, got {self.source_format!r} {where}")
        for field in ("primary_image", "wrist_image", "language_key"):
            value = getattr(self, field)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"expected {field} to be a non-empty str or None, got {value!r} {where}")
        # Lists from YAML or callers become tuples so the spec stays hashable and immutable.
        object.__setattr__(self, "required_keys", tuple(self.required_keys))
        object.__setattr__(self, "normalization_mask", tuple(self.normalization_mask))
        if not all(isinstance(k, str) and k for k in self.required_keys):
            raise ValueError(f"expected required_keys to be non-empty strs, got {self.required_keys!r} {where}")
        if not isinstance(self.action_encoding, ActionEncoding):
            raise ValueError(f"expected an ActionEncoding, got {self.action_encoding!r} {where}")
        if isinstance(self.action_dim, bool) or not isinstance(self.action_dim, int) or self.action_dim < 1:
            raise ValueError(f"expected action_dim to be a positive int, got {self.action_dim!r} {where}")
        if len(self.normalization_mask) != self.action_dim:
            raise ValueError(
                f"expected normalization_mask of length action_dim ({self.action_dim}), got "
                f"{len(self.normalization_mask)}: {self.normalization_mask!r} {where}"
            )
        if not all(isinstance(m, (bool, np.bool_)) for m in self.normalization_mask):
            raise ValueError(f"expected normalization_mask of bools, got {self.normalization_mask!r} {where}")
        object.__setattr__(self, "normalization_mask", tuple(bool(m) for m in self.normalization_mask))

    def source_keys(self) -> tuple[str, ...]:
        """Every step key a source must decode: required_keys, then cameras and language (no repeats)."""
        keys = [*self.required_keys, self.primary_image, self.wrist_image, self.language_key]
        return tuple(dict.fromkeys(k for k in keys if k is not None))

    def fingerprint(self) -> str:
        """sha256 hex over the spec's fields and the source of every ``transforms/*.py`` file.

        Any change to a field, the transform, or a helper it may call changes the fingerprint, so
        cached outputs keyed by it are never reused across code changes.
        """
        fields = {
            "name": self.name,
            "transform": _transform_identity(self.transform),
            "source_format": self.source_format,
            "primary_image": self.primary_image,
            "wrist_image": self.wrist_image,
            "language_key": self.language_key,
            "required_keys": list(self.required_keys),
            "action_encoding": self.action_encoding.value,
            "action_dim": self.action_dim,
            "normalization_mask": list(self.normalization_mask),
        }
        h = hashlib.sha256()
        _update_framed(h, json.dumps(fields, sort_keys=True).encode())
        for path in sorted(_TRANSFORMS_DIR.glob("*.py")):  # one directory: sorted by file name
            _update_framed(h, path.name.encode())
            _update_framed(h, path.read_bytes())
        return h.hexdigest()


def _update_framed(h, data: bytes) -> None:
    """Length-prefix each part so (a, bc) and (ab, c) hash differently."""
    h.update(len(data).to_bytes(8, "big"))
    h.update(data)


# --- Generic transform for YAML-defined datasets -------------------------------------------------
@dataclasses.dataclass(frozen=True)
class GenericTransform:
    """Config-driven transform: concatenated action keys, a gripper convention, concatenated state keys.

    action_keys:     step keys concatenated along the last axis (``[T]`` -> one column)
    gripper:         one of GRIPPER_MODES, applied to the last action column
                     (binarize / invert = 1 - g / rel2abs / clip01 = clip(g, 0, 1) / none)
    state_keys:      step keys concatenated into proprio; () -> proprio ``[T, 0]``
    drop_first_step: drop step 0 (e.g. an all-zero first action) before the gripper conversion
    action_dim:      when set, the concatenated width must equal it
    dataset:         name used in error messages
    """

    action_keys: tuple[str, ...]
    gripper: str = "none"
    state_keys: tuple[str, ...] = ()
    drop_first_step: bool = False
    action_dim: int | None = None
    dataset: str = "custom"

    def __post_init__(self):
        for field in ("action_keys", "state_keys"):
            if isinstance(getattr(self, field), str):  # tuple("action") would be its characters
                raise ValueError(f"expected {field} to be a sequence of keys, got the str {getattr(self, field)!r}")
        object.__setattr__(self, "action_keys", tuple(self.action_keys))
        object.__setattr__(self, "state_keys", tuple(self.state_keys or ()))
        if not self.action_keys:
            raise ValueError(f"expected at least one action key, got none for dataset {self.dataset!r}")
        if self.gripper not in GRIPPER_MODES:
            raise ValueError(
                f"expected gripper to be one of {list(GRIPPER_MODES)!r}, got {self.gripper!r} for dataset {self.dataset!r}"
            )

    @property
    def required_keys(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((*self.action_keys, *self.state_keys)))

    def __call__(self, steps: Mapping[str, np.ndarray]) -> Trajectory:
        name = f"GenericTransform for dataset {self.dataset!r}"
        oxe.require_keys(steps, self.required_keys, name)
        action_parts = {k: oxe.read_matrix(steps, k, name) for k in self.action_keys}
        state_parts = {k: oxe.read_matrix(steps, k, name) for k in self.state_keys}
        t = oxe.check_lengths(name, **{**action_parts, **state_parts})  # a key may be in both
        action = np.concatenate(list(action_parts.values()), axis=1)  # [T, D]
        if action.shape[1] == 0:
            raise TransformError(f"expected at least one action column, got shape {action.shape!r} in {name}")
        if self.action_dim is not None and action.shape[1] != self.action_dim:
            raise TransformError(
                f"expected action width {self.action_dim}, got {action.shape[1]} from keys "
                f"{list(self.action_keys)!r} in {name}; hint: fix action_dim or action_keys"
            )
        proprio = np.concatenate(list(state_parts.values()), axis=1) if state_parts else np.zeros((t, 0), np.float32)
        step_index = np.arange(t, dtype=np.int64)
        if self.drop_first_step:
            if t < 2:
                raise TransformError(
                    f"expected at least 2 steps, got {t} for {name}; hint: drop_first_step leaves T-1"
                )
            action, proprio, step_index = action[1:], proprio[1:], step_index[1:]
        action = action.copy()
        action[:, -1] = _apply_gripper(self.gripper, action[:, -1])
        return Trajectory(action=action, proprio=np.ascontiguousarray(proprio), step_index=step_index)


def _apply_gripper(mode: str, g: np.ndarray) -> np.ndarray:
    """``[T] float32`` -> ``[T] float32`` under one of GRIPPER_MODES."""
    if mode == "binarize":
        return binarize_gripper_actions(g)
    if mode == "invert":
        return invert_gripper_actions(g)
    if mode == "rel2abs":
        return rel2abs_gripper_actions(g)
    if mode == "clip01":
        return np.clip(g, 0.0, 1.0).astype(np.float32)
    return g


# --- The registry --------------------------------------------------------------------------------
REGISTRY: dict[str, DatasetSpec] = {}


def register(spec: DatasetSpec, registry: dict[str, DatasetSpec] = REGISTRY) -> DatasetSpec:
    """Add ``spec`` under its name; a name already present is an error (never a silent overwrite)."""
    if spec.name in registry:
        raise ValueError(
            f"expected a new dataset name, got {spec.name!r} which is already registered; "
            f"hint: pick another name (or set `override: true` in a YAML registry)"
        )
    registry[spec.name] = spec
    return spec


_EEF_POS_7 = default_normalization_mask(ActionEncoding.EEF_POS, 7)  # 6 x True + False


def _rlds(name, transform, keys, primary, wrist, language="observation/natural_language_instruction") -> DatasetSpec:
    return DatasetSpec(
        name=name,
        transform=transform,
        source_format="rlds",
        primary_image=primary,
        wrist_image=wrist,
        language_key=language,
        required_keys=keys,
        action_encoding=ActionEncoding.EEF_POS,
        action_dim=7,
        normalization_mask=_EEF_POS_7,
    )


def _calvin(name, transform, keys) -> DatasetSpec:
    return DatasetSpec(
        name=name,
        transform=transform,
        source_format="calvin",
        primary_image="rgb_static",
        wrist_image="rgb_gripper",
        language_key=None,  # language comes from lang_annotations/auto_lang_ann.npy
        required_keys=keys,
        action_encoding=ActionEncoding.EEF_POS,
        action_dim=7,
        normalization_mask=_EEF_POS_7,
    )


# Cameras / language as in OpenVLA's OXE_DATASET_CONFIGS (primary, wrist); OpenVLA gives Bridge no
# wrist camera. Secondary cameras are not used by OpenVLA training and are not listed.
for _spec in (
    _rlds("bridge_orig", oxe.bridge_orig_transform, oxe.BRIDGE_ORIG_KEYS, "observation/image_0", None, "language_instruction"),
    _rlds("bridge_dataset", oxe.bridge_orig_transform, oxe.BRIDGE_ORIG_KEYS, "observation/image_0", None, "language_instruction"),
    _rlds("fractal20220817_data", oxe.fractal20220817_data_transform, oxe.FRACTAL_KEYS, "observation/image", None),
    _rlds("taco_play", oxe.taco_play_transform, oxe.TACO_PLAY_KEYS, "observation/rgb_static", "observation/rgb_gripper"),
    _rlds("jaco_play", oxe.jaco_play_transform, oxe.JACO_PLAY_KEYS, "observation/image", "observation/image_wrist"),
    _rlds(
        "berkeley_cable_routing",
        oxe.berkeley_cable_routing_transform,
        oxe.BERKELEY_CABLE_ROUTING_KEYS,
        "observation/image",
        "observation/wrist45_image",
    ),
    _rlds("roboturk", oxe.roboturk_transform, oxe.ROBOTURK_KEYS, "observation/front_rgb", None),
    _rlds("viola", oxe.viola_transform, oxe.VIOLA_KEYS, "observation/agentview_rgb", "observation/eye_in_hand_rgb"),
    _rlds("toto", oxe.toto_transform, oxe.TOTO_KEYS, "observation/image", None),
    # Language Table stores its instruction as int32 UTF-8 code points padded with 0 ([T, 512]);
    # the source must decode it (OpenVLA: unicode_encode, split at "\x00").
    _rlds(
        "language_table",
        oxe.language_table_transform,
        oxe.LANGUAGE_TABLE_KEYS,
        "observation/rgb",
        None,
        "observation/instruction",
    ),
    _calvin("calvin", calvin.calvin_transform, calvin.CALVIN_KEYS),
    _calvin("calvin_recomputed", calvin.calvin_recomputed_transform, calvin.CALVIN_RECOMPUTED_KEYS),
    _calvin("calvin_robovlms", calvin.calvin_robovlms_transform, calvin.CALVIN_KEYS),
):
    register(_spec)
del _spec


def get_spec(name: str, registry: Mapping[str, DatasetSpec] | None = None) -> DatasetSpec:
    """The spec registered as ``name`` (in ``registry``, default the built-ins)."""
    registry = REGISTRY if registry is None else registry
    try:
        return registry[name]
    except KeyError:
        raise KeyError(
            f"unknown dataset {name!r}; known: {sorted(registry)!r}; hint: add it with --registry FILE"
        ) from None


# --- YAML registries -----------------------------------------------------------------------------
_YAML_FIELDS = (
    "format",
    "action_keys",
    "action_dim",
    "gripper",
    "state_keys",
    "primary_image",
    "wrist_image",
    "language_key",
    "action_encoding",
    "normalization_mask",
    "drop_first_step",
    "override",
)


class _UniqueKeySafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that rejects repeated mapping keys (plain safe_load keeps the last one,
    which would silently drop a dataset defined twice)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ValueError(f"expected unique keys, got duplicate key {key!r} (line {key_node.start_mark.line + 1})")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml_error(what: str, got: Any, name: str, path: str, hint: str = "") -> ValueError:
    msg = f"expected {what}, got {got!r} for dataset {name!r} in {path}"
    return ValueError(msg + (f"; hint: {hint}" if hint else ""))


def _str_list(entry: Mapping, field: str, name: str, path: str, required: bool) -> tuple[str, ...]:
    value = entry.get(field)
    if value is None and not required:
        return ()
    if not isinstance(value, list) or not all(isinstance(k, str) and k for k in value) or (required and not value):
        raise _yaml_error(f"{field} to be a {'non-empty ' if required else ''}list of step keys", value, name, path)
    return tuple(value)


def _opt_str(entry: Mapping, field: str, name: str, path: str) -> str | None:
    value = entry.get(field)
    if value is not None and (not isinstance(value, str) or not value):
        raise _yaml_error(f"{field} to be a step key or null", value, name, path)
    return value


def _bool(entry: Mapping, field: str, name: str, path: str) -> bool:
    value = entry.get(field, False)
    if not isinstance(value, bool):
        raise _yaml_error(f"{field} to be true or false", value, name, path)
    return value


def _spec_from_yaml(name: Any, entry: Any, path: str) -> tuple[DatasetSpec, bool]:
    """One ``datasets:`` entry -> (spec, override flag); ValueError naming the field otherwise."""
    if not isinstance(name, str):
        raise ValueError(f"expected dataset names to be strings, got {name!r} in {path}")
    if not isinstance(entry, Mapping):
        raise _yaml_error("a mapping of fields", entry, name, path)
    unknown = sorted(str(k) for k in entry if k not in _YAML_FIELDS)
    if unknown:
        raise _yaml_error(f"fields from {list(_YAML_FIELDS)!r}", unknown, name, path, "check the spelling")
    required = ["format", "action_keys", "action_dim", "gripper", "primary_image"]
    if entry.get("format") != "calvin":
        required.append("language_key")  # CALVIN language comes from annotations
    for field in required:
        if field not in entry:
            raise _yaml_error(f"field {field!r}", None, name, path, f"add `{field}:` (null where allowed)")

    fmt = entry["format"]
    if fmt not in SOURCE_FORMATS:
        raise _yaml_error(f"format to be one of {list(SOURCE_FORMATS)!r}", fmt, name, path)
    gripper = entry["gripper"]
    if gripper not in GRIPPER_MODES:
        raise _yaml_error(f"gripper to be one of {list(GRIPPER_MODES)!r}", gripper, name, path)
    action_dim = entry["action_dim"]
    if isinstance(action_dim, bool) or not isinstance(action_dim, int) or action_dim < 1:
        raise _yaml_error("action_dim to be a positive int", action_dim, name, path)
    encodings = [e.value for e in ActionEncoding]
    encoding_value = entry.get("action_encoding", ActionEncoding.EEF_POS.value)
    if encoding_value not in encodings:
        raise _yaml_error(f"action_encoding to be one of {encodings!r}", encoding_value, name, path)
    encoding = ActionEncoding(encoding_value)
    mask = entry.get("normalization_mask")
    if mask is None:
        try:
            mask = default_normalization_mask(encoding, action_dim)
        except ValueError as e:
            raise _yaml_error("an action_dim that fits action_encoding", action_dim, name, path, str(e)) from e
    elif not isinstance(mask, list) or not all(isinstance(m, bool) for m in mask) or len(mask) != action_dim:
        raise _yaml_error(f"normalization_mask to be a list of {action_dim} (action_dim) bools", mask, name, path)

    action_keys = _str_list(entry, "action_keys", name, path, required=True)
    state_keys = _str_list(entry, "state_keys", name, path, required=False)
    transform = GenericTransform(
        action_keys=action_keys,
        gripper=gripper,
        state_keys=state_keys,
        drop_first_step=_bool(entry, "drop_first_step", name, path),
        action_dim=action_dim,
        dataset=name,
    )
    try:
        spec = DatasetSpec(
            name=name,
            transform=transform,
            source_format=fmt,
            primary_image=_opt_str(entry, "primary_image", name, path),
            wrist_image=_opt_str(entry, "wrist_image", name, path),
            language_key=_opt_str(entry, "language_key", name, path),
            required_keys=transform.required_keys,
            action_encoding=encoding,
            action_dim=action_dim,
            normalization_mask=tuple(mask),
        )
    except ValueError as e:
        raise ValueError(f"{e} (in {path})") from e
    return spec, _bool(entry, "override", name, path)


def load_registry_yaml(path: str | os.PathLike) -> dict[str, DatasetSpec]:
    """Specs defined in a YAML file; each entry becomes a ``GenericTransform`` spec.

    Layout (fields without "optional" are required; ``language_key`` is optional for calvin)::

        datasets:
          my_robot:
            format: rlds                     # rlds | calvin
            action_keys: [action]            # concatenated along the last axis ([T] -> one column)
            action_dim: 7                    # width of the concatenated action
            gripper: binarize                # binarize | invert | rel2abs | clip01 | none (last column)
            state_keys: [observation/state]  # optional; concatenated -> proprio (default none, P = 0)
            primary_image: observation/image_0   # or null
            wrist_image: observation/wrist_image # optional
            language_key: language_instruction   # or null
            action_encoding: eef_pos         # optional (default eef_pos)
            normalization_mask: [true, true, true, true, true, true, false]  # optional
            drop_first_step: false           # optional
            override: false                  # optional; true to replace a built-in of that name

    A name that is also a built-in is an error unless its entry sets ``override: true``; a name
    given twice in the file is an error. Raises ValueError naming the dataset, field and file.
    """
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        try:
            doc = yaml.load(f, Loader=_UniqueKeySafeLoader)  # noqa: S506 - a SafeLoader subclass
        except (yaml.YAMLError, ValueError) as e:
            raise ValueError(f"expected a valid YAML registry, got a parse error in {path}: {e}") from e
    if not isinstance(doc, Mapping) or set(doc) != {"datasets"} or not isinstance(doc["datasets"], Mapping):
        got = sorted(map(str, doc)) if isinstance(doc, Mapping) else type(doc).__name__
        raise ValueError(
            f"expected a mapping with the single key 'datasets' holding a mapping, got {got!r} in {path}; "
            f"hint: see `load_registry_yaml`'s docstring for the layout"
        )
    out: dict[str, DatasetSpec] = {}
    for name, entry in doc["datasets"].items():
        spec, override = _spec_from_yaml(name, entry, path)
        if name in REGISTRY and not override:
            raise ValueError(
                f"expected a new dataset name, got {name!r} which is a built-in entry, in {path}; "
                f"hint: rename it or set `override: true` to replace the built-in"
            )
        register(spec, registry=out)
    return out


def merged_registry(yaml_path: str | os.PathLike | None) -> dict[str, DatasetSpec]:
    """The built-in entries plus (and, with ``override: true``, replaced by) those of ``yaml_path``."""
    merged = dict(REGISTRY)
    if yaml_path is not None:
        merged.update(load_registry_yaml(yaml_path))
    return merged
