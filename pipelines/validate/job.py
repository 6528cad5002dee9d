"""``vlaprep validate``: run ``ValidateShards`` over one split and write the report (the stage's entry point).

Outputs in ``VAL``:
  validation_report.json   data round trip + model metrics (schemas/validation_report.schema.json)
  predictions.jsonl        one line per sampled row: dataset_name, episode_id, step_index,
                           action_token_ids (stored), generated_token_ids; sorted by those keys
                           (each line: schemas/predictions.schema.json, checked before writing)

Before the pipeline starts, the model directory is checked (``check_model_dir``: config, weights,
tokenizer, processor config, remote-code modules) and, for OpenVLA checkpoints, OpenVLA's dependencies
(``openvla.check_openvla_dependencies``): each problem is one ``ValidationError`` line.

Runner: unless ``--runner`` is given, Beam's FnApiRunner runs in-process with one worker
(``--direct_running_mode=in_memory --direct_num_workers=1``): the model is loaded once and owns the
device. Pass ``--direct_num_workers`` / ``--direct_running_mode`` (or another runner) to change that;
every worker process then loads its own copy of the model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Sequence

import apache_beam as beam

from vlaprep import paths
from vlaprep.errors import in_chain
from vlaprep.pipelines.job import beam_options, write_json_atomic
from vlaprep.pipelines.validate.beam import ValidateShards
from vlaprep.pipelines.validate.layout import ValidationError, load_layout
from vlaprep.pipelines.validate.metrics import ModelAccumulator, RoundTripAccumulator, build_report
from vlaprep.pipelines.validate.model import ModelSpec, check_model_dir, is_openvla_dir, model_kind, resolve_device
from vlaprep.pipelines.validate.openvla import check_openvla_dependencies
from vlaprep.schemas import load_json_schema, validate_json
from vlaprep.schemas.layout import PREDICTIONS_FILE, VALIDATION_REPORT_FILE

PREDICTIONS_SCHEMA = "predictions"


def validate_predictions(records) -> None:
    """Raise ``jsonschema.ValidationError`` unless every record matches ``schemas/predictions.schema.json``
    and its stored and generated id lists have the same length (one validator for all lines)."""
    import jsonschema

    schema = load_json_schema(PREDICTIONS_SCHEMA)
    validator = jsonschema.validators.validator_for(schema)(schema)
    for number, record in enumerate(records, 1):
        validator.validate(record)
        if len(record["action_token_ids"]) != len(record["generated_token_ids"]):
            raise jsonschema.ValidationError(
                f"expected as many generated_token_ids as action_token_ids on line {number}, got "
                f"{len(record['generated_token_ids'])} and {len(record['action_token_ids'])}"
            )


def _user_error_in(exc: BaseException) -> ValidationError | None:
    """A ``ValidationError`` raised in a worker (load_model), found through the cause chain Beam keeps."""
    return in_chain(exc, lambda e: isinstance(e, ValidationError))


def validate_beam_options(beam_args: Sequence[str]):
    """``beam_options`` with in-process, single-worker defaults (one model copy) unless the user chose."""
    args = list(beam_args)
    if not any(a.startswith("--runner") for a in args):
        if not any(a.startswith("--direct_running_mode") for a in args):
            args.append("--direct_running_mode=in_memory")
        if not any(a.startswith("--direct_num_workers") for a in args):
            args.append("--direct_num_workers=1")
    return beam_options(args)


@dataclasses.dataclass
class ValidationResult:
    report: dict
    report_path: str
    predictions_path: str


def _read_lines(directory: str) -> list:
    out = []
    for name in sorted(os.listdir(directory)):
        with open(os.path.join(directory, name)) as f:
            out.extend(json.loads(line) for line in f if line.strip())
    return out


def run_validate(
    shards_dir: str,
    model_dir: str,
    output_dir: str,
    *,
    split: str = "heldout",
    batch_size: int = 8,
    device: str = "auto",
    max_samples: int | None = None,
    trust_remote_code: bool = False,
    statistics: str | None = None,
    beam_args: Sequence[str] = (),
    log=print,
) -> ValidationResult:
    """Validates ``split`` of ``shards_dir`` and ``model_dir`` on it; writes ``VALIDATION_REPORT_FILE`` and ``PREDICTIONS_FILE``
    in ``output_dir``."""
    started = time.time()
    if max_samples is not None and max_samples < 1:
        raise ValidationError(f"expected --max-samples >= 1, got {max_samples}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValidationError(f"expected --batch-size >= 1, got {batch_size!r}")
    if not isinstance(device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise ValidationError(f"expected --device auto, cpu, cuda or cuda:N, got {device!r}")
    if not os.path.isdir(model_dir):
        raise ValidationError(f"expected a local model directory for --model, got {model_dir!r}")
    kind, _ = model_kind(model_dir, trust_remote_code)  # refuses remote code early, one line
    check_model_dir(model_dir, kind)  # missing / truncated files: one line naming the file
    if trust_remote_code and is_openvla_dir(model_dir):
        check_openvla_dependencies()  # timm / torchvision: one line saying what to install
    # Shards in an object store are read where they are (``layout.open_parquet``), each file's sha256
    # checked once against the manifest; inference runs where the accelerator is.
    if paths.is_remote(shards_dir):
        log(f"[validate] reading {split} of {shards_dir} in place (each file's sha256 checked against the manifest)")
    layout = load_layout(shards_dir, split, statistics)
    tok = layout.tokenizer
    spec = ModelSpec(
        path=os.path.abspath(model_dir),
        num_new_tokens=layout.action_chunk * layout.action_dim,
        action_token_min=tok.min_token_id,
        action_token_max=tok.max_token_id,
        device=device,
        trust_remote_code=trust_remote_code,
        batch_size=batch_size,
    )
    if device != "auto":
        resolve_device(device)  # fail here, not in a worker, when CUDA is asked for and absent
    log(
        f"[validate] {split}: {layout.rows} rows in {len(layout.files)} files, datasets "
        f"{', '.join(layout.dataset_rows)}; model {model_dir} ({kind}), "
        f"{'all' if max_samples is None else f'at most {max_samples}'} samples"
    )
    paths.makedirs(output_dir)
    # The pipeline's JSON lines stay on this machine (validation runs where the model is).
    work_dir = tempfile.mkdtemp(prefix=".validate-work-", dir=None if paths.is_remote(output_dir) else output_dir)
    try:
        try:
            with beam.Pipeline(options=validate_beam_options(beam_args)) as pipeline:
                outputs = pipeline | "Validate" >> ValidateShards(layout, spec, max_samples)
                for name in ("round_trip", "model"):
                    _ = (
                        outputs[name]
                        | f"{name}Json" >> beam.MapTuple(lambda key, acc: json.dumps([key, acc.to_json()]))
                        | f"Write[{name}]" >> beam.io.WriteToText(os.path.join(work_dir, name, "part"), num_shards=1)
                    )
                _ = (
                    outputs["predictions"]
                    | "PredictionJson" >> beam.Map(json.dumps)
                    | "WritePredictions" >> beam.io.WriteToText(os.path.join(work_dir, "predictions", "part"), num_shards=1)
                )
        except Exception as e:  # a worker's ValidationError (e.g. from load_model) stays one line
            user_error = _user_error_in(e)
            if user_error is None:
                raise
            raise ValidationError(str(user_error).splitlines()[0]) from e
        round_trip = {k: RoundTripAccumulator.from_json(v) for k, v in _read_lines(os.path.join(work_dir, "round_trip"))}
        model = {k: ModelAccumulator.from_json(v) for k, v in _read_lines(os.path.join(work_dir, "model"))}
        predictions = _read_lines(os.path.join(work_dir, "predictions"))
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    predictions.sort(key=lambda r: (r["dataset_name"], r["episode_id"], r["step_index"]))
    report = build_report(
        layout,
        spec,
        round_trip,
        model,
        model_kind_name=kind,
        max_samples=max_samples,
        wall_seconds=time.time() - started,
    )
    validate_json(report, "validation_report")
    validate_predictions(predictions)
    predictions_path = paths.join(output_dir, PREDICTIONS_FILE)
    paths.write_bytes_atomic(predictions_path, "".join(json.dumps(record) + "\n" for record in predictions).encode())
    report_path = paths.join(output_dir, VALIDATION_REPORT_FILE)
    write_json_atomic(report_path, report)
    return ValidationResult(report, report_path, predictions_path)


def _fmt(value, spec=".4f") -> str:
    return "-" if value is None else format(value, spec)


def summary_text(report: dict) -> str:
    """Human-readable summary: round trip per dataset and dim, then the model's accuracy and speed."""
    m = report["manifest"]
    lines = [
        f"split {report['split']}: {m['rows']} rows, action chunk {m['action_chunk']} x {m['action_dim']}, "
        f"{m['normalization']}, {m['action_encoding']} tokens {m['action_token_ids'][0]}..{m['action_token_ids'][1]}",
        "data round trip (stored tokens -> actions vs raw):",
    ]
    for name, block in report["round_trip"]["datasets"].items():
        lines.append(
            f"  {name}: {block['rows']} rows, token==encode(normalize(raw)) {_fmt(block['token_matches_encoding'])}, "
            f"in-range within half a bin {_fmt(block['in_range_within_half_bin'])}, "
            f"token round trip {_fmt(block['token_roundtrip_accuracy'])} "
            f"(+{block['top_bin_values']} top-bin ids -> next id, OpenVLA quirk), "
            f"invalid ids {block['invalid_token_ids']}"
        )
        lines.append(f"    {'dim':>3} {'norm':>4} {'max|err|':>10} {'mean|err|':>10} {'max in-rng':>10} {'in-range':>8} {'saturated':>9}")
        for d in block["per_dim"]:
            flag = ("yes" if d["normalized"] else "no") + ("*" if d["constant"] else "")
            lines.append(
                f"    {d['dim']:>3} {flag:>4} {d['raw_abs_error_max']:>10.3g} {_fmt(d['raw_abs_error_mean'], '>10.3g')} "
                f"{d['raw_abs_error_max_in_range']:>10.3g} {_fmt(d['in_range_fraction'], '>8.4f')} "
                f"{_fmt(d['saturated_fraction'], '>9.4f')}"
            )
    model = report["model"]
    o = model["overall"]
    lines.append(
        f"model {model['path']} ({model['kind']}, {model['device']}, {model['dtype']}, batch {model['batch_size']}): "
        f"{model['samples']} samples, {_fmt(model['samples_per_second'], '.2f')} samples/s"
    )
    lines.append(
        f"  exact {_fmt(o['exact_accuracy'])} (chance {model['chance_exact_accuracy']:.4f}), within 1 bin "
        f"{_fmt(o['within_one_bin_accuracy'])}, L1 normalized {_fmt(o['l1_normalized'])}, L1 raw {_fmt(o['l1_raw'], '.4g')}, "
        f"outside action ids {o['outside_action_range']}"
    )
    for name, block in model["datasets"].items():
        per_dim = " ".join(_fmt(d["exact_accuracy"], ".3f") for d in block["per_dim"])
        lines.append(f"  {name}: {block['samples']} samples, exact {_fmt(block['exact_accuracy'])}, per dim [{per_dim}]")
    return "\n".join(lines)
