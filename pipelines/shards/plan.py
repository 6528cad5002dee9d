"""Which split and which shard file every episode goes to: pure functions of the inputs and options.

  * the split is a hash of (seed, dataset, episode_id) (``heldout_split``), never random, per episode;
  * the shard of an episode comes from a plan over the globally sorted list of
    ``(split, dataset, episode_id, nbytes)`` (``plan_shards``): episodes fill consecutive shards in
    key order up to the target size. The plan is small (shard boundaries, not one entry per episode),
    so it travels to the Beam workers as a side input.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
from collections.abc import Mapping, Sequence

from vlaprep.schemas.layout import HELDOUT, TRAIN

EpisodeKey = tuple  # (split, dataset_name, episode_id): the sort key of everything in the output


def heldout_score(seed: int, dataset: str, episode_id: str) -> float:
    """``int(sha256(f"{seed}\\0{dataset}\\0{episode_id}")[:8]) / 2**64`` in [0, 1)."""
    digest = hashlib.sha256(f"{seed}\0{dataset}\0{episode_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def heldout_split(seed: int, fraction: float, dataset: str, episode_id: str) -> str:
    """``"heldout"`` iff ``heldout_score < fraction``, else ``"train"``: per episode, never per step."""
    return HELDOUT if heldout_score(seed, dataset, episode_id) < fraction else TRAIN


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    """Consecutive shards per split over the episodes sorted by key.

    boundaries[split]:  first ``(dataset, episode_id)`` of each shard, ascending (one per shard)
    episodes[split]:    episodes in each shard (the writer checks it got exactly these many)
    """

    boundaries: Mapping[str, tuple[tuple[str, str], ...]]
    episodes: Mapping[str, tuple[int, ...]]

    def __post_init__(self):
        for split, bounds in self.boundaries.items():
            if list(bounds) != sorted(set(bounds)) or len(bounds) != len(self.episodes.get(split, ())):
                raise ValueError(
                    f"expected strictly ascending boundaries, one per shard, for split {split!r}, got "
                    f"{len(bounds)} boundaries and {len(self.episodes.get(split, ()))} shard sizes"
                )

    def num_shards(self, split: str) -> int:
        return len(self.boundaries.get(split, ()))

    def shard_of(self, key: EpisodeKey) -> int:
        split, dataset, episode_id = key
        index = bisect.bisect_right(self.boundaries[split], (dataset, episode_id)) - 1
        if index < 0:
            raise ValueError(f"expected episode {key!r} in the shard plan, got none that holds it")
        return index


def plan_shards(sizes: Sequence[tuple[EpisodeKey, int]], target_bytes: int) -> ShardPlan:
    """Greedy, in key order: a shard takes the next episode unless that would push it past
    ``target_bytes`` (a shard always holds at least one episode, so one huge episode is its own shard)."""
    ordered = sorted((tuple(key), int(n)) for key, n in sizes)
    for (a, _), (b, _) in zip(ordered, ordered[1:]):
        if a == b:
            raise ValueError(f"expected unique (split, dataset, episode_id) keys, got {a!r} twice; hint: two sources give the same episode ids")
    boundaries: dict[str, list] = {}
    episodes: dict[str, list] = {}
    current: dict[str, int] = {}
    for (split, dataset, episode_id), nbytes in ordered:
        if split not in boundaries or current[split] + nbytes > target_bytes:
            boundaries.setdefault(split, []).append((dataset, episode_id))
            episodes.setdefault(split, []).append(0)
            current[split] = 0
        current[split] += nbytes
        episodes[split][-1] += 1
    return ShardPlan({s: tuple(b) for s, b in boundaries.items()}, {s: tuple(e) for s, e in episodes.items()})
