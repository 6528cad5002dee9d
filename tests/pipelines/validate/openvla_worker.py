"""Subprocess of tests/pipelines/validate/test_openvla_checkpoint.py: builds a tiny OpenVLA checkpoint with OpenVLA's own
classes, runs ``vlaprep validate`` on it, and runs OpenVLA's own ``predict_action`` on every row as the reference.

Run as ``python openvla_worker.py SPEC.json``; writes ``spec["out"]`` (JSON). A separate process because
OpenVLA's code needs timm + torchvision, which the main test process must not import (``conftest.py``).

The reference is OpenVLA's README usage, verbatim where the installed transformers allows it::

    processor = AutoProcessor.from_pretrained(DIR, trust_remote_code=True)
    vla = AutoModelForVision2Seq.from_pretrained(DIR, trust_remote_code=True)
    inputs = processor("In: What action should the robot take to {instruction}?\\nOut:", image)
    action = vla.predict_action(**inputs, unnorm_key=KEY, do_sample=False)

with the generated ids read by wrapping ``vla.generate`` (``predict_action`` decodes its output's last
ids). Where that does not load (transformers 5.x has no ``AutoModelForVision2Seq``; 4.5x/5.x break OpenVLA's
class) the checkpoint's class is loaded with the documented compat patches, each recorded in the output:
``openvla.compat_class`` (``_supports_sdpa``, ``tie_weights``), ``GenerationMixin`` mixed in (5.x
remote classes lack it), an empty cache object on the first step passed to OpenVLA's
``prepare_inputs_for_generation`` as ``None`` (4.5x creates one up front; OpenVLA would then feed only the last
token, without image or prompt, and every row would get the same answer), an output class that also takes ``cache`` (5.x renames ``past_key_values``; with
it OpenVLA's ``prepare_inputs_for_generation`` never sees the cache, so every step re-runs the full
sequence: slower, same greedy ids), ``apply_transformers_compat`` for ``processing_prismatic.py``'s
imports, and the caller appending 29871 to ``input_ids`` *with* its attention-mask entry (``predict_action``
appends it to the ids only; the one-short mask is harmless on 4.40 but changes the answer on 4.57). ``predict_action``, ``forward``, the processor and the weights are OpenVLA's, unchanged.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import sys


def load_reference(path: str, needs_tokenization_names: bool):
    """-> (processor, model, patches applied)."""
    import transformers
    from transformers import AutoProcessor

    from vlaprep.pipelines.validate.openvla import apply_transformers_compat, compat_class

    patches = []
    if needs_tokenization_names:
        apply_transformers_compat()
        patches.append("tokenization_utils names (processing_prismatic imports)")
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
    auto = getattr(transformers, "AutoModelForVision2Seq", None)
    if auto is not None:
        try:
            model = auto.from_pretrained(path, trust_remote_code=True)
            return processor, model.eval(), patches
        except Exception as e:  # noqa: BLE001 - recorded, then the patched route
            patches.append(f"README load failed ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
    from transformers import GenerationMixin
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    with open(os.path.join(path, "config.json")) as f:
        reference = json.load(f)["auto_map"]["AutoModelForVision2Seq"]
    original = get_class_from_dynamic_module(reference, path)
    cls = compat_class(original)
    patches.append("compat_class (_supports_sdpa, tie_weights)")
    if not issubclass(cls, GenerationMixin):
        cls = type(cls.__name__, (cls, GenerationMixin), {})
        patches.append("GenerationMixin")
    prepare = cls.prepare_inputs_for_generation

    def prepare_inputs_for_generation(self, *args, past_key_values=None, **kwargs):
        # 4.4x+ generate hands the first step an *empty* cache object; OpenVLA reads "cache is not None" as
        # "only the last token is new" and would drop the image and the prompt. Empty means none.
        if past_key_values is not None and hasattr(past_key_values, "get_seq_length") and past_key_values.get_seq_length() == 0:
            past_key_values = None
        return prepare(self, *args, past_key_values=past_key_values, **kwargs)

    cls = type(cls.__name__, (cls,), {"prepare_inputs_for_generation": prepare_inputs_for_generation})
    patches.append("empty first-step cache passed as None")
    module = sys.modules[original.__module__]
    output_cls = module.PrismaticCausalLMOutputWithPast
    try:
        output_cls(past_key_values=None)
    except TypeError:
        from typing import Any, Optional

        @dataclasses.dataclass
        class PrismaticCausalLMOutputWithCache(output_cls):
            cache: Optional[Any] = None

        module.PrismaticCausalLMOutputWithPast = PrismaticCausalLMOutputWithCache
        patches.append("output class takes cache (KV cache not reused)")
    model = cls.from_pretrained(path)
    model.vlaprep_full_mask = True
    patches.append("29871 appended by the caller with its attention-mask entry")
    return processor, model.eval(), patches


def reference_ids(processor, model, rows, unnorm_key: str) -> dict:
    """predict_action on every row -> {key: {"ids": [...], "actions": [...]}}."""
    import torch
    from PIL import Image

    captured = []
    generate = model.generate

    def spy(*args, **kwargs):
        out = generate(*args, **kwargs)
        captured.append(out)
        return out

    model.generate = spy
    result = {}
    n = model.get_action_dim(unnorm_key)
    for row in rows:
        prompt = f"In: What action should the robot take to {row['instruction'].lower()}?\nOut:"
        image = Image.open(io.BytesIO(row["image_primary"])).convert("RGB")
        inputs = processor(prompt, image)
        if getattr(model, "vlaprep_full_mask", False) and inputs["input_ids"][0, -1] != 29871:
            # predict_action appends 29871 to input_ids only, leaving the mask one short: harmless on 4.40
            # (the language model attends causally past the mask's end) but misread from 4.5x on. Appending
            # it here with its mask entry gives predict_action the same ids (it then appends nothing).
            inputs["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([[29871]])], dim=1)
            inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(inputs["attention_mask"][:, :1])], dim=1)
        with torch.no_grad():
            actions = model.predict_action(**inputs, unnorm_key=unnorm_key, do_sample=False)
        ids = captured.pop()[0, -n:].tolist()
        result[f"{row['dataset_name']}/{row['episode_id']}/{row['step_index']}"] = {
            "ids": [int(i) for i in ids], "actions": [float(a) for a in actions],
        }
    return result


def main(spec_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    from vlaprep.synthetic.openvla import build_tiny_openvla, prepare_openvla_imports, register_tiny_timm_models

    deps = prepare_openvla_imports()
    register_tiny_timm_models()
    import pyarrow.parquet as pq
    import transformers
    import transformers.tokenization_utils as tokenization_utils

    from vlaprep.pipelines import cli
    from vlaprep.pipelines.validate import openvla
    from vlaprep.pipelines.validate.job import run_validate

    needs_tokenization_names = not hasattr(tokenization_utils, "PaddingStrategy")  # before anything adds them
    batches = []  # [(rows, sorted distinct prompt lengths)] of every vlaprep generate call
    generate = openvla.OpenVLABackend.generate

    def recording_generate(self, encoded, *args, **kwargs):
        batches.append((len(encoded), sorted({len(e.ids) for e in encoded})))
        return generate(self, encoded, *args, **kwargs)

    openvla.OpenVLABackend.generate = recording_generate

    build_tiny_openvla(spec["model_dir"], spec["tokenizer_dir"], spec["code_dir"], norm_stats=spec["norm_stats"],
                       max_shard_size=spec.get("max_shard_size"), seed=spec.get("seed", 0))
    out = {"deps": deps, "transformers": transformers.__version__, "vlaprep": {}, "reports": {}, "reference": {},
           "batches": {}}
    processor, model, patches = load_reference(spec["model_dir"], needs_tokenization_names)
    out["reference_patches"] = patches
    for name, shards in spec["shards"].items():
        rows = []
        for file in sorted(os.listdir(os.path.join(shards["root"], "heldout"))):
            rows += pq.read_table(os.path.join(shards["root"], "heldout", file)).to_pylist()
        out["reference"][name] = reference_ids(processor, model, rows, shards["unnorm_key"])
        for batch in shards["batches"]:
            target = os.path.join(spec["work"], f"{name}-b{batch}")
            batches.clear()
            if shards.get("cli") == batch:  # the user's command line
                argv = ["validate", "--shards", shards["root"], "--model", spec["model_dir"], "--output", target,
                        "--batch-size", str(batch), "--device", "cpu", "--statistics", shards["stats"],
                        "--trust-remote-code", *spec["beam_args"]]
                code = cli.main(argv)
                if code != 0:
                    raise SystemExit(f"vlaprep validate exited {code}")
                with open(os.path.join(target, "validation_report.json")) as f:
                    report = json.load(f)
            else:
                report = run_validate(shards["root"], spec["model_dir"], target, batch_size=batch, device="cpu",
                                      trust_remote_code=True, statistics=shards["stats"],
                                      beam_args=spec["beam_args"], log=lambda m: None).report
            with open(os.path.join(target, "predictions.jsonl")) as f:
                lines = [json.loads(line) for line in f]
            out["vlaprep"][f"{name}-b{batch}"] = lines
            out["batches"][f"{name}-b{batch}"] = list(batches)
            out["reports"][f"{name}-b{batch}"] = {k: report["model"][k] for k in ("kind", "device", "dtype", "samples", "batch_size", "new_tokens_per_sample")}
            out["reports"][f"{name}-b{batch}"]["outside_action_range"] = report["model"]["overall"]["outside_action_range"]
            out["reports"][f"{name}-b{batch}"]["predictions_path"] = os.path.join(target, "predictions.jsonl")
    with open(spec["out"], "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main(sys.argv[1])
