"""The common episode record every source emits, and the quarantine record for what it rejects.

Sources (``pipelines/sources/``) turn one robot episode of any on-disk format into one ``Episode``;
transforms (``transforms/``) turn its raw per-step arrays into a standardized ``Trajectory``.

Episode
  dataset_name: str                 registry name, e.g. ``"bridge_orig"``
  episode_id:   str                 stable and unique within the dataset, no absolute paths:
                                    RLDS ``"<split>/<shard file name>/<record index>"``,
                                    CALVIN ``"<split dir>/<start>-<end>"`` (half-open frame window)
  split:        str                 the source split (``"train"``, ``"val"``, ``"training"``, ...)
  language:     str                 instruction as stored (UTF-8 decoded, not lower-cased): the first non-empty
                                    step's; ``""`` if none
  step_languages: tuple[str]        RLDS: every step's instruction (OpenVLA reads them per step); CALVIN: ()
  steps:        dict[str, ndarray]  non-image per-step fields with flattened keys, first axis T:
                                    ``"action": [T, 7] float32``, ``"observation/state": [T, 7] float32``,
                                    CALVIN ``"actions"``, ``"rel_actions"``, ``"robot_obs"``: [T, k] float32
  images:       dict[str, list[bytes] | ndarray]
                                    camera role (``"primary"``, ``"wrist"``) -> T encoded images
                                    (JPEG/PNG bytes) or a decoded ``[T, H, W, 3] uint8`` array;
                                    empty when the consumer asked for no images (statistics)

TrajectoryRecord (an Episode after its dataset's transform: what statistics and shards consume)
  dataset_name, episode_id, split, language
  trajectory:   Trajectory          action [T', D] float32, proprio [T', P] float32, step_index [T'] int64
                                    (``vlaprep.transforms.base``; T' may be 0: an empty trajectory OpenVLA counts)

QuarantineRecord
  dataset_name, episode_id, stage ("read" | "transform" | "shard" ...), reason (one line)
"""

from __future__ import annotations

import dataclasses
from typing import Union

import numpy as np

ImageSeq = Union[list, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Episode:
    dataset_name: str
    episode_id: str
    split: str
    language: str
    steps: dict
    images: dict = dataclasses.field(default_factory=dict)
    step_languages: tuple = ()  # per source step (RLDS); () when the source has one per episode (CALVIN)

    def instruction_at(self, step: int) -> str:
        """The instruction of source step ``step``: its own where the source has one per step, else the episode's."""
        return self.step_languages[step] if self.step_languages else self.language

    @property
    def num_steps(self) -> int:
        for value in self.steps.values():
            return int(len(value))
        return 0


@dataclasses.dataclass(frozen=True)
class TrajectoryRecord:
    dataset_name: str
    episode_id: str
    split: str
    language: str
    trajectory: object  # vlaprep.transforms.base.Trajectory


@dataclasses.dataclass(frozen=True)
class QuarantineRecord:
    dataset_name: str
    episode_id: str
    stage: str
    reason: str

    def to_json_dict(self) -> dict:
        return dataclasses.asdict(self)


def quarantine_jsonl(records) -> bytes:
    """The one writer of ``quarantine.jsonl`` (statistics and shards): one JSON object per line, keys
    sorted, records in (dataset_name, episode_id, stage) order; each record matches
    ``schemas/quarantine_record.schema.json``. ``records``: QuarantineRecords or their dicts."""
    import json

    from vlaprep.schemas import validate_json

    rows = [r.to_json_dict() if isinstance(r, QuarantineRecord) else dict(r) for r in records]
    rows.sort(key=lambda r: (r["dataset_name"], r["episode_id"], r["stage"]))
    for row in rows:
        validate_json(row, "quarantine_record")
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode("utf-8")
