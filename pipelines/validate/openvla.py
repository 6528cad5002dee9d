"""OpenVLA checkpoints in ``vlaprep validate``: the checkpoint's own modules, decoded in batches by vlaprep.

An OpenVLA checkpoint directory (the layout of ``openvla/openvla-7b``):

  config.json                 model_type "openvla" (or "prismatic"), auto_map {AutoConfig:
                              configuration_prismatic.OpenVLAConfig, AutoModelForVision2Seq:
                              modeling_prismatic.OpenVLAForActionPrediction}, timm ids, text_config, norm_stats
  configuration_prismatic.py, modeling_prismatic.py, processing_prismatic.py      OpenVLA's code (remote code)
  model.safetensors | model-0000K-of-0000N.safetensors + model.safetensors.index.json
  tokenizer.json / tokenizer.model + tokenizer_config.json     Llama-2 tokenizer, ``<PAD>`` = 32000
  preprocessor_config.json    auto_map AutoImageProcessor -> processing_prismatic.PrismaticImageProcessor

What is reproduced: for every row, the action token ids of OpenVLA's ``predict_action`` (greedy):

  ids     = tokenizer("In: What action should the robot take to {instruction.lower()}?\\nOut:")  # with BOS
            + [29871] unless ids[-1] == 29871          # predict_action's rule, literally
  pixels  = the checkpoint's PrismaticImageProcessor(image)                  # [C*towers, S, S]
  inputs  = [embed(ids[0]), projector(vision_backbone(pixels)), embed(ids[1:])]   # Prismatic's splice
  output  = greedy generate of N*D ids by the language model, restricted to the action ids

Approach (chosen over loading the weights into native modules): vlaprep loads the checkpoint's own
classes (only with ``--trust-remote-code``) and runs its ``vision_backbone``, ``projector`` and image
processor on a whole batch, builds the embedding sequence above for every row, left-pads the batch
(attention mask 0 on the padding), and calls the *language model's* ``generate(inputs_embeds=...)``.
Why: OpenVLA's vision towers are timm ViTs named by timm ids (DINOv2 with registers + SigLIP fused, CLIP,
IN1k variants, at 224 or 384 px) with a ``LayerScale`` patch, and its preprocessing is a set of
torchvision calls chosen per checkpoint (letterbox / resize-naive / resize-crop, one normalization per
tower). Re-implementing those natively would copy every variant's architecture and preprocessing and
silently drift on the first checkpoint that differs; running the checkpoint's own modules keeps them
exactly its authors' code. The only part vlaprep replaces is the part that cannot batch and breaks
across transformers versions -- OpenVLA's ``generate`` plumbing (its ``prepare_inputs_for_generation``
refuses batch > 1, and its cache handling does not survive transformers 5.x) -- and the replacement is
the language model's own (native, e.g. ``LlamaForCausalLM``) ``generate``, which handles left padding,
position ids and the KV cache. Prismatic's ``forward`` splices the patches in after position 0; with
left padding, position 0 of a row is a pad, so the splice is done here per row instead (BOS, patches,
rest), which is exactly what ``forward`` builds for an unpadded row.

Exactness: the rows' sequences, positions (from the attention mask) and causal attention are those of
``predict_action``; greedy argmax over the same logits gives the same ids up to floating-point
differences of padded vs unpadded batched matmuls (last bits; a near-tie could flip). Measured on
tiny real-class checkpoints in tests/pipelines/validate (fp32 CPU, batch 1 and 8, mixed prompt lengths): identical.
predict_action passes its attention mask one position short (it appends 29871 to ``input_ids`` only); the
language model then attends causally to every position, as vlaprep does.

transformers compatibility (OpenVLA's code targets 4.40.1; vlaprep declares >= 4.45, tested on 5.x):
  * 5.x: ``processing_prismatic.py`` imports ``PaddingStrategy, PreTokenizedInput, TextInput,
    TruncationStrategy`` from ``transformers.tokenization_utils``, which no longer defines them:
    ``apply_transformers_compat`` adds the four names there from ``tokenization_utils_base`` (only when
    missing; the same objects 4.x exported).
  * 4.5x/5.x: ``PreTrainedModel.__init__`` reads ``self._supports_sdpa``, a property of OpenVLA's class that
    reads ``self.language_model`` before it exists; and 5.x calls ``tie_weights(recompute_mapping=...)``,
    which OpenVLA's ``tie_weights(self)`` does not accept. ``compat_class`` subclasses the checkpoint's
    class with ``_supports_sdpa = True`` (every language model OpenVLA configs name -- Llama-2, Mistral,
    Phi-2 -- supports SDPA, which is what 4.40.1 resolved to as well) and a ``tie_weights`` that forwards
    its arguments to the language model's (a no-op for Llama-2). Weights, modules and forward are unchanged.
  * 4.x < 4.56 needs ``torch_dtype=``, later versions ``dtype=`` (``dtype_kwargs``).
  * Not needed here (vlaprep never calls OpenVLA's ``generate``): on 5.x OpenVLA's output class takes
    ``past_key_values`` where 5.x passes ``cache``, and remote classes no longer inherit
    ``GenerationMixin``; tests/pipelines/validate patches those for the *reference* ``predict_action`` only.

Dependencies (``pip install 'vlaprep[openvla]'``): timm 0.9.10-0.9.12 or 0.9.16 (OpenVLA's
``modeling_prismatic.py`` raises on any other) and torchvision (timm and the processor import it).
``check_openvla_dependencies`` verifies both up front, before any pipeline starts, and names what to
install in one line. A torchvision built for another torch (PyPI's Linux torchvision wheels are CUDA
builds: against a CPU-only torch their import dies with "operator torchvision::nms does not exist") is
reported as such.

bf16 on CUDA, fp32 on CPU, as ``VlaModelHandler`` does for every model; pixel values are cast to the
model's dtype as OpenVLA's README does (``inputs.to(device, dtype=torch.bfloat16)``).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
from collections.abc import Callable, Mapping, Sequence
from importlib import metadata
from typing import Any

import numpy as np

from vlaprep.pipelines.validate.layout import ValidationError
from vlaprep.transforms.prompt import openvla_inference_prompt

OPENVLA_MODEL_TYPES = frozenset({"openvla", "prismatic"})
TIMM_VERSIONS = ("0.9.10", "0.9.11", "0.9.12", "0.9.16")  # what modeling_prismatic.py accepts
TORCHVISION_FOR_TORCH = {"2.13": "0.28"}  # torch minor -> torchvision minor (for the hint)
LLAMA2_SPACE_ID = 29871  # predict_action appends it when the prompt does not end with it
INSTALL_HINT = "pip install 'vlaprep[openvla]'"
IMAGE_PROCESSOR_CONFIG = "preprocessor_config.json"
_TOKENIZATION_NAMES = ("PaddingStrategy", "PreTokenizedInput", "TextInput", "TruncationStrategy")


def is_openvla_config(config: Mapping[str, Any]) -> bool:
    """True for a Prismatic / OpenVLA ``config.json`` (``model_type`` "openvla" or "prismatic")."""
    return config.get("model_type") in OPENVLA_MODEL_TYPES


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def check_openvla_dependencies(
    version_of: Callable[[str], str] | None = None,
    import_module: Callable[[str], Any] | None = None,
) -> dict[str, str]:
    """``{"timm": v, "torchvision": v}`` if OpenVLA's code can import; else ``ValidationError`` (one line).

    Checks the installed versions first (no import), then imports torchvision and timm, so a torchvision
    built for another torch is named as such. ``version_of`` / ``import_module`` are injectable for tests.
    """
    import importlib

    version_of = version_of or metadata.version
    import_module = import_module or importlib.import_module
    found = {}
    for name in ("timm", "torchvision"):
        try:
            found[name] = version_of(name)
        except metadata.PackageNotFoundError:
            raise ValidationError(
                f"expected {name} for OpenVLA's code (timm {', '.join(TIMM_VERSIONS)} and a torchvision matching "
                f"torch), got no {name} installed; hint: {INSTALL_HINT}"
            ) from None
    if found["timm"] not in TIMM_VERSIONS:
        raise ValidationError(
            f"expected timm {' or '.join(TIMM_VERSIONS)} (modeling_prismatic.py refuses others), got timm "
            f"{found['timm']}; hint: {INSTALL_HINT}"
        )
    try:
        import_module("torchvision")
    except Exception as e:  # noqa: BLE001 - any import failure is the same user-facing problem
        import torch

        torch_version = torch.__version__
        minor = ".".join(torch_version.split("+")[0].split(".")[:2])
        want = TORCHVISION_FOR_TORCH.get(minor, "the release")
        build = "CPU-only " if torch.version.cuda is None else ""
        raise ValidationError(
            f"expected torchvision {found['torchvision']} to import with {build}torch {torch_version}, got "
            f"{_first_line(e)}; hint: it was built for another torch or CUDA (PyPI's Linux torchvision wheels are "
            f"CUDA builds): install torchvision {want}.x built for this torch (for a CPU-only torch, PyTorch's CPU "
            "wheel)"
        ) from e
    try:
        import_module("timm")
    except Exception as e:  # noqa: BLE001
        raise ValidationError(f"expected timm {found['timm']} to import, got {_first_line(e)}; hint: {INSTALL_HINT}") from e
    return found


def apply_transformers_compat() -> None:
    """transformers 5.x: put the four names ``processing_prismatic.py`` imports back into
    ``transformers.tokenization_utils`` (from ``tokenization_utils_base``). No-op where they exist."""
    import transformers.tokenization_utils as tokenization_utils
    import transformers.tokenization_utils_base as base

    for name in _TOKENIZATION_NAMES:
        if not hasattr(tokenization_utils, name):
            setattr(tokenization_utils, name, getattr(base, name))


@functools.lru_cache(maxsize=None)
def compat_class(cls):
    """The checkpoint's model class with the two load-time fixes of the module docstring (cached per class)."""

    class OpenVLACompat(cls):
        _supports_sdpa = True  # shadows the property that reads self.language_model before __init__ made it

        def tie_weights(self, *args, **kwargs):  # 5.x passes recompute_mapping=...
            return self.language_model.tie_weights(*args, **kwargs)

    OpenVLACompat.__name__ = OpenVLACompat.__qualname__ = cls.__name__
    OpenVLACompat.__module__ = cls.__module__
    return OpenVLACompat


def load_openvla_classes(path: str):
    """``(model class, image processor class)`` from the checkpoint's own code (remote code: callers must
    have the user's ``--trust-remote-code``)."""
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    apply_transformers_compat()
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    model_ref = config["auto_map"]["AutoModelForVision2Seq"]
    with open(os.path.join(path, IMAGE_PROCESSOR_CONFIG)) as f:
        image_ref = json.load(f).get("auto_map", {}).get("AutoImageProcessor", "processing_prismatic.PrismaticImageProcessor")
    model_cls = get_class_from_dynamic_module(model_ref, path, local_files_only=True)
    image_cls = get_class_from_dynamic_module(image_ref, path, local_files_only=True)
    return compat_class(model_cls), image_cls


def prompt_ids(tokenizer, instruction: str) -> list[int]:
    """predict_action's ids: the inference prompt with BOS, plus 29871 when it does not end with it."""
    ids = [int(i) for i in tokenizer(openvla_inference_prompt(instruction), add_special_tokens=True).input_ids]
    if ids[-1] != LLAMA2_SPACE_ID:
        ids.append(LLAMA2_SPACE_ID)
    return ids


def splice_and_left_pad(token_embeddings: Sequence[Any], patches: Any):
    """``[BOS, patches, rest]`` per row, left-padded with zeros -> ``(inputs_embeds [B, W, H], attention_mask [B, W])``.

    ``token_embeddings[i]``: ``[L_i, H]`` (row i's prompt ids embedded, BOS first); ``patches``: ``[B, P, H]``.
    ``W = P + max_i L_i``; row i's first ``W - P - L_i`` positions are padding (mask 0).
    """
    import torch

    rows = [torch.cat([e[:1], patches[i], e[1:]], dim=0) for i, e in enumerate(token_embeddings)]
    width = max(r.shape[0] for r in rows)
    hidden = rows[0].shape[1]
    embeds = rows[0].new_zeros((len(rows), width, hidden))
    mask = torch.zeros((len(rows), width), dtype=torch.long, device=rows[0].device)
    for i, r in enumerate(rows):
        embeds[i, width - r.shape[0] :] = r
        mask[i, width - r.shape[0] :] = 1
    return embeds, mask


@dataclasses.dataclass
class OpenVLAEncoded:
    """One row's inputs: ``ids`` (prompt ids incl. BOS and 29871) and ``pixel_values`` ``[C*towers, S, S]``."""

    ids: list[int]
    pixel_values: Any


@dataclasses.dataclass
class OpenVLABackend:
    """A loaded OpenVLA checkpoint: its model (vision backbone, projector, language model), its image
    processor and its tokenizer; ``generate`` decodes a batch of rows at once."""

    model: Any
    image_processor: Any
    tokenizer: Any
    device: str
    dtype: Any
    pad_id: int
    class_name: str
    tails: dict = dataclasses.field(default_factory=dict)  # instruction -> prompt ids (tokenized once)

    def encode(self, instruction: str, image_bytes: bytes) -> OpenVLAEncoded:
        from PIL import Image

        if instruction not in self.tails:
            self.tails[instruction] = prompt_ids(self.tokenizer, instruction)
        image = Image.open(io.BytesIO(image_bytes)).convert("RGB")
        pixel_values = self.image_processor(image, return_tensors="pt")["pixel_values"][0]
        return OpenVLAEncoded(self.tails[instruction], pixel_values)

    def generate(self, encoded: Sequence[OpenVLAEncoded], num_new_tokens: int, logits_processor) -> np.ndarray:
        """Greedy ``num_new_tokens`` ids for every row, one language-model ``generate`` for the batch -> ``[B, n]``."""
        import torch

        model = self.model
        lm = model.language_model
        embed = lm.get_input_embeddings()
        with torch.inference_mode():
            pixels = torch.stack([e.pixel_values for e in encoded]).to(self.device, dtype=self.dtype)
            patches = model.projector(model.vision_backbone(pixels))  # [B, P, H]
            tokens = [embed(torch.tensor(e.ids, dtype=torch.long, device=self.device)) for e in encoded]
            embeds, mask = splice_and_left_pad(tokens, patches)
            out = lm.generate(
                inputs_embeds=embeds,
                attention_mask=mask,
                max_new_tokens=num_new_tokens,
                do_sample=False,
                num_beams=1,
                logits_processor=logits_processor,
                pad_token_id=self.pad_id,
                use_cache=True,
            )
        return out[:, -num_new_tokens:].cpu().numpy().astype(np.int64)


def load_openvla(path: str, device: str, dtype) -> OpenVLABackend:
    """Loads the checkpoint at ``path`` (its own classes, ``compat_class``) on ``device`` in ``dtype``."""
    from transformers import AutoTokenizer

    from vlaprep.pipelines.validate.model import dtype_kwargs  # here, not at the top: model.py imports this module

    check_openvla_dependencies()
    model_cls, image_cls = load_openvla_classes(path)
    model = model_cls.from_pretrained(path, local_files_only=True, **dtype_kwargs(dtype))
    model = model.to(device).eval()
    image_processor = image_cls.from_pretrained(path, local_files_only=True)
    # trust_remote_code: AutoTokenizer reads config.json (OpenVLAConfig, the checkpoint's code) to pick a class
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=True)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = getattr(model.config, "pad_token_id", None)
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return OpenVLABackend(model, image_processor, tokenizer, device, dtype, int(pad_id), model_cls.__name__)
