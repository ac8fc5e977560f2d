"""COCO segmentations (polygons, uncompressed RLE, compressed RLE strings): checked, then decoded with pycocotools.

pycocotools trusts its input. A compressed RLE string that is empty or ends inside a count decodes from
uninitialised memory (a different mask on every call); run lengths summing to more than H*W write past the mask
buffer, to fewer leave pixels uninitialised; negative counts overflow; NaN polygon coordinates rasterise to nothing.
So every segmentation is checked here before pycocotools sees it: types, finite coordinates near the image, counts
that are non-negative integers summing to exactly H*W (for a compressed string: after decoding it character by
character, as pycocotools' `rleFrString` would). Anything else raises DataError naming the annotation.

The mask of an object (`decode_object_mask`, what the datasets use) must also cover at least one pixel: an empty
segmentation, polygons without area or wholly outside the image, or an RLE of background only would train and score
an object against an empty ground truth.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from flmm_model.data.errors import DataError, record_errors


def rle_string_counts(text: str) -> list[int]:
    """The run lengths coded in a COCO compressed RLE string (the inverse of pycocotools' `rleToString`).

    Each count is written in 5-bit groups, least significant first, one character `chr(48 + group)` per group, with
    bit 0x20 set while more groups follow and bit 0x10 of the last group the sign; from the fourth count on, the
    value stored is the difference to the count two places before.

    Raises:
        ValueError: a character outside the code's range, or a string that ends inside a count (truncated).
    """
    counts: list[int] = []
    position = 0
    while position < len(text):
        value, shift, more = 0, 0, True
        while more:
            if position >= len(text):
                raise ValueError(f"the string ends inside count {len(counts)} (truncated)")
            code = ord(text[position]) - 48
            if not 0 <= code < 64:
                raise ValueError(f"character {text[position]!r} at position {position} is not an RLE character")
            value |= (code & 0x1F) << shift
            more = bool(code & 0x20)
            position += 1
            shift += 5
            if not more and code & 0x10:
                value |= -1 << shift  # negative: sign-extend
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


def _check_counts(counts: list[int], *, height: int, width: int, where: str, kind: str) -> None:
    negative = [(i, c) for i, c in enumerate(counts) if c < 0]
    if negative:
        index, value = negative[0]
        raise DataError(f"{where}: {kind} count {index} is negative ({value}); run lengths are >= 0")
    total = sum(counts)
    if total != height * width:
        raise DataError(f"{where}: {kind} counts sum to {total}, expected {height * width} pixels "
                        f"({height}x{width}); the RLE is truncated or belongs to another image")


def _check_size(segmentation: dict, *, height: int, width: int, where: str) -> None:
    size = segmentation["size"]
    if not (isinstance(size, (list, tuple)) and len(size) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in size)):
        raise DataError(f"{where}: RLE size must be [height, width] integers, found {size!r}")
    if list(size) != [height, width]:
        raise DataError(f"{where}: RLE size {list(size)} differs from the image's [{height}, {width}]")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _check_polygons(segmentation: list, *, height: int, width: int, where: str) -> list[list[float]]:
    """The polygons with at least three points, as floats; DataError for anything malformed."""
    if segmentation and all(_is_number(v) for v in segmentation):
        raise DataError(f"{where}: the polygon segmentation is a flat list of numbers; COCO nests it as a list of "
                        f"polygons, [[x1, y1, x2, y2, ...], ...]")
    polygons = []
    for index, polygon in enumerate(segmentation):
        if not isinstance(polygon, (list, tuple)):
            raise DataError(f"{where}: polygon {index} is a {type(polygon).__name__} ({polygon!r}), expected a list "
                            f"of x, y numbers")
        bad = [v for v in polygon if not _is_number(v)]
        if bad:
            raise DataError(f"{where}: polygon {index} holds a {type(bad[0]).__name__} ({bad[0]!r}), expected "
                            f"numbers")
        if len(polygon) % 2:
            raise DataError(f"{where}: polygon {index} has an odd number of coordinates ({len(polygon)})")
        values = [float(v) for v in polygon]
        if not all(math.isfinite(v) for v in values):
            raise DataError(f"{where}: polygon {index} has a non-finite coordinate "
                            f"({next(v for v in values if not math.isfinite(v))})")
        xs, ys = values[0::2], values[1::2]
        if xs and (min(xs) < -width or max(xs) > 2 * width or min(ys) < -height or max(ys) > 2 * height):
            raise DataError(f"{where}: polygon {index} has points far outside the {width}x{height} (W x H) image "
                            f"(x in [{min(xs)}, {max(xs)}], y in [{min(ys)}, {max(ys)}]); it belongs to another "
                            f"image or is corrupt")
        if len(values) >= 6:  # fewer than three points have no area (pycocotools would read four numbers as a box)
            polygons.append(values)
    return polygons


def decode_segmentation(segmentation: Any, *, height: int, width: int, where: str) -> np.ndarray:
    """A COCO segmentation (polygons, uncompressed RLE or compressed RLE) as an (H, W) bool mask, checked first.

    Polygons with fewer than three points have no area and are dropped. Raises DataError, naming `where`, for a
    malformed segmentation (see the module docstring) or one of another size; never returns a mask decoded from
    counts that do not cover exactly H*W pixels.
    """
    if isinstance(segmentation, list):
        polygons = _check_polygons(segmentation, height=height, width=width, where=where)
        if not polygons:
            return np.zeros((height, width), dtype=bool)
        with record_errors(where):
            rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    elif isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        _check_size(segmentation, height=height, width=width, where=where)
        counts = segmentation["counts"]
        if isinstance(counts, list):
            if not all(isinstance(c, (int, np.integer)) and not isinstance(c, bool) for c in counts):
                bad = next(c for c in counts if not isinstance(c, (int, np.integer)) or isinstance(c, bool))
                raise DataError(f"{where}: uncompressed RLE counts must be integers, found {type(bad).__name__} "
                                f"{bad!r}")
            _check_counts([int(c) for c in counts], height=height, width=width, where=where,
                          kind="uncompressed RLE")
            with record_errors(where):
                rle = mask_utils.frPyObjects({"size": [height, width], "counts": [int(c) for c in counts]}, height,
                                             width)
        elif isinstance(counts, (str, bytes)):
            try:
                text = counts.decode("ascii") if isinstance(counts, bytes) else counts
                decoded = rle_string_counts(text)
            except ValueError as error:  # UnicodeDecodeError is a ValueError too
                raise DataError(f"{where}: compressed RLE string is malformed: {error}") from error
            _check_counts(decoded, height=height, width=width, where=where, kind="compressed RLE")
            rle = {"size": [height, width], "counts": text.encode("ascii")}
        else:
            raise DataError(f"{where}: RLE counts must be a list of integers or a compressed string, found "
                            f"{type(counts).__name__}")
    else:
        raise DataError(f"{where}: unrecognised segmentation of type {type(segmentation).__name__} (expected "
                        f"polygons or an RLE dict with 'size' and 'counts')")
    with record_errors(where):
        mask = mask_utils.decode(rle).astype(bool)  # (H, W)
    if mask.shape != (height, width):
        raise DataError(f"{where}: decoded mask is {mask.shape[0]}x{mask.shape[1]}, expected {height}x{width}")
    return mask


def _why_empty(segmentation: Any, *, height: int, width: int) -> str:
    """Why a segmentation decoded to no pixel, for the message."""
    if isinstance(segmentation, dict):
        return "its RLE marks no pixel as foreground"
    if not segmentation:
        return "the segmentation is an empty list"
    points = [(float(p[i]), float(p[i + 1])) for p in segmentation for i in range(0, len(p) - 1, 2)]
    if len(points) >= 3 and all(not (0 <= x <= width and 0 <= y <= height) for x, y in points):
        xs, ys = [x for x, _ in points], [y for _, y in points]
        return (f"its polygons lie wholly outside the image (x in [{min(xs):g}, {max(xs):g}], y in [{min(ys):g}, "
                f"{max(ys):g}])")
    return "its polygons have no area (fewer than three points, collinear, or outside the image)"


def decode_object_mask(segmentation: Any, *, height: int, width: int, where: str) -> np.ndarray:
    """`decode_segmentation` for the mask of one object: an (H, W) bool mask with at least one pixel set.

    Raises:
        DataError: as `decode_segmentation`, or the mask is empty (naming `where` and why: an empty segmentation,
            polygons without area or outside the image, a background-only RLE).
    """
    mask = decode_segmentation(segmentation, height=height, width=width, where=where)
    if not mask.any():
        raise DataError(f"{where}: 'segmentation' covers no pixel of the {width}x{height} (W x H) image: "
                        f"{_why_empty(segmentation, height=height, width=width)}; an object needs a non-empty mask")
    return mask
