"""Image files as a decoder's input: the encoded bytes and the stored size, read without decoding."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

# File signatures of the formats DALI's decoder reads (JPEG, PNG, BMP, TIFF, WebP, JPEG 2000).
# Anything else that PIL opens (GIFs named .jpg in MIT-Indoor-67, for instance) would stop the
# pipeline, so it is decoded with PIL and handed to DALI re-encoded as a lossless PNG.
DECODER_SIGNATURES = (
    b"\xff\xd8\xff",
    b"\x89PNG\r\n\x1a\n",
    b"BM",
    b"II*\x00",
    b"MM\x00*",
    b"\x00\x00\x00\x0cjP  ",
    b"\xffO\xffQ",
)
_TIFF_SIGNATURES = (b"II*\x00", b"MM\x00*")
_TIFF_PHOTOMETRIC, _TIFF_BITS_PER_SAMPLE, _TIFF_EXTRA_SAMPLES = 262, 258, 338  # tag numbers
_TIFF_GRAY, _TIFF_RGB = 1, 2  # PhotometricInterpretation: BlackIsZero, RGB


# JPEG start-of-frame markers (baseline, extended, progressive, lossless, arithmetic); 0xC4 (DHT),
# 0xC8 (JPG) and 0xCC (DAC) share the range but are not frames.
_JPEG_FRAME_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from a JPEG's frame header, or None when the markers do not lead to one.

    Walks the marker segments before the first frame header (a few, in the first kilobytes): about
    3 us against about 40 us for PIL's header parse of the same bytes, which matters because the
    feeder runs on the training loop's thread.
    """
    position, end = 2, len(data)
    while position + 9 <= end:
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte before a marker
            position += 1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length field
            position += 2
        elif marker in _JPEG_FRAME_MARKERS:
            height = int.from_bytes(data[position + 5 : position + 7], "big")
            width = int.from_bytes(data[position + 7 : position + 9], "big")
            return (height, width) if height and width else None
        else:
            position += 2 + int.from_bytes(data[position + 2 : position + 4], "big")
    return None


def read_encoded(path: str) -> tuple[np.ndarray, int, int]:
    """A file's bytes as DALI's decoder input (uint8 [N]), with the stored image's (height, width).

    The size comes from the header, without EXIF orientation: load_rgb does not rotate, and the
    DALI decoder is told not to either. Formats DALI cannot decode are decoded with PIL
    (images.load_rgb) and handed over as a lossless PNG.
    """
    data = Path(path).read_bytes()
    if not _decoder_reads(data):
        return _reencoded(path)
    height, width = _stored_size(data)
    return np.frombuffer(data, dtype=np.uint8), height, width


class BatchReader:
    """read_encoded for a batch of files, into memory it reuses instead of a new bytes object per file.

    Why: DALI's feeder reads every image on the training loop's thread, so its cost per image caps the
    loader. On the 2-core development machine (a Firecracker VM, as the GPU machines are) reading
    73 KB JPEGs into new bytes objects took 119-159 us per file, into memory already touched 40-53 us
    (480 files, interleaved, three times). In the feeder, with two batches alive as DALI keeps them,
    the whole per-image cost went from a median 103 to 73 us. Threads did not help: reads in 2-8
    threads took longer than in one, here.

    `read(paths)` returns (uint8 array, height, width) per path, as read_encoded does. The arrays are
    views into one of `depth` buffers used in turn, so they stay valid until `depth` more batches have
    been read. DALI's external_source copies what its source returns when it is fed (its default,
    no_copy=False), so the loader needs them only until the call returns; depth adds a margin.
    """

    def __init__(self, depth: int = 3):
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        self._buffers = [np.empty(0, dtype=np.uint8) for _ in range(depth)]
        self._turn = 0

    def read(self, paths: Sequence[str]) -> list[tuple[np.ndarray, int, int]]:
        sizes = [os.stat(path).st_size for path in paths]
        # One spare byte: each read asks for one byte more than the stat said, so that a file grown since
        # (rewritten in place) shows up as a longer read instead of being cut short without a word.
        buffer = self._next_buffer(sum(sizes) + 1)
        view = memoryview(buffer)
        results, offset = [], 0
        for path, size in zip(paths, sizes, strict=True):
            with open(path, "rb", buffering=0) as file:
                count = file.readinto(view[offset : offset + size + 1])
            data = view[offset : offset + count]
            if count != size or not _decoder_reads(data):
                # Changed since the stat, or a format DALI cannot decode: the one-file path handles both.
                # (The next file is read at the same offset, over whatever this one left there.)
                results.append(read_encoded(path))
                continue
            height, width = _stored_size(data)
            results.append((buffer[offset : offset + count], height, width))
            offset += count
        return results

    def _next_buffer(self, size: int) -> np.ndarray:
        self._turn = (self._turn + 1) % len(self._buffers)
        if self._buffers[self._turn].size < size:
            # A quarter more than this batch needs, so that slightly larger batches later fit too.
            self._buffers[self._turn] = np.empty(size + size // 4, dtype=np.uint8)
        return self._buffers[self._turn]


def _decoder_reads(data: bytes | memoryview) -> bool:
    """Whether DALI's decoder reads the file `data` holds as PIL does (the torchvision loader's reader)."""
    head = bytes(data[:12])
    if head.startswith(_TIFF_SIGNATURES):
        return _plain_tiff(data)
    return head.startswith(DECODER_SIGNATURES) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def _plain_tiff(data: bytes | memoryview) -> bool:
    """An 8-bit RGB or grayscale TIFF without extra channels: the kind DALI's decoder reads as PIL does.

    In a review its CPU decoder stopped the pipeline on 1-bit and 32-bit integer TIFFs that PIL reads ("missing:
    BitsPerSample"), read a grayscale+alpha TIFF with the alpha as the green channel (239 grey levels off) and a
    LAB one 14 levels off PIL's. Those go through PIL. Not every TIFF does: that took 37 ms for a 500x375 RGB
    TIFF on the 2-core development machine, on the training loop's thread, against the header parse here.
    """
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            tags = image.tag_v2
            bits = tags.get(_TIFF_BITS_PER_SAMPLE, 1)
            bits = tuple(bits) if isinstance(bits, (tuple, list)) else (bits,)
            return (
                image.mode in ("RGB", "L")
                and tags.get(_TIFF_PHOTOMETRIC) in (_TIFF_GRAY, _TIFF_RGB)
                and _TIFF_EXTRA_SAMPLES not in tags
                and all(bit == 8 for bit in bits)
            )
    except Exception:  # noqa: BLE001 - a header PIL cannot parse: its decode, which names the reason, decides
        return False


def _stored_size(data: bytes | memoryview) -> tuple[int, int]:
    """(height, width) from a JPEG's frame header, else from PIL's header parse."""
    from PIL import Image

    size = jpeg_size(data) if bytes(data[:3]) == b"\xff\xd8\xff" else None
    if size is None:
        with Image.open(io.BytesIO(data)) as image:
            size = image.height, image.width
    return size


def _reencoded(path: str) -> tuple[np.ndarray, int, int]:
    """An image DALI cannot decode (a GIF named .jpg, say), decoded with PIL and re-encoded as a lossless PNG."""
    from smile_fast.data.images import load_rgb

    image = load_rgb(path)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return np.frombuffer(buffer.getvalue(), dtype=np.uint8), image.height, image.width
