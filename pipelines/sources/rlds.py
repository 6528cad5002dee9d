"""RLDS datasets (TFDS TFRecord shards of episodes) -> ``Episode`` records: ``RLDSSource``.

A dataset version is ``DIR/<name>/<version>/`` with ``dataset_info.json`` (splits, shard files, declared
records per shard), ``features.json`` (how every step key is serialized) and the TFRecord shards. Its two
metadata files are read by one function, ``read_rlds_metadata``, into ``RLDSMetadata`` (their bytes);
everything else (the split list, the feature connectors, the parser) is parsed from those bytes with
TFDS's own code, in the process that needs it, so workers never read the metadata again.

A shard is one unit. Its records are parsed with TFDS's NumPy parser restricted to the keys a consumer
needs (``RLDSParser``); stable episode ids come from the file name and record index:
``<split>/<file>/<index>``, declared records that never arrive included.
"""

from __future__ import annotations

import dataclasses
import json
import re
import zlib
from collections.abc import Mapping
from typing import Iterator, NamedTuple, Sequence

import apache_beam as beam
import numpy as np

from vlaprep import paths
from vlaprep.pipelines.sources.base import (
    COUNTER_NAMESPACE,
    BrokenLinkError,
    Source,
    SourceError,
    SourceLocation,
    SourceUnit,
    brief,
    camera_keys,
    list_files,
    refuse_broken_link,
    refuse_broken_links_in,
    register_source,
)
from vlaprep.pipelines.sources.tfrecord import CorruptRecordError, iter_tfrecord_file
from vlaprep.schemas.episode import Episode, QuarantineRecord
from vlaprep.transforms.base import SourceFormat
from vlaprep.transforms.registry import DatasetSpec

_VERSION_RE = re.compile(r"^\d+\.\d+\.\d+$")
DATASET_INFO = "dataset_info.json"
FEATURES = "features.json"
_METADATA_HINT = "hint: the file is truncated or damaged; restore it from the dataset's source"


def _version_dir(path: str) -> str:
    """``path``, once none of its entries is a broken link (a looping shard must not read as "missing")."""
    refuse_broken_links_in(path, f"a file of the TFDS dataset in {path!r}")
    return path


def resolve_rlds_version_dir(path: str) -> str:
    """Accept a TFDS version dir (``.../name/1.0.0``), a dataset dir (``.../name``) or a data_dir
    holding exactly one ``name/version``; return the version dir (the newest version if several).

    Raises ``SourceError`` for anything else, ``BrokenLinkError`` for a symlink loop (or a link to
    nothing) met on the way, whether the path itself, its metadata, a version or a shard file."""
    path = path.rstrip("/") if paths.is_remote(path) else path
    refuse_broken_link(path, "an RLDS dataset directory")
    if not paths.isdir(path):
        raise SourceError(f"expected an RLDS dataset directory, got {path!r}, which does not exist")
    info = paths.join(path, DATASET_INFO)
    refuse_broken_link(info, "TFDS metadata (dataset_info.json)")
    if paths.isfile(info):
        return _version_dir(path)
    entries = paths.listdir(path)
    for name in entries:
        refuse_broken_link(paths.join(path, name), f"a dataset or version directory in {path!r}")
        if _VERSION_RE.match(name):
            refuse_broken_link(paths.join(path, name, DATASET_INFO), "TFDS metadata (dataset_info.json)")
    versions = sorted(
        (d for d in entries if _VERSION_RE.match(d) and paths.isfile(paths.join(path, d, DATASET_INFO))),
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


# --------------------------------------------------------------------------------------------------
# Metadata: read once, parsed where needed
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RLDSMetadata:
    """The TFDS metadata files of one dataset version, as read (``read_rlds_metadata``): small bytes that
    pickle to workers, where ``parse_rlds_metadata`` turns them into TFDS objects without reading storage."""

    version_dir: str
    dataset_info: bytes  # dataset_info.json
    features: bytes | None  # features.json; None: older datasets keep their features in dataset_info.json


class ParsedRLDSMetadata(NamedTuple):
    splits: object  # tfds.core.SplitDict: per split, its shard file names and declared record counts
    features: object  # tfds.features.FeaturesDict of the dataset's examples


def read_rlds_metadata(version_dir: str) -> RLDSMetadata:
    """The one reader of a version dir's ``dataset_info.json`` and (when present) ``features.json``.

    Local and object-store paths alike (``vlaprep.paths``); ``SourceError`` naming a file that cannot be read.
    """

    def read(name: str, optional: bool = False) -> bytes | None:
        path = paths.join(version_dir, name)
        if optional and paths.is_remote(path) and not paths.isfile(path):
            return None  # stores differ in how they refuse to open a missing object: ask first
        try:
            return paths.read_bytes(path)
        except OSError as e:  # a symlink loop or no permission is an error, not an absent file
            if optional and isinstance(e, FileNotFoundError):
                return None
            raise SourceError(f"expected a readable {name}, got {brief(e)} for {name} in {version_dir!r}") from e

    return RLDSMetadata(version_dir, read(DATASET_INFO), read(FEATURES, optional=True))


def parse_rlds_metadata(metadata: RLDSMetadata) -> ParsedRLDSMetadata:
    """Splits and features of the dataset, as ``tfds.builder_from_directory`` restores them (its TFDS
    functions, in its order), from the bytes read: no storage access. Left out: what the builder alone
    reads or refuses and a parser never uses (label files of ``ClassLabel`` features, blocked versions).

    TFDS answers damaged metadata with assorted exceptions (protobuf ``ParseError``, ``ValueError`` for a
    bad version, ``TypeError`` for an unknown dtype...); they become one ``SourceError`` naming the file.
    """
    import posixpath

    import tensorflow_datasets as tfds
    from google.protobuf import json_format
    from tensorflow_datasets.core import naming
    from tensorflow_datasets.core import splits as splits_lib
    from tensorflow_datasets.core.proto import dataset_info_pb2
    from tensorflow_datasets.core.utils import version as version_lib

    try:
        info = json_format.Parse(metadata.dataset_info, dataset_info_pb2.DatasetInfo())
        version = version_lib.Version(info.version)  # the builder's first check ("Invalid version")
        features = None
        if info.HasField("features"):
            features = tfds.features.FeatureConnector.from_proto(info.features)
        template = naming.ShardedFileTemplate(
            dataset_name=info.name, data_dir=metadata.version_dir, filetype_suffix=info.file_format or "tfrecord"
        )
        splits = splits_lib.SplitDict.from_proto(repeated_split_infos=info.splits, filename_template=template)
        if features is None and metadata.features is not None:
            features = tfds.features.FeatureConnector.from_json(json.loads(metadata.features.decode("utf-8")))
        if features is None:
            full_name = posixpath.join(info.name, *([info.config_name] if info.config_name else []), str(version))
            raise ValueError(  # TFDS's ReadOnlyBuilder message
                f"Cannot restore {full_name}. It likely means the dataset was generated with an old TFDS version (<=3.2.1)."
            )
    except (json_format.ParseError, ValueError, TypeError, KeyError) as e:
        raise _metadata_error(metadata, e) from e
    return ParsedRLDSMetadata(splits, features)


def _metadata_error(metadata: RLDSMetadata, error: BaseException) -> SourceError:
    """Which metadata file TFDS could not load, and why: the first that is not JSON, else the first that
    TFDS's own reader of that file rejects (``dataset_info.json`` first, as TFDS reads it first)."""
    import tensorflow_datasets as tfds
    from google.protobuf import json_format
    from tensorflow_datasets.core.proto import dataset_info_pb2

    version_dir = metadata.version_dir
    for name, data in ((DATASET_INFO, metadata.dataset_info), (FEATURES, metadata.features)):
        if data is None:
            continue  # features.json is optional (older datasets keep features in dataset_info.json)
        try:
            json.loads(data)
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            return SourceError(f"expected JSON, got {brief(e)} for {name} in {version_dir!r}; {_METADATA_HINT}")
    try:
        json_format.Parse(metadata.dataset_info, dataset_info_pb2.DatasetInfo())
    except json_format.ParseError as e:
        return SourceError(
            f"expected TFDS dataset metadata, got {brief(e)} for dataset_info.json in {version_dir!r}; {_METADATA_HINT}"
        )
    if metadata.features is not None:
        try:
            tfds.features.FeatureConnector.from_json(json.loads(metadata.features.decode("utf-8")))
        except (json_format.ParseError, ValueError, TypeError, KeyError) as e:
            return SourceError(f"expected TFDS features, got {brief(e)} for features.json in {version_dir!r}; {_METADATA_HINT}")
    return SourceError(
        f"expected TFDS dataset metadata, got {brief(error)} for dataset_info.json in {version_dir!r}; {_METADATA_HINT}"
    )


def check_rlds_features(metadata: RLDSMetadata, spec: DatasetSpec) -> None:
    """The dataset's own ``features.json`` has every step key the registry entry reads, with the width it
    declares (widths are read from the data's metadata, never guessed); ``SourceError`` naming the key."""
    from vlaprep.transforms.features import FeatureMismatchError, check_step_shapes

    if metadata.features is None:
        return  # older datasets keep their features in dataset_info.json; the parser checks the keys
    try:
        document = json.loads(metadata.features.decode("utf-8"))
        # A document that is not an object has no top-level features, as the empty object has none.
        check_step_shapes(spec, document if isinstance(document, Mapping) else {})
    except FeatureMismatchError as e:
        raise SourceError(f"{e} (in {paths.join(metadata.version_dir, FEATURES)!r})") from e
    except ValueError as e:  # not JSON / not a FeaturesDict: the metadata check names the file
        raise _metadata_error(metadata, e) from e


def _shard_files(metadata: RLDSMetadata, parsed: ParsedRLDSMetadata) -> list[tuple[str, str, int]]:
    out = []
    for split_name in sorted(parsed.splits.keys()):
        split = parsed.splits[split_name]
        for filename, length in zip(split.filenames, split.shard_lengths):
            if int(length) < 0:
                raise SourceError(
                    f"expected a record count >= 0, got {int(length)} for shard {filename} (split {split_name!r}) "
                    f"in the shardLengths of dataset_info.json in {metadata.version_dir!r}; hint: the file is damaged, restore it"
                )
            out.append((split_name, filename, int(length)))
    return out


def rlds_shard_files(version_dir: str) -> list[tuple[str, str, int]]:
    """[(split, shard file name, number of records)] for every TFRecord shard of the dataset, sorted.

    The number of records is what ``dataset_info.json`` declares (``shardLengths``); readers compare it
    with what each file holds."""
    metadata = read_rlds_metadata(version_dir)
    return _shard_files(metadata, parse_rlds_metadata(metadata))


# --------------------------------------------------------------------------------------------------
# Records -> episodes
# --------------------------------------------------------------------------------------------------


def _flatten(tree, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "/"))
        else:
            flat[name] = value
    return flat


def decode_text(value) -> str:
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
            raise ValueError(f"expected Unicode code points in an integer-coded instruction, got {brief(e)}") from e
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
        step_languages = tuple(decode_text(v) for v in steps[spec.language_key])  # OpenVLA reads every step's
    language = next((t for t in step_languages if t.strip()), "")
    images = {}
    for role, key in camera_keys(spec, image_roles, ValueError).items():
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


class RecordDecodeError(ValueError):
    """A record whose checksums are right but whose payload is not an episode of the dataset's
    ``features.json``: not a ``tf.train.Example``, a step key missing, stored as another type, or values
    that do not fit the declared shape. Its episode is quarantined; the run goes on."""


def rlds_keys(spec: DatasetSpec, image_roles: Sequence[str] = ()) -> list[str]:
    """Step keys to parse: what the transform reads, the language key, the requested cameras."""
    return sorted(set(spec.required_keys) | set(camera_keys(spec, image_roles).values()))


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
    their own feature connector; image features stay encoded (JPEG/PNG bytes). Built from the metadata
    bytes already read (``RLDSMetadata``): constructing one reads no file.

    A record that is not an episode of the dataset's ``features.json`` raises ``RecordDecodeError``:
    the ``tf.train.Example`` is decoded first (``DecodeError`` for garbage) and every wanted key checked
    for presence and list type, which TFDS's parser does not do (it returns ``None`` for a missing key
    and converts an ``int64_list`` into floats). Decoding the protobuf twice costs ~40 µs for a 2 MB
    record: upb does not copy the bytes fields.
    """

    def __init__(self, metadata: RLDSMetadata, keys: Sequence[str], optional: Sequence[str] = ()):
        import tensorflow_datasets as tfds
        from tensorflow_datasets.core import example_parser
        from tensorflow_datasets.core.utils import py_utils

        features = parse_rlds_metadata(metadata).features
        flat = py_utils.flatten_nest_dict(features.get_serialized_info())
        wanted = {f"steps/{k}" for k in keys}
        missing = sorted(k for k in wanted if k not in flat)
        if missing:
            present = sorted(k[len("steps/"):] for k in flat if k.startswith("steps/"))
            raise SourceError(
                f"expected step keys {[m[len('steps/'):] for m in missing]!r} in {metadata.version_dir!r}, got {present!r}; "
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
        step_features = features["steps"].feature
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
                f"expected a serialized tf.train.Example, got {len(record)} bytes that do not decode ({brief(e)})"
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
            raise RecordDecodeError(f"expected values that fit features.json, got {brief(e)}") from e
        except RuntimeError as e:
            # TFDS re-raises an exception with a custom ``__str__`` (KeyError) as RuntimeError ``from`` it:
            # a ragged key this dataset does not declare. Anything else is not about the data.
            if not isinstance(e.__cause__, KeyError):
                raise
            raise RecordDecodeError(f"expected only features of features.json, got {brief(e)}") from e
        for key, connector in self._encoded.items():
            try:
                values = [connector.decode_example_np(v) for v in steps[key]]
            except (ValueError, zlib.error) as e:
                raise RecordDecodeError(f"expected encoded tensors of {key!r} that decode, got {brief(e)}") from e
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


def spec_parser(metadata: RLDSMetadata, spec: DatasetSpec, image_roles: Sequence[str] = ()) -> RLDSParser:
    """The parser of ``spec``'s keys, the requested cameras and (when the dataset has it) the language key."""
    return RLDSParser(metadata, rlds_keys(spec, image_roles), optional=[spec.language_key] if spec.language_key else [])


def rlds_parser(version_dir: str, keys: Sequence[str], optional: Sequence[str] = ()) -> RLDSParser:
    """``RLDSParser`` of the dataset in ``version_dir``, its metadata read from there."""
    return RLDSParser(read_rlds_metadata(version_dir), keys, optional)


def _shard_reason(shard: RLDSShard, read: int, what: str) -> str:
    """``<what> <file>: N of M declared records read (...)``: one kind per file before the first colon."""
    return f"{what} {shard.filename}: {read} of {shard.num_records} declared records read (dataset_info.json shardLengths)"


def read_rlds_shard(
    shard: RLDSShard, spec: DatasetSpec, image_roles: Sequence[str] = (), parser: RLDSParser | None = None
) -> Iterator[Episode | QuarantineRecord]:
    """Yield ``Episode``s of one shard, and ``QuarantineRecord``s for records that cannot be read.

    The shard is the unit ``tfds.beam.ReadFromTFDS`` reads too; here its TFRecord file is parsed with
    TFDS's own ``ExampleParser`` restricted to the keys the consumer needs (``RLDSParser``; without one,
    it is built from the shard's version dir), with ``steps`` left undecoded (Beam cannot pickle nested
    datasets).

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
        parser = spec_parser(read_rlds_metadata(shard.version_dir), spec, image_roles)
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
                beam.metrics.Metrics.counter(COUNTER_NAMESPACE, "rlds_missing_shards").inc()
                for lost in range(shard.num_records):
                    yield quarantine(lost, _shard_reason(shard, 0, "missing shard file") + "; hint: restore the file")
                return
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            beam.metrics.Metrics.counter(COUNTER_NAMESPACE, "rlds_corrupt_shards").inc()
            for lost in range(index, max(index + 1, shard.num_records)):
                yield quarantine(
                    lost, _shard_reason(shard, index, "unreadable shard file") + f"; {type(e).__name__}: {reason[:300]}"
                )
            return
        i, index = index, index + 1
        if i >= shard.num_records:
            beam.metrics.Metrics.counter(COUNTER_NAMESPACE, "rlds_undeclared_records").inc()
            yield quarantine(
                i,
                f"undeclared record in {shard.filename}: record {i} is beyond the {shard.num_records} declared "
                "records (dataset_info.json shardLengths); hint: restore the shard or regenerate dataset_info.json",
            )
            continue
        try:
            steps = parser.parse(example)
        except RecordDecodeError as e:
            beam.metrics.Metrics.counter(COUNTER_NAMESPACE, "rlds_undecodable_records").inc()
            yield quarantine(i, f"undecodable record in {shard.filename}: {e}")
            continue
        try:
            episode = decode_rlds_example(steps, spec, f"{shard.split}/{shard.filename}/{i}", shard.split, image_roles)
        except ValueError as e:  # its contract: a missing or malformed key, named
            yield quarantine(i, f"{type(e).__name__}: {e}")
            continue
        yield episode
    if index < shard.num_records:
        beam.metrics.Metrics.counter(COUNTER_NAMESPACE, "rlds_short_shards").inc()
        for lost in range(index, shard.num_records):
            yield quarantine(
                lost,
                _shard_reason(shard, index, "short shard file")
                + "; the file ends early (truncated or replaced); hint: restore it from the dataset's source",
            )


# --------------------------------------------------------------------------------------------------
# The source
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RLDSLocation(SourceLocation):
    """A TFDS dataset version: ``root`` is its version dir, ``metadata`` its ``RLDSMetadata``."""

    listing: tuple[tuple[str, int], ...]  # (name, size) of every file under the version dir


@register_source
class RLDSSource(Source):
    """TFDS/RLDS datasets: one unit per TFRecord shard, in (split, shard) order."""

    format = SourceFormat.RLDS

    def locate(self, path: str) -> RLDSLocation:
        version_dir = resolve_rlds_version_dir(path)
        metadata = read_rlds_metadata(version_dir)
        # One listing, not a request per shard; dataset_info.json decides which files are shards.
        return RLDSLocation(version_dir, metadata, tuple(list_files(version_dir)))

    def units(self, location: RLDSLocation, spec: DatasetSpec) -> list[SourceUnit]:
        metadata = location.metadata
        check_rlds_features(metadata, spec)
        shards = _shard_files(metadata, parse_rlds_metadata(metadata))
        # features.json decides how every shard parses; dataset_info.json only lists shards (it changes
        # when shards are added, which must not invalidate the existing ones).
        shared = (paths.join(location.root, FEATURES),) if metadata.features is not None else ()
        present = {name for name, _ in location.listing}
        units, per_split_index = [], {}
        for split, f, n in shards:
            index = per_split_index[split] = per_split_index.get(split, -1) + 1
            shard = RLDSShard(location.root, split, index, f, n)
            files = (paths.join(location.root, f),) if f in present else ()
            units.append(SourceUnit(f, location.root, files, shared, f"{split}/{f}/", n, (shard,)))
        return units

    def files(self, location: RLDSLocation) -> list[str]:
        """The shards and both metadata files; a shard ``dataset_info.json`` lists but the directory lacks
        is left out (reading it quarantines its records)."""
        metadata = location.metadata
        names = [f for _, f, _ in _shard_files(metadata, parse_rlds_metadata(metadata))] + [DATASET_INFO, FEATURES]
        present = {name for name, _ in location.listing}
        return sorted(paths.join(location.root, n) for n in names if n in present)

    def parser(self, metadata: RLDSMetadata, spec: DatasetSpec, image_roles: Sequence[str] = ()) -> RLDSParser:
        return spec_parser(metadata, spec, image_roles)

    def iter_episodes(
        self, unit: SourceUnit, spec: DatasetSpec, image_roles: Sequence[str] = (), parser: RLDSParser | None = None
    ) -> Iterator[Episode | QuarantineRecord]:
        yield from unit.quarantine
        for shard in unit.items:
            yield from read_rlds_shard(shard, spec, image_roles, parser)
