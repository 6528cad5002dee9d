"""The CALVIN source reads language windows back from the generator's split tree, through Beam, and
quarantines the windows it cannot read."""

import os
import shutil

import numpy as np
import pytest

from vlaprep.pipelines import safe_pickle
from vlaprep.pipelines.sources import ReadDataset, resolve_dataset
from vlaprep.pipelines.sources.calvin import list_calvin_windows
from vlaprep.synthetic.calvin import generate_calvin, rel_actions
from vlaprep.transforms.registry import get_spec


def test_read_calvin_windows_and_rel_actions(calvin, tmp_path, collect):
    spec = get_spec("calvin_recomputed")  # reads `actions` too, so rel_actions can be checked
    episodes, quarantined = collect(ReadDataset(resolve_dataset(spec.name, str(calvin), spec), image_roles=("primary", "wrist")), tmp_path)
    assert quarantined == []
    windows = list_calvin_windows(str(calvin))
    assert sorted(e.episode_id for e in episodes) == sorted(w.episode_id for w in windows)
    for ep in episodes:
        start, end = (int(v) for v in ep.episode_id.split("/")[1].split("-"))
        assert ep.num_steps == end - start
        np.testing.assert_allclose(rel_actions(ep.steps["actions"], ep.steps["robot_obs"]), ep.steps["rel_actions"], atol=1e-6)
        assert ep.images["primary"].shape == (end - start, 12, 12, 3) and ep.images["wrist"].dtype == np.uint8
        assert ep.language


def test_calvin_units_cover_every_window_once(calvin):
    spec = get_spec("calvin")
    units = list(resolve_dataset(spec.name, str(calvin), spec).units)
    windows = [w for u in units for w in u.items]
    assert [w.episode_id for w in windows] == [w.episode_id for w in list_calvin_windows(str(calvin))]
    for unit in units:  # a unit's files are the frames its windows read, and only those
        frames = {f"episode_{f:07d}.npz" for w in unit.items for f in range(w.start, w.end)}
        assert {os.path.basename(f) for f in unit.files} == frames
        assert 0 < len(unit.items) <= 64


def test_calvin_faults_are_quarantined(tmp_path, collect):
    root = generate_calvin(tmp_path / "c", frames=300, seed=3, image_static=8, image_gripper=8,
                           missing_frame_in_window=True, window_past_segment=True)
    episodes, quarantined = collect(ReadDataset(resolve_dataset("calvin", str(root), get_spec("calvin"))), tmp_path / "out")
    windows = list_calvin_windows(str(root))
    assert len(episodes) + len(quarantined) == len(windows)
    reasons = sorted(q.reason for q in quarantined)
    assert any("frames past it" in r for r in reasons)
    assert any("no such file" in r for r in reasons)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/vlaprep-pwned",))


def test_malicious_annotation_pickle_is_refused_and_never_runs(tmp_path, calvin):
    root = tmp_path / "evil"
    shutil.copytree(calvin, root)
    target = "/tmp/vlaprep-pwned"
    if os.path.exists(target):
        os.unlink(target)
    path = root / "training" / "lang_annotations" / "auto_lang_ann.npy"
    np.save(path, np.array({"language": {"ann": [_Exploit()]}, "info": {"indx": [(0, 1)]}}, dtype=object), allow_pickle=True)
    with pytest.raises(safe_pickle.UnsafePickleError, match="posix.system|os.system"):
        list_calvin_windows(str(root))
    assert not os.path.exists(target)
    # A legitimate object array of NumPy values and strings still loads.
    ok = tmp_path / "ok.npy"
    np.save(ok, np.array({"a": np.arange(3), "b": ("x", 1)}, dtype=object), allow_pickle=True)
    loaded = safe_pickle.load_pickled_npy(str(ok))
    assert loaded["b"] == ("x", 1) and loaded["a"].tolist() == [0, 1, 2]
