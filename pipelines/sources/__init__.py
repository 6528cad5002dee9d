"""Sources: every on-disk dataset format -> ``Episode`` records (``base`` documents the layer).

    dataset = resolve_dataset(name, path, spec, weight)   # once per dataset per command
    dataset.units, dataset.files                            # what to read in parallel, what to fingerprint
    parser = dataset.parser(image_roles)                    # once per worker
    dataset.iter_episodes(unit, image_roles, parser)        # Episode | QuarantineRecord
    pipeline | ReadDataset(dataset, image_roles=...)        # the same, as a Beam PTransform

Modules: ``base`` (``Source``, ``SOURCES``, ``ResolvedDataset``, errors), ``rlds`` and ``calvin`` (one
``Source`` each), ``tfrecord`` (TFRecord framing), ``beam`` (``ReadDataset``).
"""

from vlaprep.pipelines.sources import calvin, rlds  # noqa: F401 - importing them registers their Source in SOURCES
from vlaprep.pipelines.sources.base import (
    SOURCES,
    BrokenLinkError,
    ResolvedDataset,
    Source,
    SourceError,
    SourceLocation,
    SourcePlan,
    SourceUnit,
    resolve_dataset,
)
from vlaprep.pipelines.sources.beam import ReadDataset

# phase-1 re-exports: callers move to ResolvedDataset next
from vlaprep.pipelines.sources.base import iter_unit_episodes, source_files, source_units, unit_parser
from vlaprep.pipelines.sources.calvin import calvin_frame_path, list_calvin_windows, load_calvin_window
from vlaprep.pipelines.sources.rlds import (
    RecordDecodeError,
    RLDSShard,
    read_rlds_shard,
    resolve_rlds_version_dir,
    rlds_keys,
    rlds_parser,
    rlds_shard_files,
)
from vlaprep.pipelines.sources.tfrecord import iter_tfrecord_file

__all__ = [
    "SOURCES", "BrokenLinkError", "ReadDataset", "ResolvedDataset", "Source", "SourceError", "SourceLocation",
    "SourcePlan", "SourceUnit", "resolve_dataset",
    # phase-1 re-exports: callers move to ResolvedDataset next
    "RLDSShard", "RecordDecodeError", "calvin_frame_path", "iter_tfrecord_file", "iter_unit_episodes",
    "list_calvin_windows", "load_calvin_window", "read_rlds_shard", "resolve_rlds_version_dir", "rlds_keys",
    "rlds_parser", "rlds_shard_files", "source_files", "source_units", "unit_parser",
]
