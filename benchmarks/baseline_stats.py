"""Faithful single-process baseline of what the reference does for dataset_statistics.json.

OpenVLA's ``get_dataset_statistics``: a tf.data pipeline over the builder (every split), the dataset
transform applied per trajectory in the graph, all actions collected in one process, then NumPy
mean/std/min/max/quantiles. Usage: ``python baseline_stats.py VERSION_DIR OUT.json``.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402


def binarize(g):
    # OpenVLA's binarize_gripper_actions, as a tf.scan from the end (graph mode, as the reference).
    open_mask, closed_mask = g > 0.95, g < 0.05
    in_between = tf.logical_not(tf.logical_or(open_mask, closed_mask))
    is_open_float = tf.cast(open_mask, tf.float32)

    def scan_fn(carry, i):
        return tf.cond(in_between[i], lambda: tf.cast(carry, tf.float32), lambda: is_open_float[i])

    return tf.scan(scan_fn, tf.range(tf.shape(g)[0]), g[-1], reverse=True)


def bridge_orig(traj):
    steps = traj["steps"]
    action = steps["action"][1:]
    state = steps["observation"]["state"][1:]
    gripper = binarize(action[:, -1])
    rel = state[1:, :6] - state[:-1, :6]
    return tf.concat([rel, gripper[:-1, None]], axis=1)


def main(version_dir, out_path):
    builder = tfds.builder_from_directory(version_dir)
    actions = []
    for split in builder.info.splits:
        ds = builder.as_dataset(split=split, decoders={"steps": tfds.decode.SkipDecoding()})

        def flat(ex):
            return {"steps": {"action": ex["steps"]["action"], "observation": {"state": ex["steps"]["observation"]["state"]}}}

        ds = ds.map(flat).filter(lambda t: tf.shape(t["steps"]["action"])[0] >= 3).map(bridge_orig)
        actions.extend(ds.as_numpy_iterator())
    a = np.concatenate(actions)
    stats = {
        "mean": a.mean(0).tolist(), "std": a.std(0).tolist(), "max": a.max(0).tolist(), "min": a.min(0).tolist(),
        "q01": np.quantile(a, 0.01, axis=0).tolist(), "q99": np.quantile(a, 0.99, axis=0).tolist(),
        "num_transitions": int(a.shape[0]), "num_trajectories": len(actions),
    }
    with open(out_path, "w") as f:
        json.dump(stats, f, indent=2)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
