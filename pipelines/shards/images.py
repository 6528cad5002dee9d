"""A row's camera image: source frames decoded (``decode_frames``), resized exactly as OpenVLA does
(``resize_frames``: TF lanczos3 with antialias, rounded) and stored as a lossless PNG (``encode_png``).

Performance (a shared, noisy 2-core VM; 256x256 JPEG Bridge-layout frames -> 224x224). Per frame,
one thread: decode 0.45 ms + lanczos3 resize and rounding 2.0 ms = 2.45 ms; PNG 0.2 ms (stored
deflate; PIL ``compress_level=1`` would be 4-7 ms).
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

from vlaprep.pipelines.shards.options import MAX_RESIZE_BATCH, RESIZE_BATCH_BYTES


def _check_frame_exists(num_frames: int, step: int) -> None:
    """A source record with fewer frames than steps is bad data (that the transform's step_index points into
    the source steps is checked first, by ``rows.EpisodeEncoder.episode_rows``)."""
    if step >= num_frames:
        raise ValueError(f"expected a frame for source step {step}, got {num_frames} frames; hint: the record has fewer images than steps")


def decode_frames(images, indices: np.ndarray, expected_shape: tuple | None = None):
    """The frames at ``indices``: ``[K, H, W, 3] uint8`` (a NumPy array or, for encoded images, a tf.Tensor).

    ``images`` is a list of encoded images (JPEG/PNG bytes: decoded with ``tf.io.decode_image``, as
    OpenVLA's dlimp pipeline does, so the pixels match libjpeg-turbo-in-TF exactly) or a decoded
    ``[T, H, W, 3] uint8`` array (CALVIN). Each distinct frame is decoded once; decoded frames stay
    tensors (``tf.gather`` / ``tf.stack``) so the resize gets them without NumPy round trips, which on
    this machine cost as much as the decode (~0.5 ms per 256x256 frame in copies). Every frame must
    have ``expected_shape`` (``(H, W, 3)``; default: the first one decoded) -- the encoder passes the
    shape of the episode's first frame, so the check spans the episode's chunks.
    """
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected frames [T, H, W, 3] uint8, got {images.shape!r} {images.dtype}")
        if len(indices):
            _check_frame_exists(images.shape[0], int(np.max(indices)))
        return images[indices]
    import tensorflow as tf

    unique, inverse = np.unique(indices, return_inverse=True)
    decoded = []
    for i in unique:
        _check_frame_exists(len(images), int(i))
        frame = tf.io.decode_image(images[int(i)], channels=3, expand_animations=False, dtype=tf.uint8)
        reference = expected_shape if expected_shape is not None else (tuple(decoded[0].shape) if decoded else None)
        if reference is not None and tuple(frame.shape) != tuple(reference):
            raise ValueError(f"expected every frame of the episode to be {tuple(reference)!r}, got {tuple(frame.shape)!r} at step {int(i)}")
        decoded.append(frame)
    stacked = tf.stack(decoded)
    return stacked if len(unique) == len(indices) and np.array_equal(unique, indices) else tf.gather(stacked, inverse.reshape(-1))


def resize_batch_size(height: int, width: int, size: int) -> int:
    """Frames per TF resize call: at most MAX_RESIZE_BATCH, and as many as keep the call's float32
    working set (input, one separable pass, output and its rounding: ``12 * (H*W + H*S + 2*S*S)`` bytes
    a frame) under RESIZE_BATCH_BYTES."""
    per_frame = 12 * (height * width + height * size + 2 * size * size)
    return max(1, min(MAX_RESIZE_BATCH, RESIZE_BATCH_BYTES // per_frame))


def resize_frames(frames, size: int) -> np.ndarray:
    """``[K, H, W, 3] uint8`` -> ``[K, S, S, 3] uint8`` exactly as OpenVLA: ``tf.image.resize(...,
    method="lanczos3", antialias=True)``, rounded (half to even, like ``tf.round``), clamped to
    [0, 255] and cast (``tf.saturate_cast`` == clip_by_value + cast). Batched by ``resize_batch_size``."""
    import tensorflow as tf

    out = np.empty((frames.shape[0], size, size, 3), np.uint8)
    step = resize_batch_size(int(frames.shape[1]), int(frames.shape[2]), size)
    for start in range(0, frames.shape[0], step):
        batch = frames[start : start + step]
        resized = tf.image.resize(batch, (size, size), method="lanczos3", antialias=True)
        out[start : start + batch.shape[0]] = tf.saturate_cast(tf.round(resized), tf.uint8).numpy()
    return out


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_FILTER_UP = 2
PNG_DEFLATE_LEVEL = 0  # stored blocks; the Parquet page's zstd compresses (see encode_png)


def encode_png(image: np.ndarray) -> bytes:
    """``[H, W, 3] uint8`` -> a lossless 8-bit RGB PNG (deterministic bytes: no timestamp, no variable chunk).

    Why PNG: the stored pixels are exactly the ones OpenVLA's pipeline feeds the model (TF lanczos3
    resize, rounded), so a reader needs no TF and there is no second lossy step (re-encoding as JPEG
    would change them). Every PNG decoder (PIL, TF, libpng) returns them exactly.

    Why this encoder: PNG's deflate is the expensive part. PIL (5 trial filters per row, deflate level
    1) takes 4-7 ms per 224x224 camera frame here, zlib level 1 alone ~1.1 ms -- against ~2.5 ms to
    decode and resize the frame. So every row gets the PNG "Up" filter (one vectorized uint8
    subtraction) and the deflate stream uses stored blocks (``PNG_DEFLATE_LEVEL`` 0, ~0.2 ms); the
    Parquet column is then compressed with zstd (``write.write_shard_file``), which is faster than deflate
    and smaller on disk (it sees several consecutive, similar frames per page: 62 vs 88 KB per frame on
    the synthetic Bridge data), and readers decode these PNGs ~3x faster. A PNG copied out of the shard
    is therefore uncompressed (3 bytes per pixel + 1 per row).
    """
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an [H, W, 3] uint8 image, got {image.shape!r} {image.dtype}")
    height, width, _ = image.shape
    rows = np.ascontiguousarray(image).reshape(height, width * 3)
    raw = np.empty((height, width * 3 + 1), np.uint8)
    raw[:, 0] = _PNG_FILTER_UP
    raw[0, 1:] = rows[0]  # "Up" with the implicit all-zero row above
    np.subtract(rows[1:], rows[:-1], out=raw[1:, 1:])  # uint8 arithmetic wraps modulo 256, as PNG wants
    compressor = zlib.compressobj(PNG_DEFLATE_LEVEL, zlib.DEFLATED, 15, 9, zlib.Z_DEFAULT_STRATEGY)
    data = compressor.compress(raw.data) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit, truecolor, deflate, adaptive, no interlace
    return _PNG_SIGNATURE + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b"")
