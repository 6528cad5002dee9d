"""The dataset registry: an explicit dict of frozen ``DatasetSpec``s, one per dataset name.

A spec says how to read a dataset (source format, camera / language / numeric step keys with their
per-step shapes) and how to turn its steps into a ``Trajectory`` (the transform, action encoding,
normalization mask, OpenVLA's ``state_obs_keys``). Built-in entries: every dataset of OpenVLA's
``OXE_DATASET_CONFIGS`` under OpenVLA's name, in its order (``oxe/configs.py``; keys are flattened RLDS
step keys: ``observation/image_0``), then the CALVIN variants. Step shapes come from each dataset's
features.json (``shared/reference/oxe_layouts.json``); ``check_step_shapes`` compares them with a
dataset's own features.json at run time. Users add datasets without code through a YAML file
(``load_registry_yaml``), whose entries become ``GenericTransform`` specs. Registering a name twice is an
error.

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

from vlaprep.transforms import calvin, droid, libero, oxe, oxe_converted
from vlaprep.transforms import steps as steps_lib
from vlaprep.transforms.base import ActionEncoding, SourceFormat, Trajectory, TransformError
from vlaprep.transforms.gripper import (
    binarize_gripper_actions,
    invert_gripper_actions,
    rel2abs_gripper_actions,
)

SOURCE_FORMATS = tuple(f.value for f in SourceFormat)  # ("rlds", "calvin"): what YAML's `format:` accepts
# Camera roles a spec may fill, in OpenVLA's ``image_obs_keys`` order (primary, secondary, wrist).
CAMERA_ROLES = ("primary", "secondary", "wrist")
# OpenVLA's groups of OXE_DATASET_CONFIGS (its section comments), plus vlaprep's own.
GROUPS = ("oxe", "tdroid", "droid_finetuning", "libero", "calvin", "custom")
# Action encodings OpenVLA trains on (``make_oxe_dataset_kwargs`` refuses the others).
OPENVLA_TRAINABLE_ENCODINGS = (ActionEncoding.EEF_POS, ActionEncoding.EEF_R6)
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
    source_format:      a SourceFormat; "rlds" and "calvin" are accepted and coerced
    primary_image:      step key of the primary camera (``observation/image_0``; CALVIN ``rgb_static``)
    wrist_image:        step key of the wrist camera, or None
    language_key:       per-step key holding the instruction, or None (CALVIN: from annotations)
    required_keys:      every step key the transform reads; sources decode only these (+ images, language)
    action_encoding:    what the action vector means
    action_dim:         D of the transform's ``action: [T, D]``
    normalization_mask: ``[D]`` bools, False = left raw by normalization (the gripper)
    secondary_image:    step key of the secondary camera, or None
    state_obs_keys:     OpenVLA's ``state_obs_keys``: the names the proprio concatenates (after its
                        transform), ``None`` = one zero column; () when the dataset has no such config
    step_shapes:        ((key, per-step shape or None), ...) for required_keys, from the dataset's
                        features.json; None = width not established (read from the data)
    group:              one of GROUPS (OpenVLA's sections of its dataset configs)
    """

    name: str
    transform: Callable[[Mapping[str, np.ndarray]], Trajectory]
    source_format: SourceFormat
    primary_image: str | None
    wrist_image: str | None
    language_key: str | None
    required_keys: tuple[str, ...]
    action_encoding: ActionEncoding
    action_dim: int
    normalization_mask: tuple[bool, ...]
    secondary_image: str | None = None
    state_obs_keys: tuple[str | None, ...] = ()
    step_shapes: tuple[tuple[str, tuple[int, ...] | None], ...] = ()
    group: str = "custom"

    def __post_init__(self):
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name) or ".." in self.name:
            raise ValueError(
                f"expected a dataset name matching {_NAME_RE.pattern} without '..', got {self.name!r}; "
                f"hint: names become file and statistics keys"
            )
        where = f"for dataset {self.name!r}"
        if not callable(self.transform):
            raise ValueError(f"expected a callable transform, got {self.transform!r} {where}")
        try:
            object.__setattr__(self, "source_format", SourceFormat(self.source_format))
        except ValueError as e:
            raise ValueError(
                f"expected source_format one of {list(SOURCE_FORMATS)!r}, got {self.source_format!r} {where}"
            ) from e
        for field in ("primary_image", "wrist_image", "language_key", "secondary_image"):
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
        object.__setattr__(self, "state_obs_keys", tuple(self.state_obs_keys))
        if not all(k is None or (isinstance(k, str) and k) for k in self.state_obs_keys):
            raise ValueError(f"expected state_obs_keys to be non-empty strs or None, got {self.state_obs_keys!r} {where}")
        shapes = tuple(self.step_shapes.items()) if isinstance(self.step_shapes, Mapping) else tuple(self.step_shapes)
        shapes = tuple((k, None if s is None else tuple(int(d) for d in s)) for k, s in shapes)
        object.__setattr__(self, "step_shapes", shapes)
        unknown = [k for k, _ in shapes if k not in self.required_keys]
        if unknown:
            raise ValueError(
                f"expected step_shapes keys among required_keys {list(self.required_keys)!r}, got {unknown!r} {where}"
            )
        if self.group not in GROUPS:
            raise ValueError(f"expected group one of {list(GROUPS)!r}, got {self.group!r} {where}")

    @property
    def openvla_trainable(self) -> bool:
        """False for JOINT_POS datasets (berkeley_mvp, berkeley_rpt, roboset): OpenVLA refuses to load them
        for training (``make_oxe_dataset_kwargs``); vlaprep still computes their statistics and shards."""
        return self.action_encoding in OPENVLA_TRAINABLE_ENCODINGS

    @property
    def cameras(self) -> dict[str, str]:
        """``{role: step key}`` for each camera the dataset has, in ``CAMERA_ROLES`` order."""
        keys = {"primary": self.primary_image, "secondary": self.secondary_image, "wrist": self.wrist_image}
        return {role: key for role, key in keys.items() if key is not None}

    def camera_key(self, role: str) -> str | None:
        """The step key of camera ``role`` (one of ``CAMERA_ROLES``), or None if the dataset has none."""
        if role not in CAMERA_ROLES:
            raise ValueError(f"expected a camera role among {sorted(CAMERA_ROLES)!r}, got {role!r}")
        return self.cameras.get(role)

    def fingerprint(self) -> str:
        """sha256 hex over the spec's fields and the source of every ``transforms/*.py`` file.

        Any change to a field, the transform, or a helper it may call changes the fingerprint, so
        cached outputs keyed by it are never reused across code changes.
        """
        fields = {
            "name": self.name,
            "transform": _transform_identity(self.transform),
            "source_format": self.source_format.value,
            "primary_image": self.primary_image,
            "wrist_image": self.wrist_image,
            "language_key": self.language_key,
            "required_keys": list(self.required_keys),
            "action_encoding": self.action_encoding.value,
            "action_dim": self.action_dim,
            "normalization_mask": list(self.normalization_mask),
            "secondary_image": self.secondary_image,
            "state_obs_keys": list(self.state_obs_keys),
            "step_shapes": [[k, None if s is None else list(s)] for k, s in self.step_shapes],
            "group": self.group,
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
        steps_lib.require_keys(steps, self.required_keys, name)
        action_parts = {k: steps_lib.read_matrix(steps, k, name) for k in self.action_keys}
        state_parts = {k: steps_lib.read_matrix(steps, k, name) for k in self.state_keys}
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
_RTX_LANGUAGE = "observation/natural_language_instruction"  # RT-X layouts: language under observation
_STEP_LANGUAGE = "language_instruction"  # converted / later datasets: a step-level key


def _oxe(
    name: str,
    transform: Callable,
    shapes: Mapping,
    cameras: tuple[str | None, str | None, str | None],
    state_obs_keys: tuple,
    language: str = _STEP_LANGUAGE,
    group: str = "oxe",
    encoding: ActionEncoding = ActionEncoding.EEF_POS,
    action_dim: int = 7,
) -> DatasetSpec:
    """An OXE entry: ``cameras`` are OpenVLA's (primary, secondary, wrist) ``image_obs_keys`` (observation
    keys), ``shapes`` the transform's ``*_SHAPES`` (step key -> per-step shape from features.json)."""
    primary, secondary, wrist = (None if c is None else f"observation/{c}" for c in cameras)
    return DatasetSpec(
        name=name,
        transform=transform,
        source_format="rlds",
        primary_image=primary,
        wrist_image=wrist,
        language_key=language,
        required_keys=tuple(shapes),
        action_encoding=encoding,
        action_dim=action_dim,
        normalization_mask=default_normalization_mask(encoding, action_dim),
        secondary_image=secondary,
        state_obs_keys=state_obs_keys,
        step_shapes=tuple(shapes.items()),
        group=group,
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
        group="calvin",
    )


_o, _c, _d, _l = oxe, oxe_converted, droid, libero
_JOINT = ActionEncoding.JOINT_POS
# OpenVLA's OXE_DATASET_CONFIGS, in its order: name, transform, step shapes, cameras (primary,
# secondary, wrist), state_obs_keys, language key. Deviations from OpenVLA's config, each for a key
# the dataset does not have: bridge_oxe's secondary "image_1" (the OXE release has only "image").
for _spec in (
    _oxe("fractal20220817_data", _o.fractal20220817_data_transform, _o.FRACTAL_SHAPES, ("image", None, None),
         _o.FRACTAL_STATE_OBS, _RTX_LANGUAGE),
    _oxe("kuka", _o.kuka_transform, _o.KUKA_SHAPES, ("image", None, None), _o.KUKA_STATE_OBS, _RTX_LANGUAGE),
    _oxe("bridge_oxe", _o.bridge_oxe_transform, _o.BRIDGE_OXE_SHAPES, ("image", None, None), _o.BRIDGE_STATE_OBS,
         _RTX_LANGUAGE),
    _oxe("bridge_orig", _o.bridge_orig_transform, _o.BRIDGE_ORIG_SHAPES, ("image_0", "image_1", None), _o.BRIDGE_STATE_OBS),
    _oxe("bridge_dataset", _o.bridge_orig_transform, _o.BRIDGE_ORIG_SHAPES, ("image_0", "image_1", None),
         _o.BRIDGE_STATE_OBS),
    _oxe("taco_play", _o.taco_play_transform, _o.TACO_PLAY_SHAPES, ("rgb_static", None, "rgb_gripper"),
         _o.TACO_JACO_STATE_OBS, _RTX_LANGUAGE),
    _oxe("jaco_play", _o.jaco_play_transform, _o.JACO_PLAY_SHAPES, ("image", None, "image_wrist"),
         _o.TACO_JACO_STATE_OBS, _RTX_LANGUAGE),
    _oxe("berkeley_cable_routing", _o.berkeley_cable_routing_transform, _o.BERKELEY_CABLE_ROUTING_SHAPES,
         ("image", "top_image", "wrist45_image"), _o.BERKELEY_CABLE_ROUTING_STATE_OBS, _RTX_LANGUAGE),
    _oxe("roboturk", _o.roboturk_transform, _o.ROBOTURK_SHAPES, ("front_rgb", None, None), _o.NO_STATE_OBS, _RTX_LANGUAGE),
    _oxe("nyu_door_opening_surprising_effectiveness", _o.nyu_door_opening_transform, _o.NYU_DOOR_OPENING_SHAPES,
         (None, None, "image"), _o.NO_STATE_OBS, _RTX_LANGUAGE),
    _oxe("viola", _o.viola_transform, _o.VIOLA_SHAPES, ("agentview_rgb", None, "eye_in_hand_rgb"), _o.VIOLA_STATE_OBS,
         _RTX_LANGUAGE),
    _oxe("berkeley_autolab_ur5", _o.berkeley_autolab_ur5_transform, _o.BERKELEY_AUTOLAB_UR5_SHAPES,
         ("image", None, "hand_image"), _o.BERKELEY_AUTOLAB_UR5_STATE_OBS, _RTX_LANGUAGE),
    _oxe("toto", _o.toto_transform, _o.TOTO_SHAPES, ("image", None, None), _o.TOTO_STATE_OBS, _RTX_LANGUAGE),
    # Language Table stores its instruction as int32 UTF-8 code points padded with 0 ([T, 512]);
    # the source must decode it (OpenVLA: unicode_encode, split at "\x00").
    _oxe("language_table", _o.language_table_transform, _o.LANGUAGE_TABLE_SHAPES, ("rgb", None, None),
         _o.LANGUAGE_TABLE_STATE_OBS, "observation/instruction"),
    _oxe("columbia_cairlab_pusht_real", _o.columbia_pusht_transform, _o.COLUMBIA_PUSHT_SHAPES,
         ("image", None, "wrist_image"), _o.COLUMBIA_PUSHT_STATE_OBS, _RTX_LANGUAGE),
    _oxe("stanford_kuka_multimodal_dataset_converted_externally_to_rlds", _c.stanford_kuka_multimodal_transform,
         _c.STANFORD_KUKA_MULTIMODAL_SHAPES, ("image", None, None), _c.STANFORD_KUKA_MULTIMODAL_STATE_OBS),
    _oxe("nyu_rot_dataset_converted_externally_to_rlds", _c.nyu_rot_transform, _c.NYU_ROT_SHAPES, ("image", None, None),
         _c.EEF_GRIPPER_STATE_OBS),
    _oxe("stanford_hydra_dataset_converted_externally_to_rlds", _c.stanford_hydra_transform, _c.STANFORD_HYDRA_SHAPES,
         ("image", None, "wrist_image"), _c.EEF_GRIPPER_STATE_OBS),
    _oxe("austin_buds_dataset_converted_externally_to_rlds", _c.austin_buds_transform, _c.AUSTIN_BUDS_SHAPES,
         ("image", None, "wrist_image"), _c.STATE_STATE_OBS),
    _oxe("nyu_franka_play_dataset_converted_externally_to_rlds", _c.nyu_franka_play_transform, _c.NYU_FRANKA_PLAY_SHAPES,
         ("image", "image_additional_view", None), _c.NYU_FRANKA_PLAY_STATE_OBS),
    _oxe("maniskill_dataset_converted_externally_to_rlds", _c.maniskill_transform, _c.MANISKILL_SHAPES,
         ("image", None, "wrist_image"), _c.MANISKILL_STATE_OBS),
    _oxe("furniture_bench_dataset_converted_externally_to_rlds", _c.furniture_bench_transform, _c.FURNITURE_BENCH_SHAPES,
         ("image", None, "wrist_image"), _c.STATE_STATE_OBS),
    _oxe("cmu_franka_exploration_dataset_converted_externally_to_rlds", _c.cmu_franka_exploration_transform,
         _c.CMU_FRANKA_EXPLORATION_SHAPES, ("highres_image", None, None), _c.NO_STATE_OBS),
    _oxe("ucsd_kitchen_dataset_converted_externally_to_rlds", _c.ucsd_kitchen_transform, _c.UCSD_KITCHEN_SHAPES,
         ("image", None, None), _c.UCSD_KITCHEN_STATE_OBS),
    _oxe("ucsd_pick_and_place_dataset_converted_externally_to_rlds", _c.ucsd_pick_and_place_transform,
         _c.UCSD_PICK_AND_PLACE_SHAPES, ("image", None, None), _c.EEF_GRIPPER_STATE_OBS),
    _oxe("austin_sailor_dataset_converted_externally_to_rlds", _c.austin_sailor_transform, _c.AUSTIN_SAILOR_SHAPES,
         ("image", None, "wrist_image"), _c.STATE_STATE_OBS),
    _oxe("austin_sirius_dataset_converted_externally_to_rlds", _c.austin_sirius_transform, _c.AUSTIN_SIRIUS_SHAPES,
         ("image", None, "wrist_image"), _c.STATE_STATE_OBS),
    _oxe("bc_z", _o.bc_z_transform, _o.BC_Z_SHAPES, ("image", None, None), _o.BC_Z_STATE_OBS, _RTX_LANGUAGE),
    _oxe("utokyo_pr2_opening_fridge_converted_externally_to_rlds", _c.utokyo_pr2_transform, _c.UTOKYO_PR2_SHAPES,
         ("image", None, None), _c.EEF_GRIPPER_STATE_OBS),
    _oxe("utokyo_pr2_tabletop_manipulation_converted_externally_to_rlds", _c.utokyo_pr2_transform, _c.UTOKYO_PR2_SHAPES,
         ("image", None, None), _c.EEF_GRIPPER_STATE_OBS),
    _oxe("utokyo_xarm_pick_and_place_converted_externally_to_rlds", _c.utokyo_xarm_pick_and_place_transform,
         _c.UTOKYO_XARM_PICK_AND_PLACE_SHAPES, ("image", "image2", "hand_image"), _c.UTOKYO_XARM_PICK_AND_PLACE_STATE_OBS),
    _oxe("utokyo_xarm_bimanual_converted_externally_to_rlds", _c.utokyo_xarm_bimanual_transform,
         _c.UTOKYO_XARM_BIMANUAL_SHAPES, ("image", None, None), _c.UTOKYO_XARM_BIMANUAL_STATE_OBS),
    _oxe("robo_net", _c.robo_net_transform, _c.ROBO_NET_SHAPES, ("image", "image1", None), _c.EEF_GRIPPER_STATE_OBS),
    _oxe("berkeley_mvp_converted_externally_to_rlds", _c.berkeley_mvp_transform, _c.BERKELEY_MVP_SHAPES,
         (None, None, "hand_image"), _c.BERKELEY_MVP_STATE_OBS, encoding=_JOINT, action_dim=8),
    _oxe("berkeley_rpt_converted_externally_to_rlds", _c.berkeley_rpt_transform, _c.BERKELEY_RPT_SHAPES,
         (None, None, "hand_image"), _c.BERKELEY_RPT_STATE_OBS, encoding=_JOINT, action_dim=8),
    _oxe("kaist_nonprehensile_converted_externally_to_rlds", _c.kaist_nonprehensile_transform,
         _c.KAIST_NONPREHENSILE_SHAPES, ("image", None, None), _c.STATE_PAD_STATE_OBS),
    _oxe("stanford_mask_vit_converted_externally_to_rlds", _c.stanford_mask_vit_transform, _c.STANFORD_MASK_VIT_SHAPES,
         ("image", None, None), _c.EEF_GRIPPER_STATE_OBS),
    _oxe("tokyo_u_lsmo_converted_externally_to_rlds", _c.tokyo_u_lsmo_transform, _c.TOKYO_U_LSMO_SHAPES,
         ("image", None, None), _c.EEF_GRIPPER_STATE_OBS),
    _oxe("dlr_sara_pour_converted_externally_to_rlds", _c.dlr_sara_pour_transform, _c.DLR_SARA_POUR_SHAPES,
         ("image", None, None), _c.STATE_PAD2_STATE_OBS),
    _oxe("dlr_sara_grid_clamp_converted_externally_to_rlds", _c.dlr_sara_grid_clamp_transform,
         _c.DLR_SARA_GRID_CLAMP_SHAPES, ("image", None, None), _c.STATE_PAD2_STATE_OBS),
    _oxe("dlr_edan_shared_control_converted_externally_to_rlds", _c.dlr_edan_shared_control_transform,
         _c.DLR_EDAN_SHARED_CONTROL_SHAPES, ("image", None, None), _c.STATE_PAD_STATE_OBS),
    _oxe("asu_table_top_converted_externally_to_rlds", _c.asu_table_top_transform, _c.ASU_TABLE_TOP_SHAPES,
         ("image", None, None), _c.EEF_GRIPPER_STATE_OBS),
    _oxe("stanford_robocook_converted_externally_to_rlds", _c.stanford_robocook_transform, _c.STANFORD_ROBOCOOK_SHAPES,
         ("image_1", "image_2", None), _c.EEF_GRIPPER_STATE_OBS),
    _oxe("imperialcollege_sawyer_wrist_cam", _c.imperialcollege_sawyer_wrist_cam_transform,
         _c.IMPERIALCOLLEGE_SAWYER_WRIST_CAM_SHAPES, ("image", None, "wrist_image"), _c.IMPERIALCOLLEGE_STATE_OBS),
    _oxe("iamlab_cmu_pickup_insert_converted_externally_to_rlds", _c.iamlab_cmu_pickup_insert_transform,
         _c.IAMLAB_CMU_PICKUP_INSERT_SHAPES, ("image", None, "wrist_image"), _c.IAMLAB_STATE_OBS),
    _oxe("uiuc_d3field", _c.uiuc_d3field_transform, _c.UIUC_D3FIELD_SHAPES, ("image_1", "image_2", None), _c.NO_STATE_OBS),
    _oxe("utaustin_mutex", _c.utaustin_mutex_transform, _c.UTAUSTIN_MUTEX_SHAPES, ("image", None, "wrist_image"),
         _c.STATE_STATE_OBS),
    _oxe("berkeley_fanuc_manipulation", _c.berkeley_fanuc_transform, _c.BERKELEY_FANUC_SHAPES,
         ("image", None, "wrist_image"), _c.BERKELEY_FANUC_STATE_OBS),
    _oxe("cmu_playing_with_food", _c.cmu_playing_with_food_transform, _c.CMU_PLAYING_WITH_FOOD_SHAPES,
         ("image", None, "finger_vision_1"), _c.STATE_PAD2_STATE_OBS),
    _oxe("cmu_play_fusion", _c.cmu_play_fusion_transform, _c.CMU_PLAY_FUSION_SHAPES, ("image", None, None),
         _c.STATE_STATE_OBS),
    _oxe("cmu_stretch", _c.cmu_stretch_transform, _c.CMU_STRETCH_SHAPES, ("image", None, None), _c.EEF_GRIPPER_STATE_OBS),
    _oxe("berkeley_gnm_recon", _c.gnm_transform, _c.GNM_SHAPES, (None, None, "image"), _c.STATE_PAD2_STATE_OBS),
    _oxe("berkeley_gnm_cory_hall", _c.gnm_transform, _c.GNM_SHAPES, (None, None, "image"), _c.STATE_PAD2_STATE_OBS),
    _oxe("berkeley_gnm_sac_son", _c.gnm_transform, _c.GNM_SHAPES, (None, None, "image"), _c.STATE_PAD2_STATE_OBS),
    _oxe("droid", _d.droid_transform, _d.DROID_SHAPES,
         ("exterior_image_1_left", "exterior_image_2_left", "wrist_image_left"), _d.DROID_STATE_OBS),
    _oxe("fmb_dataset", _c.fmb_transform, _c.FMB_SHAPES, ("image_side_1", "image_side_2", "image_wrist_1"),
         _c.PROPRIO_STATE_OBS),
    _oxe("dobbe", _c.dobbe_transform, _c.DOBBE_SHAPES, ("wrist_image", None, None), _c.PROPRIO_STATE_OBS),
    _oxe("roboset", _c.roboset_transform, _c.ROBOSET_SHAPES, ("image_left", "image_right", "image_wrist"),
         _c.PROPRIO_STATE_OBS, encoding=_JOINT, action_dim=8),
    _oxe("rh20t", _c.rh20t_transform, _c.RH20T_SHAPES, ("image_front", "image_side_right", "image_wrist"),
         _c.PROPRIO_STATE_OBS),
    *(
        _oxe(f"tdroid_{task}", _d.tdroid_transform, _d.TDROID_SHAPES, ("static_image", None, None), _d.TDROID_STATE_OBS,
             group="tdroid")
        for task in ("carrot_in_bowl", "pour_corn_in_pot", "flip_pot_upright", "move_object_onto_plate",
                     "knock_object_over", "cover_object_with_towel")
    ),
    _oxe("droid_wipe", _d.droid_wipe_transform, _d.DROID_WIPE_SHAPES, ("exterior_image_2_left", None, "wrist_image_left"),
         _d.DROID_STATE_OBS, group="droid_finetuning"),
    *(
        _oxe(f"libero_{suite}_no_noops", _l.libero_transform, _l.LIBERO_SHAPES, ("image", None, "wrist_image"),
             _l.LIBERO_STATE_OBS, group="libero")
        for suite in ("spatial", "object", "goal", "10")
    ),
    _calvin("calvin", calvin.calvin_transform, calvin.CALVIN_KEYS),
    _calvin("calvin_recomputed", calvin.calvin_recomputed_transform, calvin.CALVIN_RECOMPUTED_KEYS),
    _calvin("calvin_robovlms", calvin.calvin_robovlms_transform, calvin.CALVIN_KEYS),
):
    register(_spec)
del _spec, _o, _c, _d, _l


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
    if entry.get("format") != SourceFormat.CALVIN:
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
