"""Beam sources: RLDS (TFDS TFRecord datasets) and CALVIN split directories -> ``Episode`` records.

Both sources return a dict of two PCollections:
  ``"episodes"``:   PCollection[Episode]            (see ``vlaprep.schemas.episode``)
  ``"quarantine"``: PCollection[QuarantineRecord]   one per input episode that could not be read

Every input episode ends up in exactly one of the two. Element logic lives in plain functions
(``decode_rlds_example``, ``load_calvin_window``) so it can be tested without Beam.
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
from typing import Iterator, Sequence

import apache_beam as beam
import numpy as np

from vlaprep.errors import UserError
from vlaprep import paths
from vlaprep.pipelines import safe_pickle
from vlaprep.schemas.episode import Episode, QuarantineRecord
from vlaprep.transforms.registry import DatasetSpec

QUARANTINE = "quarantine"
_NAMESPACE = "vlaprep"


class SourceError(UserError):
    """The source path is not a readable dataset: fail the run at once, before any work."""


# --------------------------------------------------------------------------------------------------
# RLDS
# --------------------------------------------------------------------------------------------------

_VERSION_RE = re.compile(r"^\d+\.\d+\.\d+$")


def resolve_rlds_version_dir(path: str) -> str:
    """Accept a TFDS version dir (``.../name/1.0.0``), a dataset dir (``.../name``) or a data_dir
    holding exactly one ``name/version``; return the version dir (the newest version if several)."""
    path = path.rstrip("/") if paths.is_remote(path) else path
    if not paths.isdir(path):
        raise SourceError(f"expected an RLDS dataset directory, got {path!r}, which does not exist")
    if paths.isfile(paths.join(path, "dataset_info.json")):
        return path
    entries = paths.listdir(path)
    versions = sorted(
        (d for d in entries if _VERSION_RE.match(d) and paths.isfile(paths.join(path, d, "dataset_info.json"))),
        key=lambda v: tuple(int(p) for p in v.split(".")),
    )
    if versions:
        return paths.join(path, versions[-1])
    candidates = []
    for name in entries:
        sub = paths.join(path, name)
        if paths.isdir(sub):
            try:
                candidates.append(resolve_rlds_version_dir(sub))
            except SourceError:
                pass
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise SourceError(
            f"expected a TFDS dataset (a directory with dataset_info.json), got none under {path!r}; "
            "hint: point --dataset NAME=PATH at DIR/<name>/<version>"
        )
    raise SourceError(f"expected one dataset under {path!r}, got {len(candidates)}: {candidates!r}; hint: name the version dir")


# TFDS reads metadata through TensorFlow's filesystems; a dataset in an object store is read through
# Beam's (the credentials and endpoints the pipeline is configured with). So the few small metadata files
# of a remote dataset are mirrored to a local directory named by their content, and TFDS opens that.
_DATA_FILE_MARKERS = (".tfrecord", ".array_record", ".riegeli")
_METADATA_MAX_BYTES = 64 << 20


def tfds_metadata_dir(version_dir: str) -> str:
    """``version_dir`` itself when local; else a local copy of its metadata files (not its data files)."""
    if not paths.is_remote(version_dir):
        return version_dir
    import hashlib
    import tempfile

    files = {}
    for name, size in paths.list_files(version_dir):
        if "/" in name or any(m in name for m in _DATA_FILE_MARKERS) or size > _METADATA_MAX_BYTES:
            continue
        files[name] = paths.read_bytes(paths.join(version_dir, name))
    if "dataset_info.json" not in files:
        raise SourceError(f"expected dataset_info.json in {version_dir!r}, got files {sorted(files)!r}")
    digest = hashlib.sha256(repr(sorted(files.items())).encode()).hexdigest()[:24]
    parts = version_dir.rstrip("/").split("/")
    local = os.path.join(tempfile.gettempdir(), "vlaprep-tfds-metadata", digest, parts[-2], parts[-1])
    if not os.path.isdir(local):
        for name, data in files.items():
            paths.write_bytes_atomic(os.path.join(local, name), data)
    return local


def tfds_builder(version_dir: str):
    import tensorflow_datasets as tfds

    return tfds.builder_from_directory(tfds_metadata_dir(version_dir))


def rlds_shard_files(version_dir: str) -> list[tuple[str, str, int]]:
    """[(split, shard file name, number of records)] for every TFRecord shard of the dataset, sorted."""
    builder = tfds_builder(version_dir)
    out = []
    for split_name in sorted(builder.info.splits.keys()):
        split = builder.info.splits[split_name]
        for filename, length in zip(split.filenames, split.shard_lengths):
            out.append((split_name, filename, int(length)))
    return out


def _flatten(tree, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "/"))
        else:
            flat[name] = value
    return flat


def _decode_text(value) -> str:
    """bytes -> UTF-8 str; an integer array of code points padded with 0 (Language Table) -> str."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray) and value.dtype.kind in "iu":
        return "".join(chr(int(c)) for c in value.reshape(-1) if c != 0)
    return str(value)


def decode_rlds_example(
    example: dict, spec: DatasetSpec, episode_id: str, split: str, image_roles: Sequence[str] = ()
) -> Episode:
    """Flat parsed steps of one RLDS episode (``RLDSParser.parse``) -> ``Episode``.

    Keeps only the step keys the dataset's transform needs, its language key and the requested cameras
    (still JPEG/PNG bytes). Raises ``ValueError`` naming the key for anything missing or malformed.
    """
    steps = example
    kept = {}
    for key in spec.required_keys:
        if key not in steps:
            raise ValueError(
                f"expected step key {key!r} for dataset {spec.name!r}, got keys {sorted(steps)!r}; "
                "hint: check the registry entry's keys against the dataset's features.json"
            )
        kept[key] = np.asarray(steps[key])
    language = ""
    if spec.language_key and spec.language_key in steps:
        lang = steps[spec.language_key]
        if len(lang):
            language = _decode_text(lang[0])
    images = {}
    for role in image_roles:
        key = {"primary": spec.primary_image, "wrist": spec.wrist_image}[role]
        if key is None:
            raise ValueError(f"expected a {role} camera for dataset {spec.name!r}, got none in its registry entry")
        if key not in steps:
            raise ValueError(f"expected image key {key!r} for dataset {spec.name!r}, got keys {sorted(steps)!r}")
        frames = steps[key]
        if isinstance(frames, np.ndarray) and frames.dtype.kind in "uif":
            # Raw pixel tensors (a `Tensor(uint8, [H, W, 3])` feature instead of `Image`): keep decoded.
            if frames.ndim != 4 or frames.shape[-1] not in (1, 3, 4):
                raise ValueError(f"expected image key {key!r} as [T, H, W, C] pixels, got {frames.shape!r}")
            images[role] = frames.astype(np.uint8)
        else:
            images[role] = [bytes(b) for b in frames]
    return Episode(
        dataset_name=spec.name, episode_id=episode_id, split=split, language=language, steps=kept, images=images
    )


@dataclasses.dataclass(frozen=True)
class RLDSShard:
    """One TFRecord shard to read: ``split[index shard]`` of the TFDS dataset in ``version_dir``."""

    version_dir: str
    split: str
    shard_index: int
    filename: str
    num_records: int


class CorruptRecordError(ValueError):
    """A TFRecord file whose framing or checksums are wrong (flipped bytes, truncation)."""


_CRC_MASK_DELTA = 0xA282EAD8


def _masked_crc32c(data) -> int:
    import google_crc32c

    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _CRC_MASK_DELTA) & 0xFFFFFFFF


def iter_tfrecord_file(path: str) -> Iterator[bytes]:
    """Yield the records of a TFRecord file, verifying both CRC32C checksums of every record.

    The format (tensorflow.org/tutorials/load_data/tfrecord): ``uint64 length, uint32 masked_crc32c(length),
    data, uint32 masked_crc32c(data)``, little-endian. This is what ``tf.data.TFRecordDataset`` checks,
    without TensorFlow (workers that compute statistics never import it) and without per-file dataset
    set-up. Raises ``CorruptRecordError`` naming the record index and byte offset.
    """
    import struct

    name = paths.basename(path)
    with paths.open_read(path) as f:
        index, offset = 0, 0
        while True:
            header = f.read(12)
            if not header:
                return
            if len(header) < 12:
                raise CorruptRecordError(f"truncated record header at byte {offset} (record {index}) of {name}")
            length, length_crc = struct.unpack("<QI", header)
            if _masked_crc32c(header[:8]) != length_crc:
                raise CorruptRecordError(f"corrupt length checksum at byte {offset} (record {index}) of {name}")
            data = f.read(length)  # read apart from its checksum: slicing would copy the record again
            footer = f.read(4)
            if len(data) < length or len(footer) < 4:
                raise CorruptRecordError(
                    f"truncated record {index} at byte {offset} of {name}: expected {length + 4} bytes, "
                    f"got {len(data) + len(footer)}"
                )
            if _masked_crc32c(data) != struct.unpack("<I", footer)[0]:
                raise CorruptRecordError(f"corrupt data checksum in record {index} at byte {offset} of {name}")
            yield data
            index += 1
            offset += 12 + length + 4


def rlds_keys(spec: DatasetSpec, image_roles: Sequence[str] = ()) -> list[str]:
    """Step keys to parse: what the transform reads, the language key, the requested cameras."""
    keys = list(spec.required_keys)
    for role in image_roles:
        key = {"primary": spec.primary_image, "wrist": spec.wrist_image}[role]
        if key is None:
            raise SourceError(f"expected a {role} camera for dataset {spec.name!r}, got none in its registry entry")
        keys.append(key)
    return sorted(set(keys))


class RLDSParser:
    """Parse serialized RLDS episodes into flat ``{step key: [T, ...] array}`` dicts.

    TFDS's own NumPy parser (``ExampleParserNp``) restricted to the keys a consumer needs: the image
    bytes of an episode (99% of it) are never turned into arrays, and no TensorFlow op runs per record.
    Tensor features stored encoded (``Tensor(..., encoding=zlib|bytes)``) are decoded per step with
    their own feature connector; image features stay encoded (JPEG/PNG bytes).
    """

    def __init__(self, version_dir: str, keys: Sequence[str], optional: Sequence[str] = ()):
        import tensorflow_datasets as tfds
        from tensorflow_datasets.core import example_parser
        from tensorflow_datasets.core.utils import py_utils

        builder = tfds_builder(version_dir)
        flat = py_utils.flatten_nest_dict(builder.info.features.get_serialized_info())
        wanted = {f"steps/{k}" for k in keys}
        missing = sorted(k for k in wanted if k not in flat)
        if missing:
            present = sorted(k[len("steps/"):] for k in flat if k.startswith("steps/"))
            raise SourceError(
                f"expected step keys {[m[len('steps/'):] for m in missing]!r} in {version_dir!r}, got {present!r}; "
                "hint: check the registry entry's keys against the dataset's features.json"
            )
        wanted |= {f"steps/{k}" for k in optional if f"steps/{k}" in flat}
        nested: dict = {}
        for key in sorted(wanted):
            node = nested
            *parents, leaf = key.split("/")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = flat[key]
        self._parser = example_parser.ExampleParserNp(nested)
        self._encoded = {}
        step_features = builder.info.features["steps"].feature
        for key in sorted(wanted):
            connector = step_features
            for part in key.split("/")[1:]:
                connector = connector[part]
            if isinstance(connector, tfds.features.Tensor) and flat[key].np_dtype != connector.np_dtype and not isinstance(
                connector, (tfds.features.Image, tfds.features.Text)
            ):
                self._encoded[key[len("steps/"):]] = connector

    def parse(self, record: bytes) -> dict:
        steps = _flatten(self._parser.parse_example(record)["steps"])
        for key, connector in self._encoded.items():
            values = [connector.decode_example_np(v) for v in steps[key]]
            steps[key] = np.stack(values) if values else np.zeros((0,) + tuple(connector.shape), connector.np_dtype)
        return steps


def rlds_parser(version_dir: str, keys: Sequence[str], optional: Sequence[str] = ()) -> RLDSParser:
    return RLDSParser(version_dir, keys, optional)


def read_rlds_shard(shard: RLDSShard, spec: DatasetSpec, image_roles: Sequence[str] = (), parser=None) -> Iterator:
    """Yield ``Episode``s of one shard, and ``QuarantineRecord``s for records that cannot be read.

    The shard is the unit ``tfds.beam.ReadFromTFDS`` reads too; here its TFRecord file is parsed with
    TFDS's own ``ExampleParser`` restricted to the keys the consumer needs (``rlds_parser``), with
    ``steps`` left undecoded (Beam cannot pickle nested datasets). Stable ids come from the file name
    and record index. A corrupt or truncated shard stops TFRecord reading at the bad record; every
    record of the shard not read by then is quarantined, so the accounting still balances.
    """
    if parser is None:
        parser = rlds_parser(shard.version_dir, rlds_keys(spec, image_roles), optional=[spec.language_key] if spec.language_key else [])
    path = paths.join(shard.version_dir, shard.filename)
    # Every record's CRC32C is checked: that is how flipped bytes and truncation are caught.
    iterator = iter_tfrecord_file(path)
    index = 0
    while True:
        try:
            example = next(iterator)
        except StopIteration:
            break
        except (CorruptRecordError, OSError) as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            beam.metrics.Metrics.counter(_NAMESPACE, "rlds_corrupt_shards").inc()
            for lost in range(index, max(index + 1, shard.num_records)):
                yield QuarantineRecord(
                    spec.name,
                    f"{shard.split}/{shard.filename}/{lost}",
                    "read",
                    f"unreadable record in {shard.filename} (read {index} of {shard.num_records}): "
                    f"{type(e).__name__}: {reason[:300]}",
                )
            return
        episode_id = f"{shard.split}/{shard.filename}/{index}"
        index += 1
        try:
            yield decode_rlds_example(parser.parse(example), spec, episode_id, shard.split, image_roles)
        except (ValueError, KeyError, TypeError, UnicodeDecodeError, RuntimeError, IndexError) as e:
            yield QuarantineRecord(spec.name, episode_id, "read", f"{type(e).__name__}: {e}")


class _ReadRLDSShardFn(beam.DoFn):
    def __init__(self, spec: DatasetSpec, image_roles: Sequence[str]):
        self._spec = spec
        self._image_roles = tuple(image_roles)
        self._parsers = None

    def setup(self):
        self._parsers = {}  # version dir -> parser; built once per worker, not per shard

    def process(self, shard: RLDSShard):
        parser = self._parsers.get(shard.version_dir)
        if parser is None:
            optional = [self._spec.language_key] if self._spec.language_key else []
            parser = self._parsers[shard.version_dir] = rlds_parser(shard.version_dir, rlds_keys(self._spec, self._image_roles), optional)
        for item in read_rlds_shard(shard, self._spec, self._image_roles, parser):
            if isinstance(item, QuarantineRecord):
                beam.metrics.Metrics.counter(_NAMESPACE, "quarantined_read").inc()
                yield beam.pvalue.TaggedOutput(QUARANTINE, item)
            else:
                beam.metrics.Metrics.counter(_NAMESPACE, "episodes_read").inc()
                yield item


class ReadRLDS(beam.PTransform):
    """PBegin -> {"episodes": PCollection[Episode], "quarantine": PCollection[QuarantineRecord]}.

    Reads every split (or ``splits``) of a TFDS/RLDS dataset found with ``tfds.builder_from_directory``,
    one element per TFRecord shard so shards are read in parallel.
    """

    def __init__(
        self,
        path: str,
        spec: DatasetSpec,
        splits: Sequence[str] | None = None,
        image_roles: Sequence[str] = (),
        shard_files: Sequence[str] | None = None,
    ):
        super().__init__()
        self._version_dir = resolve_rlds_version_dir(path)
        self._spec = spec
        self._image_roles = tuple(image_roles)
        shards = []
        per_split_index: dict[str, int] = {}
        for split, filename, length in rlds_shard_files(self._version_dir):
            index = per_split_index.get(split, 0)
            per_split_index[split] = index + 1
            if (splits is None or split in splits) and (shard_files is None or filename in shard_files):
                shards.append(RLDSShard(self._version_dir, split, index, filename, length))
        if splits is not None:
            missing = sorted(set(splits) - set(per_split_index))
            if missing:
                raise SourceError(f"expected splits {missing!r} in {self._version_dir!r}, got {sorted(per_split_index)!r}")
        self.shards = tuple(shards)
        # Fail at once, on the launcher, if the dataset lacks a key its registry entry needs.
        rlds_parser(self._version_dir, rlds_keys(spec, self._image_roles))

    def expand(self, pbegin):
        results = (
            pbegin
            | "ListShards" >> beam.Create(self.shards)
            | "ReadShards" >> beam.ParDo(_ReadRLDSShardFn(self._spec, self._image_roles)).with_outputs(QUARANTINE, main="episodes")
        )
        return {"episodes": results.episodes, "quarantine": results[QUARANTINE]}


# --------------------------------------------------------------------------------------------------
# CALVIN
# --------------------------------------------------------------------------------------------------

CALVIN_SPLITS = ("training", "validation")
CALVIN_STEP_KEYS = ("actions", "rel_actions", "robot_obs", "scene_obs")


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
    if not paths.isdir(path):
        raise SourceError(f"expected a CALVIN directory, got {path!r}, which does not exist")
    if paths.isfile(paths.join(path, "ep_start_end_ids.npy")):
        return [(paths.basename(os.path.normpath(path) if not paths.is_remote(path) else path), path)]
    found = [(s, paths.join(path, s)) for s in CALVIN_SPLITS if paths.isfile(paths.join(path, s, "ep_start_end_ids.npy"))]
    if not found:
        raise SourceError(
            f"expected a CALVIN split directory (with ep_start_end_ids.npy) or a root with training/ and "
            f"validation/, got neither at {path!r}"
        )
    return found


def load_language_annotations(split_dir: str) -> list[tuple[int, int, str]]:
    """[(start, end_exclusive, ann)] from ``lang_annotations/auto_lang_ann.npy``, via the restricted unpickler."""
    path = paths.join(split_dir, "lang_annotations", "auto_lang_ann.npy")
    if not paths.isfile(path):
        raise SourceError(f"expected language annotations at {path!r}, got no such file; hint: pass --calvin-unlabeled to read play segments")
    data = safe_pickle.load_pickled_npy(path)
    try:
        anns = list(data["language"]["ann"])
        indx = list(data["info"]["indx"])
    except (KeyError, TypeError) as e:
        raise SourceError(f"expected {{'language': {{'ann': [...]}}, 'info': {{'indx': [...]}}}} in {path!r}, got {type(data).__name__}: {e}") from e
    if len(anns) != len(indx):
        raise SourceError(f"expected as many annotations as windows in {path!r}, got {len(anns)} anns and {len(indx)} windows")
    out = []
    for ann, window in zip(anns, indx):
        start, end = (int(v) for v in window)
        out.append((start, end, str(ann)))
    return out


def list_calvin_windows(path: str, unlabeled: bool = False) -> list[CalvinWindow]:
    """Every episode of a CALVIN dataset: language windows (default) or play segments (``unlabeled``)."""
    windows = []
    for split, split_dir in calvin_split_dirs(path):
        segments = _load_npy(paths.join(split_dir, "ep_start_end_ids.npy"))
        if segments.ndim != 2 or segments.shape[1] != 2:
            raise SourceError(f"expected ep_start_end_ids.npy of shape [N, 2] in {split_dir!r}, got {segments.shape!r}")
        segments = sorted((int(a), int(b)) for a, b in segments)
        starts = [a for a, _ in segments]
        if unlabeled:
            for a, b in segments:
                windows.append(CalvinWindow(split_dir, split, a, b + 1, "", (a, b)))
            continue
        for start, end, ann in load_language_annotations(split_dir):
            pos = int(np.searchsorted(starts, start, side="right")) - 1
            segment = segments[pos] if pos >= 0 and segments[pos][0] <= start <= segments[pos][1] else None
            windows.append(CalvinWindow(split_dir, split, start, end, ann, segment))
    return windows


def _load_npy(path: str) -> np.ndarray:
    with paths.open_read(path) as f:
        return np.load(io.BytesIO(f.read()) if paths.is_remote(path) else f, allow_pickle=False)


def _open_npz(path: str):
    """``np.load`` of an ``.npz`` frame; remote files are read whole first (zip needs seeks)."""
    if paths.is_remote(path):
        return np.load(io.BytesIO(paths.read_bytes(path)), allow_pickle=False)
    return np.load(path, allow_pickle=False)


def calvin_frame_path(split_dir: str, frame: int) -> str:
    return paths.join(split_dir, f"episode_{frame:07d}.npz")


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
    keys = [k for k in spec.required_keys]
    image_keys = {}
    for role in image_roles:
        key = {"primary": spec.primary_image, "wrist": spec.wrist_image}[role]
        if key is None:
            raise ValueError(f"expected a {role} camera for dataset {spec.name!r}, got none in its registry entry")
        image_keys[role] = key
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


class _ReadCalvinWindowFn(beam.DoFn):
    def __init__(self, spec: DatasetSpec, image_roles: Sequence[str]):
        self._spec = spec
        self._image_roles = tuple(image_roles)

    def process(self, window: CalvinWindow):
        try:
            episode = load_calvin_window(window, self._spec, self._image_roles)
        except (ValueError, OSError, KeyError) as e:
            beam.metrics.Metrics.counter(_NAMESPACE, "quarantined_read").inc()
            yield beam.pvalue.TaggedOutput(QUARANTINE, QuarantineRecord(self._spec.name, window.episode_id, "read", f"{type(e).__name__}: {e}"))
            return
        beam.metrics.Metrics.counter(_NAMESPACE, "episodes_read").inc()
        yield episode


class ReadCalvin(beam.PTransform):
    """PBegin -> {"episodes": PCollection[Episode], "quarantine": PCollection[QuarantineRecord]}.

    One episode per language window ``[start, end)`` of ``auto_lang_ann.npy`` (or per play segment with
    ``unlabeled=True``), frames enumerated from ``ep_start_end_ids.npy``, never from a glob.
    """

    def __init__(self, path: str, spec: DatasetSpec, image_roles: Sequence[str] = (), unlabeled: bool = False):
        super().__init__()
        self._spec = spec
        self._image_roles = tuple(image_roles)
        windows, seen, duplicates = [], set(), []
        for window in list_calvin_windows(path, unlabeled=unlabeled):
            if window.episode_id in seen:
                # Same frames listed twice: keep the first annotation, account for the others.
                duplicates.append(QuarantineRecord(
                    spec.name, f"{window.episode_id}#dup{len(duplicates)}", "read",
                    f"duplicate episode id {window.episode_id!r} (window listed again in auto_lang_ann.npy, "
                    f"annotation {window.language!r}); the first listing is kept",
                ))
                continue
            seen.add(window.episode_id)
            windows.append(window)
        self.windows = tuple(windows)
        self.duplicates = tuple(duplicates)

    def expand(self, pbegin):
        results = (
            pbegin
            | "ListWindows" >> beam.Create(self.windows)
            | "ReadWindows" >> beam.ParDo(_ReadCalvinWindowFn(self._spec, self._image_roles)).with_outputs(QUARANTINE, main="episodes")
        )
        quarantine = results[QUARANTINE]
        if self.duplicates:
            duplicates = pbegin | "DuplicateWindows" >> beam.Create(self.duplicates)
            quarantine = (quarantine, duplicates) | "AllReadQuarantine" >> beam.Flatten()
        return {"episodes": results.episodes, "quarantine": quarantine}


def read_episodes(path: str, spec: DatasetSpec, image_roles: Sequence[str] = (), calvin_unlabeled: bool = False) -> beam.PTransform:
    """The source PTransform for a registry entry's format."""
    if spec.source_format == "rlds":
        return ReadRLDS(path, spec, image_roles=image_roles)
    if spec.source_format == "calvin":
        return ReadCalvin(path, spec, image_roles=image_roles, unlabeled=calvin_unlabeled)
    raise SourceError(f"expected source_format 'rlds' or 'calvin', got {spec.source_format!r} for dataset {spec.name!r}")


def source_files(path: str, spec: DatasetSpec) -> list[str]:
    """Every file whose content determines the dataset's episodes (for fingerprints), sorted."""
    if spec.source_format == "rlds":
        version_dir = resolve_rlds_version_dir(path)
        names = [f for _, f, _ in rlds_shard_files(version_dir)] + ["dataset_info.json", "features.json"]
        present = {name for name, _ in paths.list_files(version_dir)}
        return sorted(paths.join(version_dir, n) for n in names if n in present)
    files = []
    for _, split_dir in calvin_split_dirs(path):
        files.extend(_calvin_files(split_dir))
    return sorted(files)


def _calvin_files(split_dir: str) -> list[str]:
    return sorted(paths.join(split_dir, n) for n, _ in paths.list_files(split_dir) if n.endswith((".npy", ".npz")))


@dataclasses.dataclass(frozen=True)
class SourceUnit:
    """The unit of incremental recomputation: one RLDS TFRecord shard, or one CALVIN split directory.

    ``files`` determine its episodes; ``shared`` (dataset-wide metadata) determine every unit's.
    """

    name: str
    path: str  # what to hand the source to read only this unit
    files: tuple[str, ...]
    shared: tuple[str, ...]
    prefix: str  # what every episode id of this unit starts with ("train/<shard file>/", "training/")


def source_units(path: str, spec: DatasetSpec) -> list[SourceUnit]:
    if spec.source_format == "rlds":
        version_dir = resolve_rlds_version_dir(path)
        # features.json decides how every shard parses; dataset_info.json only lists shards (it changes
        # when shards are added, which must not invalidate the existing ones).
        shared = tuple(paths.join(version_dir, n) for n in ("features.json",) if paths.isfile(paths.join(version_dir, n)))
        return [
            SourceUnit(f, version_dir, (paths.join(version_dir, f),), shared, f"{split}/{f}/")
            for split, f, _ in rlds_shard_files(version_dir)
        ]
    units = []
    for split, split_dir in calvin_split_dirs(path):
        units.append(SourceUnit(split, split_dir, tuple(_calvin_files(split_dir)), (), f"{split}/"))
    return units


def episode_unit(spec: DatasetSpec, episode_id: str) -> str:
    """The ``SourceUnit.name`` an episode (or its quarantine record) came from."""
    parts = episode_id.split("/")
    return parts[1] if spec.source_format == "rlds" else parts[0]


def read_units(units: Sequence[SourceUnit], spec: DatasetSpec, image_roles: Sequence[str] = ()) -> beam.PTransform:
    """The source PTransform restricted to ``units`` (all of one dataset)."""
    if spec.source_format == "rlds":
        return ReadRLDS(units[0].path, spec, image_roles=image_roles, shard_files=[u.name for u in units])
    return _ReadCalvinSplits([u.path for u in units], spec, image_roles)


class _ReadCalvinSplits(beam.PTransform):
    """PBegin -> {"episodes", "quarantine"}: ``ReadCalvin`` over several split directories."""

    def __init__(self, split_dirs: Sequence[str], spec: DatasetSpec, image_roles: Sequence[str]):
        super().__init__()
        self._reads = [ReadCalvin(d, spec, image_roles=image_roles) for d in split_dirs]

    def expand(self, pbegin):
        parts = [pbegin | f"Split{i}" >> read for i, read in enumerate(self._reads)]
        return {
            tag: [p[tag] for p in parts] | f"Flatten{tag}" >> beam.Flatten()
            for tag in ("episodes", "quarantine")
        }
