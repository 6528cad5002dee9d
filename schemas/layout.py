"""The on-disk contract of vlaprep's outputs: file names, the shards manifest and the run pointer.

Every module that writes or reads these names imports them from here (one place to change a name).
Nothing here imports Beam, TensorFlow or torch: the loader and training nodes use it too.

Shards output ``OUT`` (written by ``vlaprep shards``)::

  manifest.json                     written last; lists every file with rows, bytes and sha256
  train/shard-00000-of-0000N.parquet
  heldout/shard-00000-of-0000M.parquet
  quarantine/quarantine.jsonl       one ``QuarantineRecord`` per rejected episode
  inputs/dataset_statistics.json    the statistics the rows were normalized with

Run output ``RUN`` (written by ``vlaprep run``)::

  LATEST                            {"version", "fingerprints", "history"}, replaced last, atomically
  current -> versions/<version>
  versions/<version>/{stats,shards,validation}/, run_summary.json
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from typing import Any

from vlaprep.errors import UserError
from vlaprep.paths import confined

# --- shards output ---------------------------------------------------------------------------------
MANIFEST_FILE = "manifest.json"
TRAIN = "train"
HELDOUT = "heldout"
SPLITS = (TRAIN, HELDOUT)
QUARANTINE_DIR = "quarantine"
QUARANTINE_FILE_NAME = "quarantine.jsonl"
SHARDS_QUARANTINE_FILE = f"{QUARANTINE_DIR}/{QUARANTINE_FILE_NAME}"
INPUTS_DIR = "inputs"
STATISTICS_FILE = "dataset_statistics.json"
STATISTICS_COPY = f"{INPUTS_DIR}/{STATISTICS_FILE}"
SHARD_SUFFIX = ".parquet"
MANIFEST_FORMAT = "vlaprep.shards"
MANIFEST_FORMAT_VERSION = 1

# --- run output ------------------------------------------------------------------------------------
LATEST_FILE = "LATEST"
CURRENT_LINK = "current"
VERSIONS_DIR = "versions"
STATS_STAGE_DIR = "stats"  # one directory per stage inside a version
SHARDS_STAGE_DIR = "shards"
VALIDATION_STAGE_DIR = "validation"

# --- validation output (written by ``vlaprep validate``) --------------------------------------------
VALIDATION_REPORT_FILE = "validation_report.json"
PREDICTIONS_FILE = "predictions.jsonl"


def shard_relpath(split: str, index: int, count: int) -> str:
    """``train/shard-00003-of-00010.parquet``: the name every writer and reader agrees on."""
    return f"{split}/shard-{index:05d}-of-{count:05d}{SHARD_SUFFIX}"


class ManifestError(UserError):
    """A shards manifest or run pointer that is missing, unreadable or not what vlaprep writes."""


@dataclasses.dataclass(frozen=True)
class ManifestFile:
    """One entry of ``manifest["files"]``; ``path`` is relative to the shards root and confined to it."""

    path: str
    split: str
    rows: int
    episodes: int
    bytes: int
    sha256: str
    datasets: Mapping[str, Mapping[str, int]]


@dataclasses.dataclass(frozen=True)
class Manifest:
    """The parsed, schema-checked ``manifest.json`` of a shards output: the one reader of it.

    Build with ``Manifest.parse(raw_bytes, root)`` (the caller fetches the bytes with whatever
    filesystem it uses: ``vlaprep.paths`` or pyarrow's), or ``read_manifest(root)``.
    """

    root: str
    document: Mapping[str, Any]

    @classmethod
    def parse(cls, raw: bytes | str, root: str, where: str | None = None) -> "Manifest":
        where = where or f"{root.rstrip('/')}/{MANIFEST_FILE}"
        try:
            document = json.loads(raw)
        except ValueError as e:
            raise ManifestError(f"expected JSON in {where}, got a parse error: {e}; hint: regenerate the shards") from e
        try:
            from vlaprep.schemas import validate_json

            validate_json(document, "manifest")
        except Exception as e:  # noqa: BLE001 - jsonschema.ValidationError: one line with the path into the doc
            if type(e).__name__ != "ValidationError":
                raise
            location = "/".join(str(p) for p in getattr(e, "absolute_path", ())) or "(top level)"
            raise ManifestError(
                f"expected a vlaprep shards manifest in {where}, got one that does not match "
                f"schemas/manifest.schema.json at {location}: {getattr(e, 'message', e)}"
            ) from e
        manifest = cls(root, document)
        for entry in manifest.document["files"]:  # a crafted manifest must not point outside the root
            manifest._confined(entry["path"], "'files'")
        manifest._confined(manifest.document["quarantine"]["path"], "'quarantine'")
        return manifest

    def _confined(self, relative: str, key: str) -> str:
        try:
            return confined(self.root, relative, f"{MANIFEST_FILE} {key}")
        except ValueError as e:
            raise ManifestError(str(e)) from e

    # --- what readers ask -----------------------------------------------------------------------------
    @property
    def options(self) -> Mapping[str, Any]:
        return self.document["options"]

    @property
    def datasets(self) -> Mapping[str, Mapping[str, Mapping[str, int]]]:
        """``{dataset: {split: {"episodes", "rows"}}}``."""
        return self.document["datasets"]

    @property
    def accounting(self) -> Mapping[str, Mapping[str, Any]]:
        return self.document["accounting"]

    @property
    def splits(self) -> Mapping[str, Mapping[str, int]]:
        return self.document["splits"]

    @property
    def input_datasets(self) -> Mapping[str, Mapping[str, str]]:
        """``inputs.datasets``: ``{dataset: {"source_format", "registry_fingerprint", ["rows_fingerprint"]}}``."""
        return self.document["inputs"]["datasets"]

    @property
    def arrow_schema(self) -> str:
        """``schema.arrow``: pyarrow ``Schema.to_string(show_schema_metadata=False)`` of every shard."""
        return self.document["schema"]["arrow"]

    def files(self, split: str | None = None) -> tuple[ManifestFile, ...]:
        """The split's files (all files when ``split`` is None), in manifest order."""
        return tuple(
            ManifestFile(
                path=e["path"], split=e["split"], rows=int(e["rows"]), episodes=int(e["episodes"]),
                bytes=int(e["bytes"]), sha256=e["sha256"], datasets=e["datasets"],
            )
            for e in self.document["files"]
            if split is None or e["split"] == split
        )

    def path(self, relative: str) -> str:
        """``root/relative`` for a path named by the manifest (confined to the root)."""
        return self._confined(relative, "path")

    @property
    def quarantine(self) -> Mapping[str, Any]:
        return self.document["quarantine"]

    @property
    def statistics_relpath(self) -> str:
        """``inputs.statistics.path`` relative to the root (``inputs/dataset_statistics.json``)."""
        return self.document["inputs"]["statistics"].get("path", STATISTICS_COPY)

    @property
    def statistics_path(self) -> str:
        """The copy of the statistics the rows were normalized with (``inputs/dataset_statistics.json``)."""
        return self._confined(self.statistics_relpath, "inputs.statistics.path")

    @property
    def statistics_sha256(self) -> str:
        return self.document["inputs"]["statistics"]["sha256"]


def read_manifest(root: str, read_bytes: Callable[[str], bytes] | None = None) -> Manifest:
    """``root/manifest.json`` parsed and checked; ``read_bytes`` defaults to ``vlaprep.paths.read_bytes``."""
    if read_bytes is None:
        from vlaprep import paths

        read_bytes = paths.read_bytes
    where = f"{root.rstrip('/')}/{MANIFEST_FILE}"
    try:
        raw = read_bytes(where)
    except FileNotFoundError as e:
        raise ManifestError(
            f"expected a published shards output with {MANIFEST_FILE} in {root!r}, got none; hint: the output is "
            "incomplete or was never written (run vlaprep shards)"
        ) from e
    return Manifest.parse(raw, root, where)


def parse_latest(raw: bytes | str, output: str) -> dict:
    """The run pointer ``{"version", "fingerprints", "history"}``; ``version`` checked to be a plain name."""
    where = f"{output.rstrip('/')}/{LATEST_FILE}"
    try:
        latest = json.loads(raw)
    except ValueError as e:
        raise ManifestError(f"expected JSON in {where}, got a parse error: {e}") from e
    if not isinstance(latest, dict) or not isinstance(latest.get("version"), str):
        raise ManifestError(f"expected an object with a 'version' string in {where}, got {str(latest)[:80]!r}")
    try:
        confined(f"{output.rstrip('/')}/{VERSIONS_DIR}", latest["version"], LATEST_FILE)
    except ValueError as e:
        raise ManifestError(str(e)) from e
    if "/" in latest["version"] or "\\" in latest["version"]:
        raise ManifestError(f"expected a version name in {where}, got a path {latest['version']!r}")
    return latest


def version_dir(output: str, version: str) -> str:
    """``output/versions/<version>`` (local path or URL)."""
    return confined(output, f"{VERSIONS_DIR}/{version}", LATEST_FILE)


def latest_shards_root(output: str, version: str) -> str:
    """The shards directory of a published run version."""
    return confined(output, f"{VERSIONS_DIR}/{version}/{SHARDS_STAGE_DIR}", LATEST_FILE)


# --- statistics output (written by ``vlaprep stats``) ------------------------------------------------
# Besides STATISTICS_FILE and QUARANTINE_FILE_NAME (the same names as in a shards output):
STATISTICS_CACHE_FILE = "dataset_statistics.cache.json"  # per dataset: its inputs' fingerprint and entry
