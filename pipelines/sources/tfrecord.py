"""TFRecord framing with both CRC32C checks, without TensorFlow (workers computing statistics never import it).

The format (tensorflow.org/tutorials/load_data/tfrecord), little-endian, per record::

    uint64 length, uint32 masked_crc32c(length), byte data[length], uint32 masked_crc32c(data)
"""

from __future__ import annotations

import struct
from typing import Iterator

from vlaprep import paths

_CRC_MASK_DELTA = 0xA282EAD8


class CorruptRecordError(ValueError):
    """A TFRecord file whose framing or checksums are wrong (flipped bytes, truncation)."""


def masked_crc32c(data) -> int:
    """TFRecord's masked CRC32C of ``data``: the CRC rotated right by 15 bits plus a constant."""
    import google_crc32c

    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _CRC_MASK_DELTA) & 0xFFFFFFFF


def iter_tfrecord_file(path: str) -> Iterator[bytes]:
    """Yield the records of a TFRecord file, verifying both CRC32C checksums of every record.

    This is what ``tf.data.TFRecordDataset`` checks, without per-file dataset set-up. Raises
    ``CorruptRecordError`` naming the record index and byte offset.
    """
    name = paths.basename(path)
    with paths.open_read(path) as f:
        index, offset = 0, 0
        while True:
            header = f.read(12)
            if not header:
                return
            if len(header) < 12:
                raise CorruptRecordError(f"truncated record header at byte {offset} (record {index}) of {name}")
            length, length_crc = struct.unpack("<QI", header)
            if masked_crc32c(header[:8]) != length_crc:
                raise CorruptRecordError(f"corrupt length checksum at byte {offset} (record {index}) of {name}")
            data = f.read(length)  # read apart from its checksum: slicing would copy the record again
            footer = f.read(4)
            if len(data) < length or len(footer) < 4:
                raise CorruptRecordError(
                    f"truncated record {index} at byte {offset} of {name}: expected {length + 4} bytes, "
                    f"got {len(data) + len(footer)}"
                )
            if masked_crc32c(data) != struct.unpack("<I", footer)[0]:
                raise CorruptRecordError(f"corrupt data checksum in record {index} at byte {offset} of {name}")
            yield data
            index += 1
            offset += 12 + length + 4
