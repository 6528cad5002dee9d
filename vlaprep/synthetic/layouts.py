"""Synthetic RLDS datasets in the real on-disk layout of any OXE dataset OpenVLA knows, written by TFDS.

``generate_layout_rlds(output_dir, "kuka")`` writes ``output_dir/kuka/1.0.0/`` (``dataset_info.json``,
``features.json``, TFRecord shards per split) whose step features are exactly those of
``oxe_layouts.json`` (a copy of ``shared/reference/oxe_layouts.json``): every key with its shape, dtype and
encoding (ZLIB-compressed tensors for kuka, JPEG / PNG / TFDS-default images, Text or string language,
Language Table's int32 code points), the splits the dataset ships, and its episode metadata. Only images
are small: the longer side is ``image_size``, the aspect ratio and channel count are the layout's.

The values exercise the transforms rather than look like robots:

- every float column takes two values in three from ``SPECIAL_VALUES``, cycling through them over the
  dataset's steps in order: the gripper thresholds of OpenVLA's transforms and their float32 neighbours
  (binarize 0.05 / 0.95, rel2abs +-0.1, clip 0 / 1), in-between and out-of-range values (-1.5 ... 2.0),
  so every column holds each of them once the dataset has ``1.5 * len(SPECIAL_VALUES)`` (~40) steps;
  the other values are N(0, 0.5);
- quaternion slices named by the layout (``action[3:7] is a quaternion (x, y, z, w)``) hold unit
  quaternions, including the identity, 180-degree turns and both gimbal locks (r20 = -1 and +1);
- int tensors are 0 / 1, bools are random;
- episode ``k`` has 1, 2, 3 steps for k = 0, 1, 2 (Bridge keeps 0 steps of a 2-step episode; OpenVLA's
  Bridge gripper scan fails on 1 step), then ``min(max_steps, 4 + k % (max_steps - 3))`` steps;
- the instruction is empty in episodes with ``k % 3 == 1``; in episode 3 it changes along the episode
  (step 0 empty, later steps not), for readers that keep per-step language;
- the first split holds every episode but the last ``round(episodes / 4)`` (at least one when the layout
  has a second split and there are 2+ episodes), which go to the layout's second split.

Everything is a deterministic function of ``seed`` (identical TFRecord bytes).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import re
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

VERSION = "1.0.0"
LAYOUTS_FILE = pathlib.Path(__file__).with_name("oxe_layouts.json")
MAX_IMAGE_SIZE = 4096
_QUATERNION_NOTE = re.compile(r"(\w+)\[(\d+):(\d+)\] is a quaternion \(x, y, z, w\)")
_BOOKKEEPING = ("is_first", "is_last", "is_terminal", "reward", "discount")
INSTRUCTIONS = ("Pick up the red block", "put the Spoon in the pot", "open the drawer", "Wipe the table.")


@functools.cache
def layouts() -> dict[str, dict]:
    """Every OXE layout (``oxe_layouts.json``'s ``datasets``), by OpenVLA's dataset name."""
    with open(LAYOUTS_FILE, encoding="utf-8") as f:
        return json.load(f)["datasets"]


def layout(name: str) -> dict:
    try:
        return layouts()[name]
    except KeyError:
        raise KeyError(
            f"expected an OXE layout name, got {name!r}; known: {sorted(layouts())!r}; hint: names are OpenVLA's "
            f"OXE_DATASET_CONFIGS keys"
        ) from None


def flat_key(path: list[str]) -> str:
    """A layout path as the flattened step key the sources and transforms use."""
    return "/".join(path)


def quaternion_slices(spec: Mapping) -> dict[str, tuple[int, int]]:
    """``{step key: (start, stop)}`` of the quaternions the layout's note names (OpenVLA converts them)."""
    return {m[1]: (int(m[2]), int(m[3])) for m in _QUATERNION_NOTE.finditer(spec.get("note", ""))}


def image_shape(shape: list[int], image_size: int) -> tuple[int, int, int]:
    """The layout's ``[H, W, C]`` scaled so the longer side is ``image_size`` (aspect kept, >= 1 px)."""
    h, w, c = shape
    scale = image_size / max(h, w)
    return max(1, round(h * scale)), max(1, round(w * scale)), c


# ----------------------------------------------------------------------------------------------
# Features
# ----------------------------------------------------------------------------------------------


def _feature(f: Mapping, image_size: int):
    kind = f["kind"]
    if kind == "tensor":
        encoding = tfds.features.Encoding.ZLIB if f.get("encoding") == "zlib" else tfds.features.Encoding.NONE
        return tfds.features.Tensor(shape=tuple(f["shape"]), dtype=np.dtype(f["dtype"]), encoding=encoding)
    if kind == "image":
        dtype = np.dtype(f["dtype"])
        encoding = f.get("encoding") or ("png" if dtype != np.uint8 else None)  # None: TFDS's default (PNG)
        return tfds.features.Image(shape=image_shape(f["shape"], image_size), dtype=dtype, encoding_format=encoding)
    if kind == "text":
        return tfds.features.Text()
    if kind == "string":
        return tfds.features.Tensor(shape=(), dtype=np.object_)
    raise ValueError(f"expected feature kind tensor, image, text or string, got {kind!r} for {f['path']!r}")


def _nest(entries: list[Mapping], image_size: int) -> dict:
    tree: dict = {}
    for f in entries:
        node = tree
        *parents, leaf = f["path"]
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = _feature(f, image_size)

    def to_features(node):
        return tfds.features.FeaturesDict({k: to_features(v) if isinstance(v, dict) else v for k, v in node.items()})

    return {k: to_features(v) if isinstance(v, dict) else v for k, v in tree.items()}


def features(spec: Mapping, image_size: int) -> tfds.features.FeaturesDict:
    top = {"steps": tfds.features.Dataset(_nest(spec["features"], image_size))}
    if spec["episode_metadata"]:
        top["episode_metadata"] = tfds.features.FeaturesDict(_nest(spec["episode_metadata"], image_size))
    return tfds.features.FeaturesDict(top)


# ----------------------------------------------------------------------------------------------
# Values
# ----------------------------------------------------------------------------------------------


def _around(v: float) -> list[float]:
    """v and its float32 neighbours (thresholds are compared in float32)."""
    v32 = np.float32(v)
    return [float(np.nextafter(v32, np.float32(-np.inf))), float(v32), float(np.nextafter(v32, np.float32(np.inf)))]


# Gripper thresholds of OpenVLA's transforms (binarize 0.05 / 0.95, rel2abs +-0.1, clip at 0 and 1), their
# neighbours, in-between and out-of-range values.
SPECIAL_VALUES = tuple(
    sorted({*_around(0.05), *_around(0.95), *_around(0.1), *_around(-0.1), *_around(0.0), *_around(1.0),
            -1.5, -1.0, -0.5, 0.3, 0.5, 0.7, 1.5, 2.0})
)


def _unit_quaternions(rng: np.random.Generator, n: int) -> np.ndarray:
    """``[n, 4]`` (x, y, z, w): special rotations first (identity, 180-degree turns, both gimbal locks),
    then uniformly random ones, each scaled to unit norm in float64."""
    s = np.sqrt(0.5)
    special = np.array(
        [[0, 0, 0, 1], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, s, 0, s], [0, -s, 0, s], [0.5, 0.5, 0.5, -0.5]]
    )
    q = rng.normal(size=(n, 4))
    take = rng.random(n) < 0.4
    q[take] = special[rng.integers(len(special), size=int(take.sum()))]
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def _floats(rng: np.random.Generator, shape: tuple[int, ...], dtype, offset: int) -> np.ndarray:
    """``[n, ...]`` values for dataset steps ``offset .. offset+n-1``: at global step g, column j is special
    when ``(g + j) % 3 != 2``, the next value of the pool in that column's cycle; else N(0, 0.5)."""
    n = shape[0]
    values = rng.normal(0.0, 0.5, size=(n, int(np.prod(shape[1:], dtype=np.int64))))
    g = np.arange(offset, offset + n)[:, None]
    j = np.arange(values.shape[1])[None, :]
    special = (g + j) % 3 != 2
    seen = g - (g + j + 1) // 3 + (j + 1) // 3  # specials of this column before step g
    pool = np.asarray(SPECIAL_VALUES)
    values = np.where(special, pool[(seen + j) % len(pool)], values)
    return values.reshape(shape).astype(dtype)


def _tensor(
    rng: np.random.Generator, f: Mapping, n: int, quaternion: tuple[int, int] | None, offset: int = 0
) -> np.ndarray:
    shape, dtype = (n, *f["shape"]), np.dtype(f["dtype"])
    if dtype.kind == "f":
        values = _floats(rng, shape, dtype, offset)
        if quaternion is not None:
            a, b = quaternion
            values[:, a:b] = _unit_quaternions(rng, n).astype(dtype)
        return values
    if dtype.kind == "b":
        return rng.random(shape) < 0.5
    if dtype.kind in "iu":
        return rng.integers(0, 2, size=shape).astype(dtype)
    raise ValueError(f"expected a numeric dtype, got {dtype} for {f['path']!r}")


def _image(rng: np.random.Generator, f: Mapping, n: int, image_size: int) -> np.ndarray:
    shape, dtype = (n, *image_shape(f["shape"], image_size)), np.dtype(f["dtype"])
    if dtype.kind == "f":
        return rng.random(shape).astype(dtype)
    return rng.integers(0, np.iinfo(dtype).max, size=shape, endpoint=True).astype(dtype)


def _codepoints(text: str, width: int) -> np.ndarray:
    points = [ord(c) for c in text][:width]
    return np.array(points + [0] * (width - len(points)), dtype=np.int32)


def _set(tree: dict, path: list[str], value) -> None:
    for part in path[:-1]:
        tree = tree.setdefault(part, {})
    tree[path[-1]] = value


@dataclasses.dataclass(frozen=True)
class EpisodePlan:
    """Which episodes exist, their lengths, splits and instructions (see the module doc)."""

    name: str
    layout_name: str
    seed: int
    image_size: int
    episodes: int
    max_steps: int

    def num_steps(self, k: int) -> int:
        if k < 3:
            return k + 1
        return min(self.max_steps, 4 + k % max(1, self.max_steps - 3))

    def offset(self, k: int) -> int:
        """Steps of the episodes before ``k`` (their global step numbering)."""
        return sum(self.num_steps(i) for i in range(k))

    def instruction(self, k: int) -> str:
        return "" if k % 3 == 1 else INSTRUCTIONS[k % len(INSTRUCTIONS)]

    def step_instructions(self, k: int) -> list[str]:
        text = self.instruction(k)
        if k == 3 and text:
            return [""] + [text] * (self.num_steps(k) - 1)
        return [text] * self.num_steps(k)

    def splits(self) -> dict[str, tuple[int, ...]]:
        names = layout(self.layout_name)["splits"]
        n_second = 0
        if len(names) > 1 and self.episodes >= 2:
            n_second = min(self.episodes - 1, max(1, round(self.episodes / 4)))
        out = {names[0]: tuple(range(self.episodes - n_second))}
        if n_second:
            out[names[1]] = tuple(range(self.episodes - n_second, self.episodes))
        return out

    def example(self, k: int, split: str) -> dict[str, Any]:
        spec = layout(self.layout_name)
        rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(k,)))
        n = self.num_steps(k)
        language_path = spec["language"]["key"]
        quaternions = quaternion_slices(spec)
        texts = self.step_instructions(k)
        columns: dict[str, Any] = {}
        for f in spec["features"]:
            key, path = flat_key(f["path"]), f["path"]
            if path == language_path:
                if spec["language"]["kind"] == "int32_codepoints":
                    columns[key] = np.stack([_codepoints(t, f["shape"][0]) for t in texts])
                else:
                    columns[key] = list(texts)
            elif key == "is_first":
                columns[key] = np.arange(n) == 0
            elif key in ("is_last", "is_terminal"):
                columns[key] = np.arange(n) == n - 1
            elif key == "reward":
                columns[key] = (np.arange(n) == n - 1).astype(f["dtype"])
            elif key == "discount":
                columns[key] = np.ones(n, dtype=f["dtype"])
            elif f["kind"] in ("text", "string"):
                columns[key] = [f"{path[-1]} {k}.{t}" for t in range(n)]
            elif f["kind"] == "image":
                columns[key] = _image(rng, f, n, self.image_size)
            else:
                columns[key] = _tensor(rng, f, n, quaternions.get(key), self.offset(k))
        steps = []
        for t in range(n):
            step: dict = {}
            for f in spec["features"]:
                _set(step, f["path"], columns[flat_key(f["path"])][t])
            steps.append(step)
        example: dict[str, Any] = {"steps": steps}
        if spec["episode_metadata"]:
            meta: dict = {}
            for f in spec["episode_metadata"]:
                if f["kind"] in ("text", "string"):
                    value = f"synthetic/{self.name}/{split}/traj{k:07d}"
                elif f["kind"] == "tensor":
                    value = _tensor(rng, f, 1, None)[0]
                else:
                    value = _image(rng, f, 1, self.image_size)[0]
                _set(meta, f["path"], value)
            example["episode_metadata"] = meta
        return example


class _LayoutBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Writes the episodes of an ``EpisodePlan``; a subclass per call sets ``name`` and ``_plan``."""

    VERSION = tfds.core.Version(VERSION)
    RELEASE_NOTES = {str(VERSION): "Synthetic episodes in an OXE dataset's layout (vlaprep.synthetic.layouts)."}
    _plan: EpisodePlan
    _num_shards: int | None
    _only_split: str | None = None

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                f"Synthetic RLDS episodes in the layout of OXE dataset {self._plan.layout_name!r} "
                f"(seed {self._plan.seed}); values exercise OpenVLA's transforms."
            ),
            features=features(layout(self._plan.layout_name), self._plan.image_size),
            homepage="https://github.com/vlaprep",
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        splits = self._plan.splits()
        chosen = [self._only_split] if self._only_split else list(splits)
        return {split: self._generate_examples(split, splits[split]) for split in chosen}

    def _generate_examples(self, split: str, ids: tuple[int, ...]) -> Iterator[tuple[str, dict]]:
        for k in ids:
            yield f"{split}_{k:07d}", self._plan.example(k, split)

    def _generate_splits(self, dl_manager, download_config):
        # TFDS refuses more shards than examples and shares num_shards across splits: one split at a time.
        infos = []
        for split, ids in self._plan.splits().items():
            self._only_split = split
            try:
                shards = max(1, min(self._num_shards or 1, len(ids)))
                config = dataclasses.replace(download_config, num_shards=shards)
                infos.extend(super()._generate_splits(dl_manager, config))
            finally:
                self._only_split = None
        return infos


def check_sizes(episodes: int, image_size: int, num_shards: int | None, max_steps: int = 8) -> None:
    """ValueError with the bad value unless every size is possible."""
    if isinstance(episodes, bool) or not isinstance(episodes, int) or episodes < 1:
        raise ValueError(f"expected episodes >= 1, got {episodes!r}")
    if not isinstance(image_size, int) or not 1 <= image_size <= MAX_IMAGE_SIZE:
        raise ValueError(f"expected 1 <= image_size <= {MAX_IMAGE_SIZE}, got {image_size!r}")
    if num_shards is not None and (not isinstance(num_shards, int) or num_shards < 1):
        raise ValueError(f"expected num_shards >= 1 or None, got {num_shards!r}")
    if not isinstance(max_steps, int) or max_steps < 3:
        raise ValueError(f"expected max_steps >= 3 (episodes 0-2 have 1-3 steps), got {max_steps!r}")


def generate_layout_rlds(
    output_dir: str | pathlib.Path,
    layout_name: str,
    name: str | None = None,
    episodes: int = 8,
    seed: int = 0,
    image_size: int = 8,
    num_shards: int | None = None,
    max_steps: int = 8,
    progress: bool = False,
) -> pathlib.Path:
    """Writes ``output_dir/<name>/1.0.0`` in the layout of OXE dataset ``layout_name``; returns that dir.

    Args:
      output_dir: TFDS data dir; ``output_dir/<name>/1.0.0`` must not exist.
      layout_name: an OpenVLA dataset name (``layouts()``), e.g. ``"kuka"``, ``"libero_10_no_noops"``.
      name: dataset folder and shard prefix (default ``layout_name``, what ``--mixture`` resolution expects).
      episodes: episode count over all splits (ids 0..episodes-1; see the module doc for lengths).
      seed: everything is a deterministic function of the seed.
      image_size: longer side of every image, 1..4096 (aspect ratio and channels from the layout).
      num_shards: TFRecord shards per split (capped at the split's episode count); default 1.
      max_steps: longest episode (>= 3).
    """
    layout(layout_name)  # KeyError naming the known layouts
    check_sizes(episodes, image_size, num_shards, max_steps)
    name = name or layout_name
    output_dir = pathlib.Path(output_dir)
    version_dir = output_dir / name / VERSION
    if version_dir.exists():
        raise FileExistsError(f"{version_dir} already exists; remove it or choose another output_dir or name")
    plan = EpisodePlan(name, layout_name, int(seed), int(image_size), int(episodes), int(max_steps))
    builder_cls = type(
        f"SyntheticLayout_{name}",
        (_LayoutBuilder,),
        {"name": name, "_plan": plan, "_num_shards": num_shards, "__module__": __name__},
        skip_registration=True,
    )
    builder = builder_cls(data_dir=str(output_dir))
    previous = getattr(tfds.core.utils.tqdm_utils, "_active", True)
    tfds.display_progress_bar(progress)
    try:
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(
                try_download_gcs=False, compute_stats=tfds.download.ComputeStatsMode.SKIP
            )
        )
    finally:
        tfds.display_progress_bar(previous)
    return version_dir
