"""``vlaprep shards``: pre-tokenized Parquet training shards (one row = one OpenVLA sample).

Layers, each importable and testable without the ones above it:

  plain core (no Beam)
    options       ShardOptions (the user's request + what the tokenizer and inputs decide), fixed settings
    tokenization  the tokenizer files, the probes, the prompt ids workers compute
    images        frame decode, OpenVLA's resize, PNG encoding
    rows          EpisodeEncoder: one Episode -> its rows (Arrow record batches) or a QuarantineRecord
    spill         an encoded episode at rest (Arrow IPC) and its EpisodeRef
    plan          held-out split and shard plan (pure functions of keys and sizes)
    write         one Parquet shard file from its episodes; reading a previous one back
    publish       ownership of OUT, the all-or-nothing publish and its recovery
    manifest      manifest.json, and reuse of unchanged datasets from a previous output
  Beam
    beam          EncodeEpisodes, WriteShards and build_shards_pipeline: DoFns that only adapt the core
  driver
    job           run_shards: checks every argument, builds and runs the pipeline, whose last step publishes

Determinism. The bytes of every file are a function of the inputs and options only, never of the
runner, the worker count or the bundle boundaries: an episode's rows are built in one place
(``rows.EpisodeEncoder.encode``), in step order, so they are contiguous and ordered in exactly one
shard file; the split is a hash (``plan.heldout_split``); the shard of an episode comes from a plan
over the globally sorted keys and sizes (``plan.plan_shards``); a shard's writer sorts its episodes,
checks it got exactly the planned ones, and writes Parquet with fixed settings and no wall-clock
metadata (``write.write_shard_file``).

Throughput (a shared, noisy 2-core VM; 7,697 frames, 256x256 JPEG -> 224x224, FnApiRunner with 2
worker processes): read+decode+resize alone 31.6 CPU-s / 29.4 s wall, ``vlaprep shards`` 44.5 CPU-s /
40.2 s wall: ~70 % of the decode+resize throughput (per frame the shard path adds PNG 0.2 ms, ids and
Arrow 0.1 ms, spill 0.1-0.2 ms and the Parquet write 0.5-0.6 ms). Workers tokenize with the
tokenizer's Rust backend when it matches HF on the probes (``tokenization.prompt_ids_backend``):
importing transformers costs ~2 CPU-s per process.
"""
