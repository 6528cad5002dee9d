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

__all__ = [
    "SOURCES", "BrokenLinkError", "ReadDataset", "ResolvedDataset", "Source", "SourceError", "SourceLocation",
    "SourcePlan", "SourceUnit", "resolve_dataset",
]
