"""Dataflow Flex Template entry point (``FLEX_TEMPLATE_PYTHON_PY_FILE``): template parameters -> vlaprep CLI.

The Python template launcher runs this file with every template parameter and pipeline option as
``--name=value``. The parameters declared in ``metadata.json`` become a ``vlaprep stats|shards``
command line; everything else (``--runner``, ``--project``, ``--sdk_container_image``,
``--disk_size_gb``, ...) passes through unchanged to Beam's PipelineOptions, exactly as on the CLI.

    --command=stats --datasets=bridge_orig=gs://b/rlds/bridge_orig/1.0.0,taco_play=gs://b/rlds/taco_play
    --output=gs://b/vlaprep/stats --proprio=true --runner=DataflowRunner ...
  -> vlaprep stats --dataset bridge_orig=gs://... --dataset taco_play=gs://... --output gs://b/vlaprep/stats
     --proprio --runner=DataflowRunner ...

The launcher must exit once the job is submitted (Dataflow's Flex Template contract: no
``wait_until_finish``), so the command always carries ``--no-wait``: the pipeline's own last step
(``StatsFinalizer`` / ``ShardsFinalizer``) writes ``dataset_statistics.json`` or publishes the shards and
their manifest, on a worker, through Beam's GCS filesystem.
"""

from __future__ import annotations

import argparse
import sys

from vlaprep.pipelines.options import SHARD_OPTIONS, STATS_OPTIONS

COMMANDS = ("stats", "shards")

# template parameter -> (vlaprep flag, the commands that accept it). Paths and --force are the commands'
# own; every stage option comes from its one definition (vlaprep.pipelines.options).
_STAGE_OPTIONS = {"stats": STATS_OPTIONS, "shards": SHARD_OPTIONS}
VALUE_PARAMETERS = {
    "output": ("--output", COMMANDS),
    "registry": ("--registry", COMMANDS),
    "statistics": ("--statistics", ("shards",)),
    "tokenizer": ("--tokenizer", ("shards",)),
    **{o.name: (o.flag, (command,)) for command, options in _STAGE_OPTIONS.items() for o in options if o.kind is not bool},
}
# template parameter ("true"/"false") -> vlaprep switch
BOOL_PARAMETERS = {
    **{o.name: (o.flag, (command,)) for command, options in _STAGE_OPTIONS.items() for o in options if o.kind is bool},
    "force": ("--force", ("stats",)),
}
REQUIRED = {"stats": ("output",), "shards": ("output", "statistics", "tokenizer")}


class TemplateParameterError(ValueError):
    """A template parameter is missing or malformed: reported as one line before anything runs."""


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: a Beam option must never be taken for an abbreviation of a template parameter.
    parser = argparse.ArgumentParser(
        prog="vlaprep-flex-launcher", description=__doc__.splitlines()[0], allow_abbrev=False
    )
    parser.add_argument("--command", required=True, choices=COMMANDS)
    parser.add_argument("--datasets", required=True, help="NAME=PATH[,NAME=PATH...]")
    for name in list(VALUE_PARAMETERS) + list(BOOL_PARAMETERS):
        parser.add_argument(f"--{name}", default=None)
    return parser


def parse_datasets(value: str) -> list[str]:
    """``"a=gs://x,b=gs://y"`` -> ``["a=gs://x", "b=gs://y"]``; every item must be NAME=PATH."""
    items = [item.strip() for item in value.split(",") if item.strip()]
    if not items:
        raise TemplateParameterError(f"expected datasets as NAME=PATH[,NAME=PATH...], got {value!r}")
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise TemplateParameterError(f"expected NAME=PATH in datasets, got {item!r} in {value!r}")
    return items


def _parse_bool(name: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered not in ("true", "false"):
        raise TemplateParameterError(f"expected true or false for {name}, got {value!r}")
    return lowered == "true"


def _normalize_passthrough(args: list[str]) -> list[str]:
    """Join ``--flag value`` pairs into ``--flag=value``: vlaprep accepts Beam options only in that form."""
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--") and "=" not in arg and i + 1 < len(args) and not args[i + 1].startswith("--"):
            out.append(f"{arg}={args[i + 1]}")
            i += 2
        else:
            out.append(arg)
            i += 1
    return out


def to_cli_argv(argv: list[str]) -> list[str]:
    """Template arguments -> the argv of ``vlaprep`` (command first, Beam options last)."""
    args, passthrough = build_parser().parse_known_args(argv)
    given = {name: getattr(args, name) for name in list(VALUE_PARAMETERS) + list(BOOL_PARAMETERS)}
    given = {name: value for name, value in given.items() if value not in (None, "")}
    missing = [name for name in REQUIRED[args.command] if name not in given]
    if missing:
        raise TemplateParameterError(f"expected parameters {missing!r} for command {args.command!r}")
    for name in given:
        allowed = (VALUE_PARAMETERS.get(name) or BOOL_PARAMETERS[name])[1]
        if args.command not in allowed:
            raise TemplateParameterError(
                f"expected parameter {name!r} only with command {'/'.join(allowed)}, got command {args.command!r}"
            )
    out = [args.command]
    for item in parse_datasets(args.datasets):
        out += ["--dataset", item]
    for name, (flag, _) in VALUE_PARAMETERS.items():
        if name in given:
            out += [flag, given[name]]
    for name, (flag, _) in BOOL_PARAMETERS.items():
        if name in given and _parse_bool(name, given[name]):
            out.append(flag)
    out.append("--no-wait")  # a Flex Template launcher submits and exits; the job publishes its outputs
    return out + _normalize_passthrough(passthrough)


def main(argv: list[str] | None = None) -> int:
    try:
        cli_argv = to_cli_argv(sys.argv[1:] if argv is None else argv)
    except TemplateParameterError as e:
        print(f"vlaprep flex template: error: {e}", file=sys.stderr)
        return 2
    from vlaprep.pipelines.cli import main as cli_main

    print("vlaprep " + " ".join(cli_argv), file=sys.stderr, flush=True)
    return cli_main(cli_argv)


if __name__ == "__main__":
    sys.exit(main())
