"""The user-facing options of each stage, defined once.

Every option of ``vlaprep stats``, ``vlaprep shards`` and ``vlaprep validate`` is one ``Option`` in one
``OptionSet`` below. From these come, by construction:
  * the CLI flags (``OptionSet.add_arguments``; ``--image-size`` from ``image_size``) and the keyword
    arguments the CLI hands the stage (``OptionSet.values``);
  * the keys of ``run.yaml``'s ``stats:``, ``shards:`` and ``validate:`` sections (``run_job``);
  * the Dataflow Flex Template parameters (``infra/dataflow/launcher.py``; ``metadata.json`` is
    checked against them by a test).
A new option is one line here plus its use in the stage. What a value must be is checked by the
stage itself (``ShardOptions`` for the shards, ``validate.job`` for validation): the option's
``kind`` only says how a flag or a YAML value is typed.

Nothing here imports Beam.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Iterator


@dataclasses.dataclass(frozen=True)
class Option:
    """One option: ``name`` is the keyword argument, the ``run.yaml`` key and the template parameter."""

    name: str
    kind: type  # bool (a switch), int, float or str
    default: Any
    help: str
    choices: tuple[str, ...] | None = None  # the CLI's choices (run.yaml checks the same set)
    nullable: bool = False  # None is a valid value (e.g. "all rows")
    yaml_list: bool = False  # run.yaml also accepts a list of strings (cameras: [primary, wrist])

    def __post_init__(self):
        if self.kind not in (bool, int, float, str):
            raise TypeError(f"expected kind bool, int, float or str for option {self.name!r}, got {self.kind!r}")
        if self.kind is bool and self.default is not False:
            raise ValueError(f"expected a switch option {self.name!r} to default to False, got {self.default!r}")

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


@dataclasses.dataclass(frozen=True)
class OptionSet:
    """The options of one stage, in the order the CLI lists them."""

    stage: str
    options: tuple[Option, ...]

    def __post_init__(self):
        names = [o.name for o in self.options]
        if len(set(names)) != len(names):
            raise ValueError(f"expected each option of {self.stage!r} once, got {names!r}")

    def __iter__(self) -> Iterator[Option]:
        return iter(self.options)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.options)

    def defaults(self) -> dict[str, Any]:
        return {o.name: o.default for o in self.options}

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        for o in self.options:
            if o.kind is bool:
                parser.add_argument(o.flag, action="store_true", help=o.help)
            else:
                parser.add_argument(o.flag, type=o.kind, default=o.default, choices=o.choices, help=o.help)

    def values(self, namespace: argparse.Namespace) -> dict[str, Any]:
        """The keyword arguments of the stage from parsed CLI arguments."""
        return {o.name: getattr(namespace, o.name) for o in self.options}


STATS_OPTIONS = OptionSet("stats", (
    Option("proprio", bool, False, "compute proprio statistics (default: zeros, as OpenVLA)"),
))

SHARD_OPTIONS = OptionSet("shards", (
    Option("heldout_fraction", float, 0.05, "fraction of episodes held out (hash of seed, dataset, episode id)"),
    Option("seed", int, 0, "seed of the held-out split"),
    Option("image_size", int, 224, "square size of the stored images, pixels (OpenVLA: 224)"),
    Option("cameras", str, "primary", "primary or primary,wrist", yaml_list=True),
    Option("target_shard_mb", float, 256.0, "MiB of uncompressed rows per shard (files are smaller by Parquet's zstd)"),
    Option("action_chunk", int, 1, "actions per row (OpenVLA-OFT / Octo chunks; 1 = OpenVLA)"),
    Option("normalization", str, "bounds_q99", "bounds_q99 | bounds | normal | fixed:LOW,HIGH"),
    Option("action_encoding", str, "uniform", "uniform | mu_law[:MU]"),
    Option("allow_empty", bool, False, "publish even when every episode is quarantined (default: refuse, leaving OUT as it was)"),
))

VALIDATE_OPTIONS = OptionSet("validate", (
    Option("split", str, "heldout", "split of the shards to validate", choices=("heldout", "train")),
    Option("batch_size", int, 8, "rows per model call"),
    Option("device", str, "auto", "auto | cpu | cuda | cuda:N"),
    Option("max_samples", int, None, "rows for the model (evenly spread); default all", nullable=True),
))

OPTION_SETS = (STATS_OPTIONS, SHARD_OPTIONS, VALIDATE_OPTIONS)
