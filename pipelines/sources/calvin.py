"""CALVIN split directories -> ``Episode`` records: ``CalvinSource``.

A split directory (``training/``, ``validation/``) holds one ``episode_XXXXXXX.npz`` per frame,
``ep_start_end_ids.npy`` (the inclusive frame ranges of its play segments) and
``lang_annotations/auto_lang_ann.npy`` (the language windows, pickled). An episode is one language
window: frames ``[start, end)`` with its annotation. ``CALVIN_WINDOWS_PER_UNIT`` windows of one split
make a unit.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
from typing import Iterator, Sequence

import numpy as np

from vlaprep import paths
from vlaprep.pipelines import safe_pickle
from vlaprep.pipelines.sources.base import (
    Source,
    SourceError,
    SourceLocation,
    SourceUnit,
    brief,
    camera_keys,
    list_files,
    refuse_broken_link,
    register_source,
)
from vlaprep.schemas.episode import Episode, QuarantineRecord
from vlaprep.transforms.base import SourceFormat
from vlaprep.transforms.registry import DatasetSpec

CALVIN_SPLITS = ("training", "validation")
CALVIN_WINDOWS_PER_UNIT = 64  # CALVIN episodes read by one worker call (and cached as one projection)


@dataclasses.dataclass(frozen=True)
class CalvinWindow:
    """Frames ``[start, end)`` of one CALVIN split directory, with the segment that should contain them."""

    split_dir: str
    split: str
    start: int
    end: int  # exclusive
    language: str
    segment: tuple[int, int] | None  # inclusive [start, end] of the play segment holding `start`

    @property
    def episode_id(self) -> str:
        return f"{self.split}/{self.start}-{self.end}"


def calvin_split_dirs(path: str) -> list[tuple[str, str]]:
    """[(split name, dir)] for a CALVIN root (with training/ validation/) or a single split dir."""
    path = path.rstrip("/") if paths.is_remote(path) else path
    refuse_broken_link(path, "a CALVIN directory")
    if not paths.isdir(path):
        raise SourceError(f"expected a CALVIN directory, got {path!r}, which does not exist")
    refuse_broken_link(paths.join(path, "ep_start_end_ids.npy"), "CALVIN segments (ep_start_end_ids.npy)")
    if paths.isfile(paths.join(path, "ep_start_end_ids.npy")):
        return [(paths.basename(os.path.normpath(path) if not paths.is_remote(path) else path), path)]
    for s in CALVIN_SPLITS:
        refuse_broken_link(paths.join(path, s), f"a CALVIN split directory ({s}/)")
        refuse_broken_link(paths.join(path, s, "ep_start_end_ids.npy"), "CALVIN segments (ep_start_end_ids.npy)")
    found = [(s, paths.join(path, s)) for s in CALVIN_SPLITS if paths.isfile(paths.join(path, s, "ep_start_end_ids.npy"))]
    if not found:
        raise SourceError(
            f"expected a CALVIN split directory (with ep_start_end_ids.npy) or a root with training/ and "
            f"validation/, got neither at {path!r}"
        )
    return found


class UnsafeFileError(SourceError, safe_pickle.UnsafePickleError):
    """A dataset file whose pickle asks for more than NumPy arrays and containers (refused before anything
    runs): a user error, and still an ``UnsafePickleError`` for callers that catch that."""


def load_calvin_segments(split_dir: str) -> list[tuple[int, int]]:
    """Sorted inclusive ``[start, end]`` frame ranges (play segments) of ``ep_start_end_ids.npy``.

    Raises ``SourceError`` naming the file and row for anything but an ``[N, 2]`` array of integer frame
    ids >= 0 with ``start <= end``: an object array, NaN, a fraction, a reversed range, a damaged file.
    Integral floats are accepted (frame ids saved as float64).
    """
    path = paths.join(split_dir, "ep_start_end_ids.npy")
    where = f"ep_start_end_ids.npy in {split_dir!r}"
    hint = (
        "hint: it holds the inclusive [start, end] frame ids of each play segment; restore it from the "
        "dataset's source or re-save it with np.save(path, ids.astype(np.int64))"
    )
    try:
        segments = _load_npy(path)
    except (ValueError, EOFError) as e:  # an object array (no pickles here), a truncated file, not a .npy
        raise SourceError(f"expected an integer array [N, 2] written by np.save, got {brief(e)} for {where}; {hint}") from e
    if segments.ndim != 2 or segments.shape[1] != 2:
        raise SourceError(f"expected ep_start_end_ids.npy of shape [N, 2] in {split_dir!r}, got {segments.shape!r}")
    if segments.dtype.kind == "f":
        with np.errstate(invalid="ignore"):
            bad = ~np.isfinite(segments).all(axis=1) | (np.round(segments) != segments).any(axis=1)
    elif segments.dtype.kind in "iu":
        bad = np.zeros(len(segments), dtype=bool)
    else:
        raise SourceError(f"expected integer frame ids, got dtype {segments.dtype} for {where}; {hint}")
    if bad.any():
        row = int(np.argmax(bad))
        raise SourceError(f"expected integer frame ids, got {segments[row].tolist()!r} in row {row} for {where}; {hint}")
    ids = segments.astype(np.int64)
    for row, (start, end) in enumerate(ids.tolist()):
        if start < 0 or end < start:
            raise SourceError(
                f"expected a frame range 0 <= start <= end, got [{start}, {end}] in row {row} for {where}; {hint}"
            )
    return sorted((int(a), int(b)) for a, b in ids)


def _annotations_path(split_dir: str) -> str:
    return paths.join(split_dir, "lang_annotations", "auto_lang_ann.npy")


def _missing_annotations(split_dir: str) -> SourceError:
    return SourceError(
        f"expected language annotations at {_annotations_path(split_dir)!r}, got no such file; hint: vlaprep reads "
        "CALVIN's language-annotated windows, which lang_annotations/auto_lang_ann.npy lists"
    )


def load_language_annotations(split_dir: str, required: bool = True) -> list[tuple[int, int, str]] | None:
    """[(start, end_exclusive, ann)] from ``lang_annotations/auto_lang_ann.npy``, via the restricted unpickler.

    Raises ``SourceError`` naming the file for one that is missing (``None`` instead if not ``required``),
    does not load (truncated, not a ``.npy``, a pickle asking for code: ``UnsafeFileError``) or is not
    ``{'language': {'ann': [str]}, 'info': {'indx': [(start, end)]}}`` with integer frame ids >= 0. A
    window whose end is not after its start is kept: reading it quarantines that one episode.
    """
    path = _annotations_path(split_dir)
    refuse_broken_link(paths.join(split_dir, "lang_annotations"), "CALVIN language annotations (lang_annotations/)")
    refuse_broken_link(path, "CALVIN language annotations (auto_lang_ann.npy)")
    if not paths.isfile(path):
        if not required:
            return None
        raise _missing_annotations(split_dir)
    hint = "hint: the file is damaged; restore it from the dataset's source"
    try:
        data = safe_pickle.load_pickled_npy(path)
    except safe_pickle.UnsafePickleError as e:
        raise UnsafeFileError(str(e)) from e
    except (pickle.UnpicklingError, EOFError, ValueError) as e:  # truncated, flipped bytes, not a .npy
        raise SourceError(f"expected a pickled dict saved by np.save, got {brief(e)} for {path!r}; {hint}") from e
    shape = "{'language': {'ann': [...]}, 'info': {'indx': [...]}}"
    language = data.get("language") if isinstance(data, dict) else None
    info = data.get("info") if isinstance(data, dict) else None
    if not isinstance(language, dict) or not isinstance(info, dict) or "ann" not in language or "indx" not in info:
        got = (
            f"keys {sorted(map(str, data))!r}" if isinstance(data, dict)
            else f"ndarray of shape {data.shape!r}" if isinstance(data, np.ndarray) else type(data).__name__
        )
        raise SourceError(f"expected {shape}, got {got} for {path!r}; {hint}")
    anns, indx = language["ann"], info["indx"]
    for name, value in (("ann", anns), ("indx", indx)):
        if not isinstance(value, (list, tuple, np.ndarray)):
            raise SourceError(f"expected a list for {name!r}, got {type(value).__name__} for {path!r}; {hint}")
    if len(anns) != len(indx):
        raise SourceError(f"expected as many annotations as windows in {path!r}, got {len(anns)} anns and {len(indx)} windows")
    out = []
    for i, (ann, window) in enumerate(zip(anns, indx)):
        if not isinstance(ann, str):
            raise SourceError(
                f"expected a string annotation, got {type(ann).__name__} {ann!r} at index {i} of 'ann' for {path!r}; {hint}"
            )
        values = np.asarray(window, dtype=object).reshape(-1).tolist() if isinstance(window, (list, tuple, np.ndarray)) else None
        if values is None or len(values) != 2 or not all(_is_frame_id(v) for v in values):
            raise SourceError(
                f"expected a window (start, end) of integer frame ids, got {window!r} at index {i} of 'indx' "
                f"for {path!r}; {hint}"
            )
        start, end = (int(v) for v in values)
        out.append((start, end, str(ann)))
    return out


def _is_frame_id(value) -> bool:
    """An integer >= 0 (Python or NumPy), or a float equal to one; never a bool."""
    if isinstance(value, (bool, np.bool_)):
        return False
    if isinstance(value, (int, np.integer)):
        return value >= 0
    if isinstance(value, (float, np.floating)):
        return bool(np.isfinite(value)) and float(value).is_integer() and value >= 0
    return False


def _windows(
    split: str, split_dir: str, segments: Sequence[tuple[int, int]], annotations: Sequence[tuple[int, int, str]]
) -> list[CalvinWindow]:
    """The split's language windows in annotation order, each with the play segment holding its start."""
    starts = [a for a, _ in segments]
    windows = []
    for start, end, ann in annotations:
        pos = int(np.searchsorted(starts, start, side="right")) - 1
        segment = segments[pos] if pos >= 0 and segments[pos][0] <= start <= segments[pos][1] else None
        windows.append(CalvinWindow(split_dir, split, start, end, ann, segment))
    return windows


def list_calvin_windows(path: str) -> list[CalvinWindow]:
    """Every episode of a CALVIN dataset: its language windows, in annotation order, per split."""
    return [
        w for split, split_dir in calvin_split_dirs(path)
        for w in _windows(split, split_dir, load_calvin_segments(split_dir), load_language_annotations(split_dir))
    ]


def _load_npy(path: str) -> np.ndarray:
    with paths.open_read(path) as f:
        return np.load(io.BytesIO(f.read()) if paths.is_remote(path) else f, allow_pickle=False)


def _open_npz(path: str):
    """``np.load`` of an ``.npz`` frame; remote files are read whole first (zip needs seeks)."""
    if paths.is_remote(path):
        return np.load(io.BytesIO(paths.read_bytes(path)), allow_pickle=False)
    return np.load(path, allow_pickle=False)


def calvin_frame_name(frame: int) -> str:
    return f"episode_{frame:07d}.npz"


def calvin_frame_path(split_dir: str, frame: int) -> str:
    return paths.join(split_dir, calvin_frame_name(frame))


def load_calvin_window(window: CalvinWindow, spec: DatasetSpec, image_roles: Sequence[str] = ()) -> Episode:
    """Read frames ``[start, end)`` of one window into an ``Episode`` (vectors in their stored dtype).

    Raises ``ValueError`` naming the frame for a window outside its play segment, a missing frame file,
    or a frame without the expected keys/shapes.
    """
    if window.end <= window.start:
        raise ValueError(f"expected a window with end > start, got [{window.start}, {window.end})")
    if window.segment is None:
        raise ValueError(f"expected window [{window.start}, {window.end}) to start inside a play segment of ep_start_end_ids.npy, got none")
    if window.end - 1 > window.segment[1]:
        raise ValueError(
            f"expected window [{window.start}, {window.end}) to end within its segment "
            f"[{window.segment[0]}, {window.segment[1]}], got {window.end - 1 - window.segment[1]} frames past it"
        )
    keys = list(spec.required_keys)
    image_keys = camera_keys(spec, image_roles, ValueError)
    columns: dict[str, list] = {k: [] for k in keys}
    frames: dict[str, list] = {r: [] for r in image_keys}
    for frame in range(window.start, window.end):
        path = calvin_frame_path(window.split_dir, frame)
        try:
            npz = _open_npz(path)  # no existence check first: on object stores that is a request per frame
        except Exception:  # noqa: BLE001 - FileNotFoundError locally, NotFound/BeamIOError remotely
            if paths.isfile(path):
                raise
            raise ValueError(
                f"expected frame file {paths.basename(path)} for window [{window.start}, {window.end}), got no such file"
            ) from None
        with npz:
            for key in keys:
                if key not in npz.files:
                    raise ValueError(f"expected key {key!r} in {paths.basename(path)}, got {sorted(npz.files)!r}")
                columns[key].append(npz[key])
            for role, key in image_keys.items():
                if key not in npz.files:
                    raise ValueError(f"expected image {key!r} in {paths.basename(path)}, got {sorted(npz.files)!r}")
                frames[role].append(npz[key])
    steps = {}
    for key, values in columns.items():
        shapes = {np.shape(v) for v in values}
        if len(shapes) != 1:
            raise ValueError(f"expected one shape for {key!r} across window [{window.start}, {window.end}), got {sorted(shapes)!r}")
        # Kept in the stored dtype (float64 in real CALVIN files): recomputing rel_actions needs the
        # full precision of actions - robot_obs; transforms emit float32.
        steps[key] = np.stack(values)
    images = {}
    for role, values in frames.items():
        array = np.stack(values)
        if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3:
            raise ValueError(f"expected {image_keys[role]!r} frames [T, H, W, 3] uint8, got {array.shape!r} {array.dtype}")
        images[role] = array
    return Episode(
        dataset_name=spec.name,
        episode_id=window.episode_id,
        split=window.split,
        language=window.language,
        steps=steps,
        images=images,
    )


# --------------------------------------------------------------------------------------------------
# The source
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CalvinSplit:
    """One split directory as ``CalvinSource.locate`` read it."""

    name: str  # "training", "validation", or the directory's own name when given one split
    directory: str
    segments: tuple[tuple[int, int], ...]  # ep_start_end_ids.npy, sorted
    annotations: tuple[tuple[int, int, str], ...] | None  # auto_lang_ann.npy; None when the file is absent
    files: tuple[str, ...]  # every .npy / .npz under the directory, sorted
    annotation_files: tuple[str, ...]  # every file under lang_annotations/ (when it is a directory)


@dataclasses.dataclass(frozen=True)
class CalvinLocation(SourceLocation):
    """A CALVIN root or split directory (``root``, as given); its units need no metadata."""

    splits: tuple[CalvinSplit, ...]


@register_source
class CalvinSource(Source):
    """CALVIN split trees: ``CALVIN_WINDOWS_PER_UNIT`` language windows per unit, in annotation order."""

    format = SourceFormat.CALVIN

    def locate(self, path: str) -> CalvinLocation:
        """Checks each split's segments and, when present, its annotations (``SourceError``)."""
        splits = []
        for split, split_dir in calvin_split_dirs(path):
            segments = tuple(load_calvin_segments(split_dir))
            annotations = load_language_annotations(split_dir, required=False)
            files = tuple(sorted(paths.join(split_dir, n) for n, _ in list_files(split_dir) if n.endswith((".npy", ".npz"))))
            lang_dir = paths.join(split_dir, "lang_annotations")
            annotation_files = tuple(paths.join(lang_dir, n) for n, _ in list_files(lang_dir)) if paths.isdir(lang_dir) else ()
            splits.append(CalvinSplit(
                split, split_dir, segments, None if annotations is None else tuple(annotations), files, annotation_files,
            ))
        return CalvinLocation(path, None, tuple(splits))

    def units(self, location: CalvinLocation, spec: DatasetSpec) -> list[SourceUnit]:
        """A split's windows in annotation order, ``CALVIN_WINDOWS_PER_UNIT`` per unit; ``SourceError`` for a
        split without annotations. A window listed again (same frames) is not read twice: its record goes
        to the unit of the listing."""
        units = []
        for split in location.splits:
            if split.annotations is None:
                raise _missing_annotations(split.directory)
            units += _split_units(spec, split)
        return units

    def files(self, location: CalvinLocation) -> list[str]:
        return sorted(f for split in location.splits for f in split.files)

    def iter_episodes(
        self, unit: SourceUnit, spec: DatasetSpec, image_roles: Sequence[str] = (), parser: None = None
    ) -> Iterator[Episode | QuarantineRecord]:
        yield from unit.quarantine
        for window in unit.items:
            try:
                yield load_calvin_window(window, spec, image_roles)
            except (ValueError, OSError, KeyError) as e:
                yield QuarantineRecord(spec.name, window.episode_id, "read", f"{type(e).__name__}: {e}")


def _split_units(spec: DatasetSpec, split: CalvinSplit) -> list[SourceUnit]:
    frame_files = {paths.basename(f): f for f in split.files}
    shared = tuple(sorted(f for name, f in frame_files.items() if not name.startswith("episode_"))) + split.annotation_files
    listed = _windows(split.name, split.directory, split.segments, split.annotations)
    units, seen, duplicates = [], set(), 0
    for first in range(0, len(listed), CALVIN_WINDOWS_PER_UNIT):
        windows, quarantine = [], []
        for window in listed[first : first + CALVIN_WINDOWS_PER_UNIT]:
            if window.episode_id in seen:
                # Same frames listed twice: keep the first annotation, account for the others.
                quarantine.append(QuarantineRecord(
                    spec.name, f"{window.episode_id}#dup{duplicates}", "read",
                    f"duplicate episode id {window.episode_id!r} (window listed again in auto_lang_ann.npy, "
                    f"annotation {window.language!r}); the first listing is kept",
                ))
                duplicates += 1
                continue
            seen.add(window.episode_id)
            windows.append(window)
        names = sorted({calvin_frame_name(f) for w in windows for f in range(w.start, max(w.start, w.end))})
        files = tuple(frame_files[n] for n in names if n in frame_files)  # a missing frame quarantines its window
        units.append(SourceUnit(
            f"{split.name}:{first // CALVIN_WINDOWS_PER_UNIT:05d}", split.directory, files, shared, f"{split.name}/",
            None, tuple(windows), tuple(quarantine),
        ))
    return units
