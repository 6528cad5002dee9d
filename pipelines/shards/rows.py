"""One episode -> its training rows (one row = one OpenVLA sample), as Arrow record batches.

``EpisodeEncoder.encode`` is the one place an episode's rows are built, in step order: the dataset
transform, normalization and action tokens, prompt ids, then images, chunk by chunk
(``EpisodeRows``). An episode that is bad data becomes a ``QuarantineRecord``; a bug (an IndexError or
TypeError from a transform's output, say) fails the run with its traceback (``_data_errors``).

Memory does not grow with episode length. Per episode a worker holds its source record (encoded
frames, as read) and per-step arrays without pixels (actions, ids: ~0.5 KB a step); frames are
decoded, resized and PNG-encoded one chunk of steps at a time (``options.CHUNK_ROWS``), each chunk
appended to the spill file as its own record batch (``spill.spill_episode``). Measured
(``benchmarks/long_episode_memory.py``, 2 episodes of 128x128 frames, 2 worker processes, summed RSS
of driver + workers): 2,000 / 10,000 / 20,000 steps peak at 2.8 / 3.0 / 3.3 GB, against 3.6 / 8.1 /
13.0 GB when whole episodes were decoded at once; what still grows (~13 KB a step) is the source
record, read whole (``sources``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np
import pyarrow as pa

from vlaprep.pipelines.shards.images import decode_frames, encode_png, resize_batch_size, resize_frames
from vlaprep.pipelines.shards.options import (
    CHUNK_PIXEL_BYTES,
    CHUNK_ROWS,
    EMPTY_LANGUAGE_REASON,
    EMPTY_TRAJECTORY_REASON,
    STAGE_SHARD,
    STAGE_TRANSFORM,
    TEXT_ROUND_TRIP,
    ShardOptions,
)
from vlaprep.pipelines.shards.plan import heldout_split
from vlaprep.pipelines.shards.spill import spill_episode
from vlaprep.pipelines.shards.tokenization import BackendPromptIds, HFPromptIds, TokenizerFiles
from vlaprep.pipelines.stats.records import transform_episode
from vlaprep.schemas.episode import Episode, QuarantineRecord
from vlaprep.schemas.shards import LABEL_IGNORE, Column, image_column
from vlaprep.transforms.base import EmptyTrajectoryError
from vlaprep.transforms.normalization import normalize_actions
from vlaprep.transforms.registry import DatasetSpec


def _data_errors() -> tuple[type[Exception], ...]:
    """What bad data in an episode raises while its rows are built, and is quarantined: ValueError (the
    checks here and in ``images``; pyarrow's ArrowInvalid is one) and TF's OpError (an image that does
    not decode). Anything else -- an IndexError or TypeError from a transform's output, a KeyError -- is
    a bug and propagates."""
    import tensorflow as tf

    return (ValueError, tf.errors.OpError)


def chunk_indices(num_steps: int, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """``(index [T, N] int64, mask [T, N] bool)``: row t takes steps t..t+N-1; past the end, the last."""
    raw = np.arange(num_steps)[:, None] + np.arange(chunk)[None, :]  # [T, N]
    return np.minimum(raw, num_steps - 1), raw < num_steps


def default_chunk_rows(options: ShardOptions) -> int:
    """Steps per chunk: CHUNK_ROWS, fewer when their output pixels (all cameras) pass CHUNK_PIXEL_BYTES."""
    per_row = options.image_size * options.image_size * 3 * len(options.cameras)
    return max(1, min(CHUNK_ROWS, CHUNK_PIXEL_BYTES // per_row))


def _fixed_size_list(values: np.ndarray, width: int, value_type: pa.DataType) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), type=value_type), width)


def _int32_lists(values) -> pa.ListArray:
    """A ``[K, L]`` array (one prompt) or a list of K rows of different lengths -> list<int32>."""
    if isinstance(values, np.ndarray):
        return _regular_list(values)
    return pa.array([np.asarray(v, np.int32) for v in values], pa.list_(pa.int32()))


def _regular_list(values: np.ndarray) -> pa.ListArray:
    """``[T, L]`` int32 -> list<int32> with every list of length L."""
    rows, length = values.shape
    offsets = pa.array(np.arange(rows + 1, dtype=np.int32) * length, type=pa.int32())
    return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1), type=pa.int32()))


def verify_training_rows(input_ids: np.ndarray, labels: np.ndarray, action_ids: np.ndarray, eos_id: int) -> None:
    """Every row: the last N*D+1 ids are the action ids + EOS, labels are those and -100 elsewhere."""
    width = action_ids.shape[1] + 1
    tail = np.concatenate([action_ids, np.full((action_ids.shape[0], 1), eos_id, action_ids.dtype)], axis=1)
    if not (np.array_equal(input_ids[:, -width:], tail) and np.array_equal(labels[:, -width:], tail)):
        raise RuntimeError("expected the last N*D+1 input ids and labels to be the action ids + EOS, got others")
    if not np.all(labels[:, :-width] == LABEL_IGNORE):
        raise RuntimeError(f"expected labels {LABEL_IGNORE} before the action ids, got others")


class EpisodeEncoder:
    """``Episode`` -> ``(EpisodeKey, rows)`` or a ``QuarantineRecord``.

    Holds the prompt tokenizer (one per worker: ``HFPromptIds`` or ``BackendPromptIds``; a bare HF
    tokenizer is wrapped in ``HFPromptIds``) and a small instruction -> prompt ids cache. Per
    episode, what scales with steps only is vectorized over all of them at once (normalization, action
    tokens, chunk indices: ``[T, D]`` and ``[T, N]`` arrays, the prompt tokenized once); what scales
    with steps x pixels is done ``chunk_rows`` steps at a time (``EpisodeRows``), so the memory of an
    encoder does not grow with the episode's length.
    """

    def __init__(self, options: ShardOptions, specs: Mapping[str, DatasetSpec], action_stats: Mapping[str, dict], tokenizer,
                 chunk_rows: int | None = None):
        self.options = options
        self.specs = dict(specs)
        self.action_stats = dict(action_stats)
        self.prompts = tokenizer if isinstance(tokenizer, (HFPromptIds, BackendPromptIds)) else HFPromptIds(tokenizer)
        self.action_tokenizer = options.action_tokenizer()
        self.schema = options.schema()
        self.chunk_rows = int(chunk_rows) if chunk_rows is not None else default_chunk_rows(options)
        if self.chunk_rows < 1:
            raise ValueError(f"expected chunk_rows >= 1, got {chunk_rows!r}")
        self._prefix_cache: dict[str, list[int]] = {}

    def prefix_ids(self, instruction: str) -> list[int]:
        ids = self._prefix_cache.get(instruction)
        if ids is None:
            if len(self._prefix_cache) > 4096:
                self._prefix_cache.clear()
            ids = self._prefix_cache[instruction] = self.prompts.prefix_ids(instruction)
        return ids

    def encode(self, episode: Episode, spill_dir: str | None = None):
        """-> ``(key, rows)`` or ``QuarantineRecord`` (stage "transform" or "shard").

        With ``spill_dir`` (the pipeline), rows is the ``EpisodeRef`` of the episode spilled there chunk
        by chunk; without, the episode's rows as one record batch (whole in memory: tests, short
        episodes). The bytes of the rows are the same either way. Bad data is quarantined; any other
        error propagates (``_data_errors``)."""
        name, episode_id = episode.dataset_name, episode.episode_id
        if not episode.language.strip():
            return QuarantineRecord(name, episode_id, STAGE_SHARD, EMPTY_LANGUAGE_REASON)
        try:
            record = transform_episode(episode, self.specs[name])
        except EmptyTrajectoryError as e:  # statistics count it (as OpenVLA); there is no row to write
            return QuarantineRecord(name, episode_id, STAGE_TRANSFORM, f"{EMPTY_TRAJECTORY_REASON}: {e}")
        except ValueError as e:  # the transform's contract (TransformError); anything else is a bug
            return QuarantineRecord(name, episode_id, STAGE_TRANSFORM, f"{type(e).__name__}: {e}")
        split = heldout_split(self.options.seed, self.options.heldout_fraction, name, episode_id)
        key = (split, name, episode_id)
        try:
            rows = self.episode_rows(episode, record.trajectory)
            if spill_dir is None:
                out = pa.Table.from_batches(list(rows.batches()), schema=self.schema).combine_chunks().to_batches()[0]
            else:
                out = spill_episode(spill_dir, key, rows.batches())
        except _data_errors() as e:
            message = (str(e).strip().splitlines() or [""])[0][:300]
            return QuarantineRecord(name, episode_id, STAGE_SHARD, f"{type(e).__name__}: {message}")
        return key, out

    def episode_rows(self, episode: Episode, trajectory) -> EpisodeRows:
        """The whole-episode part of the rows (T = trajectory steps) and every check that needs no pixels."""
        opts = self.options
        action = np.ascontiguousarray(trajectory.action, dtype=np.float32)  # [T, D]
        t, d = action.shape
        if t == 0:
            raise ValueError("expected at least one step after the dataset transform, got 0")
        n = opts.action_chunk
        normalized = normalize_actions(action, self.action_stats[episode.dataset_name], opts.normalization)  # [T, D]
        tokens = self.action_tokenizer.encode(normalized).astype(np.int32)  # [T, D]
        index, mask = chunk_indices(t, n)  # [T, N]: row t looks ahead to t+N-1, across chunk boundaries
        steps = trajectory.step_index.astype(np.int64)  # [T] source step of each row
        if int(steps.min()) < 0 or int(steps.max()) >= episode.num_steps:
            # Not bad data: the transform itself broke its contract, so this fails the run (an IndexError).
            raise IndexError(
                f"expected step_index in [0, {episode.num_steps}) (the source steps) from the transform of "
                f"{episode.dataset_name!r}, got values in [{int(steps.min())}, {int(steps.max())}] for episode "
                f"{episode.episode_id!r}; hint: step_index must point into the steps the transform was given"
            )
        if episode.step_languages and int(steps.max()) >= len(episode.step_languages):
            raise ValueError(
                f"expected an instruction for each of the {episode.num_steps} source steps, got "
                f"{len(episode.step_languages)}; hint: the record has fewer instructions than steps"
            )
        # OpenVLA's prompt uses each step's own instruction (RLDS stores one per step).
        instructions = [episode.instruction_at(int(i)) for i in steps]
        prefixes = {text: self.prefix_ids(text) for text in dict.fromkeys(instructions)}
        longest = max(len(p) for p in prefixes.values())
        length = longest + n * d + 1
        if length > opts.model_max_length:
            raise ValueError(
                f"expected prompt + {n * d} action ids + EOS within the tokenizer's model_max_length "
                f"{opts.model_max_length}, got {length} ids ({longest} prompt ids)"
            )
        rows = EpisodeRows(self, episode, steps, action, normalized, tokens, index, mask, instructions, prefixes)
        if opts.tokenization == TEXT_ROUND_TRIP:
            for text in prefixes:  # one full-text tokenization per distinct instruction
                row = instructions.index(text)
                input_ids, _, action_ids = rows.ids(row, row + 1)
                self._check_text_round_trip(text, np.asarray(input_ids[0]), np.asarray(action_ids[0]))
        if opts.proprio_dim:
            proprio = np.ascontiguousarray(trajectory.proprio, dtype=np.float32)  # [T, P_dataset]
            width = opts.proprio_width(episode.dataset_name)
            if proprio.shape != (t, width):
                raise ValueError(f"expected proprio [T, {width}] like the dataset's other episodes, got {proprio.shape!r}")
            if width < opts.proprio_dim:  # zero-padded to the column's width (the manifest records `width`)
                proprio = np.concatenate([proprio, np.zeros((t, opts.proprio_dim - width), np.float32)], axis=1)
            rows.proprio = proprio
        return rows

    def _check_text_round_trip(self, instruction: str, input_ids: np.ndarray, action_ids: np.ndarray) -> None:
        """One full-text tokenization per episode: it must equal the prefix path's ids (the probe said so)."""
        if self.prompts.full_text_ids(instruction, action_ids.tolist()) != input_ids.tolist():
            raise ValueError(
                "expected the prompt ids + action ids to equal the tokenization of OpenVLA's full text "
                f"(tokenization {TEXT_ROUND_TRIP}), got a difference for instruction {instruction!r}"
            )


class EpisodeRows:
    """One episode's rows, produced ``encoder.chunk_rows`` steps at a time by ``batches()``.

    Holds the whole-episode arrays that scale with steps only (``action``, ``normalized``, ``tokens``:
    ``[T, D]``; ``index``, ``mask``: ``[T, N]``; ``proprio``: ``[T, P]``; ``steps``: ``[T]`` source
    steps) and, per camera, the shape of its first frame. Pixels exist one chunk at a time: its frames
    are decoded, resized and PNG-encoded in groups of ``resize_batch_size``.

    Errors come out as they did when an episode was one batch (the quarantine reason is part of the
    output): a camera's frames were all decoded before the next camera's, so an error in a later
    camera is reported only once the earlier cameras' remaining frames decode (``_first_error``).
    """

    def __init__(self, encoder: EpisodeEncoder, episode: Episode, steps, action, normalized, tokens, index, mask,
                 instructions: list[str], prefixes: dict[str, list[int]]):
        self.encoder = encoder
        self.episode = episode
        self.steps = steps
        self.action = action
        self.normalized = normalized
        self.tokens = tokens
        self.index = index
        self.mask = mask
        self.instructions = instructions  # [T] each row's instruction (its source step's)
        self.prefixes = prefixes  # instruction -> prompt ids (BOS + prompt)
        self.proprio = None
        self.frame_shapes: dict[str, tuple] = {}

    @property
    def num_rows(self) -> int:
        return int(self.action.shape[0])

    def ids(self, start: int, stop: int):
        """``(input_ids, labels, action_ids [K, N*D])`` int32 of rows start..stop-1, checked. ``input_ids``
        and ``labels`` are ``[K, L]`` arrays, or lists of K rows when the rows' instructions differ."""
        opts = self.encoder.options
        k, d = stop - start, self.action.shape[1]
        action_ids = self.tokens[self.index[start:stop]].reshape(k, opts.action_chunk * d)  # row-major, step t first
        runs = []  # (first row, last row + 1, prompt ids) of consecutive rows with one instruction
        for row in range(start, stop):
            if runs and self.instructions[row] == self.instructions[runs[-1][0]]:
                runs[-1][1] = row + 1
            else:
                runs.append([row, row + 1, self.prefixes[self.instructions[row]]])
        parts = []
        for first, end, prefix in runs:
            ids = action_ids[first - start : end - start]
            input_ids = np.empty((end - first, len(prefix) + ids.shape[1] + 1), np.int32)  # prefix ++ action ids ++ EOS
            input_ids[:, : len(prefix)] = np.asarray(prefix, np.int32)
            input_ids[:, len(prefix) : -1] = ids
            input_ids[:, -1] = opts.eos_id
            labels = input_ids.copy()
            labels[:, : len(prefix)] = LABEL_IGNORE
            verify_training_rows(input_ids, labels, ids, opts.eos_id)
            parts.append((input_ids, labels))
        if len(parts) == 1:
            return parts[0][0], parts[0][1], action_ids
        return [r for p in parts for r in p[0]], [r for p in parts for r in p[1]], action_ids

    def batches(self):
        """Record batches of rows [0, K), [K, 2K), ... (K = the encoder's chunk_rows), in step order."""
        for start in range(0, self.num_rows, self.encoder.chunk_rows):
            yield self.batch(start, min(self.num_rows, start + self.encoder.chunk_rows))

    def batch(self, start: int, stop: int) -> pa.RecordBatch:
        opts, schema = self.encoder.options, self.encoder.schema
        episode, t, k = self.episode, self.num_rows, stop - start
        n, d = opts.action_chunk, self.action.shape[1]
        input_ids, labels, action_ids = self.ids(start, stop)
        index = self.index[start:stop]  # [K, N]
        columns = {
            Column.DATASET_NAME: pa.array([episode.dataset_name] * k, pa.string()),
            Column.EPISODE_ID: pa.array([episode.episode_id] * k, pa.string()),
            Column.STEP_INDEX: pa.array(np.arange(start, stop, dtype=np.int32)),
            Column.NUM_STEPS: pa.array(np.full(k, t, np.int32)),
            Column.INSTRUCTION: pa.array(self.instructions[start:stop], pa.string()),
            Column.INPUT_IDS: _int32_lists(input_ids),
            Column.LABELS: _int32_lists(labels),
            Column.ACTION_TOKEN_IDS: _fixed_size_list(action_ids, n * d, pa.int32()),
            Column.ACTION: _fixed_size_list(self.action[start:stop], d, pa.float32()),
            Column.NORMALIZED_ACTION: _fixed_size_list(self.normalized[start:stop], d, pa.float32()),
            Column.ACTION_CHUNK: _fixed_size_list(self.action[index], n * d, pa.float32()),
            Column.ACTION_CHUNK_MASK: _fixed_size_list(self.mask[start:stop], n, pa.bool_()),
            Column.NORMALIZED_ACTION_CHUNK: _fixed_size_list(self.normalized[index], n * d, pa.float32()),
        }
        if self.proprio is not None:
            columns[Column.PROPRIO] = _fixed_size_list(self.proprio[start:stop], opts.proprio_dim, pa.float32())
        for position, role in enumerate(opts.cameras):
            try:
                columns[image_column(role)] = pa.array(self.pngs(role, start, stop), pa.binary())
            except _data_errors() as e:
                raise self._first_error(position, stop, e) from None
        return pa.RecordBatch.from_arrays([columns[f.name] for f in schema], schema=schema)

    def pngs(self, role: str, start: int, stop: int, encode: bool = True) -> list[bytes]:
        """The PNGs of camera ``role`` for rows start..stop-1 (``encode=False``: only decode and check)."""
        if role not in self.episode.images:
            raise ValueError(f"expected {role} camera images in the episode, got roles {sorted(self.episode.images)!r}")
        images, size = self.episode.images[role], self.encoder.options.image_size
        out = []
        position = start
        while position < stop:
            shape = self.frame_shapes.get(role)
            take = 1 if shape is None else resize_batch_size(shape[0], shape[1], size)  # [take, H, W, 3] at a time
            frames = decode_frames(images, self.steps[position : min(stop, position + take)], expected_shape=shape)
            self.frame_shapes.setdefault(role, tuple(int(x) for x in frames.shape[1:]))
            if encode:
                out.extend(encode_png(frame) for frame in resize_frames(frames, size))
            position += int(frames.shape[0])
        return out

    def _first_error(self, position: int, stop: int, error: Exception) -> Exception:
        """The error a whole-episode pass would have met first: one in an earlier camera's later frames
        (decoded only, to find it) before ``error`` in camera ``position`` at rows before ``stop``."""
        for role in self.encoder.options.cameras[:position]:
            for start in range(stop, self.num_rows, self.encoder.chunk_rows):
                try:
                    self.pngs(role, start, min(self.num_rows, start + self.encoder.chunk_rows), encode=False)
                except _data_errors() as earlier:
                    return earlier
        return error


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """What a worker needs to build an ``EpisodeEncoder`` (pickles: options, specs, statistics and either
    the verified Rust tokenizer JSON or the tokenizer files)."""

    options: ShardOptions
    specs: Mapping[str, DatasetSpec]
    action_stats: Mapping[str, dict]
    tokenizer_files: TokenizerFiles | None = None
    backend_json: str | None = None
    eos_token: str | None = None

    def __post_init__(self):
        if (self.tokenizer_files is None) == (self.backend_json is None):
            raise ValueError("expected exactly one of tokenizer_files and backend_json")
        if self.backend_json is not None and not self.eos_token:
            raise ValueError("expected eos_token with backend_json")

    def build(self) -> EpisodeEncoder:
        if self.backend_json is not None:
            prompts = BackendPromptIds(self.backend_json, self.eos_token)
        else:
            prompts = HFPromptIds(self.tokenizer_files.load())
        return EpisodeEncoder(self.options, self.specs, self.action_stats, prompts)
