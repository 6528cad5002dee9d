"""``vlaprep validate``: checks pre-tokenized shards and a VLA model on one split of them.

Two independent checks over one split of a shard directory written by ``vlaprep shards``
(``OUT/{train,heldout}/shard-*.parquet`` + ``OUT/manifest.json``, columns in ``schemas/shards.py``): the
data round trip (stored action tokens decoded and un-normalized vs the raw actions, every row) and the
model (greedy action tokens generated for sampled rows vs the stored ones). Modules, lowest layer first:

  layout    ``ValidationLayout`` from the manifest (``load_layout``), the statistics it names, ``ValidationError``
  read      the pipeline's elements (``ActionBatch``, ``ShardRow``) read from Parquet; ``ReadTask``, sampling
  metrics   accumulators, summaries and the report: plain NumPy (no Beam, no torch)
  openvla   OpenVLA checkpoints: the checkpoint's own modules, decoded in batches
  model     model directory checks, ``ModelSpec`` and ``VlaModelHandler`` for ``RunInference`` (torch loaded lazily)
  beam      the Beam wiring only: ``ValidateShards``, ``RoundTripMetrics``, ``ModelMetrics``
  job       ``run_validate``: checks, runs the pipeline, writes ``validation_report.json`` / ``predictions.jsonl``

``layout``, ``read`` and ``metrics`` import neither Beam nor torch nor transformers.
"""
