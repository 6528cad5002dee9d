"""What validation reads from a shard directory: ``ValidationLayout`` (``load_layout``) and its statistics.

The manifest (``manifest.json`` beside the split folders) is read with ``vlaprep.schemas.layout``
(``read_manifest``): checked against ``schemas/manifest.schema.json``, every path confined to the shard
directory. Fields used:
  files[]: {path, split, rows} of the split validated
  options: {action_chunk, action_dim, normalization, action_encoding, vocab_size, n_bins}
  inputs.statistics: {sha256, path}: the statistics used must hash to ``sha256``. They are ``--statistics
  FILE`` when given, else the copy ``vlaprep shards`` writes beside the shards (``path``,
  ``inputs/dataset_statistics.json``); nothing else is looked for.
The action width D is read from the Parquet schema (``action`` column) and checked against
``options.action_dim``.

A shard directory in an object store (``gs://...``) is read where it is, as the loader reads it: each
file of the split is streamed once to check its sha256 against the manifest (a mismatch is an error
naming the file), then workers read only the footers and row groups they need (``open_parquet``);
nothing is copied to local disk first.

``ValidationError`` is the stage's one user-facing error (every module of the package raises it).
Imports neither Beam nor torch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

import pyarrow.parquet as pq

from vlaprep import paths
from vlaprep.errors import UserError
from vlaprep.schemas.layout import MANIFEST_FILE, TRAIN, Manifest, read_manifest
from vlaprep.schemas.shards import Column
from vlaprep.transforms.action_tokenizer import ActionTokenizer
from vlaprep.transforms.normalization import NormalizationSpec


class ValidationError(UserError):
    """A user-facing problem with the shards, the manifest or the model directory (one line)."""


@dataclasses.dataclass(frozen=True)
class ValidationLayout:
    """What validation needs from a shard directory; built by ``load_layout``."""

    root: str
    split: str
    files: tuple[tuple[str, int], ...]  # (path relative to root, rows), manifest order
    action_chunk: int  # N
    action_dim: int  # D
    normalization: str
    action_encoding: str
    vocab_size: int
    n_bins: int
    statistics: Mapping[str, Any]  # dataset -> dataset_statistics entry
    statistics_source: str
    statistics_fingerprint: str  # inputs.statistics.sha256 of the manifest
    dataset_rows: Mapping[str, int]  # rows of the split per dataset

    def __post_init__(self):
        if self.action_chunk < 1 or self.action_dim < 1:
            raise ValidationError(f"expected action_chunk >= 1 and action_dim >= 1, got {self.action_chunk}, {self.action_dim}")
        try:
            NormalizationSpec.parse(self.normalization)
            self.tokenizer  # validates encoding / vocab / n_bins
        except (TypeError, ValueError) as e:
            raise ValidationError(f"expected valid shard options in {MANIFEST_FILE}, got: {e}") from e
        missing = sorted(set(self.dataset_rows) - set(self.statistics))
        if missing:
            raise ValidationError(
                f"expected statistics for every dataset in the shards, got none for {missing!r} in "
                f"{self.statistics_source}; hint: pass --statistics FILE"
            )

    @property
    def rows(self) -> int:
        return sum(rows for _, rows in self.files)

    @property
    def tokenizer(self) -> ActionTokenizer:
        return ActionTokenizer.from_encoding(self.action_encoding, vocab_size=self.vocab_size, n_bins=self.n_bins)


def open_parquet(path: str) -> pq.ParquetFile:
    """A shard file for reading its footer and row groups: a local path as is (memory-mapped reads), an
    object-store URL through its filesystem's seekable stream (range reads of what is asked for only)."""
    return pq.ParquetFile(paths.open_read(path) if paths.is_remote(path) else path)


def _check_remote_digests(manifest: Manifest, entries) -> None:
    """Stream every remote file of the split once and compare its sha256 with the manifest's (what ``vlaprep
    shards`` wrote is what is validated); local files are the writer's own and are not re-hashed."""
    for entry in entries:
        full = manifest.path(entry.path)
        digest = hashlib.sha256()
        with paths.open_read(full) as f:
            while chunk := f.read(8 << 20):
                digest.update(chunk)
        if digest.hexdigest() != entry.sha256:
            raise ValidationError(
                f"expected {entry.path} with sha256 {entry.sha256} (manifest), got {digest.hexdigest()} from {full}; "
                "hint: the file changed after vlaprep shards wrote it: rewrite the shards"
            )


def _load_statistics_file(path: str, expected_sha256: str, what: str):
    try:
        data = paths.read_bytes(path)
    except FileNotFoundError:
        raise ValidationError(f"expected {what} at {path!r}, got no such file; hint: pass --statistics FILE") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected_sha256:
        raise ValidationError(
            f"expected the statistics the shards were written with (sha256 {expected_sha256[:12]}... in "
            f"{MANIFEST_FILE}), got sha256 {digest[:12]}... from {path}; hint: pass the dataset_statistics.json "
            "given to vlaprep shards"
        )
    try:
        return json.loads(data)
    except json.JSONDecodeError as e:
        raise ValidationError(f"expected {what} at {path!r} to be JSON, got: {e}") from e


def _resolve_statistics(manifest: Manifest, statistics_path: str | None) -> tuple[Mapping[str, Any], str]:
    """-> (statistics dict, the file it came from).

    ``--statistics FILE`` when given, else the copy ``vlaprep shards`` writes (``inputs/dataset_statistics.json``,
    the manifest's ``inputs.statistics.path``); either must hash to ``inputs.statistics.sha256``.
    """
    if statistics_path is not None:
        return _load_statistics_file(statistics_path, manifest.statistics_sha256, "dataset statistics (--statistics)"), statistics_path
    path = manifest.statistics_path
    return _load_statistics_file(path, manifest.statistics_sha256, f"the statistics copy of {MANIFEST_FILE}"), path


def load_layout(shards_dir: str, split: str = "heldout", statistics_path: str | None = None) -> ValidationLayout:
    """Reads ``shards_dir/manifest.json`` (+ Parquet footers and the dataset_name column of the split).

    Raises ``vlaprep.schemas.layout.ManifestError`` for a missing manifest or one that is not what vlaprep shards writes."""
    root = os.fspath(shards_dir)
    manifest = read_manifest(root)
    manifest_path = paths.join(root, MANIFEST_FILE)
    entries = manifest.files(split)
    if not entries:
        splits = sorted({f.split for f in manifest.files()})
        raise ValidationError(
            f"expected shard files for split {split!r} in {manifest_path}, got splits {splits!r}; "
            f"hint: --split {splits[0] if splits else TRAIN}"
        )
    files = tuple((f.path, f.rows) for f in entries)
    options = manifest.options
    chunk = int(options["action_chunk"])
    normalization = str(options["normalization"])
    encoding = str(options["action_encoding"])
    vocab_size = int(options["vocab_size"])
    n_bins = int(options["n_bins"])

    if paths.is_remote(root):
        _check_remote_digests(manifest, entries)
    first = manifest.path(files[0][0])
    schema = open_parquet(first).schema_arrow
    if Column.ACTION not in schema.names or Column.ACTION_TOKEN_IDS not in schema.names:
        raise ValidationError(f"expected the shard columns of schemas/shards.py in {first}, got {schema.names!r}")
    dim = schema.field(Column.ACTION).type.list_size
    ids_width = schema.field(Column.ACTION_TOKEN_IDS).type.list_size
    if int(options["action_dim"]) != dim:
        raise ValidationError(f"expected action width {options['action_dim']} (manifest options.action_dim) in {first}, got {dim}")
    if ids_width != chunk * dim:
        raise ValidationError(
            f"expected {Column.ACTION_TOKEN_IDS} of width action_chunk * D = {chunk} * {dim} = {chunk * dim} in {first}, "
            f"got {ids_width}; hint: is options.action_chunk in the manifest right?"
        )
    dataset_rows: dict[str, int] = {}
    for path, rows in files:
        full = manifest.path(path)
        parquet = open_parquet(full)
        metadata_rows = parquet.metadata.num_rows
        if metadata_rows != rows:
            raise ValidationError(f"expected {rows} rows in {full} (manifest), got {metadata_rows}")
        names = parquet.read(columns=[Column.DATASET_NAME]).column(0).value_counts()
        for item in names.to_pylist():
            dataset_rows[item["values"]] = dataset_rows.get(item["values"], 0) + int(item["counts"])
    statistics, source = _resolve_statistics(manifest, statistics_path)
    return ValidationLayout(
        root=root,
        split=split,
        files=files,
        action_chunk=chunk,
        action_dim=dim,
        normalization=normalization,
        action_encoding=encoding,
        vocab_size=vocab_size,
        n_bins=n_bins,
        statistics=statistics,
        statistics_source=source,
        statistics_fingerprint=manifest.statistics_sha256,
        dataset_rows=dict(sorted(dataset_rows.items())),
    )
