"""Synthetic RLDS datasets written by TFDS itself, in the Bridge V2 / Open X-Embodiment layout.

`generate_rlds` writes a real TFDS dataset (``dataset_info.json``, ``features.json`` and sharded
TFRecords) through a `tfds.core.GeneratorBasedBuilder`, so readers exercise exactly the code path
they use on downloaded OXE data (`tfds.builder_from_directory(...).as_dataset(...)`).

Layout (whatever ``name`` is)::

    <output_dir>/<name>/1.0.0/
        dataset_info.json
        features.json
        <name>-train.tfrecord-00000-of-0000N ...
        <name>-val.tfrecord-00000-of-0000M ...     # absent when there is no val episode

Episode schema (Bridge V2 as in OXE ``bridge_orig``)::

    steps: Dataset of {
        observation: {image_0: [S, S, 3] uint8 JPEG, image_1: [S, S, 3] uint8 JPEG,
                      state: [7] float32  # EEF xyz (m), rpy (rad), gripper in [0, 1]
                      },
        action: [7] float32               # xyz/rpy deltas, commanded gripper in [0, 1]
        language_instruction: str,        # same for every step; "" in some episodes
        is_first, is_last, is_terminal: bool, reward, discount: float32,
    }
    episode_metadata: {file_path: str, episode_id: int32}

Semantics of the values (what a reader can rely on):
- ``action[t, :6] = state[t + 1, :6] - state[t, :6] + noise`` for ``t < T - 1`` (noise about 1e-4 m /
  1e-3 rad, plus Student-t (df=2) outliers on about 1 % of steps); the last step repeats the
  previous delta with fresh noise.
- ``action[t, 6]`` is the commanded gripper: exact 0.0 / 1.0 plateaus joined by 1-3 step ramps whose
  values lie in (0.05, 0.95); ``state[:, 6]`` follows it with a first-order lag.
- ``reward = 1.0`` and ``is_terminal = True`` on the last step only; ``discount = 1.0``.
- Episode ``k`` (``episode_metadata/episode_id == k``) has the same content for a given seed whatever
  ``episodes`` is; only its split depends on ``episodes`` (val takes the highest ids).
- TFDS shuffles example order within a split by a hash of the key, deterministically; identify
  episodes by ``episode_id``, not by position.

Other layouts: ``generate_rlds(..., layout="kuka")`` writes the real on-disk layout of any dataset of
OpenVLA's ``OXE_DATASET_CONFIGS`` instead (``vlaprep.synthetic.layouts``: every step feature with its
shape, dtype and encoding, values chosen to exercise OpenVLA's transforms); the Bridge-specific options
(fractions, step ranges, fault injection) do not apply there.

Fault injection (all off by default):
- ``nan_episodes=n``: the ``n`` train episodes with the lowest ids get one NaN in one action value.
- ``short_episodes=(0, 1, 2)``: extra train episodes (ids ``episodes, episodes + 1, ...``) with exactly
  these step counts; a 0-step episode is a valid record whose ``steps`` dataset is empty.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

VERSION = "1.0.0"
STATE_DIM = 7
ACTION_DIM = 7
EPISODES_PER_SHARD = 25
JPEG_NOTE = "TFDS encodes uint8 arrays with tf.image.encode_jpeg (quality 95)."

# Mixed case, stray punctuation and whitespace on purpose, as in real Bridge instructions.
INSTRUCTIONS: tuple[str, ...] = (
    "Put the Carrot in the pot",
    "put the spoon on the towel",
    "Move the pot to the left side of the stove",
    "open the microwave",
    "close the Drawer.",
    "PICK UP the green block",
    "wipe the table with the cloth",
    "put corn in pot which is in sink",
    "Flip the cup upright ",
    "place the eggplant on the plate",
    "push the red object to the right",
    "put the knife in the Sink",
)

# Seed-sequence spawn keys, so episode streams never collide with other streams.
_KEY_EPISODE = 1
_KEY_GLOBAL = 2
_KEY_SHORT = 3


def _features(image_size: int) -> tfds.features.FeaturesDict:
    image = lambda: tfds.features.Image(  # noqa: E731
        shape=(image_size, image_size, 3), dtype=np.uint8, encoding_format="jpeg"
    )
    return tfds.features.FeaturesDict(
        {
            "steps": tfds.features.Dataset(
                {
                    "observation": tfds.features.FeaturesDict(
                        {
                            "image_0": image(),
                            "image_1": image(),
                            "state": tfds.features.Tensor(shape=(STATE_DIM,), dtype=np.float32),
                        }
                    ),
                    "action": tfds.features.Tensor(shape=(ACTION_DIM,), dtype=np.float32),
                    "language_instruction": tfds.features.Text(),
                    "is_first": tfds.features.Scalar(dtype=np.bool_),
                    "is_last": tfds.features.Scalar(dtype=np.bool_),
                    "is_terminal": tfds.features.Scalar(dtype=np.bool_),
                    "reward": tfds.features.Scalar(dtype=np.float32),
                    "discount": tfds.features.Scalar(dtype=np.float32),
                }
            ),
            "episode_metadata": tfds.features.FeaturesDict(
                {
                    "file_path": tfds.features.Text(),
                    "episode_id": tfds.features.Scalar(dtype=np.int32),
                }
            ),
        }
    )


# ----------------------------------------------------------------------------------------------
# Episode content (pure NumPy)
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _EpisodeArrays:
    state: np.ndarray  # [T, 7] float32
    action: np.ndarray  # [T, 7] float32
    image_0: np.ndarray  # [T, S, S, 3] uint8
    image_1: np.ndarray  # [T, S, S, 3] uint8
    instruction: str


def _gripper_command(rng: np.random.Generator, num_steps: int) -> np.ndarray:
    """Commanded gripper [T] in [0, 1]: open plateau, close, maybe re-open; ramps of 1-3 steps."""
    cmd = np.ones(num_steps)
    if num_steps < 4:
        if num_steps and rng.random() < 0.5:
            cmd[:] = 0.0
        return cmd
    t_close = int(rng.integers(1, max(2, num_steps // 2)))
    t_open = int(rng.integers(t_close + 1, num_steps + 1))  # == num_steps: never re-opens
    cmd[t_close:t_open] = 0.0
    for t_edge, start, end in ((t_close, 1.0, 0.0), (t_open, 0.0, 1.0)):
        ramp = int(rng.integers(1, 4))
        if t_edge >= num_steps:
            continue
        # Intermediate values strictly inside (0.05, 0.95), ending at the plateau value.
        values = np.linspace(start, end, ramp + 2)[1:-1]
        lo = t_edge
        hi = min(num_steps, lo + ramp)
        cmd[lo:hi] = values[: hi - lo]
    return cmd


def _smooth_walk(rng: np.random.Generator, num_steps: int, dims: int, step: float, inertia: float) -> np.ndarray:
    """[T, dims] AR(1)-velocity random walk starting at 0."""
    velocity = np.zeros(dims)
    out = np.zeros((num_steps, dims))
    kicks = rng.normal(0.0, step, size=(num_steps, dims))
    pos = np.zeros(dims)
    for t in range(num_steps):
        out[t] = pos
        velocity = inertia * velocity + (1.0 - inertia) * kicks[t] * 3.0
        pos = pos + velocity
    return out


def _render(
    rng: np.random.Generator,
    centers: np.ndarray,  # [T, 2] in [0, 1] (col, row)
    radii: np.ndarray,  # [T] in pixels
    bar: np.ndarray,  # [T] in [0, 1]
    size: int,
    color: np.ndarray,  # [3]
    background: np.ndarray,  # [3]
) -> np.ndarray:
    """Renders [T, S, S, 3] uint8 frames: textured background, a disc and a gripper bar."""
    num_steps = centers.shape[0]
    pad = max(4, size // 8)
    # One noise tile per episode and camera; each frame crops it at its own offset, so texture
    # moves between frames (JPEG size stays realistic) at the cost of slicing only. Everything is
    # uint8 and bounded by construction (noise 0..70 stored with +35 offset, background 70..150
    # +- 20 shading stored with -35 offset, disc colour 40..230 +- 18): no overflow, no clipping.
    tile = rng.normal(0.0, 1.0, size=(size + pad, size + pad))
    tile = 0.5 * (tile + np.roll(tile, 1, axis=0))  # cheap 2-tap blur on both axes
    tile = 0.5 * (tile + np.roll(tile, 1, axis=1))
    tile = (np.clip(np.rint(tile * 14.0), -35, 35) + 35).astype(np.uint8)  # [S+pad, S+pad]
    tile3 = np.repeat(tile[:, :, None], 3, axis=2)  # [S+pad, S+pad, 3]; full arrays add fastest
    offsets = rng.integers(0, pad + 1, size=(num_steps, 2))
    ys = np.arange(size, dtype=np.float64)
    grad = (ys / size - 0.5) * 40.0  # vertical shading  [S]
    base = np.rint(background[None, None, :] + grad[:, None, None] - 35.0).astype(np.uint8)  # [S, 1, 3]
    base = np.ascontiguousarray(np.broadcast_to(base, (size, size, 3)))
    color_i = np.rint(color).astype(np.int16)
    frames = np.empty((num_steps, size, size, 3), dtype=np.uint8)
    bar_h = max(1, size // 16)
    for t in range(num_steps):
        oy, ox = offsets[t]
        img = frames[t]
        np.add(base, tile3[oy : oy + size, ox : ox + size], out=img)
        cx, cy = centers[t] * size
        r = radii[t]
        y0, y1 = max(0, int(cy - r)), min(size, int(cy + r) + 2)
        x0, x1 = max(0, int(cx - r)), min(size, int(cx + r) + 2)
        if y0 < y1 and x0 < x1:  # disc, drawn inside its bounding box only
            disc = (ys[None, x0:x1] - cx) ** 2 + (ys[y0:y1, None] - cy) ** 2 <= r * r
            noise = tile[oy + y0 : oy + y1, ox + x0 : ox + x1][disc].astype(np.int16) - 35
            img[y0:y1, x0:x1][disc] = color_i + (noise // 2)[:, None]
        width = int(round(float(bar[t]) * (size - 2)))
        img[size - bar_h :, :width] = 235
    return frames


def _episode(seed: int, episode_id: int, num_steps: int | None, min_steps: int, max_steps: int,
             image_size: int, empty_language: bool, spawn: int = _KEY_EPISODE) -> _EpisodeArrays:
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(spawn, episode_id)))
    if num_steps is None:
        num_steps = int(rng.integers(min_steps, max_steps + 1))
    n = num_steps
    instruction = "" if empty_language else INSTRUCTIONS[int(rng.integers(len(INSTRUCTIONS)))]

    # State: xyz in a Bridge-like workspace (m), rpy small smooth angles (rad), gripper lagged.
    start_xyz = np.array([0.30, 0.0, 0.06]) + rng.uniform(-0.05, 0.05, size=3)
    xyz = start_xyz + _smooth_walk(rng, n, 3, step=0.006, inertia=0.8)
    xyz[:, 2] = np.clip(xyz[:, 2], -0.05, 0.25)
    start_rpy = np.array([0.0, -0.1, 0.0]) + rng.uniform(-0.15, 0.15, size=3)
    rpy = start_rpy + _smooth_walk(rng, n, 3, step=0.02, inertia=0.8)
    cmd = _gripper_command(rng, n)
    grip = np.empty(n)
    g = cmd[0] if n else 1.0
    for t in range(n):
        grip[t] = g
        g = g + 0.6 * (cmd[t] - g)
    grip = np.clip(grip + rng.normal(0.0, 0.005, size=n), 0.0, 1.0)
    state = np.concatenate([xyz, rpy, grip[:, None]], axis=1).astype(np.float32)  # [T, 7]

    # Action: next-state deltas + noise + rare heavy-tailed outliers; commanded gripper.
    action = np.zeros((n, ACTION_DIM))
    if n >= 2:
        delta = np.diff(state[:, :6].astype(np.float64), axis=0)  # [T-1, 6]
        action[:-1, :6] = delta
        action[-1, :6] = delta[-1]
    noise_scale = np.array([1e-4] * 3 + [1e-3] * 3)
    action[:, :6] += rng.normal(0.0, 1.0, size=(n, 6)) * noise_scale
    outlier = rng.random(n) < 0.01
    action[outlier, :6] += rng.standard_t(2, size=(int(outlier.sum()), 6)) * 0.02
    action[:, 6] = cmd
    action = action.astype(np.float32)

    # Images: camera 0 looks down (col <- y, row <- x, radius <- z), camera 1 from the side.
    color = rng.uniform(40, 230, size=3)
    bg0 = rng.uniform(70, 150, size=3)
    bg1 = rng.uniform(70, 150, size=3)
    s = image_size
    c0 = np.stack([0.5 + xyz[:, 1] / 0.4, 0.5 + (xyz[:, 0] - 0.30) / 0.3], axis=1) if n else np.zeros((0, 2))
    c1 = np.stack([0.5 + xyz[:, 1] / 0.4, 0.8 - xyz[:, 2] / 0.3], axis=1) if n else np.zeros((0, 2))
    r0 = s * (0.06 + 0.25 * np.clip(xyz[:, 2], 0.0, 0.25))
    r1 = s * (0.08 - 0.1 * np.clip(xyz[:, 0] - 0.3, -0.1, 0.1))
    image_0 = _render(rng, c0, r0, grip, s, color, bg0)
    image_1 = _render(rng, c1, r1, grip, s, color[::-1], bg1)
    return _EpisodeArrays(state=state, action=action, image_0=image_0, image_1=image_1, instruction=instruction)


def _to_example(ep: _EpisodeArrays, episode_id: int, file_path: str) -> dict[str, Any]:
    n = ep.state.shape[0]
    steps = []
    for t in range(n):
        last = t == n - 1
        steps.append(
            {
                "observation": {"image_0": ep.image_0[t], "image_1": ep.image_1[t], "state": ep.state[t]},
                "action": ep.action[t],
                "language_instruction": ep.instruction,
                "is_first": t == 0,
                "is_last": last,
                "is_terminal": last,
                "reward": np.float32(1.0 if last else 0.0),
                "discount": np.float32(1.0),
            }
        )
    return {"steps": steps, "episode_metadata": {"file_path": file_path, "episode_id": np.int32(episode_id)}}


# ----------------------------------------------------------------------------------------------
# Plan: which episode goes where
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Plan:
    name: str
    seed: int
    image_size: int
    min_steps: int
    max_steps: int
    train_ids: tuple[int, ...]
    val_ids: tuple[int, ...]
    empty_language: frozenset[int]
    nan_ids: frozenset[int]
    short_steps: tuple[int, ...]  # step counts of extra train episodes, ids follow the regular ones
    num_episodes: int
    num_shards: int | None

    def split_sizes(self) -> dict[str, int]:
        sizes = {"train": len(self.train_ids) + len(self.short_steps)}
        if self.val_ids:
            sizes["val"] = len(self.val_ids)
        return sizes

    def shards_for(self, split: str) -> int:
        n = self.split_sizes()[split]
        wanted = self.num_shards if self.num_shards is not None else max(1, round(n / EPISODES_PER_SHARD))
        # TFDS refuses more shards than examples; small splits get one shard per episode.
        return max(1, min(wanted, n))

    def examples(self, split: str) -> Iterator[tuple[str, dict[str, Any]]]:
        ids = self.train_ids if split == "train" else self.val_ids
        for k in ids:
            ep = _episode(self.seed, k, None, self.min_steps, self.max_steps, self.image_size,
                          k in self.empty_language)
            if k in self.nan_ids:
                ep = _inject_nan(ep, self.seed, k)
            yield f"{split}_{k:07d}", _to_example(ep, k, f"synthetic/{self.name}/{split}/traj{k:07d}/out.npy")
        if split == "train":
            for j, steps in enumerate(self.short_steps):
                k = self.num_episodes + j
                ep = _episode(self.seed, k, steps, self.min_steps, self.max_steps, self.image_size,
                              k in self.empty_language, spawn=_KEY_SHORT)
                yield f"{split}_{k:07d}", _to_example(ep, k, f"synthetic/{self.name}/{split}/traj{k:07d}/out.npy")


def _inject_nan(ep: _EpisodeArrays, seed: int, episode_id: int) -> _EpisodeArrays:
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_KEY_GLOBAL, 1, episode_id)))
    action = ep.action.copy()
    t = int(rng.integers(action.shape[0]))
    d = int(rng.integers(ACTION_DIM))
    action[t, d] = np.nan
    return dataclasses.replace(ep, action=action)


def _empty_language_ids(seed: int, total: int, fraction: float) -> frozenset[int]:
    """Low-discrepancy choice: among ids 0..n-1, floor(n * fraction) +- 1 are empty, for every n."""
    if fraction <= 0.0:
        return frozenset()
    phase = float(np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_KEY_GLOBAL, 0))).random())
    return frozenset(k for k in range(total) if np.floor((k + 1) * fraction + phase) > np.floor(k * fraction + phase))


# ----------------------------------------------------------------------------------------------
# The TFDS builder
# ----------------------------------------------------------------------------------------------


class _SyntheticBridgeBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Writes the episodes of a `_Plan`; a subclass per call sets `name` and `_plan`."""

    VERSION = tfds.core.Version(VERSION)
    RELEASE_NOTES = {str(VERSION): "Synthetic Bridge-layout episodes (vlaprep.synthetic.rlds)."}
    _plan: _Plan
    _only_split: str | None = None

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"Synthetic RLDS episodes in the Bridge V2 / OXE layout (seed {self._plan.seed}). {JPEG_NOTE}",
            features=_features(self._plan.image_size),
            homepage="https://github.com/vlaprep",
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        splits = self._plan.split_sizes()
        chosen = [self._only_split] if self._only_split else list(splits)
        return {split: self._generate_examples(split) for split in chosen}

    def _generate_examples(self, split: str):
        yield from self._plan.examples(split)

    def _generate_splits(self, dl_manager, download_config):
        # `DownloadConfig.num_shards` is shared by all splits, and TFDS refuses more shards than
        # examples; generate each split on its own with its own shard count.
        infos = []
        for split in self._plan.split_sizes():
            self._only_split = split
            try:
                config = dataclasses.replace(download_config, num_shards=self._plan.shards_for(split))
                infos.extend(super()._generate_splits(dl_manager, config))
            finally:
                self._only_split = None
        return infos


def _builder_class(name: str, plan: _Plan) -> type[_SyntheticBridgeBuilder]:
    # A fresh unregistered class per call: TFDS's registry refuses a name twice, and the name must
    # be the dataset name because it names the folder and the shard files.
    return type(
        f"SyntheticBridge_{name}",
        (_SyntheticBridgeBuilder,),
        {"name": name, "_plan": plan, "__module__": __name__},
        skip_registration=True,
    )


def generate_rlds(
    output_dir: str | pathlib.Path,
    name: str | None = None,
    episodes: int = 20,
    seed: int = 0,
    image_size: int = 256,
    num_shards: int | None = None,
    val_fraction: float = 0.1,
    empty_language_fraction: float = 0.1,
    min_steps: int = 3,
    max_steps: int = 60,
    *,
    nan_episodes: int = 0,
    short_episodes: Sequence[int] = (),
    progress: bool = False,
    layout: str | None = None,
) -> pathlib.Path:
    """Writes a synthetic Bridge-layout RLDS dataset with TFDS; returns ``output_dir/name/1.0.0``.

    Args:
      output_dir: TFDS data dir; the dataset lands in ``output_dir/<name>/1.0.0``, which must not exist.
      name: dataset name (folder and shard file prefix; default ``bridge_orig``, or the layout's name);
        without ``layout`` the feature layout is Bridge's whatever it is.
      episodes: regular episodes, ids ``0..episodes-1``; val takes the highest ``round(episodes *
        val_fraction)`` ids (at least 1 when ``episodes >= 2`` and ``val_fraction > 0``).
      seed: everything is a deterministic function of the seed (identical TFRecord bytes).
      image_size: S of the ``[S, S, 3]`` JPEG images of both cameras.
      num_shards: TFRecord shards per split (capped at the split's episode count); default
        ``max(1, round(n / 25))`` per split.
      val_fraction: fraction of regular episodes in the ``val`` split; no ``val`` split when 0 episodes.
      empty_language_fraction: fraction of episodes whose instruction is "".
      min_steps, max_steps: episode lengths are uniform in ``[min_steps, max_steps]``.
      nan_episodes: the lowest-id train episodes that get one NaN in one action value.
      short_episodes: step counts of extra train episodes (0 allowed: empty ``steps``).
      progress: show TFDS's progress bars.
      layout: an OXE dataset name (OpenVLA's): write that dataset's layout with
        ``vlaprep.synthetic.layouts.generate_layout_rlds`` (uses episodes, seed, image_size as the longer
        image side, num_shards, max_steps (>= 3) and progress; the Bridge-only options must stay default).
    """
    if layout is not None:
        from vlaprep.synthetic.layouts import generate_layout_rlds

        bridge_only = dict(val_fraction=(val_fraction, 0.1), empty_language_fraction=(empty_language_fraction, 0.1),
                           min_steps=(min_steps, 3), nan_episodes=(nan_episodes, 0), short_episodes=(tuple(short_episodes), ()))
        changed = sorted(k for k, (v, default) in bridge_only.items() if v != default)
        if changed:
            raise ValueError(f"expected only layout options with layout={layout!r}, got Bridge-only options {changed!r}")
        return generate_layout_rlds(output_dir, layout, name=name, episodes=episodes, seed=seed, image_size=image_size,
                                    num_shards=num_shards, max_steps=max_steps, progress=progress)
    name = "bridge_orig" if name is None else name
    if episodes < 1:
        raise ValueError(f"expected episodes >= 1, got {episodes!r}")
    if not 1 <= min_steps <= max_steps:
        raise ValueError(f"expected 1 <= min_steps <= max_steps, got min_steps={min_steps!r}, max_steps={max_steps!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"expected 0 <= val_fraction < 1, got {val_fraction!r}")
    if not 0.0 <= empty_language_fraction <= 1.0:
        raise ValueError(f"expected 0 <= empty_language_fraction <= 1, got {empty_language_fraction!r}")
    if image_size < 8:
        raise ValueError(f"expected image_size >= 8, got {image_size!r}")
    if num_shards is not None and num_shards < 1:
        raise ValueError(f"expected num_shards >= 1 or None, got {num_shards!r}")
    if any(int(s) < 0 for s in short_episodes):
        raise ValueError(f"expected non-negative step counts in short_episodes, got {tuple(short_episodes)!r}")

    n_val = int(round(episodes * val_fraction))
    if val_fraction > 0 and episodes >= 2:
        n_val = max(1, n_val)
    n_val = min(n_val, episodes - 1)
    train_ids = tuple(range(episodes - n_val))
    val_ids = tuple(range(episodes - n_val, episodes))
    if not 0 <= nan_episodes <= len(train_ids):
        raise ValueError(f"expected 0 <= nan_episodes <= {len(train_ids)} (train episodes), got {nan_episodes!r}")

    plan = _Plan(
        name=name,
        seed=int(seed),
        image_size=int(image_size),
        min_steps=int(min_steps),
        max_steps=int(max_steps),
        train_ids=train_ids,
        val_ids=val_ids,
        empty_language=_empty_language_ids(int(seed), episodes + len(short_episodes), empty_language_fraction),
        nan_ids=frozenset(train_ids[:nan_episodes]),
        short_steps=tuple(int(s) for s in short_episodes),
        num_episodes=episodes,
        num_shards=num_shards,
    )
    output_dir = pathlib.Path(output_dir)
    version_dir = output_dir / name / VERSION
    if version_dir.exists():
        raise FileExistsError(f"{version_dir} already exists; remove it or choose another output_dir or name")
    builder = _builder_class(name, plan)(data_dir=str(output_dir))
    # TFDS's progress bars are global state; restore the caller's setting afterwards.
    previous = getattr(tfds.core.utils.tqdm_utils, "_active", True)
    tfds.display_progress_bar(progress)
    try:
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(
                try_download_gcs=False,
                compute_stats=tfds.download.ComputeStatsMode.SKIP,
            )
        )
    finally:
        tfds.display_progress_bar(previous)
    return version_dir
