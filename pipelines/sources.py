"""Beam sources: RLDS (TFDS TFRecord datasets) and CALVIN split directories -> ``Episode`` records.

Both sources return a dict of two PCollections:
  ``"episodes"``:   PCollection[Episode]            (see ``vlaprep.schemas.episode``)
  ``"quarantine"``: PCollection[QuarantineRecord]   one per input episode that could not be read

Every input episode ends up in exactly one of the two. Element logic lives in plain functions
(``decode_rlds_example``, ``load_calvin_window``) so it can be tested without Beam.
"""

from __future__ import annotations

import dataclasses
import errno
import io
import json
import os
import pickle
import re
import zlib
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


class BrokenLinkError(SourceError):
    """A path of the dataset is a symlink loop (ELOOP) or a symlink to nothing.

    ``os.path.isdir``/``isfile`` answer False for both, which would read as "no dataset here" or skip the
    entry silently; the user is told about the link instead, and a search never swallows this error.
    """


def _refuse_broken_link(path: str, what: str) -> None:
    """Raise ``BrokenLinkError`` when local ``path`` is a symlink loop or a dangling symlink (remote: no links)."""
    if paths.is_remote(path):
        return
    local = path[len("file://"):] if path.startswith("file://") else path
    try:
        os.stat(local)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise BrokenLinkError(
                f"expected {what}, got a symlink loop for {path!r}; hint: fix or remove the link"
            ) from e
        if e.errno == errno.ENOENT and os.path.islink(local):
            raise BrokenLinkError(
                f"expected {what}, got a symlink to nothing ({os.readlink(local)!r}) for {path!r}; "
                "hint: fix or remove the link"
            ) from e


def _refuse_broken_links_in(directory: str, what: str) -> None:
    """``_refuse_broken_link`` for every symlink directly inside local ``directory`` (one ``scandir``)."""
    if paths.is_remote(directory):
        return
    with os.scandir(directory[len("file://"):] if directory.startswith("file://") else directory) as entries:
        links = sorted(e.path for e in entries if e.is_symlink())
    for link in links:
        _refuse_broken_link(link, what)


# --------------------------------------------------------------------------------------------------
# RLDS
# --------------------------------------------------------------------------------------------------

_VERSION_RE = re.compile(r"^\d+\.\d+\.\d+$")
_METADATA_FILES = ("dataset_info.json", "features.json")


def _version_dir(path: str) -> str:
    """``path``, once none of its entries is a broken link (a looping shard must not read as "missing")."""
    _refuse_broken_links_in(path, f"a file of the TFDS dataset in {path!r}")
    return path


def resolve_rlds_version_dir(path: str) -> str:
    """Accept a TFDS version dir (``.../name/1.0.0``), a dataset dir (``.../name``) or a data_dir
    holding exactly one ``name/version``; return the version dir (the newest version if several).

    Raises ``SourceError`` for anything else, ``BrokenLinkError`` for a symlink loop (or a link to
    nothing) met on the way, whether the path itself, its metadata, a version or a shard file."""
    path = path.rstrip("/") if paths.is_remote(path) else path
    _refuse_broken_link(path, "an RLDS dataset directory")
    if not paths.isdir(path):
        raise SourceError(f"expected an RLDS dataset directory, got {path!r}, which does not exist")
    info = paths.join(path, "dataset_info.json")
    _refuse_broken_link(info, "TFDS metadata (dataset_info.json)")
    if paths.isfile(info):
        return _version_dir(path)
    entries = paths.listdir(path)
    for name in entries:
        _refuse_broken_link(paths.join(path, name), f"a dataset or version directory in {path!r}")
        if _VERSION_RE.match(name):
            _refuse_broken_link(paths.join(path, name, "dataset_info.json"), "TFDS metadata (dataset_info.json)")
    versions = sorted(
        (d for d in entries if _VERSION_RE.match(d) and paths.isfile(paths.join(path, d, "dataset_info.json"))),
        key=lambda v: tuple(int(p) for p in v.split(".")),
    )
    if versions:
        return _version_dir(paths.join(path, versions[-1]))
    candidates = []
    for name in entries:
        sub = paths.join(path, name)
        if paths.isdir(sub):
            try:
                candidates.append(resolve_rlds_version_dir(sub))
            except BrokenLinkError:
                raise
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
    """``tfds.builder_from_directory`` of the dataset's metadata, its splits and features loaded.

    TFDS answers damaged metadata with assorted exceptions (protobuf ``ParseError``, ``ValueError`` for a
    bad version, ``TypeError`` for an unknown dtype...); they become one ``SourceError`` naming the file.
    """
    import tensorflow_datasets as tfds
    from google.protobuf import json_format
    from tensorflow_datasets.core.dataset_info import DatasetInfoFileError

    local = tfds_metadata_dir(version_dir)
    try:
        builder = tfds.builder_from_directory(local)
        _ = builder.info.splits, builder.info.features
    except (json_format.ParseError, DatasetInfoFileError, ValueError, TypeError, KeyError) as e:
        raise _metadata_error(version_dir, local, e) from e
    return builder


def _brief(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return f"{type(e).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def _metadata_error(version_dir: str, local: str, error: BaseException) -> SourceError:
    """Which metadata file TFDS could not load, and why: the first that is not JSON, else the first
    that TFDS's own reader of that file rejects (``dataset_info.json`` read first, as TFDS does)."""
    import tensorflow_datasets as tfds
    from google.protobuf import json_format
    from tensorflow_datasets.core import dataset_info

    hint = "hint: the file is truncated or damaged; restore it from the dataset's source"
    for name in _METADATA_FILES:
        try:
            with open(os.path.join(local, name), "rb") as f:
                json.loads(f.read())
        except FileNotFoundError:
            continue  # features.json is optional (older datasets keep features in dataset_info.json)
        except OSError as e:
            return SourceError(f"expected a readable {name}, got {_brief(e)} for {name} in {version_dir!r}")
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            return SourceError(f"expected JSON, got {_brief(e)} for {name} in {version_dir!r}; {hint}")
    try:
        dataset_info.read_from_json(os.path.join(local, "dataset_info.json"))
    except (json_format.ParseError, dataset_info.DatasetInfoFileError) as e:
        return SourceError(f"expected TFDS dataset metadata, got {_brief(e)} for dataset_info.json in {version_dir!r}; {hint}")
    if os.path.isfile(os.path.join(local, "features.json")):
        try:
            tfds.features.FeatureConnector.from_config(local)
        except (json_format.ParseError, ValueError, TypeError, KeyError) as e:
            return SourceError(f"expected TFDS features, got {_brief(e)} for features.json in {version_dir!r}; {hint}")
    return SourceError(f"expected TFDS dataset metadata, got {_brief(error)} for dataset_info.json in {version_dir!r}; {hint}")


def rlds_shard_files(version_dir: str) -> list[tuple[str, str, int]]:
    """[(split, shard file name, number of records)] for every TFRecord shard of the dataset, sorted.

    The number of records is what ``dataset_info.json`` declares (``shardLengths``); readers compare it
    with what each file holds."""
    builder = tfds_builder(version_dir)
    out = []
    for split_name in sorted(builder.info.splits.keys()):
        split = builder.info.splits[split_name]
        for filename, length in zip(split.filenames, split.shard_lengths):
            if int(length) < 0:
                raise SourceError(
                    f"expected a record count >= 0, got {int(length)} for shard {filename} (split {split_name!r}) "
                    f"in the shardLengths of dataset_info.json in {version_dir!r}; hint: the file is damaged, restore it"
                )
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
        codes = value.reshape(-1)
        nul = np.flatnonzero(codes == 0)
        codes = codes[: nul[0]] if len(nul) else codes  # the text ends at the first NUL, as OpenVLA decodes it
        try:
            return "".join(chr(int(c)) for c in codes)
        except (ValueError, OverflowError) as e:  # outside 0..0x10FFFF
            raise ValueError(f"expected Unicode code points in an integer-coded instruction, got {_brief(e)}") from e
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
    step_languages: tuple[str, ...] = ()
    if spec.language_key and spec.language_key in steps:
        step_languages = tuple(_decode_text(v) for v in steps[spec.language_key])  # OpenVLA reads every step's
    language = next((t for t in step_languages if t.strip()), "")
    images = {}
    for role in image_roles:
        key = spec.camera_key(role)
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
        dataset_name=spec.name, episode_id=episode_id, split=split, language=language, steps=kept, images=images,
        step_languages=step_languages,
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


class RecordDecodeError(ValueError):
    """A record whose checksums are right but whose payload is not an episode of the dataset's
    ``features.json``: not a ``tf.train.Example``, a step key missing, stored as another type, or values
    that do not fit the declared shape. Its episode is quarantined; the run goes on."""


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
        key = spec.camera_key(role)
        if key is None:
            raise SourceError(f"expected a {role} camera for dataset {spec.name!r}, got none in its registry entry")
        keys.append(key)
    return sorted(set(keys))


def _proto_kind(np_dtype) -> str:
    """The ``tf.train.Feature`` list TFDS serializes a dtype into (``example_serializer``): integers and
    bools as ``int64_list``, floats as ``float_list``, strings and encoded tensors as ``bytes_list``."""
    kind = np.dtype(np_dtype).kind
    return "float_list" if kind == "f" else "int64_list" if kind in "iub" else "bytes_list"


class RLDSParser:
    """Parse serialized RLDS episodes into flat ``{step key: [T, ...] array}`` dicts.

    TFDS's own NumPy parser (``ExampleParserNp``) restricted to the keys a consumer needs: the image
    bytes of an episode (99% of it) are never turned into arrays, and no TensorFlow op runs per record.
    Tensor features stored encoded (``Tensor(..., encoding=zlib|bytes)``) are decoded per step with
    their own feature connector; image features stay encoded (JPEG/PNG bytes).

    A record that is not an episode of the dataset's ``features.json`` raises ``RecordDecodeError``:
    the ``tf.train.Example`` is decoded first (``DecodeError`` for garbage) and every wanted key checked
    for presence and list type, which TFDS's parser does not do (it returns ``None`` for a missing key
    and converts an ``int64_list`` into floats). Decoding the protobuf twice costs ~40 µs for a 2 MB
    record: upb does not copy the bytes fields.
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
        # (proto key, list kind, dtype) per wanted feature; a nested sequence is stored as ragged values.
        self._kinds = tuple(
            (
                key if flat[key].sequence_rank < 2 else f"{key}/ragged_flat_values",
                _proto_kind(flat[key].np_dtype),
                flat[key].np_dtype,
            )
            for key in sorted(wanted)
        )
        self._encoded = {}
        step_features = builder.info.features["steps"].feature
        for key in sorted(wanted):
            connector = _feature_at(step_features, key.split("/")[1:])
            if isinstance(connector, tfds.features.Tensor) and flat[key].np_dtype != connector.np_dtype and not isinstance(
                connector, (tfds.features.Image, tfds.features.Text)
            ):
                self._encoded[key[len("steps/"):]] = connector

    def parse(self, record: bytes) -> dict:
        """One serialized episode -> ``{step key: [T, ...]}``; ``RecordDecodeError`` for bad data only."""
        from google.protobuf.message import DecodeError
        from tensorflow_datasets.proto import tf_example_pb2

        try:
            features = tf_example_pb2.Example.FromString(record).features.feature
        except DecodeError as e:
            raise RecordDecodeError(
                f"expected a serialized tf.train.Example, got {len(record)} bytes that do not decode ({_brief(e)})"
            ) from e
        for key, kind, dtype in self._kinds:
            got = features[key].WhichOneof("kind") if key in features else None
            if got != kind:
                raise RecordDecodeError(
                    f"expected feature {key!r} as {kind} ({np.dtype(dtype).name} in features.json), "
                    f"got {got or 'no such feature'}"
                )
        try:
            steps = _flatten(self._parser.parse_example(record)["steps"])
        except (ValueError, OverflowError) as e:  # a value that does not convert, a size that does not reshape
            raise RecordDecodeError(f"expected values that fit features.json, got {_brief(e)}") from e
        except RuntimeError as e:
            # TFDS re-raises an exception with a custom ``__str__`` (KeyError) as RuntimeError ``from`` it:
            # a ragged key this dataset does not declare. Anything else is not about the data.
            if not isinstance(e.__cause__, KeyError):
                raise
            raise RecordDecodeError(f"expected only features of features.json, got {_brief(e)}") from e
        for key, connector in self._encoded.items():
            try:
                values = [connector.decode_example_np(v) for v in steps[key]]
            except (ValueError, zlib.error) as e:
                raise RecordDecodeError(f"expected encoded tensors of {key!r} that decode, got {_brief(e)}") from e
            steps[key] = np.stack(values) if values else np.zeros((0,) + tuple(connector.shape), connector.np_dtype)
        return steps


def _feature_at(features, parts: Sequence[str]):
    """The TFDS feature at ``parts`` of a flattened key, longest name first: a FeaturesDict key may
    itself contain ``/`` (kuka's ``clip_function_input/base_pose_tool_reached``, bc_z's
    ``future/xyz_residual``)."""
    node, i = features, 0
    while i < len(parts):
        for j in range(len(parts), i, -1):
            name = "/".join(parts[i:j])
            if name in node.keys():
                node, i = node[name], j
                break
        else:
            raise KeyError("/".join(parts))
    return node


def rlds_parser(version_dir: str, keys: Sequence[str], optional: Sequence[str] = ()) -> RLDSParser:
    return RLDSParser(version_dir, keys, optional)


def _shard_reason(shard: "RLDSShard", read: int, what: str) -> str:
    """``<what> <file>: N of M declared records read (...)``: one kind per file before the first colon."""
    return f"{what} {shard.filename}: {read} of {shard.num_records} declared records read (dataset_info.json shardLengths)"


def read_rlds_shard(shard: RLDSShard, spec: DatasetSpec, image_roles: Sequence[str] = (), parser=None) -> Iterator:
    """Yield ``Episode``s of one shard, and ``QuarantineRecord``s for records that cannot be read.

    The shard is the unit ``tfds.beam.ReadFromTFDS`` reads too; here its TFRecord file is parsed with
    TFDS's own ``ExampleParser`` restricted to the keys the consumer needs (``rlds_parser``), with
    ``steps`` left undecoded (Beam cannot pickle nested datasets). Stable ids come from the file name
    and record index: ``<split>/<file>/<index>``, declared records that never arrive included.

    Every record ``dataset_info.json`` declares for the shard (``shard.num_records``) ends up as an
    episode or a quarantine record (stage ``read``):
      - a record that does not decode (``RecordDecodeError``) or is not an episode (``ValueError`` from
        ``decode_rlds_example``): that record;
      - a corrupt or truncated record (checksums, framing) or an unreadable file: every record from it on;
      - a missing file: every declared record;
      - a file that ends early at a record boundary (0 bytes, a cut copy): the records it lacks.
    Records beyond the declared count are quarantined too, not read: the file and the metadata disagree
    (a shard from another build, appended records), so nothing vouches for them, and reading them would
    change the statistics without a trace; quarantined they stay counted and explained.
    """
    if parser is None:
        parser = rlds_parser(shard.version_dir, rlds_keys(spec, image_roles), optional=[spec.language_key] if spec.language_key else [])
    path = paths.join(shard.version_dir, shard.filename)

    def quarantine(index: int, reason: str) -> QuarantineRecord:
        return QuarantineRecord(spec.name, f"{shard.split}/{shard.filename}/{index}", "read", reason)

    # Every record's CRC32C is checked: that is how flipped bytes and truncation are caught.
    iterator = iter_tfrecord_file(path)
    index = 0
    while True:
        try:
            example = next(iterator)
        except StopIteration:
            break
        except (CorruptRecordError, OSError) as e:
            if index == 0 and not paths.isfile(path):
                beam.metrics.Metrics.counter(_NAMESPACE, "rlds_missing_shards").inc()
                for lost in range(shard.num_records):
                    yield quarantine(lost, _shard_reason(shard, 0, "missing shard file") + "; hint: restore the file")
                return
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            beam.metrics.Metrics.counter(_NAMESPACE, "rlds_corrupt_shards").inc()
            for lost in range(index, max(index + 1, shard.num_records)):
                yield quarantine(
                    lost, _shard_reason(shard, index, "unreadable shard file") + f"; {type(e).__name__}: {reason[:300]}"
                )
            return
        i, index = index, index + 1
        if i >= shard.num_records:
            beam.metrics.Metrics.counter(_NAMESPACE, "rlds_undeclared_records").inc()
            yield quarantine(
                i,
                f"undeclared record in {shard.filename}: record {i} is beyond the {shard.num_records} declared "
                "records (dataset_info.json shardLengths); hint: restore the shard or regenerate dataset_info.json",
            )
            continue
        try:
            steps = parser.parse(example)
        except RecordDecodeError as e:
            beam.metrics.Metrics.counter(_NAMESPACE, "rlds_undecodable_records").inc()
            yield quarantine(i, f"undecodable record in {shard.filename}: {e}")
            continue
        try:
            episode = decode_rlds_example(steps, spec, f"{shard.split}/{shard.filename}/{i}", shard.split, image_roles)
        except ValueError as e:  # its contract: a missing or malformed key, named
            yield quarantine(i, f"{type(e).__name__}: {e}")
            continue
        yield episode
    if index < shard.num_records:
        beam.metrics.Metrics.counter(_NAMESPACE, "rlds_short_shards").inc()
        for lost in range(index, shard.num_records):
            yield quarantine(
                lost,
                _shard_reason(shard, index, "short shard file")
                + "; the file ends early (truncated or replaced); hint: restore it from the dataset's source",
            )


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
    _refuse_broken_link(path, "a CALVIN directory")
    if not paths.isdir(path):
        raise SourceError(f"expected a CALVIN directory, got {path!r}, which does not exist")
    _refuse_broken_link(paths.join(path, "ep_start_end_ids.npy"), "CALVIN segments (ep_start_end_ids.npy)")
    if paths.isfile(paths.join(path, "ep_start_end_ids.npy")):
        return [(paths.basename(os.path.normpath(path) if not paths.is_remote(path) else path), path)]
    for s in CALVIN_SPLITS:
        _refuse_broken_link(paths.join(path, s), f"a CALVIN split directory ({s}/)")
        _refuse_broken_link(paths.join(path, s, "ep_start_end_ids.npy"), "CALVIN segments (ep_start_end_ids.npy)")
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
        raise SourceError(f"expected an integer array [N, 2] written by np.save, got {_brief(e)} for {where}; {hint}") from e
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


def load_language_annotations(split_dir: str, required: bool = True) -> list[tuple[int, int, str]] | None:
    """[(start, end_exclusive, ann)] from ``lang_annotations/auto_lang_ann.npy``, via the restricted unpickler.

    Raises ``SourceError`` naming the file for one that is missing (``None`` instead if not ``required``),
    does not load (truncated, not a ``.npy``, a pickle asking for code: ``UnsafeFileError``) or is not
    ``{'language': {'ann': [str]}, 'info': {'indx': [(start, end)]}}`` with integer frame ids >= 0. A
    window whose end is not after its start is kept: reading it quarantines that one episode.
    """
    path = paths.join(split_dir, "lang_annotations", "auto_lang_ann.npy")
    _refuse_broken_link(paths.join(split_dir, "lang_annotations"), "CALVIN language annotations (lang_annotations/)")
    _refuse_broken_link(path, "CALVIN language annotations (auto_lang_ann.npy)")
    if not paths.isfile(path):
        if not required:
            return None
        raise SourceError(
            f"expected language annotations at {path!r}, got no such file; hint: vlaprep reads CALVIN's "
            "language-annotated windows, which lang_annotations/auto_lang_ann.npy lists"
        )
    hint = "hint: the file is damaged; restore it from the dataset's source"
    try:
        data = safe_pickle.load_pickled_npy(path)
    except safe_pickle.UnsafePickleError as e:
        raise UnsafeFileError(str(e)) from e
    except (pickle.UnpicklingError, EOFError, ValueError) as e:  # truncated, flipped bytes, not a .npy
        raise SourceError(f"expected a pickled dict saved by np.save, got {_brief(e)} for {path!r}; {hint}") from e
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


def list_calvin_windows(path: str) -> list[CalvinWindow]:
    """Every episode of a CALVIN dataset: its language windows, in annotation order, per split."""
    windows = []
    for split, split_dir in calvin_split_dirs(path):
        segments = load_calvin_segments(split_dir)
        starts = [a for a, _ in segments]
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
    keys = [k for k in spec.required_keys]
    image_keys = {}
    for role in image_roles:
        key = spec.camera_key(role)
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


def source_files(path: str, spec: DatasetSpec) -> list[str]:
    """Every file whose content determines the dataset's episodes (for fingerprints), sorted.

    The first thing a run asks of a source, so it also checks the dataset's metadata and raises
    ``SourceError`` before any work: RLDS ``dataset_info.json``/``features.json`` (loaded by TFDS),
    CALVIN ``ep_start_end_ids.npy`` and, when present, ``auto_lang_ann.npy``. A shard file that
    ``dataset_info.json`` lists but the directory lacks is left out (reading it quarantines its records).
    """
    if spec.source_format == "rlds":
        version_dir = resolve_rlds_version_dir(path)
        names = [f for _, f, _ in rlds_shard_files(version_dir)] + ["dataset_info.json", "features.json"]
        present = {name for name, _ in _list_files(version_dir)}
        return sorted(paths.join(version_dir, n) for n in names if n in present)
    files = []
    for _, split_dir in calvin_split_dirs(path):
        load_calvin_segments(split_dir)
        load_language_annotations(split_dir, required=False)
        files.extend(_calvin_files(split_dir))
    return sorted(files)


def _calvin_files(split_dir: str) -> list[str]:
    return sorted(paths.join(split_dir, n) for n, _ in _list_files(split_dir) if n.endswith((".npy", ".npz")))


def _list_files(directory: str) -> list[tuple[str, int]]:
    """``paths.list_files``; a symlink loop or a link to nothing among the files is a ``BrokenLinkError``."""
    try:
        return paths.list_files(directory)
    except OSError as e:
        if e.filename and e.errno in (errno.ELOOP, errno.ENOENT) and os.path.islink(e.filename):
            _refuse_broken_link(e.filename, f"a file of the dataset in {directory!r}")
        raise


CALVIN_WINDOWS_PER_UNIT = 64  # CALVIN episodes read by one worker call (and cached as one projection)


@dataclasses.dataclass(frozen=True)
class SourceUnit:
    """The unit every source is read, parallelised and cached by: one RLDS TFRecord shard, or a run of
    ``CALVIN_WINDOWS_PER_UNIT`` language windows of one CALVIN split.

    ``files`` determine its episodes; ``shared`` (dataset-wide metadata) determine every unit's.
    ``items`` is what ``iter_unit_episodes`` reads: ``(RLDSShard,)`` or CALVIN windows;
    ``quarantine``: records known from the listing alone (a CALVIN window listed twice).
    """

    name: str
    path: str  # the dataset's version dir (RLDS) or split dir (CALVIN)
    files: tuple[str, ...]  # empty for an RLDS shard missing from its directory (all its records quarantined)
    shared: tuple[str, ...]
    prefix: str  # what every episode id of this unit starts with ("train/<shard file>/", "training/")
    # RLDS: the records dataset_info.json declares for the shard; with the file's content it decides the
    # unit's episodes and quarantine (a short shard's missing records). None for CALVIN.
    declared: int | None = None
    items: tuple = ()
    quarantine: tuple[QuarantineRecord, ...] = ()


def source_units(path: str, spec: DatasetSpec) -> list[SourceUnit]:
    """Every unit of the dataset at ``path``, in a stable order (checks its metadata: ``SourceError``)."""
    if spec.source_format == "rlds":
        version_dir = resolve_rlds_version_dir(path)
        check_rlds_features(version_dir, spec)
        # features.json decides how every shard parses; dataset_info.json only lists shards (it changes
        # when shards are added, which must not invalidate the existing ones).
        shared = tuple(paths.join(version_dir, n) for n in ("features.json",) if paths.isfile(paths.join(version_dir, n)))
        present = {name for name, _ in _list_files(version_dir)}  # one listing, not a request per shard
        units, per_split_index = [], {}
        for split, f, n in rlds_shard_files(version_dir):
            index = per_split_index[split] = per_split_index.get(split, -1) + 1
            shard = RLDSShard(version_dir, split, index, f, n)
            files = (paths.join(version_dir, f),) if f in present else ()
            units.append(SourceUnit(f, version_dir, files, shared, f"{split}/{f}/", n, (shard,)))
        return units
    if spec.source_format == "calvin":
        return [u for split, split_dir in calvin_split_dirs(path) for u in _calvin_units(spec, split, split_dir)]
    raise SourceError(f"expected source_format 'rlds' or 'calvin', got {spec.source_format!r} for dataset {spec.name!r}")


def _calvin_units(spec: DatasetSpec, split: str, split_dir: str) -> list[SourceUnit]:
    """The split's language windows in annotation order, ``CALVIN_WINDOWS_PER_UNIT`` per unit.

    A window listed again (same frames) is not read twice: its record goes to the unit of the listing."""
    frame_files = {paths.basename(f): f for f in _calvin_files(split_dir)}
    shared = tuple(sorted(f for name, f in frame_files.items() if not name.startswith("episode_")))
    shared += tuple(
        paths.join(split_dir, "lang_annotations", n) for n, _ in _list_files(paths.join(split_dir, "lang_annotations"))
    ) if paths.isdir(paths.join(split_dir, "lang_annotations")) else ()
    listed = list_calvin_windows(split_dir)
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
            f"{split}:{first // CALVIN_WINDOWS_PER_UNIT:05d}", split_dir, files, shared, f"{split}/",
            None, tuple(windows), tuple(quarantine),
        ))
    return units


def check_rlds_features(version_dir: str, spec: DatasetSpec) -> None:
    """The dataset's own ``features.json`` has every step key the registry entry reads, with the width it
    declares (widths are read from the data's metadata, never guessed); ``SourceError`` naming the key."""
    from vlaprep.transforms.features import FeatureMismatchError, check_step_shapes

    local = tfds_metadata_dir(version_dir)
    features = os.path.join(local, "features.json")
    if not os.path.isfile(features):
        return  # older datasets keep their features in dataset_info.json; the parser checks the keys
    try:
        check_step_shapes(spec, features)
    except FeatureMismatchError as e:
        raise SourceError(f"{e} (in {paths.join(version_dir, 'features.json')!r})") from e
    except ValueError as e:  # not JSON / not a FeaturesDict: the metadata check names the file
        raise _metadata_error(version_dir, local, e) from e


def iter_unit_episodes(unit: SourceUnit, spec: DatasetSpec, image_roles: Sequence[str] = (), parser=None) -> Iterator:
    """Yield every ``Episode`` of the unit and a ``QuarantineRecord`` for each one that cannot be read
    (reasons as in ``read_rlds_shard`` / ``load_calvin_window``). ``parser``: a reused ``RLDSParser``."""
    yield from unit.quarantine
    if spec.source_format == "rlds":
        for shard in unit.items:
            yield from read_rlds_shard(shard, spec, image_roles, parser)
        return
    for window in unit.items:
        try:
            yield load_calvin_window(window, spec, image_roles)
        except (ValueError, OSError, KeyError) as e:
            yield QuarantineRecord(spec.name, window.episode_id, "read", f"{type(e).__name__}: {e}")


def unit_parser(spec: DatasetSpec, unit: SourceUnit, image_roles: Sequence[str] = ()):
    """The parser ``iter_unit_episodes`` needs for this unit (RLDS), else None; reusable across its units."""
    if spec.source_format != "rlds":
        return None
    return rlds_parser(unit.path, rlds_keys(spec, image_roles), optional=[spec.language_key] if spec.language_key else [])


class _ReadUnitFn(beam.DoFn):
    """SourceUnit -> Episode (main) and QuarantineRecord (tagged ``quarantine``)."""

    def __init__(self, spec: DatasetSpec, image_roles: Sequence[str]):
        self._spec = spec
        self._image_roles = tuple(image_roles)
        self._parsers = None

    def setup(self):
        self._parsers = {}  # dataset dir -> parser; built once per worker, not per unit

    def process(self, unit: SourceUnit):
        parser = self._parsers.get(unit.path)
        if parser is None and self._spec.source_format == "rlds":
            parser = self._parsers[unit.path] = unit_parser(self._spec, unit, self._image_roles)
        for item in iter_unit_episodes(unit, self._spec, self._image_roles, parser):
            if isinstance(item, QuarantineRecord):
                beam.metrics.Metrics.counter(_NAMESPACE, "quarantined_read").inc()
                yield beam.pvalue.TaggedOutput(QUARANTINE, item)
            else:
                beam.metrics.Metrics.counter(_NAMESPACE, "episodes_read").inc()
                yield item


class ReadDataset(beam.PTransform):
    """PBegin -> {"episodes": PCollection[Episode], "quarantine": PCollection[QuarantineRecord]}.

    Reads the dataset at ``path`` (RLDS or CALVIN, after its registry entry), one element per
    ``SourceUnit`` so units are read in parallel; ``units`` restricts it to some of them. Checks on the
    launcher, before any work, that the dataset has every key its registry entry needs.
    """

    def __init__(self, path: str, spec: DatasetSpec, image_roles: Sequence[str] = (), units: Sequence[SourceUnit] | None = None):
        super().__init__()
        self._spec = spec
        self._image_roles = tuple(image_roles)
        self.units = tuple(units) if units is not None else tuple(source_units(path, spec))
        if self.units and spec.source_format == "rlds":
            rlds_parser(self.units[0].path, rlds_keys(spec, self._image_roles))

    def expand(self, pbegin):
        results = (
            pbegin
            | "ListUnits" >> beam.Create(self.units)
            | "ReadUnits" >> beam.ParDo(_ReadUnitFn(self._spec, self._image_roles)).with_outputs(QUARANTINE, main="episodes")
        )
        return {"episodes": results.episodes, "quarantine": results[QUARANTINE]}
