"""Beam wiring of validation: thin ``PTransform``s over the plain functions of ``read`` and ``metrics``.

  ``ValidateShards``      PBegin -> {"round_trip", "model", "predictions"}: the whole stage
  ``RoundTripMetrics``    ActionBatch -> (dataset, RoundTripAccumulator)
  ``ModelMetrics``        PredictionResult(ShardRow, Generation) -> (dataset, ModelAccumulator)
  ``MergeAccumulatorsFn`` the per-dataset merge both metric transforms end with
"""

from __future__ import annotations

import dataclasses

import apache_beam as beam
from apache_beam.ml.inference.base import PredictionResult, RunInference

from vlaprep import paths
from vlaprep.pipelines.validate.layout import ValidationLayout
from vlaprep.pipelines.validate.metrics import MetricsSpec, model_accumulator, round_trip_accumulator
from vlaprep.pipelines.validate.model import ModelSpec, VlaModelHandler
from vlaprep.pipelines.validate.read import ReadTask, model_read_tasks, read_action_batches, read_shard_rows


class MergeAccumulatorsFn(beam.CombineFn):
    """Merges per-key accumulators (``RoundTripAccumulator`` or ``ModelAccumulator``); exact for counts,
    float64 sums for the error / L1 sums (merge order moves them by rounding only), exact maxima."""

    def create_accumulator(self):
        return None

    def add_input(self, accumulator, element):
        return _merge(accumulator, element)

    def merge_accumulators(self, accumulators):
        out = None
        for acc in accumulators:
            out = _merge(out, acc)
        return out

    def extract_output(self, accumulator):
        return accumulator


def _merge(a, b):
    if a is None:
        return None if b is None else dataclasses.replace(b)  # copy: never mutate an input element
    return a.merge(b)


def _prediction_record(result: PredictionResult) -> dict:
    """One line of ``predictions.jsonl`` (schemas/predictions.schema.json)."""
    row, generation = result.example, result.inference
    return {
        "dataset_name": row.dataset_name,
        "episode_id": row.episode_id,
        "step_index": row.step_index,
        "action_token_ids": [int(i) for i in row.action_token_ids],
        "generated_token_ids": [int(i) for i in generation.token_ids],
    }


class RoundTripMetrics(beam.PTransform):
    """PCollection[ActionBatch] -> PCollection[tuple[str, RoundTripAccumulator]] (one per dataset)."""

    def __init__(self, spec: MetricsSpec):
        super().__init__()
        self._spec = spec

    def expand(self, batches):
        spec = self._spec
        return (
            batches
            | "Accumulate" >> beam.Map(lambda b: (b.dataset_name, round_trip_accumulator(b, spec)))
            | "MergePerDataset" >> beam.CombinePerKey(MergeAccumulatorsFn())
        )


class ModelMetrics(beam.PTransform):
    """PCollection[PredictionResult(ShardRow, Generation)] -> PCollection[tuple[str, ModelAccumulator]] (one per dataset)."""

    def __init__(self, spec: MetricsSpec):
        super().__init__()
        self._spec = spec

    def expand(self, predictions):
        spec = self._spec
        return (
            predictions
            | "Accumulate" >> beam.Map(lambda r: (r.example.dataset_name, model_accumulator(r.example, r.inference, spec)))
            | "MergePerDataset" >> beam.CombinePerKey(MergeAccumulatorsFn())
        )


class ValidateShards(beam.PTransform):
    """PBegin -> dict of PCollections:

      "round_trip":  tuple[str, RoundTripAccumulator]   per dataset, over every row of the split
      "model":       tuple[str, ModelAccumulator]       per dataset, over the sampled rows
      "predictions": dict                                one per sampled row (``_prediction_record``)

    Reads the split's Parquet files of ``layout`` twice: the action columns of every row
    (``ActionBatch``) and the rows ``sample_indices(rows, max_samples)`` in full (``ShardRow``), which go
    through ``RunInference(VlaModelHandler(model))``.
    """

    def __init__(self, layout: ValidationLayout, model: ModelSpec, max_samples: int | None = None):
        super().__init__()
        self._layout, self._model, self._max_samples = layout, model, max_samples

    def expand(self, pbegin):
        layout, width = self._layout, self._layout.action_chunk * self._layout.action_dim
        spec = MetricsSpec.from_layout(layout)
        all_files = [ReadTask(paths.join(layout.root, path)) for path, _ in layout.files]
        round_trip = (
            pbegin
            | "ActionFiles" >> beam.Create(all_files)
            | "ReshuffleActionFiles" >> beam.Reshuffle()
            | "ReadActions" >> beam.FlatMap(read_action_batches, width)
            | "RoundTrip" >> RoundTripMetrics(spec)
        )
        predictions = (
            pbegin
            | "SampleTasks" >> beam.Create(model_read_tasks(layout, self._max_samples))
            | "ReadRows" >> beam.FlatMap(read_shard_rows, width)
            | "Generate" >> RunInference(VlaModelHandler(self._model))
        )
        return {
            "round_trip": round_trip,
            "model": predictions | "Model" >> ModelMetrics(spec),
            "predictions": predictions | "PredictionRecords" >> beam.Map(_prediction_record),
        }
