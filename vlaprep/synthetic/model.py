"""Offline, random-init LLaVA checkpoints for tests and GPU benchmarks (no hub, no torchvision).

``build_tiny_llava`` writes a directory that loads exactly like a real image-text-to-text checkpoint:

    model     = transformers.AutoModelForImageTextToText.from_pretrained(out_dir)   # LlavaForConditionalGeneration
    processor = transformers.AutoProcessor.from_pretrained(out_dir)                # LlavaProcessor

Layout of the saved directory (``save_pretrained`` of the model and of the processor):

  config.json, generation_config.json, model.safetensors
  tokenizer.json, tokenizer_config.json     the Llama-like tokenizer from ``tokenizer_dir`` plus two added
                                            tokens: ``<image>`` (id = base vocab, 32000) and ``<pad>`` (32001)
  processor_config.json                     LlavaProcessor (patch size, ``num_additional_image_tokens=1``
                                            for CLIP's CLS, strategy "default") + a CLIP image processor
                                            (square resize to ``image_size``, no center crop)

Vocabulary: the tokenizer's *base* vocabulary stays ``tokenizer.vocab_size`` (32000 for
``build_llama_like_tokenizer``), so OpenVLA's action ids 31744..31999 are the last 256 base ids as in
openvla-7b; the language model's embedding has ``len(tokenizer)`` rows (base + ``<image>`` + ``<pad>``).

Image processor: the checkpoint records ``"image_processor_type": "CLIPImageProcessor"``. transformers
5.x resolves that to the torchvision-backed fast class when torchvision is importable and to
``CLIPImageProcessorPil`` (pure PIL/NumPy) otherwise, so the directory loads on both kinds of machine.

A prompt for this model is ``[BOS] + [<image>] * num_image_tokens + prompt ids``: the processor expands
one ``<image>`` in the text to ``(image_size // patch_size) ** 2`` placeholders (CLS dropped by the
"default" strategy), e.g. 16 for ``image_size=32, patch_size=8``. Build inputs with
``processor(text="<image>" + prompt, images=image)``.
"""

from __future__ import annotations

import dataclasses
import math
import os

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"


@dataclasses.dataclass(frozen=True)
class LlavaSize:
    """Shape of a LLaVA build: CLIP vision tower + Llama text model (``heads`` divides ``hidden``)."""

    image_size: int = 32
    patch_size: int = 8
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    intermediate: int | None = None  # text MLP width; default 2 * hidden (tiny) -- see build_llava_of_size

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(
                f"expected image_size divisible by patch_size, got image_size={self.image_size}, "
                f"patch_size={self.patch_size}"
            )
        for hidden, heads, what in ((self.hidden, self.heads, "text"), (self.vision_hidden, self.vision_heads, "vision")):
            if hidden % heads:
                raise ValueError(f"expected {what} hidden ({hidden}) divisible by its heads ({heads})")

    @property
    def text_intermediate(self) -> int:
        return self.intermediate if self.intermediate is not None else 2 * self.hidden

    @property
    def num_image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def _add_special_tokens(tokenizer) -> None:
    from transformers import AddedToken

    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})


def _configs(size: LlavaSize, tokenizer):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=size.vision_hidden,
        intermediate_size=4 * size.vision_hidden,
        num_hidden_layers=size.vision_layers,
        num_attention_heads=size.vision_heads,
        image_size=size.image_size,
        patch_size=size.patch_size,
        projection_dim=size.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=size.hidden,
        intermediate_size=size.text_intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.heads,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
        # image tokens per image; transformers 4.45-4.46 take fewer than this (default 576) in input_ids as
        # "the processor did not expand <image>" and fail on batches
        image_seq_length=size.num_image_tokens,
    )


def _processor(size: LlavaSize, tokenizer):
    from transformers import LlavaProcessor

    try:  # pure PIL/NumPy; present in transformers 5.x
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as ImageProcessor
    except ImportError:  # 4.x: the slow CLIPImageProcessor is already PIL-based
        from transformers import CLIPImageProcessor as ImageProcessor
    square = {"height": size.image_size, "width": size.image_size}
    image_processor = ImageProcessor(size=square, crop_size=square, do_center_crop=False)
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=size.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS, dropped again by the "default" strategy
    )


def _build(out_dir, tokenizer_dir, size: LlavaSize, seed: int, dtype=None, device: str | None = None):
    import torch
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(os.fspath(tokenizer_dir))
    _add_special_tokens(tokenizer)
    config = _configs(size, tokenizer)
    torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        model = LlavaForConditionalGeneration(config)
    if dtype is not None:
        model = model.to(dtype)
    model.eval()
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    _processor(size, tokenizer).save_pretrained(out_dir)
    return model


def build_tiny_llava(out_dir, tokenizer_dir, image_size: int = 32, hidden: int = 64, layers: int = 2, seed: int = 0):
    """Random-init tiny ``LlavaForConditionalGeneration`` (+ processor) saved to ``out_dir``; returns the model.

    ``tokenizer_dir`` is a saved tokenizer (e.g. from ``build_llama_like_tokenizer``). Vision: CLIP with
    patch ``image_size // 4`` (16 image tokens), width ``hidden``; text: Llama ``hidden`` x ``layers``,
    4 heads. About 4.3M parameters with the defaults (most of them the 32002 x 64 embedding and head).
    Deterministic for a given ``seed``. Builds and saves in about a second on CPU.
    """
    if image_size % 4:
        raise ValueError(f"expected image_size divisible by 4 (patch = image_size // 4), got {image_size}")
    size = LlavaSize(
        image_size=image_size,
        patch_size=image_size // 4,
        vision_hidden=hidden,
        vision_layers=layers,
        vision_heads=4,
        hidden=hidden,
        layers=layers,
        heads=4,
    )
    return _build(out_dir, tokenizer_dir, size, seed)


def llava_parameter_count(size: LlavaSize, vocab: int) -> int:
    """Exact parameter count of the LLaVA built for ``size`` with a ``vocab``-row embedding."""
    h, i, L = size.hidden, size.text_intermediate, size.layers
    text = vocab * h * 2 + L * (4 * h * h + 3 * h * i + 2 * h) + h  # embed + head, attn + MLP + 2 norms, final norm
    vh, vL = size.vision_hidden, size.vision_layers
    n_pos = size.num_image_tokens + 1
    vision = (
        3 * vh * size.patch_size**2  # patch conv (no bias)
        + vh  # class embedding
        + n_pos * vh  # position embedding
        + 2 * vh  # pre layernorm
        + vL * (4 * (vh * vh + vh) + 2 * (vh * 4 * vh) + 4 * vh + vh + 4 * vh)  # q,k,v,o + fc1,fc2 + 2 LNs
        + 2 * vh  # post layernorm
    )
    projector = vh * h + h + h * h + h
    return text + vision + projector


def size_for_params(params: float, vocab: int = 32002, image_size: int = 224) -> LlavaSize:
    """A LlavaSize of about ``params`` parameters: ViT-B/14-like vision tower, Llama text model sized to fit.

    The text width grows with the target (``hidden = 2048`` from 6e8 to 3e9, Llama-style MLP
    ``8/3 * hidden`` rounded up to a multiple of 256, head dim 128); the layer count makes up the rest
    (at least one layer, so tiny targets overshoot).
    """
    if params <= 0:
        raise ValueError(f"expected params > 0, got {params!r}")
    hidden = next(h for limit, h in ((2e8, 512), (6e8, 1024), (3e9, 2048), (1e10, 4096), (math.inf, 5120)) if params < limit)
    inter = int(math.ceil(8 * hidden / 3 / 256) * 256)
    heads = max(4, hidden // 128)
    base = LlavaSize(
        image_size=image_size,
        patch_size=14 if image_size % 14 == 0 else 16 if image_size % 16 == 0 else image_size // 8,
        vision_hidden=768,
        vision_layers=12,
        vision_heads=12,
        hidden=hidden,
        layers=1,
        heads=heads,
        intermediate=inter,
    )
    fixed = llava_parameter_count(dataclasses.replace(base, layers=0), vocab)
    per_layer = llava_parameter_count(base, vocab) - fixed
    layers = max(1, round((params - fixed) / per_layer))
    return dataclasses.replace(base, layers=layers)


def build_llava_of_size(
    out_dir,
    tokenizer_dir,
    params: float = 1e9,
    image_size: int = 224,
    seed: int = 0,
    dtype: str = "bfloat16",
    device: str | None = None,
):
    """Random-init LLaVA of about ``params`` parameters for GPU benchmarks; saved like ``build_tiny_llava``.

    ``size_for_params`` picks the shape (about 1.0e9 for the default: CLIP ViT-B/14 at 224 px = 256 image
    tokens like OpenVLA, Llama 2048 x 15 layers: 0.993e9). Weights are saved in ``dtype`` (bf16 halves the disk
    and RAM: ~2 GB at 1e9). ``device="cuda"`` initializes on the GPU (seconds instead of a minute on CPU).
    Returns the model.
    """
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(os.fspath(tokenizer_dir))
    _add_special_tokens(tokenizer)
    size = size_for_params(params, vocab=len(tokenizer), image_size=image_size)
    return _build(out_dir, tokenizer_dir, size, seed, dtype=getattr(torch, dtype), device=device)
