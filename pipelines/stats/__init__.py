"""The statistics stage (``vlaprep stats``): OpenVLA's ``dataset_statistics.json``, exact and incremental.

Layers, each module importing only those listed above it:

  exact.py      pure NumPy: exact mergeable accumulators (moments, order statistics), OpenVLA's quantile rule
  records.py    element logic: an episode through its dataset's transform; a dataset's entry from accumulators
  histogram.py  the ``<dataset>_histograms.png`` people check the normalization with
  cache.py      what makes runs incremental: dataset fingerprints, unit keys, per-unit projection files
  failure.py    a refusal inside the pipeline, noted on disk for the driver to raise as the same error
  beam.py       Beam wiring only: CombineFns and DoFns adapting the above, the PTransforms, the pipeline
  job.py        the driver: reuse cached results, run the pipeline, publish (``StatsFinalizer``), summarize

Nothing is re-exported here: import each name from the module that defines it.
"""
