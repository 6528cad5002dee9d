"""The ``vlaprep`` command line. Unknown ``--flags`` pass through to Beam's PipelineOptions."""

from __future__ import annotations

import argparse
import os
import sys

from vlaprep.pipelines.options import SHARD_OPTIONS, STATS_OPTIONS, VALIDATE_OPTIONS
from vlaprep.errors import UsageError, UserError, describe_environment_error, environment_error
from vlaprep.schemas import layout

__all__ = ["UsageError", "build_parser", "main"]


def _inputs(args):
    """The command's datasets: ``--dataset NAME=PATH`` and/or ``--mixture NAME --data-dir ROOT``."""
    from vlaprep.pipelines.job import resolve_inputs

    return resolve_inputs(args.dataset, args.registry, args.mixture, args.data_dir, args.skip_missing)


def _add_inputs(parser) -> None:
    parser.add_argument("--dataset", action="append", metavar="NAME=PATH", default=[],
                        help="a dataset (NAME selects its registry entry); repeatable")
    parser.add_argument("--mixture", default=None, metavar="NAME",
                        help="one of OpenVLA's named mixtures (e.g. oxe_magic_soup_plus): its datasets and weights")
    parser.add_argument("--data-dir", default=None, metavar="ROOT", help="where --mixture's datasets are (ROOT/NAME/VERSION)")
    parser.add_argument("--skip-missing", action="store_true", help="leave out (and say) mixture datasets missing under ROOT")
    parser.add_argument("--registry", default=None, help="YAML file declaring custom datasets")


MAX_IMAGE_SIZE = 4096  # longest image side `generate` writes


def _check_generate_args(args) -> None:
    """UsageError (one line, exit 2) for sizes no dataset can have, before anything is written."""
    if args.format == "rlds":
        if args.episodes < 1:
            raise UsageError(f"expected --episodes >= 1, got {args.episodes} for vlaprep generate rlds")
        if not 8 <= args.image_size <= MAX_IMAGE_SIZE:
            raise UsageError(
                f"expected --image-size between 8 and {MAX_IMAGE_SIZE} pixels, got {args.image_size} for vlaprep "
                f"generate rlds; hint: synthetic images are small, 8-64 is plenty for tests"
            )
        if args.shards is not None and args.shards < 1:
            raise UsageError(f"expected --shards >= 1, got {args.shards} for vlaprep generate rlds")
        if args.layout is not None:
            from vlaprep.synthetic.layouts import layouts

            if args.layout not in layouts():
                raise UsageError(
                    f"expected --layout to be one of OpenVLA's OXE datasets, got {args.layout!r}; known: "
                    f"{sorted(layouts())!r}"
                )
    else:
        from vlaprep.synthetic.calvin import MIN_SEGMENT

        least = _calvin_min_frames(MIN_SEGMENT)
        if args.frames < least:
            raise UsageError(
                f"expected --frames >= {least} (each split needs {MIN_SEGMENT} frames), got {args.frames} for "
                f"vlaprep generate calvin"
            )


def _calvin_min_frames(min_segment: int, val_fraction: float = 0.2) -> int:
    """Fewest frames generate_calvin accepts: round(frames * val_fraction) and the rest both >= min_segment."""
    frames = 2 * min_segment
    while not (round(frames * val_fraction) >= min_segment and frames - round(frames * val_fraction) >= min_segment):
        frames += 1
    return frames


def _cmd_generate(args, beam_args):
    from vlaprep.errors import OutputError

    _check_generate_args(args)
    try:
        if args.format == "rlds":
            from vlaprep.synthetic.rlds import generate_rlds

            path = generate_rlds(args.output, name=args.name, episodes=args.episodes, seed=args.seed,
                                 image_size=args.image_size, num_shards=args.shards, layout=args.layout)
        else:
            from vlaprep.synthetic.calvin import generate_calvin

            path = generate_calvin(args.output, frames=args.frames, seed=args.seed)
    except FileExistsError as e:
        raise OutputError(f"expected a new dataset directory, got an existing one: {e}; hint: choose another --output") from e
    print(path)
    return 0


def _cmd_stats(args, beam_args):
    from vlaprep.pipelines.job import stderr_log
    from vlaprep.pipelines.stats.job import run_stats, summary_table

    inputs = _inputs(args)
    result = run_stats(inputs, args.output, with_proprio=STATS_OPTIONS.values(args)["proprio"], force=args.force, beam_args=beam_args, log=stderr_log,
                       wait=not args.no_wait)
    if result.job is not None:
        print(_submitted(result.job, args.output, layout.STATISTICS_FILE))
        return 0
    print(summary_table(result))
    print(f"wrote {_join(args.output, layout.STATISTICS_FILE)} in {result.seconds:.1f}s")
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
    from vlaprep.pipelines.shards.job import REUSE_OUTPUT, run_shards, summary
    from vlaprep.pipelines.shards.options import ShardsArgumentError
    from vlaprep.pipelines.job import stderr_log

    inputs = _inputs(args)
    weights = {}
    for value in args.weight or []:  # --weight NAME=W: the dataset's sampling weight, recorded in the manifest
        name, sep, number = value.partition("=")
        try:
            weight = float(number)
        except ValueError:
            weight = None
        if not sep or weight is None:
            raise UsageError(f"expected --weight NAME=W with a number W, got {value!r}")
        if name in weights:
            raise UsageError(f"expected each dataset's --weight once, got {name!r} twice")
        weights[name] = weight
    try:
        result = run_shards(
            inputs, args.statistics, args.tokenizer, args.output,
            beam_args=beam_args, log=stderr_log, wait=not args.no_wait, reuse_from=None if args.force else REUSE_OUTPUT,
            weights=weights, **SHARD_OPTIONS.values(args),
        )
    except ShardsArgumentError as e:
        raise UsageError(str(e)) from None
    if result.job is not None:
        print(_submitted(result.job, args.output, layout.MANIFEST_FILE))
        return 0
    print(summary(result))
    print(f"wrote {_join(args.output, 'manifest.json')} in {result.seconds:.1f}s")
    return 0


def _cmd_validate(args, beam_args):
    from vlaprep.pipelines.job import stderr_log
    from vlaprep.pipelines.validate.job import run_validate, summary_text

    result = run_validate(args.shards, args.model, args.output, trust_remote_code=args.trust_remote_code,
                          statistics=args.statistics, beam_args=beam_args, log=stderr_log, **VALIDATE_OPTIONS.values(args))
    print(summary_text(result.report))
    print(f"wrote {result.report_path}")
    return 0


def _cmd_run(args, beam_args):
    from vlaprep.pipelines.run_job import RunConfigError, load_run_config, run_pipeline_config
    from vlaprep.pipelines.job import stderr_log

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
    g_rlds = gen_sub.add_parser("rlds", help="TFDS/RLDS dataset in the Bridge V2 layout, or any OXE dataset's (--layout)")
    g_rlds.add_argument("--output", required=True)
    g_rlds.add_argument("--layout", default=None, metavar="NAME",
                        help="write the real on-disk layout of this OXE dataset (OpenVLA's name, e.g. kuka) with "
                             "values that exercise its transform (default: Bridge V2 with realistic values)")
    g_rlds.add_argument("--name", default=None, help="dataset folder name (default: the layout's name, or bridge_orig)")
    g_rlds.add_argument("--episodes", type=int, default=20)
    g_rlds.add_argument("--seed", type=int, default=0)
    g_rlds.add_argument("--image-size", type=int, default=256, help="image side (with --layout: the longer side)")
    g_rlds.add_argument("--shards", type=int, default=None, help="TFRecord shards per split (default: ~1 per 25 episodes)")
    g_calvin = gen_sub.add_parser("calvin", help="CALVIN split tree (training/, validation/)")
    g_calvin.add_argument("--output", required=True)
    g_calvin.add_argument("--frames", type=int, default=600)
    g_calvin.add_argument("--seed", type=int, default=0)
    for p in (g_rlds, g_calvin):
        p.set_defaults(func=_cmd_generate)

    stats = sub.add_parser("stats", help="write dataset_statistics.json (exact, OpenVLA layout)")
    _add_inputs(stats)
    stats.add_argument("--output", required=True)
    STATS_OPTIONS.add_arguments(stats)
    stats.add_argument("--force", action="store_true", help="recompute even when the inputs' fingerprints are unchanged")
    stats.set_defaults(func=_cmd_stats)
    _add_no_wait(stats)

    val = sub.add_parser("validate", help="check shard round trip and a model's action-token accuracy on a split")
    val.add_argument("--shards", required=True, help="shard directory (manifest.json + <split>/shard-*.parquet)")
    val.add_argument("--model", required=True,
                     help="local checkpoint directory: image-text-to-text (e.g. LLaVA) or OpenVLA (openvla-7b layout)")
    val.add_argument("--output", required=True)
    VALIDATE_OPTIONS.add_arguments(val)
    val.add_argument("--statistics", default=None, help="dataset_statistics.json (default: the manifest's)")
    val.add_argument("--trust-remote-code", action="store_true",
                     help="allow checkpoints that ship code (OpenVLA: needs pip install 'vlaprep[openvla]')")
    val.set_defaults(func=_cmd_validate)

    shards = sub.add_parser("shards", help="write pre-tokenized Parquet training shards (OpenVLA rows)")
    _add_inputs(shards)
    shards.add_argument("--statistics", required=True, metavar="FILE", help="dataset_statistics.json from vlaprep stats")
    shards.add_argument("--tokenizer", required=True, metavar="DIR", help="local tokenizer directory (never the hub)")
    shards.add_argument("--output", required=True, metavar="OUT")
    SHARD_OPTIONS.add_arguments(shards)
    shards.add_argument("--force", action="store_true",
                        help="encode every dataset from its sources (default: unchanged datasets' rows are read back from OUT)")
    shards.add_argument("--weight", action="append", metavar="NAME=W",
                        help="a dataset's sampling weight (default 1.0), recorded with OpenVLA's balanced sampling "
                             "probability in the manifest's mixture (ShardDataset(mixture='manifest')); repeatable")
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
    # A failing DoFn reaches main() as an exception, reported once (one line for user/machine errors, the
    # traceback for bugs); Beam also logs it at ERROR with its traceback, and forwards workers' copies.
    for name in ("apache_beam.runners.common", "apache_beam.runners.portability.local_job_service"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def main(argv=None) -> int:
    _quiet_logs()
    parser = build_parser()
    args, beam_args = parser.parse_known_args(argv)
    stray = [a for a in beam_args if not a.startswith("--")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)} (Beam options must be --flag=value)")
    from vlaprep.pipelines.interrupt import on_signals

    # SIGINT/SIGTERM: workers stopped, staging removed by the failure paths, one line, exit 128+signum.
    with on_signals(f"vlaprep {args.command}") as stop:
        try:
            try:
                code = args.func(args, beam_args)
            except UserError as e:  # the user can fix it: one line
                print(f"vlaprep {args.command}: error: {_one_line(e)}", file=sys.stderr)
                code = 2
            except ModuleNotFoundError as e:  # a light (loader-only) install running a pipeline command
                if (e.name or "").split(".")[0] not in _PIPELINE_MODULES:
                    raise
                print(f"vlaprep {args.command}: error: this command needs the pipelines' dependencies, which this "
                      f"install lacks (no module {e.name!r}); hint: pip install 'vlaprep[pipelines]'", file=sys.stderr)
                code = 2
            except Exception as e:
                env = environment_error(e)  # disk full, read-only output, a parent that is a file...
                if env is None:
                    raise  # anything else is a bug in vlaprep: keep the traceback
                print(f"vlaprep {args.command}: error: {describe_environment_error(env)}", file=sys.stderr)
                code = 2
        except BaseException:
            if stop.signum is None:
                raise
        # After a signal, whatever it became on its way out (Beam may re-raise it as a RuntimeError).
        return stop.report() if stop.signum is not None else code


_PIPELINE_MODULES = ("apache_beam", "tensorflow", "tensorflow_datasets", "transformers", "tokenizers", "sentencepiece")


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 2000 else text[:1997] + "..."


if __name__ == "__main__":
    sys.exit(main())
