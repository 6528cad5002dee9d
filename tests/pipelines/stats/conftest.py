"""A synthetic Bridge dataset shared by the statistics tests, and its actions as an independent reference
reads them: straight through tfds, with OpenVLA's bridge rule written out here (not vlaprep's)."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from vlaprep.synthetic.rlds import generate_rlds


def _read_bridge_reference(version_dir):
    """Read every split with tfds itself and apply OpenVLA's bridge rule written out here."""
    builder = tfds.builder_from_directory(str(version_dir))
    actions, trajectories, skipped = [], 0, 0
    for split in builder.info.splits:
        for ex in tfds.as_numpy(builder.as_dataset(split=split)):
            steps = ex["steps"]
            state = np.stack([s["observation"]["state"] for s in steps]) if not isinstance(steps, dict) else steps["observation"]["state"]
            act = np.stack([s["action"] for s in steps]) if not isinstance(steps, dict) else steps["action"]
            if len(act) < 2 or not np.isfinite(act).all():
                skipped += 1
                continue
            if len(act) == 2:  # OpenVLA drops steps 0 and T-1: an empty trajectory it still counts
                trajectories += 1
                continue
            g = act[1:, -1].astype(np.float32)
            out = np.empty(len(g), np.float32)
            carry = g[-1]
            for t in range(len(g) - 1, -1, -1):  # OpenVLA binarize: backward scan
                if g[t] > 0.95:
                    carry = np.float32(1.0)
                elif g[t] < 0.05:
                    carry = np.float32(0.0)
                out[t] = carry
            st = state[1:]
            rel = st[1:, :6] - st[:-1, :6]
            actions.append(np.concatenate([rel, out[:-1, None]], axis=1).astype(np.float32))
            trajectories += 1
    return np.concatenate(actions), trajectories, skipped


@pytest.fixture(scope="session")
def bridge(tmp_path_factory):
    """24 regular episodes in up to 3 shards per split, plus a NaN, a 1-step and a 2-step episode."""
    root = tmp_path_factory.mktemp("rlds")
    return generate_rlds(root, name="bridge_orig", episodes=24, seed=3, image_size=32, num_shards=3,
                         nan_episodes=1, short_episodes=(1, 2))


@pytest.fixture(scope="session")
def bridge_reference(bridge):
    """(actions [N, 7] float32 of every valid trajectory, trajectories, skipped episodes) of ``bridge``."""
    return _read_bridge_reference(bridge)
