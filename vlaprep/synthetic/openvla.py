"""Offline, tiny OpenVLA checkpoints built with OpenVLA's own HF classes, for tests and benchmarks.

``build_tiny_openvla(out_dir, tokenizer_dir, code_dir)`` writes a directory in the layout of
``openvla/openvla-7b`` from the three files OpenVLA ships with it (``code_dir`` holds
``configuration_prismatic.py``, ``modeling_prismatic.py``, ``processing_prismatic.py``, MIT, unmodified;
they are copied into the checkpoint as every OpenVLA checkpoint carries them):

  config.json               OpenVLAConfig: model_type "openvla", auto_map {AutoConfig, AutoModelForVision2Seq},
                            vision_backbone_id "dinosiglip-vit-so-224px" (fused, as openvla-7b), llm_backbone_id
                            "llama2-7b-pure", a tiny Llama text_config (vocab 32064 = 32000 + <PAD>, padded to 64),
                            norm_stats, architectures ["OpenVLAForActionPrediction"]; timm_model_ids / image_sizes
                            replaced by the tiny towers below
  model.safetensors         OpenVLAForActionPrediction's weights (or model-0000K-of-0000N.safetensors +
                            model.safetensors.index.json with ``max_shard_size``, as openvla-7b ships them)
  tokenizer.json, tokenizer_config.json    the Llama-like tokenizer + ``<PAD>`` (32000); auto_map AutoProcessor;
                            model inputs ids + attention mask only (no token_type_ids), as Llama's tokenizer
  preprocessor_config.json  PrismaticImageProcessor's fields (tvf_* included) + auto_map AutoImageProcessor /
                            AutoProcessor -> processing_prismatic, as openvla-7b
  *_prismatic.py            OpenVLA's code

Load it as OpenVLA's README does (``AutoProcessor`` / ``AutoModelForVision2Seq`` with
``trust_remote_code=True``; on transformers 5.x through ``vlaprep.pipelines.validate.openvla``'s compat), in a
process that called ``register_tiny_timm_models()``.

Tiny towers: timm's ``VisionTransformer`` registered under two extra names with the arguments of the
towers openvla-7b fuses, only narrower and shallower -- ``vlaprep_tiny_dinov2_reg4`` (as
``vit_large_patch14_reg4_dinov2``: patch 14, 4 registers, no embedded class, LayerScale) and
``vlaprep_tiny_siglip`` (as ``vit_so400m_patch14_siglip_224``: patch 14, no class token, MAP pool, MLP
ratio 3.7362). ``image_size`` 28 gives 2 x 2 = 4 patches per tower. ``fused=False`` keeps only the DINOv2 tower
(vision_backbone_id "dinov2-vit-l").

Weights (``informative_init``): OpenVLA's ``_init_weights`` draws every Linear / Conv / Embedding from
N(0, 0.02) and timm's LayerScale starts at 1e-5, so a random model's last hidden state hardly depends on
the prompt or the image and every row predicts the same ids -- a match with ``predict_action`` would prove
nothing. The builder redraws every matrix with std 1/sqrt(fan_in) (position embeddings and register tokens
std 1, token embeddings 0.5), the language model's query/key projections 3x that (sharp, content-dependent
attention) and its output projections 2x, sets LayerScale to 1 and biases to N(0, 0.1^2), so the image and
the instruction move the logits (measured: 20 rows, 5 instructions, random images -> 20 distinct answers,
10-20 distinct ids at every position; with unit gains the first id takes 2 values);
and it scales the language-model head's rows outside the action ids (31744..31999) by 1e-3, so an
unrestricted greedy ``predict_action`` also picks action ids (as a trained OpenVLA does) and can be compared
with vlaprep's generation, which is restricted to them. Deterministic for a given ``seed``.

Importing OpenVLA's code here needs timm 0.9.10-0.9.12 / 0.9.16 and torchvision. ``prepare_openvla_imports``
puts a side directory with both on ``sys.path`` (``$VLAPREP_OPENVLA_DEPS`` or ``<venv>/openvla-deps``,
filled with ``pip install --no-deps --target``; kept out of the main environment because a torchvision
that cannot import breaks transformers' own image models there) and applies ``torchvision_ops_shim``.
Use it in dedicated processes (test workers, benchmarks) only.

``torchvision_ops_shim``: PyPI's Linux torchvision wheels are CUDA builds; against a CPU-only torch their
compiled ops (``_C.so``) do not load. torchvision is written to run without them (``extension._has_ops()``
is then False and every op raises when called) except for two unconditional
``torch.library.register_fake("torchvision::nms" / "torchvision::qnms")`` calls in
``_meta_registrations.py``, which die with "operator torchvision::nms does not exist". The shim declares
those two operator schemas (no kernel) when -- and only when -- ``_C.so`` cannot be loaded, so the import
succeeds and torchvision runs as it does without compiled ops. Nothing else is replaced: the transforms
timm builds and OpenVLA's processor calls (``Resize``, ``CenterCrop``, ``ToTensor``, ``Normalize``,
``functional.resize/pad/center_crop/to_tensor/normalize``) are torchvision's own Python code over PIL and
torch; calling ``nms`` raises "no kernel". Where torchvision imports by itself (a CPU build, or a CUDA
machine) the shim does nothing.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import math
import os
import shutil
import sys

OPENVLA_FILES = ("configuration_prismatic.py", "modeling_prismatic.py", "processing_prismatic.py")
SIDECAR_ENV = "VLAPREP_OPENVLA_DEPS"
TINY_DINOV2 = "vlaprep_tiny_dinov2_reg4"
TINY_SIGLIP = "vlaprep_tiny_siglip"
PAD_TOKEN = "<PAD>"
ACTION_LOW, ACTION_HIGH = 31744, 31999  # OpenVLA's action ids for the Llama-2 vocabulary (32000)
_SHIM_LIBRARIES: list = []  # torch.library.Library objects must stay alive for their definitions to stay
_TORCHVISION_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)


def default_sidecar() -> str:
    return os.environ.get(SIDECAR_ENV) or os.path.join(sys.prefix, "openvla-deps")


def torchvision_ops_shim() -> bool:
    """Declare ``torchvision::nms`` / ``qnms`` (no kernel) when torchvision's compiled ops cannot load; True if applied.

    Call before anything imports torchvision. See the module docstring for why this is all it takes.
    """
    if "torchvision" in sys.modules:
        return False
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return False
    import torch

    libraries = glob.glob(os.path.join(os.path.dirname(spec.origin), "_C.*so")) + glob.glob(
        os.path.join(os.path.dirname(spec.origin), "_C.*pyd")
    )
    if libraries:
        try:
            torch.ops.load_library(libraries[0])  # what torchvision.extension does first; same handle later
            return False
        except (OSError, RuntimeError):
            pass
    library = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _TORCHVISION_SCHEMAS:
        library.define(schema)
    _SHIM_LIBRARIES.append(library)
    return True


def prepare_openvla_imports(sidecar: str | None = None) -> dict:
    """Make timm + torchvision importable for OpenVLA's code in this process -> ``{"sidecar", "shim", "timm", "torchvision"}``.

    Adds ``sidecar`` (default ``default_sidecar()``) to the front of ``sys.path`` when it exists and timm
    is not importable otherwise, applies ``torchvision_ops_shim`` and imports both. Raises ImportError
    (with the install command) when they are not found.
    """
    sidecar = sidecar or default_sidecar()
    used = None
    if importlib.util.find_spec("timm") is None and os.path.isdir(sidecar):
        sys.path.insert(0, sidecar)
        importlib.invalidate_caches()
        used = sidecar
    if importlib.util.find_spec("timm") is None or importlib.util.find_spec("torchvision") is None:
        raise ImportError(
            f"expected timm 0.9.16 and torchvision for OpenVLA's code, in the environment or in {sidecar!r}, got "
            f"neither; hint: python -m pip install --no-deps --target {sidecar} timm==0.9.16 torchvision==0.28.0"
        )
    shim = torchvision_ops_shim()
    import timm
    import torchvision

    return {"sidecar": used, "shim": shim, "timm": timm.__version__, "torchvision": torchvision.__version__}


def register_tiny_timm_models() -> None:
    """Registers ``TINY_DINOV2`` and ``TINY_SIGLIP`` with timm (idempotent)."""
    from timm.models import is_model, register_model
    from timm.models.vision_transformer import _create_vision_transformer

    if is_model(TINY_DINOV2):
        return

    def vlaprep_tiny_dinov2_reg4(pretrained: bool = False, **kwargs):
        # vit_large_patch14_reg4_dinov2's arguments, 32 wide and 3 deep
        args = dict(patch_size=14, embed_dim=32, depth=3, num_heads=2, init_values=1e-5, reg_tokens=4, no_embed_class=True)
        return _create_vision_transformer(TINY_DINOV2, pretrained=pretrained, **dict(args, **kwargs))

    def vlaprep_tiny_siglip(pretrained: bool = False, **kwargs):
        # vit_so400m_patch14_siglip_224's arguments, 48 wide and 3 deep
        args = dict(patch_size=14, embed_dim=48, depth=3, num_heads=2, mlp_ratio=3.7362, class_token=False, global_pool="map")
        return _create_vision_transformer(TINY_SIGLIP, pretrained=pretrained, **dict(args, **kwargs))

    register_model(vlaprep_tiny_dinov2_reg4)
    register_model(vlaprep_tiny_siglip)


def default_norm_stats(dim: int = 7) -> dict:
    """A ``norm_stats`` entry for one dataset: q01 = -1, q99 = 1 (identity un-normalization), gripper masked out."""
    return {
        "bridge_orig": {
            "action": {"q01": [-1.0] * dim, "q99": [1.0] * dim, "mask": [True] * (dim - 1) + [False],
                       "mean": [0.0] * dim, "std": [1.0] * dim, "min": [-1.0] * dim, "max": [1.0] * dim},
        }
    }


def informative_init(model, seed: int, low: int = ACTION_LOW, high: int = ACTION_HIGH) -> None:
    """Redraw the weights so predictions depend on the inputs (module docstring); in place, deterministic."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "scale_factor":  # OpenVLA's renamed LayerScale gamma
                p.fill_(1.0)
            elif "embed_tokens" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=generator))
            elif leaf in ("pos_embed", "reg_token", "cls_token", "latent"):
                p.copy_(torch.randn(p.shape, generator=generator))
            elif p.dim() >= 2:
                gain = 3.0 if name.endswith(("q_proj.weight", "k_proj.weight")) else 2.0 if name.endswith("o_proj.weight") else 1.0
                p.copy_(gain * torch.randn(p.shape, generator=generator) / math.sqrt(p[0].numel()))
            elif leaf == "bias":
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))
        head = model.language_model.get_output_embeddings().weight  # [vocab, H]
        head[:low] *= 1e-3
        head[high + 1 :] *= 1e-3


def _load_code_classes(out_dir: str):
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    from vlaprep.pipelines.validate.openvla import apply_transformers_compat, compat_class

    apply_transformers_compat()
    get = lambda ref: get_class_from_dynamic_module(ref, out_dir, local_files_only=True)  # noqa: E731
    return (
        get("configuration_prismatic.OpenVLAConfig"),
        compat_class(get("modeling_prismatic.OpenVLAForActionPrediction")),
        get("processing_prismatic.PrismaticImageProcessor"),
        get("processing_prismatic.PrismaticProcessor"),
    )


def build_tiny_openvla(
    out_dir,
    tokenizer_dir,
    code_dir,
    *,
    image_size: int = 28,
    fused: bool = True,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    norm_stats: dict | None = None,
    resize_strategy: str = "resize-naive",
    max_shard_size: str | None = None,
    seed: int = 0,
):
    """Random-init tiny ``OpenVLAForActionPrediction`` + processor saved to ``out_dir`` (module docstring); returns the model.

    ``tokenizer_dir``: a Llama-like tokenizer (``build_llama_like_tokenizer``; base vocab 32000); ``code_dir``:
    OpenVLA's three HF files. Needs ``prepare_openvla_imports()`` first (timm, torchvision).
    """
    import torch
    from transformers import AutoTokenizer

    register_tiny_timm_models()
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    for name in OPENVLA_FILES:
        shutil.copyfile(os.path.join(os.fspath(code_dir), name), os.path.join(out_dir, name))
    config_cls, model_cls, image_cls, processor_cls = _load_code_classes(out_dir)

    tokenizer = AutoTokenizer.from_pretrained(os.fspath(tokenizer_dir))
    tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    pad_to = 64
    vocab = int(math.ceil(len(tokenizer) / pad_to) * pad_to)  # 32001 -> 32064, as openvla-7b
    text_config = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False, rms_norm_eps=1e-5,
    )
    config = config_cls(
        vision_backbone_id="dinosiglip-vit-so-224px" if fused else "dinov2-vit-l",
        llm_backbone_id="llama2-7b-pure",
        arch_specifier="no-align+fused-gelu-mlp" if fused else "no-align+gelu-mlp",
        use_fused_vision_backbone=fused,
        image_resize_strategy=resize_strategy,
        text_config=text_config,
        llm_max_length=2048,
        pad_token_id=tokenizer.pad_token_id,
        pad_to_multiple_of=pad_to,
        norm_stats=norm_stats or default_norm_stats(),
        n_action_bins=256,
    )
    towers = [TINY_DINOV2, TINY_SIGLIP] if fused else [TINY_DINOV2]
    config.timm_model_ids = towers
    config.timm_override_act_layers = [None] * len(towers)
    config.image_sizes = [image_size] * len(towers)
    config.auto_map = {
        "AutoConfig": "configuration_prismatic.OpenVLAConfig",
        "AutoModelForVision2Seq": "modeling_prismatic.OpenVLAForActionPrediction",
    }
    config.architectures = ["OpenVLAForActionPrediction"]
    torch.manual_seed(seed)
    model = model_cls(config)
    informative_init(model, seed)
    model.eval()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, safe_serialization=True, **kwargs)
    _fix_config(out_dir)

    means = [(0.485, 0.456, 0.406), (0.5, 0.5, 0.5)][: len(towers)]  # DINOv2 (ImageNet), SigLIP
    stds = [(0.229, 0.224, 0.225), (0.5, 0.5, 0.5)][: len(towers)]
    image_processor = image_cls(
        use_fused_vision_backbone=fused, image_resize_strategy=resize_strategy,
        input_sizes=[(3, image_size, image_size)] * len(towers), interpolations=["bicubic"] * len(towers),
        means=means, stds=stds,
    )
    processor_cls(image_processor, tokenizer)  # the real processor accepts the pair (validates its attributes)
    _write_image_processor(out_dir, image_processor)
    _write_tokenizer(out_dir, tokenizer)
    return model


def _fix_config(out_dir: str) -> None:
    """config.json as openvla-7b has it: the class's own name under architectures (not the compat subclass's module)."""
    path = os.path.join(out_dir, "config.json")
    with open(path) as f:
        config = json.load(f)
    config["architectures"] = ["OpenVLAForActionPrediction"]
    with open(path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")


def _write_image_processor(out_dir: str, image_processor) -> None:
    """preprocessor_config.json in openvla-7b's layout (transformers 5.x would nest it in processor_config.json)."""
    fields = image_processor.to_dict()
    fields = {k: v for k, v in fields.items() if not k.startswith("_")}
    fields["image_processor_type"] = "PrismaticImageProcessor"
    fields["processor_class"] = "PrismaticProcessor"
    fields["auto_map"] = {
        "AutoImageProcessor": "processing_prismatic.PrismaticImageProcessor",
        "AutoProcessor": "processing_prismatic.PrismaticProcessor",
    }
    with open(os.path.join(out_dir, "preprocessor_config.json"), "w") as f:
        json.dump(fields, f, indent=2, sort_keys=True)
        f.write("\n")


def _write_tokenizer(out_dir: str, tokenizer) -> None:
    """tokenizer.json + tokenizer_config.json (class name both 4.x and 5.x load, processor auto_map)."""
    tokenizer.save_pretrained(out_dir)
    path = os.path.join(out_dir, "tokenizer_config.json")
    with open(path) as f:
        config = json.load(f)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"  # 5.x writes "TokenizersBackend", unknown to 4.x
    config["processor_class"] = "PrismaticProcessor"
    config["auto_map"] = {"AutoProcessor": "processing_prismatic.PrismaticProcessor"}
    config["pad_token"] = PAD_TOKEN
    config["model_input_names"] = ["input_ids", "attention_mask"]  # as Llama's tokenizers: no token_type_ids
    for key in ("backend", "is_local", "local_files_only"):  # 5.x bookkeeping
        config.pop(key, None)
    with open(path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    processor_config = os.path.join(out_dir, "processor_config.json")
    if os.path.exists(processor_config):  # written by 5.x's tokenizer save for some classes; openvla-7b has none
        os.remove(processor_config)
