"""The model side of validation: the model directory's checks and ``VlaModelHandler`` for ``RunInference``.

The model check (at most ``--max-samples`` rows, evenly spread over the split): greedy generation of exactly
``N*D`` new tokens restricted to the 256 action ids (``ActionTokenMask``: every other logit is -inf, so EOS
never ends a sample early); ``metrics.model_accumulator`` compares them with the stored ids.

Prompt (OpenVLA's ``predict_action``): ``openvla_inference_prompt(instruction)`` (no trailing space)
tokenized with BOS, then the tail is patched to the *training* prompt's tail found by comparing the
two tokenizations (``prompt_tail``): with Llama-2 tokenizers that appends the lone-space id 29871,
exactly OpenVLA's "append 29871 if the last id is not 29871". Models:

* native image-text-to-text checkpoints (``AutoModelForImageTextToText`` + ``AutoProcessor``, e.g.
  LLaVA): the text is ``processor.image_token + prompt``, so the model sees
  ``[BOS] + image tokens + prompt ids (+ 29871)`` -- the OpenVLA layout, where the patch embeddings
  follow BOS. Batches are left-padded.
* OpenVLA checkpoints (``config.json`` ``model_type`` "openvla"/"prismatic" with
  ``auto_map["AutoModelForVision2Seq"]``, the ``openvla/openvla-7b`` layout) only with
  ``trust_remote_code``: ``openvla.py`` loads the checkpoint's own classes and decodes a
  whole batch at once (vision backbone + projector on the batch, ``[BOS, patches, rest]`` per row,
  left-padded, the language model's ``generate``): the ids of OpenVLA's ``predict_action``, batched.
  Needs ``vlaprep[openvla]`` (timm, torchvision), checked before the pipeline starts.
* other checkpoints that ship code (``auto_map``), only with ``trust_remote_code``: the class is loaded
  with ``get_class_from_dynamic_module`` and driven like a native one, except that a batch is run as
  sub-batches of equal prompt length (no padding: such code may not support it).

The model directory is checked before the pipeline starts (``check_model_dir``): config.json, the
weights (every shard an index names; safetensors files must be as long as their header says), a
tokenizer file and the image processor's config; each problem is one ``ValidationError`` naming the file.

Processor outputs other than ``input_ids`` / ``attention_mask`` / image tensors that are per token (e.g.
``token_type_ids``) reach ``generate`` only when the model's ``forward`` names them (transformers 4.x
rejects unused model kwargs). transformers >= 4.45: ``AutoModelForImageTextToText`` where it exists
(``AutoModelForVision2Seq`` before), ``torch_dtype=`` before 4.56, ``dtype=`` after (``dtype_kwargs``).

bf16 on CUDA, fp32 on CPU. The model, the processor and transformers are loaded in
``VlaModelHandler.load_model`` on the worker, never at construction (this module does not import
torch or transformers itself; Beam's ``ml.inference.base`` imports torch when it is installed).
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from vlaprep.paths import confined
from vlaprep.pipelines.validate.layout import ValidationError
from vlaprep.pipelines.validate.metrics import Generation
from vlaprep.pipelines.validate.openvla import IMAGE_PROCESSOR_CONFIG, is_openvla_config, load_openvla
from vlaprep.pipelines.validate.read import ShardRow
from vlaprep.transforms.prompt import openvla_inference_prompt, prompt_prefix_ids

METRICS_NAMESPACE = "vlaprep.validate"
REMOTE_AUTO_CLASS = "AutoModelForVision2Seq"  # where OpenVLA's config.json declares its class
NATIVE = "native"
REMOTE_CODE = "remote_code"


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What the handler needs to load and drive a model; cheap to pickle."""

    path: str
    num_new_tokens: int  # N*D
    action_token_min: int  # e.g. 31744
    action_token_max: int  # e.g. 31999
    device: str = "auto"  # auto | cpu | cuda (| cuda:K)
    trust_remote_code: bool = False
    batch_size: int = 8

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValidationError(f"expected --batch-size >= 1, got {self.batch_size}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValidationError(f"expected --device auto, cpu or cuda, got {self.device!r}")


CONFIG_FILE = "config.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
WEIGHT_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model", "tokenizer.tiktoken")
IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def _load_json(path: str, what: str):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ValidationError(f"expected {what} at {path!r}, got no such file") from None
    except json.JSONDecodeError as e:
        raise ValidationError(f"expected {what} at {path!r} to be JSON, got: {e}") from e


def _check_safetensors(path: str) -> None:
    """The file is as long as its header says: 8-byte header length, JSON header, then every tensor's bytes."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        header_len = int.from_bytes(head, "little") if len(head) == 8 else None
        if header_len is None or header_len > size - 8:
            raise ValidationError(
                f"expected a complete safetensors file at {path!r}, got {size} bytes, shorter than its header "
                "says (truncated); hint: download or copy the weights again"
            )
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValidationError(f"expected a safetensors header in {path!r}, got unreadable bytes ({e}); hint: download the weights again") from None
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    if size != 8 + header_len + end:
        raise ValidationError(
            f"expected {8 + header_len + end} bytes in {path!r} (its header's tensors), got {size} "
            f"({'truncated' if size < 8 + header_len + end else 'trailing bytes'}); hint: download or copy the weights again"
        )


def _check_weights_file(path: str) -> None:
    if not os.path.isfile(path):
        raise ValidationError(f"expected the weights file {path!r}, got no such file; hint: download or copy the checkpoint again")
    if path.endswith(".safetensors"):
        _check_safetensors(path)
    elif path.endswith(".bin"):
        import zipfile

        with open(path, "rb") as f:
            is_zip_start = f.read(4) == b"PK\x03\x04"
        if is_zip_start and not zipfile.is_zipfile(path):  # torch's zip format without its end: truncated
            raise ValidationError(f"expected a complete torch checkpoint at {path!r}, got a truncated zip archive; hint: download the weights again")


def check_model_dir(path: str, kind: str) -> None:
    """One ``ValidationError`` naming the file for a missing / truncated / unreadable part of the model directory.

    Weights: an index (``model.safetensors.index.json`` ...) and every shard it names, else
    ``model.safetensors`` / ``pytorch_model.bin``; a tokenizer file (``TOKENIZER_FILES``); an image
    processor config (``IMAGE_PROCESSOR_FILES``; OpenVLA: ``preprocessor_config.json``); for remote code,
    every ``*.py`` module its ``auto_map`` entries name.
    """
    config = _load_json(os.path.join(path, CONFIG_FILE), "a model config.json (a local Hugging Face checkpoint)")
    index = next((os.path.join(path, n) for n in WEIGHT_INDEX_FILES if os.path.exists(os.path.join(path, n))), None)
    if index is not None:
        weight_map = _load_json(index, "a weights index").get("weight_map")
        if not isinstance(weight_map, Mapping) or not weight_map:
            raise ValidationError(f"expected a 'weight_map' of tensor -> file in {index!r}, got {type(weight_map).__name__}")
        for name in sorted(set(weight_map.values())):
            try:
                shard = confined(path, name, f"{index} weight_map")
            except ValueError as e:
                raise ValidationError(str(e)) from None
            _check_weights_file(shard)
    else:
        single = next((os.path.join(path, n) for n in WEIGHT_FILES if os.path.exists(os.path.join(path, n))), None)
        if single is None:
            raise ValidationError(
                f"expected model weights in {path!r} ({' or '.join(WEIGHT_FILES)}, or an index "
                f"{' / '.join(WEIGHT_INDEX_FILES)} with its shards), got none; hint: is the download complete?"
            )
        _check_weights_file(single)
    if not any(os.path.exists(os.path.join(path, n)) for n in TOKENIZER_FILES):
        raise ValidationError(
            f"expected a tokenizer in {path!r} (tokenizer.json or tokenizer.model beside tokenizer_config.json), "
            f"got none of {', '.join(TOKENIZER_FILES)}; hint: save the tokenizer with the model (save_pretrained)"
        )
    for name in ("tokenizer_config.json", "special_tokens_map.json", *IMAGE_PROCESSOR_FILES, "generation_config.json"):
        if os.path.exists(os.path.join(path, name)):
            _load_json(os.path.join(path, name), f"a {name}")
    wanted = (IMAGE_PROCESSOR_CONFIG,) if is_openvla_config(config) else IMAGE_PROCESSOR_FILES
    if not any(os.path.exists(os.path.join(path, n)) for n in wanted):
        raise ValidationError(
            f"expected the image processor's config in {path!r} ({' or '.join(wanted)}), got none; "
            "hint: save the processor with the model (save_pretrained)"
        )
    if kind == REMOTE_CODE:
        maps = [config.get("auto_map") or {}]
        for name in IMAGE_PROCESSOR_FILES + ("tokenizer_config.json",):
            if os.path.exists(os.path.join(path, name)):
                maps.append(_load_json(os.path.join(path, name), f"a {name}").get("auto_map") or {})
        for auto_map in maps:
            for reference in auto_map.values():
                for ref in reference if isinstance(reference, list) else [reference]:
                    if isinstance(ref, str) and "--" not in ref and "." in ref:  # "repo--module.Class" would be the hub
                        module = os.path.join(path, ref.rsplit(".", 1)[0] + ".py")
                        if not os.path.exists(module):
                            raise ValidationError(
                                f"expected {os.path.basename(module)} in {path!r} (config auto_map names {ref!r}), "
                                "got no such file; hint: copy the checkpoint's *.py files with it"
                            )


def dtype_kwargs(dtype) -> dict:
    """``from_pretrained`` keyword for the dtype: ``dtype=`` from transformers 4.56 on, ``torch_dtype=`` before."""
    import transformers
    from packaging.version import Version

    return {"dtype": dtype} if Version(transformers.__version__).release >= (4, 56) else {"torch_dtype": dtype}


def image_text_auto_class():
    """``AutoModelForImageTextToText`` (transformers >= 4.46 and 5.x), else ``AutoModelForVision2Seq``."""
    try:
        from transformers import AutoModelForImageTextToText as cls
    except ImportError:
        from transformers import AutoModelForVision2Seq as cls
    return cls


def is_openvla_dir(path: str) -> bool:
    return is_openvla_config(_load_json(os.path.join(path, CONFIG_FILE), "a model config.json (a local Hugging Face checkpoint)"))


def model_kind(path: str, trust_remote_code: bool) -> tuple[str, str | None]:
    """``(NATIVE, None)`` or ``(REMOTE_CODE, "module.Class")`` from ``path/config.json``; refuses remote code
    without ``trust_remote_code`` (ValidationError, one line)."""
    config = _load_json(os.path.join(path, CONFIG_FILE), "a model config.json (a local Hugging Face checkpoint)")
    auto_map = config.get("auto_map") or {}
    reference = auto_map.get(REMOTE_AUTO_CLASS) or auto_map.get("AutoModelForImageTextToText")
    if reference is None:
        return NATIVE, None
    if not trust_remote_code:
        raise ValidationError(
            f"the model at {path} runs its own code (config.json auto_map[{REMOTE_AUTO_CLASS!r}] = "
            f"{reference!r}, an OpenVLA-style checkpoint); pass --trust-remote-code to load it "
            "(only for checkpoints you trust)"
        )
    return REMOTE_CODE, reference


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValidationError(f"expected a visible CUDA device for --device {device}, got none; hint: --device cpu")
    return device


def prompt_tail(tokenizer, instruction: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(drop, add)``: the inference prompt's ids end with ``drop``; replacing them by ``add`` gives the
    training prompt's ids (``prompt_prefix_ids``). Llama-2: ``((), (29871,))`` -- OpenVLA's append rule."""
    inference = list(tokenizer(openvla_inference_prompt(instruction), add_special_tokens=True).input_ids)
    training = prompt_prefix_ids(tokenizer, instruction)
    common = 0
    while common < min(len(inference), len(training)) and inference[common] == training[common]:
        common += 1
    return tuple(inference[common:]), tuple(training[common:])


class ActionTokenMask:
    """Logits processor: every logit outside ``[low, high]`` (the action ids) becomes -inf."""

    def __init__(self, low: int, high: int):
        self.low, self.high = low, high

    def __call__(self, input_ids, scores):
        scores[:, : self.low] = -math.inf  # in place: generate hands each step a fresh float32 copy
        scores[:, self.high + 1 :] = -math.inf
        return scores


@dataclasses.dataclass
class LoadedModel:
    model: Any
    processor: Any
    kind: str
    class_name: str
    device: str
    dtype: Any
    pad_id: int
    image_token: str | None
    tails: dict = dataclasses.field(default_factory=dict)
    forward_args: frozenset = frozenset()  # parameters model.forward names (per-token extras must be one)
    openvla: Any = None  # an openvla.OpenVLABackend for OpenVLA checkpoints (then model/processor are its)


class VlaModelHandler(ModelHandler[ShardRow, PredictionResult, LoadedModel]):
    """RunInference handler: ``ShardRow`` -> ``PredictionResult(example=ShardRow, inference=Generation)``.

    ``__init__`` only stores the ``ModelSpec``; ``load_model`` imports torch/transformers and loads the
    checkpoint on the worker; ``run_inference`` builds OpenVLA prompts and generates ``N*D`` action ids.
    """

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self._spec = spec

    @property
    def spec(self) -> ModelSpec:
        return self._spec

    def batch_elements_kwargs(self) -> Mapping[str, Any]:
        return {"min_batch_size": self._spec.batch_size, "max_batch_size": self._spec.batch_size}

    def get_metrics_namespace(self) -> str:
        return METRICS_NAMESPACE

    def load_model(self) -> LoadedModel:
        import inspect

        import torch
        from transformers import AutoProcessor

        spec = self._spec
        kind, reference = model_kind(spec.path, spec.trust_remote_code)
        device = resolve_device(spec.device)
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        if kind == REMOTE_CODE and is_openvla_dir(spec.path):
            backend = load_openvla(spec.path, device, dtype)
            return LoadedModel(backend.model, backend.image_processor, kind, backend.class_name, device, dtype,
                               backend.pad_id, None, openvla=backend)
        common = dict(local_files_only=True, trust_remote_code=spec.trust_remote_code)
        if kind == REMOTE_CODE:
            from transformers.dynamic_module_utils import get_class_from_dynamic_module

            cls = get_class_from_dynamic_module(reference, spec.path, local_files_only=True)
        else:
            cls = image_text_auto_class()
        model = cls.from_pretrained(spec.path, **dtype_kwargs(dtype), **common)
        model = model.to(device).eval()
        processor = AutoProcessor.from_pretrained(spec.path, **common)
        tokenizer = getattr(processor, "tokenizer", processor)
        pad_id = tokenizer.pad_token_id
        if pad_id is None:
            pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        image_token = getattr(processor, "image_token", None)  # LLaVA-style processors
        forward_args = frozenset(inspect.signature(model.forward).parameters)
        return LoadedModel(model, processor, kind, type(model).__name__, device, dtype, int(pad_id), image_token,
                           forward_args=forward_args)

    def _encode(self, loaded: LoadedModel, row: ShardRow) -> dict:
        from PIL import Image

        tokenizer = getattr(loaded.processor, "tokenizer", loaded.processor)
        prompt = openvla_inference_prompt(row.instruction)
        text = (loaded.image_token or "") + prompt
        image = Image.open(io.BytesIO(row.image_primary)).convert("RGB")
        encoded = dict(loaded.processor(text=text, images=image, return_tensors="pt"))
        ids = encoded["input_ids"][0].tolist()
        if row.instruction not in loaded.tails:
            loaded.tails[row.instruction] = prompt_tail(tokenizer, row.instruction)
        drop, add = loaded.tails[row.instruction]
        if drop and tuple(ids[-len(drop):]) != drop:
            beam.metrics.Metrics.counter(METRICS_NAMESPACE, "prompt_tail_mismatch").inc()
            drop = ()
        length = len(ids)
        ids = ids[: length - len(drop)] + list(add)
        encoded["input_ids"] = ids
        encoded["attention_mask"] = [1] * len(ids)
        for key, value in list(encoded.items()):  # other per-token tensors: cut / extend like the ids
            if key not in ("input_ids", "attention_mask") and hasattr(value, "shape") and value.ndim == 2 and value.shape[1] == length:
                if key not in loaded.forward_args:  # e.g. token_type_ids of a plain tokenizer: 4.x generate rejects it
                    del encoded[key]
                    continue
                kept = value[0].tolist()[: length - len(drop)]
                encoded[key] = kept + [0] * len(add)
        return encoded

    def _collate(self, loaded: LoadedModel, encoded: Sequence[dict]) -> dict:
        import torch

        width = max(len(e["input_ids"]) for e in encoded)
        batch = {}
        for key in encoded[0]:
            values = [e[key] for e in encoded]
            if isinstance(values[0], list):  # per-token: left-pad
                fill = loaded.pad_id if key == "input_ids" else 0
                batch[key] = torch.tensor([[fill] * (width - len(v)) + v for v in values], dtype=torch.long)
            elif hasattr(values[0], "shape"):
                batch[key] = torch.cat(values, dim=0)
        for key, value in batch.items():
            value = value.to(loaded.device)
            batch[key] = value.to(loaded.dtype) if value.is_floating_point() else value
        return batch

    def _run_processor_model(self, batch: Sequence[ShardRow], model: LoadedModel) -> tuple[list[np.ndarray], float]:
        """Native (and other remote-code) models: processor per row, collate, ``model.generate``."""
        encoded = [self._encode(model, row) for row in batch]
        if model.kind == REMOTE_CODE:  # unknown code may not support padding: equal-length sub-batches
            groups: dict[int, list[int]] = {}
            for i, e in enumerate(encoded):
                groups.setdefault(len(e["input_ids"]), []).append(i)
            index_groups = list(groups.values())
        else:
            index_groups = [list(range(len(batch)))]
        generated: list[np.ndarray | None] = [None] * len(batch)
        generate_seconds = 0.0
        for indices in index_groups:
            inputs = self._collate(model, [encoded[i] for i in indices])
            t0 = time.perf_counter()
            ids = self._generate(model, inputs)
            generate_seconds += time.perf_counter() - t0
            for j, i in enumerate(indices):
                generated[i] = ids[j]
        return generated, generate_seconds

    def _generate(self, loaded: LoadedModel, batch: dict) -> np.ndarray:
        import torch
        from transformers import LogitsProcessorList

        spec = self._spec
        with torch.inference_mode():
            out = loaded.model.generate(
                **batch,
                max_new_tokens=spec.num_new_tokens,
                do_sample=False,
                num_beams=1,
                logits_processor=LogitsProcessorList([ActionTokenMask(spec.action_token_min, spec.action_token_max)]),
                pad_token_id=loaded.pad_id,
            )
        return out[:, -spec.num_new_tokens :].cpu().numpy().astype(np.int64)

    def _run_openvla(self, batch: Sequence[ShardRow], model: LoadedModel) -> tuple[list[np.ndarray], float]:
        """OpenVLA: the whole batch in one language-model ``generate`` (openvla.OpenVLABackend)."""
        from transformers import LogitsProcessorList

        spec = self._spec
        encoded = [model.openvla.encode(row.instruction, row.image_primary) for row in batch]
        t0 = time.perf_counter()
        ids = model.openvla.generate(
            encoded, spec.num_new_tokens,
            LogitsProcessorList([ActionTokenMask(spec.action_token_min, spec.action_token_max)]),
        )
        return list(ids), time.perf_counter() - t0

    def run_inference(self, batch: Sequence[ShardRow], model: LoadedModel, inference_args=None):
        started = time.perf_counter()
        if model.openvla is not None:
            generated, generate_seconds = self._run_openvla(batch, model)
        else:
            generated, generate_seconds = self._run_processor_model(batch, model)
        seconds = time.perf_counter() - started
        n = len(batch)
        outside = sum(int((~((g >= self._spec.action_token_min) & (g <= self._spec.action_token_max))).sum()) for g in generated)
        if outside:
            beam.metrics.Metrics.counter(METRICS_NAMESPACE, "generated_outside_action_range").inc(outside)
        beam.metrics.Metrics.counter(METRICS_NAMESPACE, "model_samples").inc(n)
        dtype = str(model.dtype).replace("torch.", "")
        for row, ids in zip(batch, generated):
            yield PredictionResult(row, Generation(ids, seconds / n, generate_seconds / n, model.device, dtype), self._spec.path)
