"""Writers of dataset fixtures in the datasets' real on-disk formats, shared by the data and eval tests.

`write_refer`: the REFER layout (COCO_train2014 JPEGs, `<name>/instances.json` with polygon and RLE segmentations,
`<name>/refs(<split_by>).p`). `write_png`: Panoptic Narrative Grounding (narratives JSON, COCO panoptic JSON and
panoptic PNGs with id = R + 256 G + 256^2 B).
"""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

IMAGE_IDS = (1, 2, 3)


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE (column-major runs, starting with background), written by hand."""
    flat = mask.flatten(order="F").astype(np.uint8)
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts = [0] + counts
    return {"size": list(mask.shape), "counts": counts}


def _compressed_rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def _ellipse(height: int, width: int, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    ys, xs = np.mgrid[0:height, 0:width]
    return ((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2 <= 1.0


def _sentences(sent_ids: list[int], texts: list[str]) -> list[dict]:
    return [{"sent_id": i, "raw": text.capitalize(), "sent": text, "tokens": text.split()}
            for i, text in zip(sent_ids, texts, strict=True)]


def write_refer(root, photos, *, name: str = "refcoco", split_by: str = "unc", extra_refs=(), heights=None) -> dict:
    """REFER layout under `root`: train2014 JPEGs, <name>/instances.json, <name>/refs(<split_by>).p."""
    os.makedirs(root / "train2014", exist_ok=True)
    os.makedirs(root / name, exist_ok=True)
    images = []
    for image_id, photo in zip(IMAGE_IDS, photos[:3], strict=True):
        file_name = f"COCO_train2014_{image_id:012d}.jpg"
        photo.save(root / "train2014" / file_name, quality=95)
        height = (heights or {}).get(image_id, photo.height)
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": photo.width})
    size = {image["id"]: (image["height"], image["width"]) for image in images}

    h1, w1 = size[1]
    h2, w2 = size[2]
    h3, w3 = size[3]
    rect = np.zeros((h2, w2), dtype=bool)
    rect[h2 // 4: h2 // 2, w2 // 3: w2 - 5] = True
    annotations = [
        # Two polygons (a triangle and a quadrilateral) for one object, plus a degenerate 2-point polygon.
        {"id": 11, "image_id": 1, "category_id": 47, "iscrowd": 0, "segmentation": [
            [10.0, 10.0, 0.4 * w1, 20.0, 30.0, 0.5 * h1],
            [0.6 * w1, 0.6 * h1, 0.9 * w1, 0.62 * h1, 0.85 * w1, 0.95 * h1, 0.62 * w1, 0.9 * h1],
            [5.0, 5.0, 8.0, 9.0]]},
        {"id": 12, "image_id": 1, "category_id": 47, "iscrowd": 0,
         "segmentation": _compressed_rle(_ellipse(h1, w1, h1 / 2, w1 / 2, h1 / 5, w1 / 4))},
        {"id": 21, "image_id": 2, "category_id": 1, "iscrowd": 0, "segmentation": _uncompressed_rle(rect)},
        {"id": 31, "image_id": 3, "category_id": 17, "iscrowd": 0,
         "segmentation": [[0.1 * w3, 0.2 * h3, 0.5 * w3, 0.1 * h3, 0.45 * w3, 0.8 * h3, 0.15 * w3, 0.7 * h3]]},
        {"id": 32, "image_id": 3, "category_id": 17, "iscrowd": 0,
         "segmentation": _compressed_rle(_ellipse(h3, w3, 0.7 * h3, 0.7 * w3, 0.2 * h3, 0.1 * w3))},
        {"id": 33, "image_id": 3, "category_id": 17, "iscrowd": 0, "segmentation": [[1, 1, 40, 1, 40, 30, 1, 30]]},
    ]
    with open(root / name / "instances.json", "w") as handle:
        json.dump({"images": images, "annotations": annotations,
                   "categories": [{"id": 1, "name": "person"}, {"id": 17, "name": "cat"}, {"id": 47, "name": "cup"}]},
                  handle)
    refs = [
        {"ref_id": 101, "ann_id": 11, "image_id": 1, "split": "train", "category_id": 47,
         "sentences": _sentences([1001, 1002], ["the cup on the left", "left mug"])},
        {"ref_id": 102, "ann_id": 12, "image_id": 1, "split": "train", "category_id": 47,
         "sentences": _sentences([1003, 1004, 1005], ["saucer", "the plate under it", "white round plate"])},
        {"ref_id": 201, "ann_id": 21, "image_id": 2, "split": "val", "category_id": 1,
         "sentences": _sentences([2001, 2002], ["the astronaut", "man in a white suit"])},
        {"ref_id": 301, "ann_id": 31, "image_id": 3, "split": "val", "category_id": 17,
         "sentences": _sentences([3001, 3002], ["the cat", "orange tabby"])},
        {"ref_id": 302, "ann_id": 32, "image_id": 3, "split": "val", "category_id": 17,
         "sentences": _sentences([3003, 3004], ["the cat's right side", "part near the edge"])},
        {"ref_id": 303, "ann_id": 33, "image_id": 3, "split": "testA", "category_id": 17,
         "sentences": _sentences([3005], ["the corner"])},
        *extra_refs,
    ]
    with open(root / name / f"refs({split_by}).p", "wb") as handle:
        pickle.dump(refs, handle, protocol=2)
    return {"instances": str(root / name / "instances.json"), "refs": refs}


CATEGORIES = [
    {"id": 1, "name": "person", "isthing": 1}, {"id": 17, "name": "cat", "isthing": 1},
    {"id": 187, "name": "sky-other-merged", "isthing": 0}, {"id": 193, "name": "grass-merged", "isthing": 0},
    {"id": 199, "name": "wall-other-merged", "isthing": 0},
]
# Segment ids chosen to use all three PNG channels: 3226956 = 76 + 256 * 61 + 256^2 * 49.
PERSON_A, PERSON_B, SKY, GRASS, CAT, WALL = 3226956, 65793, 1000, 2000, 5000, 6000


def _paint(height: int, width: int, boxes: dict[int, tuple[float, float, float, float]]) -> np.ndarray:
    """A segment id map: each id fills its (y0, x0, y1, x1) box in fractions of the image; 0 = unlabeled."""
    ids = np.zeros((height, width), dtype=np.int64)
    for segment_id, (y0, x0, y1, x1) in boxes.items():
        ids[int(y0 * height): int(y1 * height), int(x0 * width): int(x1 * width)] = segment_id
    return ids


def _encode_ids(ids: np.ndarray) -> Image.Image:
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 256 ** 2], axis=-1).astype(np.uint8)  # (H, W, 3)
    return Image.fromarray(rgb)


def _segments(*pieces) -> list[dict]:
    return [{"utterance": text, "segment_ids": [str(i) for i in ids], "plural": plural, "noun": bool(ids)}
            for text, ids, plural in pieces]


def write_png(root, photos, *, split: str = "val", narratives=None, extra_segments_info=(), png_sizes=None) -> dict:
    """PNG layout under `root`: <split>2017 JPEGs, annotations/{png_coco,panoptic}_<split>2017.json + PNG folder."""
    ann_dir = root / "annotations"
    os.makedirs(root / f"{split}2017", exist_ok=True)
    os.makedirs(ann_dir / f"panoptic_{split}2017", exist_ok=True)
    scenes = {
        139: (photos[0], {SKY: (0, 0, 0.3, 1), PERSON_A: (0.3, 0.1, 0.8, 0.3), PERSON_B: (0.35, 0.6, 0.9, 0.75),
                          GRASS: (0.8, 0, 1, 1)}),
        285: (photos[-1], {WALL: (0, 0, 0.5, 1), CAT: (0.4, 0.2, 0.9, 0.7)}),
    }
    images, annotations, painted = [], [], {}
    for image_id, (photo, boxes) in scenes.items():
        file_name = f"{image_id:012d}.jpg"
        photo.save(root / f"{split}2017" / file_name, quality=95)
        height, width = (png_sizes or {}).get(image_id, (photo.height, photo.width))
        ids = _paint(height, width, boxes)
        painted[image_id] = ids
        _encode_ids(ids).save(ann_dir / f"panoptic_{split}2017" / f"{image_id:012d}.png")
        category = {PERSON_A: 1, PERSON_B: 1, SKY: 187, GRASS: 193, CAT: 17, WALL: 199}
        infos = [{"id": i, "category_id": category[i], "iscrowd": 0, "bbox": [0, 0, 1, 1],
                  "area": int((ids == i).sum())} for i in boxes]
        infos += [extra["info"] for extra in extra_segments_info if extra["image_id"] == image_id]
        images.append({"id": image_id, "file_name": file_name, "height": photo.height, "width": photo.width})
        annotations.append({"image_id": image_id, "file_name": f"{image_id:012d}.png", "segments_info": infos})
    with open(ann_dir / f"panoptic_{split}2017.json", "w") as handle:
        json.dump({"images": images, "annotations": annotations, "categories": CATEGORIES}, handle)

    if narratives is None:
        narratives = [
            {"image_id": "139", "annotator_id": 7,
             "caption": "In this picture we can see two persons standing on the grass, and in the background we can "
                        "see the sky.",
             "segments": _segments(("In this picture we can see", [], False),
                                   ("two persons", [PERSON_A, PERSON_B], True), ("standing on", [], False),
                                   ("the grass", [GRASS], False),
                                   (", and in the background we can see", [], False), ("the sky", [SKY], False),
                                   (".", [], False))},
            {"image_id": "139", "caption": "A blurry picture.",
             "segments": _segments(("A blurry picture.", [], False))},
            {"image_id": "285",  # no caption: the utterances are joined with spaces
             "segments": _segments(("a cat", [CAT], False), ("in front of", [], False), ("a wall", [WALL], False))},
            {"image_id": "285", "caption": "Words that do not match the utterances.",
             "segments": _segments(("the wall", [WALL], False), ("behind", [], False), ("the cat", [CAT], False))},
        ]
    with open(ann_dir / f"png_coco_{split}2017.json", "w") as handle:
        json.dump(narratives, handle)
    return painted
