"""The ``vlaprep`` command line. Unknown ``--flags`` pass through to Beam's PipelineOptions."""

from __future__ import annotations

import argparse
import os
import sys

from vlaprep.errors import UsageError, UserError, describe_environment_error, environment_error
from vlaprep.transforms.registry import get_spec, merged_registry

__all__ = ["UsageError", "build_parser", "main", "parse_dataset_args"]


def parse_dataset_args(values, registry_file):
    """``NAME=PATH`` strings -> [DatasetInput]; the name selects the registry entry."""
    from vlaprep.pipelines.stats_job import DatasetInput

    try:
        registry = merged_registry(registry_file)
    except (ValueError, OSError) as e:  # yaml errors are ValueErrors too
        raise UsageError(f"bad --registry {registry_file}: {e}") from None
    out, seen = [], set()
    for value in values or []:
        if "=" not in value:
            raise UsageError(f"expected --dataset NAME=PATH, got {value!r}")
        name, path = value.split("=", 1)
        if name in seen:
            raise UsageError(f"expected each dataset once, got {name!r} twice")
        seen.add(name)
        try:
            spec = get_spec(name, registry)
        except KeyError as e:
            raise UsageError(str(e.args[0])) from None
        from vlaprep import paths

        if not (paths.exists(path) or paths.isdir(path)):
            raise UsageError(f"expected an existing path for dataset {name!r}, got {path!r}")
        out.append(DatasetInput(name, path, spec))
    if not out:
        raise UsageError("expected at least one --dataset NAME=PATH")
    return out


def _cmd_generate(args, beam_args):
    if args.format == "rlds":
        from vlaprep.synthetic.rlds import generate_rlds

        path = generate_rlds(args.output, name=args.name, episodes=args.episodes, seed=args.seed,
                             image_size=args.image_size, num_shards=args.shards)
    else:
        from vlaprep.synthetic.calvin import generate_calvin

        path = generate_calvin(args.output, frames=args.frames, seed=args.seed)
    print(path)
    return 0


def _cmd_stats(args, beam_args):
    from vlaprep.pipelines.stats_job import run_stats, stderr_log, summary_table

    inputs = parse_dataset_args(args.dataset, args.registry)
    result = run_stats(inputs, args.output, with_proprio=args.proprio, force=args.force, beam_args=beam_args, log=stderr_log,
                       wait=not args.no_wait)
    if result.job is not None:
        print(_submitted(result.job, args.output, "dataset_statistics.json"))
        return 0
    print(summary_table(result))
    print(f"wrote {_join(args.output, 'dataset_statistics.json')} in {result.seconds:.1f}s")
    return 0


def _join(directory: str, name: str) -> str:
    from vlaprep import paths

    return paths.join(directory, name)


def _submitted(job, output: str, name: str) -> str:
    """One line for a run that did not wait: the runner's job id when it has one."""
    try:
        job_id = job.job_id()
    except Exception:  # noqa: BLE001 - local runners and template launches have no job id
        job_id = None
    where = f"job {job_id}" if job_id else f"{type(job).__name__} (state {getattr(job, 'state', '?')})"
    return f"submitted {where}; its last step writes {_join(output, name)}"


def _cmd_shards(args, beam_args):
    from vlaprep.pipelines.shards import ShardsArgumentError
    from vlaprep.pipelines.shards_job import REUSE_OUTPUT, run_shards, summary
    from vlaprep.pipelines.stats_job import stderr_log

    inputs = parse_dataset_args(args.dataset, args.registry)
    try:
        result = run_shards(
            inputs, args.statistics, args.tokenizer, args.output,
            heldout_fraction=args.heldout_fraction, seed=args.seed, image_size=args.image_size,
            cameras=args.cameras, target_shard_mb=args.target_shard_mb, action_chunk=args.action_chunk,
            normalization=args.normalization, action_encoding=args.action_encoding,
            beam_args=beam_args, log=stderr_log, wait=not args.no_wait, reuse_from=None if args.force else REUSE_OUTPUT,
        )
    except ShardsArgumentError as e:
        raise UsageError(str(e)) from None
    if result.job is not None:
        print(_submitted(result.job, args.output, "manifest.json"))
        return 0
    print(summary(result))
    print(f"wrote {_join(args.output, 'manifest.json')} in {result.seconds:.1f}s")
    return 0


def _cmd_validate(args, beam_args):
    from vlaprep.pipelines.stats_job import stderr_log
    from vlaprep.pipelines.validate import ValidationError
    from vlaprep.pipelines.validate_job import run_validate, summary_text

    try:
        result = run_validate(args.shards, args.model, args.output, split=args.split, batch_size=args.batch_size,
                              device=args.device, max_samples=args.max_samples, trust_remote_code=args.trust_remote_code,
                              statistics=args.statistics, beam_args=beam_args, log=stderr_log)
    except ValidationError as e:
        raise UsageError(str(e)) from None
    print(summary_text(result.report))
    print(f"wrote {result.report_path}")
    return 0


def _cmd_run(args, beam_args):
    from vlaprep.pipelines.run_job import RunConfigError, load_run_config, run_pipeline_config
    from vlaprep.pipelines.stats_job import stderr_log

    try:
        config = load_run_config(args.config)
    except RunConfigError as e:
        raise UsageError(str(e)) from None
    try:
        run_pipeline_config(config, beam_args=beam_args, force=args.force, log=stderr_log)
    except RunConfigError as e:
        raise UsageError(str(e)) from None
    print(f"outputs in {config.output}")
    return 0


def _cmd_demo(args, beam_args):
    from vlaprep.pipelines.demo import run_demo

    run_demo(args.output, episodes=args.episodes, calvin_frames=args.calvin_frames, beam_args=beam_args)
    return 0


def _cmd_status(args, beam_args):
    from vlaprep.pipelines.run_job import RunConfigError, status

    from vlaprep import paths

    if not (paths.exists(args.target) or paths.isdir(args.target)):
        raise UsageError(f"expected a run output directory or a run config, got {args.target!r}, which does not exist")
    try:
        print(status(args.target))
    except RunConfigError as e:
        raise UsageError(str(e)) from None
    return 0


def _add_no_wait(parser) -> None:
    parser.add_argument(
        "--no-wait", action="store_true",
        help="submit the pipeline and exit (Dataflow Flex Templates, schedulers); its last step publishes OUT",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlaprep", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="write a synthetic dataset in a real on-disk format")
    gen_sub = gen.add_subparsers(dest="format", required=True)
    g_rlds = gen_sub.add_parser("rlds", help="TFDS/RLDS dataset in the Bridge V2 layout")
    g_rlds.add_argument("--output", required=True)
    g_rlds.add_argument("--name", default="bridge_orig")
    g_rlds.add_argument("--episodes", type=int, default=20)
    g_rlds.add_argument("--seed", type=int, default=0)
    g_rlds.add_argument("--image-size", type=int, default=256)
    g_rlds.add_argument("--shards", type=int, default=None, help="TFRecord shards per split (default: ~1 per 25 episodes)")
    g_calvin = gen_sub.add_parser("calvin", help="CALVIN split tree (training/, validation/)")
    g_calvin.add_argument("--output", required=True)
    g_calvin.add_argument("--frames", type=int, default=600)
    g_calvin.add_argument("--seed", type=int, default=0)
    for p in (g_rlds, g_calvin):
        p.set_defaults(func=_cmd_generate)

    stats = sub.add_parser("stats", help="write dataset_statistics.json (exact, OpenVLA layout)")
    stats.add_argument("--dataset", action="append", metavar="NAME=PATH", required=True)
    stats.add_argument("--output", required=True)
    stats.add_argument("--registry", default=None, help="YAML file declaring custom datasets")
    stats.add_argument("--proprio", action="store_true", help="compute proprio statistics (default: zeros, as OpenVLA)")
    stats.add_argument("--force", action="store_true", help="recompute even when the inputs' fingerprints are unchanged")
    stats.set_defaults(func=_cmd_stats)
    _add_no_wait(stats)

    val = sub.add_parser("validate", help="check shard round trip and a model's action-token accuracy on a split")
    val.add_argument("--shards", required=True, help="shard directory (manifest.json + <split>/shard-*.parquet)")
    val.add_argument("--model", required=True, help="local image-text-to-text checkpoint directory")
    val.add_argument("--output", required=True)
    val.add_argument("--split", default="heldout")
    val.add_argument("--batch-size", type=int, default=8)
    val.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    val.add_argument("--max-samples", type=int, default=None, help="rows for the model (evenly spread); default all")
    val.add_argument("--statistics", default=None, help="dataset_statistics.json (default: the manifest's)")
    val.add_argument("--trust-remote-code", action="store_true", help="allow checkpoints that ship code (OpenVLA)")
    val.set_defaults(func=_cmd_validate)

    shards = sub.add_parser("shards", help="write pre-tokenized Parquet training shards (OpenVLA rows)")
    shards.add_argument("--dataset", action="append", metavar="NAME=PATH", required=True)
    shards.add_argument("--statistics", required=True, metavar="FILE", help="dataset_statistics.json from vlaprep stats")
    shards.add_argument("--tokenizer", required=True, metavar="DIR", help="local tokenizer directory (never the hub)")
    shards.add_argument("--output", required=True, metavar="OUT")
    shards.add_argument("--heldout-fraction", type=float, default=0.05)
    shards.add_argument("--seed", type=int, default=0)
    shards.add_argument("--image-size", type=int, default=224)
    shards.add_argument("--cameras", default="primary", help="primary or primary,wrist")
    shards.add_argument("--target-shard-mb", type=float, default=256.0,
                        help="MiB of uncompressed rows per shard (files are smaller by Parquet's zstd)")
    shards.add_argument("--action-chunk", type=int, default=1)
    shards.add_argument("--normalization", default="bounds_q99", help="bounds_q99 | bounds | normal | fixed:LOW,HIGH")
    shards.add_argument("--action-encoding", default="uniform", help="uniform | mu_law[:MU]")
    shards.add_argument("--registry", default=None, help="YAML file declaring custom datasets")
    shards.add_argument("--force", action="store_true",
                        help="encode every dataset from its sources (default: unchanged datasets' rows are read back from OUT)")
    shards.set_defaults(func=_cmd_shards)
    _add_no_wait(shards)

    run = sub.add_parser("run", help="statistics -> shards -> validation from one YAML config")
    run.add_argument("--config", required=True, metavar="run.yaml")
    run.add_argument("--force", action="store_true", help="recompute every stage even when inputs are unchanged")
    run.set_defaults(func=_cmd_run)

    demo = sub.add_parser("demo", help="generate RLDS + CALVIN demo data and `vlaprep run` over both")
    demo.add_argument("--output", default="demo_out")
    demo.add_argument("--episodes", type=int, default=60)
    demo.add_argument("--calvin-frames", type=int, default=900)
    demo.set_defaults(func=_cmd_demo)

    st = sub.add_parser("status", help="what a run directory holds and what a run would redo")
    st.add_argument("target", metavar="OUT_or_run.yaml")
    st.set_defaults(func=_cmd_status)
    return parser


def _quiet_logs() -> None:
    # TensorFlow's C++ banner and Beam's per-bundle INFO lines drown the summary; workers inherit the env.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import logging

    logging.getLogger().setLevel(logging.WARNING)
    for name in ("absl", "apache_beam", "tensorflow"):
        logging.getLogger(name).setLevel(logging.WARNING)


def main(argv=None) -> int:
    _quiet_logs()
    parser = build_parser()
    args, beam_args = parser.parse_known_args(argv)
    stray = [a for a in beam_args if not a.startswith("--")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)} (Beam options must be --flag=value)")
    try:
        return args.func(args, beam_args)
    except UserError as e:  # the user can fix it: one line
        print(f"vlaprep {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:
        env = environment_error(e)  # disk full, read-only output, a parent that is a file...
        if env is None:
            raise  # anything else is a bug in vlaprep: keep the traceback
        print(f"vlaprep {args.command}: error: {describe_environment_error(env)}", file=sys.stderr)
        return 2


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 2000 else text[:1997] + "..."

if __name__ == "__main__":
    sys.exit(main())
