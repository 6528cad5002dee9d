"""Digest of every output vlaprep writes, to prove a refactor leaves the bytes unchanged.

Runs ``vlaprep demo`` (statistics, shards, validation over a Bridge-like RLDS set and CALVIN) and a
second ``vlaprep shards`` over the CALVIN data with the other shard options (both cameras, action
chunks, normal normalization, mu-law encoding), then prints one JSON object: relative path -> sha256 for every file,
except that the manifest is hashed without its ``software`` block and the validation report without
its timings (the only fields that legitimately change between two runs).

    python benchmarks/output_identity.py --work /tmp/ident > before.json
    (change the code)
    python benchmarks/output_identity.py --work /tmp/ident > after.json   # same --work: the same data files
    diff before.json after.json        # empty: byte-identical outputs
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys

from vlaprep.schemas import layout

_TIMING_KEYS = {"seconds", "generate_seconds", "wall_seconds", "samples_per_second", "started", "finished"}


def _strip(value):
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in _TIMING_KEYS and "seconds" not in k}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def _digest(path: str) -> str:
    name = os.path.basename(path)
    with open(path, "rb") as f:
        data = f.read()
    if name == "manifest.json":
        doc = json.loads(data)
        doc.pop("software", None)
        data = json.dumps(doc, sort_keys=True).encode()
    elif name == "validation_report.json":
        data = json.dumps(_strip(json.loads(data)), sort_keys=True).encode()
    elif name in {".vlaprep-version.json", "run_summary.json"} or name.endswith(".log"):
        return "(varies)"
    return hashlib.sha256(data).hexdigest()


def digest_tree(root: str) -> dict[str, str]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, root)] = _digest(path)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True,
                        help="scratch directory; its generated data is kept between runs (paths and file dates enter fingerprints)")
    args = parser.parse_args()
    work = os.path.abspath(args.work)
    os.makedirs(work, exist_ok=True)
    exe = os.path.join(os.path.dirname(sys.executable), "vlaprep")
    demo = os.path.join(work, "demo")
    variant = os.path.join(work, "shards-variant")
    # Keep the generated data (and its mtimes, which source digests read); rebuild every output.
    for out in (os.path.join(demo, "run"), variant):
        shutil.rmtree(out, ignore_errors=True)
    subprocess.run([exe, "demo", "--output", demo], check=True, stdout=subprocess.DEVNULL)
    run = os.path.join(demo, "run")
    with open(os.path.join(run, layout.LATEST_FILE), "rb") as f:
        version = layout.version_dir(run, layout.parse_latest(f.read(), run)["version"])
    subprocess.run(
        [exe, "shards",
         "--dataset", f"calvin={demo}/data/calvin",
         "--statistics", os.path.join(version, "stats", layout.STATISTICS_FILE),
         "--tokenizer", os.path.join(demo, "tokenizer"),
         "--output", variant, "--cameras", "primary,wrist", "--action-chunk", "4", "--image-size", "64",
         "--normalization", "normal", "--action-encoding", "mu_law", "--heldout-fraction", "0.25", "--seed", "7"],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    result = {"demo/" + k: v for k, v in digest_tree(version).items()}
    result.update({"variant/" + k: v for k, v in digest_tree(variant).items()})
    json.dump(result, sys.stdout, indent=1, sort_keys=True)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
