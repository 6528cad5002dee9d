"""The typed source layer: one Source per format, and a ResolvedDataset that reads a dataset's metadata once,
pickles to workers, and and reads the same episodes with one parser as unit by unit."""

import collections
import pickle

import numpy as np
import pytest

from vlaprep import paths
from vlaprep.pipelines.sources import SOURCES, ReadDataset, Source, resolve_dataset
from vlaprep.pipelines.sources.base import register_source
from vlaprep.schemas.episode import Episode
from vlaprep.transforms.base import SourceFormat
from vlaprep.transforms.registry import get_spec

try:
    import cloudpickle
except ImportError:  # Beam vendors it
    from apache_beam.internal.cloudpickle import cloudpickle

# (dataset name, fixture, cameras read, episodes the generator wrote)
CASES = [("bridge_orig", "rlds", ("primary",), 12), ("calvin", "calvin", ("primary", "wrist"), 7)]


def _comparable(item):
    """An Episode or QuarantineRecord as plain values (Episode holds arrays, which do not compare with ==)."""
    if not isinstance(item, Episode):
        return item
    arrays = {k: (v.dtype.str, v.shape, v.tobytes()) for k, v in item.steps.items()}
    images = {r: [bytes(np.asarray(f).tobytes()) if not isinstance(f, bytes) else f for f in frames]
              for r, frames in item.images.items()}
    return (item.dataset_name, item.episode_id, item.split, item.language, item.step_languages, arrays, images)


@pytest.fixture
def opened(monkeypatch):
    """Counts the files opened through ``vlaprep.paths`` (every read of a source goes through it), by name."""
    counts = collections.Counter()
    real_open = paths.open_read

    def counting_open(path, *args, **kwargs):
        counts[paths.basename(path)] += 1
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(paths, "open_read", counting_open)
    return counts


def test_every_source_format_has_its_source():
    assert set(SOURCES) == set(SourceFormat)
    for fmt, cls in SOURCES.items():
        assert issubclass(cls, Source) and cls.format is fmt


def test_a_format_registered_twice_is_an_error():
    class AnotherRLDS(Source):
        format = SourceFormat.RLDS

    before = dict(SOURCES)
    with pytest.raises(ValueError, match=r"expected one Source per format, got AnotherRLDS and RLDSSource for 'rlds'"):
        register_source(AnotherRLDS)
    assert SOURCES == before


def test_resolving_rlds_reads_its_metadata_once_and_reading_never_again(rlds, opened):
    dataset = resolve_dataset("bridge_orig", str(rlds), get_spec("bridge_orig"))
    assert (opened["dataset_info.json"], opened["features.json"]) == (1, 1)
    ReadDataset(dataset, image_roles=("primary",))  # checks the keys on the launcher
    parser = dataset.parser(("primary",))
    read = [e for u in dataset.units for e in dataset.iter_episodes(u, ("primary",), parser)]
    read += [e for u in dataset.units for e in dataset.iter_episodes(u)]  # a parser built per call
    assert len(read) == 24 and all(isinstance(e, Episode) for e in read)
    assert (opened["dataset_info.json"], opened["features.json"]) == (1, 1)
    shards = {paths.basename(f) for f in dataset.files} - {"dataset_info.json", "features.json"}
    assert shards and {opened[s] for s in shards} == {2}  # each shard read once per pass


def test_resolving_calvin_reads_its_segments_and_annotations_once(calvin, opened):
    dataset = resolve_dataset("calvin", str(calvin), get_spec("calvin"))
    assert (opened["ep_start_end_ids.npy"], opened["auto_lang_ann.npy"]) == (2, 2)  # training/ and validation/
    assert not [name for name in opened if name.startswith("episode_")]  # frames are read by units, not planned
    read = [e for u in dataset.units for e in dataset.iter_episodes(u, ("primary",))]
    assert len(read) == 7 and all(isinstance(e, Episode) for e in read)
    assert (opened["ep_start_end_ids.npy"], opened["auto_lang_ann.npy"]) == (2, 2)


@pytest.mark.parametrize("name, fixture, roles, _episodes", CASES)
def test_resolved_dataset_pickles_and_reads_the_same_after(request, name, fixture, roles, _episodes):
    dataset = resolve_dataset(name, str(request.getfixturevalue(fixture)), get_spec(name), weight=0.5)
    for dumps, loads in ((pickle.dumps, pickle.loads), (cloudpickle.dumps, cloudpickle.loads)):
        copy = loads(dumps(dataset))
        assert copy == dataset and copy.weight == 0.5 and copy.format is dataset.format
        unit = copy.units[-1]
        assert [_comparable(e) for e in copy.iter_episodes(unit, roles)] == [
            _comparable(e) for e in dataset.iter_episodes(unit, roles)
        ]


@pytest.mark.parametrize("name, fixture, roles, episodes", CASES)
def test_one_parser_for_every_unit_reads_what_each_unit_read_alone_reads(request, name, fixture, roles, episodes):
    path, spec = str(request.getfixturevalue(fixture)), get_spec(name)
    dataset = resolve_dataset(name, path, spec)
    alone = [_comparable(e) for u in dataset.units for e in resolve_dataset(name, path, spec).iter_episodes(u, roles)]
    parser = dataset.parser(roles)
    shared = [_comparable(e) for u in dataset.units for e in dataset.iter_episodes(u, roles, parser)]
    ids = [e[1] if isinstance(e, tuple) else e.episode_id for e in shared]
    assert shared == alone and len(shared) == episodes and len(set(ids)) == episodes
    assert set(dataset.files) >= {f for u in dataset.units for f in u.files + u.shared}


def test_read_dataset_of_a_resolved_dataset(rlds, tmp_path, collect):
    dataset = resolve_dataset("bridge_orig", str(rlds), get_spec("bridge_orig"))
    episodes, quarantined = collect(ReadDataset(dataset, image_roles=("primary",)), tmp_path)
    expected = [_comparable(e) for u in dataset.units for e in dataset.iter_episodes(u, ("primary",))]
    assert quarantined == [] and sorted(map(_comparable, episodes), key=lambda e: e[1]) == sorted(expected, key=lambda e: e[1])
