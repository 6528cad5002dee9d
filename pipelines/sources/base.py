"""The typed source layer: one ``Source`` class per on-disk format, found through ``SOURCES``.

A command resolves each of its datasets once (``resolve_dataset``): the format's ``Source`` locates the
dataset and reads its metadata and listings (``locate``, the only step that reads them), checks the
registry entry against that and plans the units (``plan``). The ``ResolvedDataset`` it returns is what
every later step uses: the units to read in parallel, the files to fingerprint, and the metadata any
unit's reader needs (``parser``), which travels to workers as the bytes read once.

A new format (LeRobot, HDF5...) is a ``SourceFormat`` member and one ``Source`` subclass decorated with
``register_source``; nothing else dispatches on the format.

Every input episode of a unit comes out of ``Source.iter_episodes`` as exactly one ``Episode`` or one
``QuarantineRecord``.
"""

from __future__ import annotations

import abc
import dataclasses
import errno
import os
from typing import Any, ClassVar, Iterator, Sequence

from vlaprep import paths
from vlaprep.errors import UserError
from vlaprep.schemas.episode import Episode, QuarantineRecord
from vlaprep.transforms.base import SourceFormat
from vlaprep.transforms.registry import DatasetSpec

COUNTER_NAMESPACE = "vlaprep"  # Beam counters of every source


class SourceError(UserError):
    """The source path is not a readable dataset: fail the run at once, before any work."""


class BrokenLinkError(SourceError):
    """A path of the dataset is a symlink loop (ELOOP) or a symlink to nothing.

    ``os.path.isdir``/``isfile`` answer False for both, which would read as "no dataset here" or skip the
    entry silently; the user is told about the link instead, and a search never swallows this error.
    """


def refuse_broken_link(path: str, what: str) -> None:
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


def refuse_broken_links_in(directory: str, what: str) -> None:
    """``refuse_broken_link`` for every symlink directly inside local ``directory`` (one ``scandir``)."""
    if paths.is_remote(directory):
        return
    with os.scandir(directory[len("file://"):] if directory.startswith("file://") else directory) as entries:
        links = sorted(e.path for e in entries if e.is_symlink())
    for link in links:
        refuse_broken_link(link, what)


def list_files(directory: str) -> list[tuple[str, int]]:
    """``paths.list_files``; a symlink loop or a link to nothing among the files is a ``BrokenLinkError``."""
    try:
        return paths.list_files(directory)
    except OSError as e:
        if e.filename and e.errno in (errno.ELOOP, errno.ENOENT) and os.path.islink(e.filename):
            refuse_broken_link(e.filename, f"a file of the dataset in {directory!r}")
        raise


def brief(e: BaseException, limit: int = 300) -> str:
    """``Type: message`` on one line, cut at ``limit`` characters (for one-line errors and reasons)."""
    text = " ".join(str(e).split()) or type(e).__name__
    return f"{type(e).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def camera_keys(spec: DatasetSpec, image_roles: Sequence[str], error: type[Exception] = SourceError) -> dict[str, str]:
    """``{role: step key}`` of the requested cameras (``spec.cameras``), in request order.

    ``error`` names a role the registry entry has no camera for: ``SourceError`` when planning a read,
    ``ValueError`` (its episode quarantined) when reading one episode.
    """
    keys = {}
    for role in image_roles:
        key = spec.camera_key(role)
        if key is None:
            raise error(f"expected a {role} camera for dataset {spec.name!r}, got none in its registry entry")
        keys[role] = key
    return keys


@dataclasses.dataclass(frozen=True)
class SourceUnit:
    """The unit every source is read, parallelised and cached by: one RLDS TFRecord shard, or a run of
    ``CALVIN_WINDOWS_PER_UNIT`` language windows of one CALVIN split.

    ``files`` determine its episodes; ``shared`` (dataset-wide metadata) determine every unit's.
    ``items`` is what ``Source.iter_episodes`` reads: ``(RLDSShard,)`` or CALVIN windows;
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


@dataclasses.dataclass(frozen=True)
class SourceLocation:
    """A dataset found on storage: its metadata read and its files listed by ``Source.locate``, once;
    ``Source.units`` and ``Source.files`` work from this and touch storage no more. Subclassed per format."""

    root: str  # the dataset's directory as its units name it (RLDS: the version dir; CALVIN: the path given)
    metadata: Any  # what a reader of any unit needs besides the unit (RLDS: ``RLDSMetadata``); None if nothing


@dataclasses.dataclass(frozen=True)
class SourcePlan:
    """What a resolved dataset is read by: its units (in a stable order), the files its episodes depend on
    (sorted, for fingerprints), and the metadata every unit's reader needs (``Source.parser``)."""

    root: str
    units: tuple[SourceUnit, ...]
    files: tuple[str, ...]
    metadata: Any


class Source(abc.ABC):
    """How one on-disk format is found, planned and read. Stateless: ``SOURCES[fmt]()`` where needed.

    ``locate`` is the only step that reads a dataset's metadata; everything after works on what it read,
    so a command reads each metadata file once and its workers never do.
    """

    format: ClassVar[SourceFormat]

    @abc.abstractmethod
    def locate(self, path: str) -> SourceLocation:
        """The dataset at ``path`` (any layout the format accepts) with its metadata read and its files
        listed; ``SourceError`` when it is not a readable dataset of this format."""

    @abc.abstractmethod
    def units(self, location: SourceLocation, spec: DatasetSpec) -> list[SourceUnit]:
        """Every unit of the dataset in a stable order, once its metadata is checked against ``spec``
        (``SourceError`` naming what does not match)."""

    @abc.abstractmethod
    def files(self, location: SourceLocation) -> list[str]:
        """Every file whose content determines the dataset's episodes, sorted (for fingerprints); checks
        the metadata they come from (``SourceError``)."""

    def plan(self, location: SourceLocation, spec: DatasetSpec) -> SourcePlan:
        """``units`` and ``files`` of the located dataset, with the metadata its readers need."""
        return SourcePlan(location.root, tuple(self.units(location, spec)), tuple(self.files(location)), location.metadata)

    def parser(self, metadata: Any, spec: DatasetSpec, image_roles: Sequence[str] = ()) -> Any:
        """State ``iter_episodes`` reuses across the units of one dataset (built once per worker, from
        ``metadata`` without reading storage); ``SourceError`` when the dataset cannot give ``spec``'s
        keys or ``image_roles``. None when the format needs none."""
        return None

    @abc.abstractmethod
    def iter_episodes(
        self, unit: SourceUnit, spec: DatasetSpec, image_roles: Sequence[str] = (), parser: Any = None
    ) -> Iterator[Episode | QuarantineRecord]:
        """Every ``Episode`` of ``unit``, and a ``QuarantineRecord`` for each one that cannot be read
        (``unit.quarantine`` first). ``parser``: from ``parser``; None reads the metadata for this unit."""


SOURCES: dict[SourceFormat, type[Source]] = {}


def register_source(cls: type[Source]) -> type[Source]:
    """Class decorator: ``cls`` reads datasets of ``cls.format``; a format registered twice is an error."""
    if cls.format in SOURCES:
        raise ValueError(
            f"expected one Source per format, got {cls.__name__} and {SOURCES[cls.format].__name__} for "
            f"{cls.format.value!r}; hint: a format's reading belongs in its one Source class"
        )
    SOURCES[cls.format] = cls
    return cls


@dataclasses.dataclass(frozen=True)
class ResolvedDataset:
    """One dataset of a command, located, checked against its registry entry and planned once
    (``resolve_dataset``). Pickles (Beam ships it to workers): its metadata is the bytes read once.

    ``units`` are what a pipeline reads in parallel, ``files`` what fingerprints hash; ``parser`` builds
    a worker's reader of the units and ``iter_episodes`` reads one, neither reading metadata again.
    """

    name: str
    path: str  # as given (``--dataset NAME=PATH``, a mixture's ``DIR/<name>``)
    spec: DatasetSpec
    weight: float
    plan: SourcePlan

    @property
    def format(self) -> SourceFormat:
        return self.spec.source_format

    @property
    def source(self) -> Source:
        return SOURCES[self.format]()

    @property
    def units(self) -> tuple[SourceUnit, ...]:
        return self.plan.units

    @property
    def files(self) -> tuple[str, ...]:
        return self.plan.files

    def parser(self, image_roles: Sequence[str] = ()) -> Any:
        """A reader state for ``iter_episodes``, reusable across this dataset's units (``Source.parser``)."""
        return self.source.parser(self.plan.metadata, self.spec, image_roles)

    def iter_episodes(
        self, unit: SourceUnit, image_roles: Sequence[str] = (), parser: Any = None
    ) -> Iterator[Episode | QuarantineRecord]:
        """``Source.iter_episodes`` of one of this dataset's units; without ``parser``, one is built from the
        plan's metadata (pass one to reuse it across units)."""
        if parser is None:
            parser = self.parser(image_roles)
        return self.source.iter_episodes(unit, self.spec, image_roles, parser)


def resolve_dataset(name: str, path: str, spec: DatasetSpec, weight: float = 1.0) -> ResolvedDataset:
    """Locate the dataset at ``path``, check it against ``spec`` and plan it: ``SourceError`` before any work."""
    source = SOURCES[spec.source_format]()
    return ResolvedDataset(name, path, spec, float(weight), source.plan(source.locate(path), spec))
