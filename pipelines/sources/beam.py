"""``ReadDataset``: a resolved dataset -> PCollections of its episodes and of its quarantine records."""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import apache_beam as beam

from vlaprep.pipelines.sources.base import COUNTER_NAMESPACE, SOURCES, ResolvedDataset, SourceUnit
from vlaprep.schemas.episode import Episode, QuarantineRecord
from vlaprep.transforms.registry import DatasetSpec

QUARANTINE = "quarantine"


def _unit_at(index: int, units: Sequence[SourceUnit]) -> SourceUnit:
    return units[index]


class _ReadUnitsFn(beam.DoFn):
    """SourceUnit -> Episode (main output) and QuarantineRecord (tagged ``quarantine``).

    Carries the dataset's registry entry and its plan's metadata (not its unit list: the units are the
    elements); each worker builds the format's parser from that metadata once, reading no file.
    """

    def __init__(self, spec: DatasetSpec, image_roles: Sequence[str], metadata: Any):
        self._spec = spec
        self._image_roles = tuple(image_roles)
        self._metadata = metadata
        self._source = None
        self._parser = None

    def setup(self):
        self._source = SOURCES[self._spec.source_format]()
        self._parser = self._source.parser(self._metadata, self._spec, self._image_roles)

    def process(self, unit: SourceUnit) -> Iterator[Episode | beam.pvalue.TaggedOutput]:
        for item in self._source.iter_episodes(unit, self._spec, self._image_roles, self._parser):
            if isinstance(item, QuarantineRecord):
                beam.metrics.Metrics.counter(COUNTER_NAMESPACE, "quarantined_read").inc()
                yield beam.pvalue.TaggedOutput(QUARANTINE, item)
            else:
                beam.metrics.Metrics.counter(COUNTER_NAMESPACE, "episodes_read").inc()
                yield item


class ReadDataset(beam.PTransform):
    """PBegin -> {"episodes": PCollection[Episode], "quarantine": PCollection[QuarantineRecord]}.

    Reads a ``ResolvedDataset`` one element per ``SourceUnit``, so units are read in parallel; every input
    episode ends up in exactly one of the two outputs. Checks on the launcher, before any work, what the
    format can check from its metadata (``Source.parser``: an RLDS dataset's step keys and cameras).
    """

    def __init__(self, dataset: ResolvedDataset, *, image_roles: Sequence[str] = ()):
        super().__init__()
        self._dataset = dataset
        self._image_roles = tuple(image_roles)
        if dataset.units:
            dataset.parser(self._image_roles)

    def expand(self, pbegin):
        read_fn = _ReadUnitsFn(self._dataset.spec, self._image_roles, self._dataset.plan.metadata)
        results = (
            pbegin
            # Indices, not the units, go through Create and the Reshuffle it adds: a local runner decodes a
            # Reshuffle's elements in the driver (~8 KB of driver memory per unit, measured); the unit list
            # travels once, pickled with the next step.
            | "ListUnits" >> beam.Create(range(len(self._dataset.units)))
            | "Unit" >> beam.Map(_unit_at, self._dataset.units)
            | "ReadUnits" >> beam.ParDo(read_fn).with_outputs(QUARANTINE, main="episodes")
        )
        return {"episodes": results.episodes, "quarantine": results[QUARANTINE]}
