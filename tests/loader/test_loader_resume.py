"""Exact resume: stop after any batch, restore in a new process, and the (dataset_name, episode_id,
step_index) sequence continues as if uninterrupted; state small and JSON; world-size rules."""

import functools
import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest
import torch

from vlaprep.loader import LoaderStateError, ShardDataset, ShardLoader, collate_vla

_spec = importlib.util.spec_from_file_location("loader_test_module", pathlib.Path(__file__).with_name("test_loader.py"))
tl = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tl)


def write(root):
    """3 files, two datasets (sorted per file), episodes of 1..6 steps: 45 rows."""
    files, ep = [], 0
    for f in range(3):
        rows = []
        for name, count in (("alpha", 2), ("beta", 2)):
            for _ in range(count):
                n = 1 + (ep * 5) % 6
                rows += [(ep, t, n, name) for t in range(n)]
                ep += 1
        files.append(rows)
    tl.write_shards(root, files, rows_override=True, row_group_size=4)


CASES = {
    # name: (dataset kwargs, loader kwargs)
    "items-w0-h1": (dict(seed=1, shuffle_buffer=5), dict(batch_size=3, num_workers=0)),
    "items-w2-h3": (dict(seed=2, shuffle_buffer=4, history=3), dict(batch_size=2, num_workers=2)),
    "batches-w2-mixture": (dict(seed=3, shuffle_buffer=6, history=2, mixture={"alpha": 1.0, "beta": 3.0}, batch_size=4),
                           dict(batch_size=None, num_workers=2)),
    "items-w3-mixture-h2": (dict(seed=4, shuffle_buffer=3, history=2, mixture="manifest"), dict(batch_size=5, num_workers=3)),
}

RESTORE = r"""
import json, sys
from vlaprep.loader import ShardDataset, ShardLoader
root, ds_kw, dl_kw, states = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), json.loads(sys.argv[4])
out = []
for state in states:
    ds = ShardDataset(root, **ds_kw)
    loader = ShardLoader(ds, **dl_kw)
    loader.load_state_dict(state)
    seq = []
    for batch in loader:
        seq += [[d, e, int(s)] for d, e, s in zip(batch["dataset_name"], batch["episode_id"], batch["step_index"])]
    out.append(seq)
print(json.dumps(out))
"""


def sequence(loader, stop=None):
    seq = []
    for i, batch in enumerate(loader):
        seq += [[d, e, int(s)] for d, e, s in zip(batch["dataset_name"], batch["episode_id"], batch["step_index"])]
        if stop is not None and i + 1 == stop:
            break
    return seq


@pytest.mark.parametrize("case", list(CASES))
def test_stop_anywhere_restore_in_a_new_process_continues_exactly(tmp_path, case):
    write(tmp_path)
    ds_kw, dl_kw = CASES[case]
    full = sequence(ShardLoader(ShardDataset(tmp_path, **ds_kw), **dl_kw))
    n_batches = len(list(ShardLoader(ShardDataset(tmp_path, **ds_kw), **dl_kw)))
    assert n_batches >= 6
    stops = sorted({1, 2, n_batches // 2, n_batches - 1})
    heads, states = [], []
    for stop in stops:
        loader = ShardLoader(ShardDataset(tmp_path, **ds_kw), **dl_kw)
        heads.append(sequence(loader, stop))
        state = loader.state_dict()
        text = json.dumps(state)
        assert len(text) < 600, text  # positions, not samples
        states.append(json.loads(text))
    proc = subprocess.run([sys.executable, "-c", RESTORE, str(tmp_path), json.dumps(ds_kw), json.dumps(dl_kw), json.dumps(states)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tails = json.loads(proc.stdout.strip().splitlines()[-1])
    for stop, head, tail in zip(stops, heads, tails):
        assert head + tail == full, f"stopped after {stop} batches"


def test_num_workers_0_dataset_state_dict_and_torch_dataloader(tmp_path):
    write(tmp_path)
    kw = dict(seed=9, shuffle_buffer=7, history=2, mixture={"alpha": 2.0, "beta": 1.0})
    full = sequence(torch.utils.data.DataLoader(ShardDataset(tmp_path, **kw), batch_size=4, collate_fn=collate_vla))
    for stop in (1, 3, 6):
        ds = ShardDataset(tmp_path, **kw)
        head = sequence(torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate_vla), stop)
        state = json.loads(json.dumps(ds.state_dict()))
        restored = ShardDataset(tmp_path, **kw)
        restored.load_state_dict(state)
        assert head + sequence(torch.utils.data.DataLoader(restored, batch_size=4, collate_fn=collate_vla)) == full


def test_resume_mid_epoch_then_next_epochs_match_an_uninterrupted_run(tmp_path):
    write(tmp_path)
    kw = dict(seed=5, shuffle_buffer=4, mixture="manifest")

    def epochs(loader, first, last, stop=None):
        seq, state = [], None
        for epoch in range(first, last):
            loader.set_epoch(epoch)  # keeps a restored position in the restored epoch
            part = sequence(loader, stop if epoch == first else None)
            seq += part
            if stop is not None and epoch == first:
                return seq, loader.state_dict()
        return seq, state

    full, _ = epochs(ShardLoader(ShardDataset(tmp_path, **kw), batch_size=3, num_workers=2), 0, 3)
    head_0, _ = epochs(ShardLoader(ShardDataset(tmp_path, **kw), batch_size=3, num_workers=2), 0, 1)
    head_1, state = epochs(ShardLoader(ShardDataset(tmp_path, **kw), batch_size=3, num_workers=2), 1, 2, stop=4)
    loader = ShardLoader(ShardDataset(tmp_path, **kw), batch_size=3, num_workers=2)
    loader.load_state_dict(state)
    tail, _ = epochs(loader, state["epoch"], 3)
    assert head_0 + head_1 + tail == full


def test_world_size_may_change_at_an_epoch_boundary_not_mid_epoch(tmp_path):
    write(tmp_path)
    kw = dict(seed=2, shuffle_buffer=5)
    # End of epoch 0 on 2 ranks x 2 workers: restore onto 3 ranks x 1 worker; epoch 0 is over, epoch 1 is fresh.
    ending = ShardLoader(ShardDataset(tmp_path, rank=0, world_size=2, **kw), batch_size=2, num_workers=2)
    sequence(ending)
    done = ending.state_dict()
    assert done["complete"] and done["epoch"] == 0
    for rank in range(3):
        ds = ShardDataset(tmp_path, rank=rank, world_size=3, **kw)
        loader = ShardLoader(ds, batch_size=2, num_workers=1)
        loader.load_state_dict(done)
        assert sequence(loader) == []
        loader.set_epoch(1)
        fresh = ShardLoader(ShardDataset(tmp_path, rank=rank, world_size=3, epoch=1, **kw), batch_size=2, num_workers=1)
        assert sequence(loader) == sequence(fresh)
    # Start of an epoch: any layout.
    start = ShardLoader(ShardDataset(tmp_path, rank=1, world_size=2, **kw), batch_size=2, num_workers=2).state_dict()
    other = ShardLoader(ShardDataset(tmp_path, rank=0, world_size=1, **kw), batch_size=2, num_workers=0)
    other.load_state_dict(start)
    assert sequence(other) == sequence(ShardLoader(ShardDataset(tmp_path, **kw), batch_size=2))
    # Mid-epoch: the same world size and num_workers only.
    mid = ShardLoader(ShardDataset(tmp_path, rank=0, world_size=2, **kw), batch_size=2, num_workers=2)
    sequence(mid, 2)
    state = mid.state_dict()
    for world_size, workers in ((3, 2), (2, 1)):
        loader = ShardLoader(ShardDataset(tmp_path, rank=0, world_size=world_size, **kw), batch_size=2, num_workers=workers)
        loader.load_state_dict(state)
        with pytest.raises(LoaderStateError, match="expected world_size 2, rank 0 and 2 DataLoader worker.*mid-epoch 0"):
            sequence(loader)


def test_a_state_of_another_dataset_is_refused(tmp_path):
    write(tmp_path)
    state = ShardDataset(tmp_path, seed=1).state_dict()
    with pytest.raises(LoaderStateError, match="expected a state of this dataset .*seed 2"):
        ShardDataset(tmp_path, seed=2).load_state_dict(state)
    with pytest.raises(LoaderStateError, match="expected a 'vlaprep.loader.state' state"):
        ShardDataset(tmp_path).load_state_dict({"epoch": 1})
    assert issubclass(LoaderStateError, ValueError)


def test_torchdata_stateful_dataloader(tmp_path):
    sdl = pytest.importorskip("torchdata.stateful_dataloader")
    write(tmp_path)
    kw = dict(seed=6, shuffle_buffer=5, history=2, mixture={"alpha": 1.0, "beta": 2.0})
    collate = functools.partial(collate_vla, pad_token_id=0)
    full = sequence(sdl.StatefulDataLoader(ShardDataset(tmp_path, **kw), batch_size=3, num_workers=2, collate_fn=collate))
    for stop in (1, 4):
        dl = sdl.StatefulDataLoader(ShardDataset(tmp_path, **kw), batch_size=3, num_workers=2, collate_fn=collate)
        head = sequence(dl, stop)
        state = dl.state_dict()
        restored = sdl.StatefulDataLoader(ShardDataset(tmp_path, **kw), batch_size=3, num_workers=2, collate_fn=collate)
        restored.load_state_dict(state)
        assert head + sequence(restored) == full
