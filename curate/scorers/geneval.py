"""GenEval (Ghosh et al., NeurIPS 2023): is each object the prompt asks for there, in the right number, colour and
position? An image is correct or not; a task's score is its share of correct images; the overall score is the mean
over the tasks.

The rules follow the benchmark's evaluation script (`geneval/evaluation/evaluate_images.py`):
- A prompt's record (one JSON line of `evaluation_metadata.jsonl`) has a `tag` (single_object, two_object,
  counting, colors, position, color_attr), `include` clauses (`class`, `count`, optional `color`, optional
  `position` = [relation, index of an earlier include clause]) combined with AND, and `exclude` clauses (`class`,
  `count`) combined with OR.
- Detections of a class are kept in order of confidence when their score is above 0.3 (0.9 for the counting task),
  at most 16 per class (an optional greedy suppression above an overlap threshold is off by default).
- An include clause takes the `count` most confident detections of its class: fewer fails it. With a colour, each
  of them is classified by CLIP zero-shot among ten colours on the masked crop, and fewer than `count` of the
  asked colour fails it. With a position, each of them must stand in the asked relation to every object of the
  clause it refers to (which must itself have matched).
- An exclude clause fails when its class has at least `count` detections.
- The relation of A to B: the centres' offset, each axis shrunk by 0.1 x the sum of the two boxes' sizes on that
  axis (and kept at zero when it would change sign), divided by the offset's length; dx < -0.5 is "left of",
  dx > 0.5 "right of", dy < -0.5 "above", dy > 0.5 "below" (image y grows downwards); no relation when the
  shrunk offset vanishes.

The detector is a Mask2Former COCO instance-segmentation model run through transformers (the benchmark runs
mmdetection's). It sees each image as mmdetection's test pipeline (`mask2former_*_lsj_8x2_50e_coco`) gives it:
resized with the aspect kept so that the short side is 800 and the long side at most 1333 (`Resize(img_scale=(1333,
800), keep_ratio=True)`: bilinear, no antialiasing, 8-bit, as mmcv's cv2 resize), normalised with ImageNet's mean
and std in 0-255, zero-padded at the bottom and right to a multiple of 32; the checkpoint's own image processor is
not used (the hub's is a fixed 384 x 384). Its per-query class scores and masks become scored boxes as
mmdetection's Mask2Former does (the top 100 (query, class) pairs, the class probability times the mean mask
probability inside the binary mask, the box of the mask). Its labels must name COCO's 80 classes in COCO's order
(mmdetection's names, or GenEval's for the three it renames). The colour classifier is an open_clip model (the
benchmark's: ViT-L-14 with OpenAI's weights).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from PIL import Image
from transformers import Mask2FormerForUniversalSegmentation

from lpo.core.errors import InputError
from lpo.curate.scorers.clip import _open_clip_spec, check_clip, open_clip_precision
from lpo.curate.scorers.specs import checked_config

logger = logging.getLogger(__name__)

TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
RELATIONS = ("left of", "right of", "above", "below")
# The benchmark's class names (`object_names.txt`): COCO's 80 things in COCO's order, a few renamed.
CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant",
    "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard",
    "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli",
    "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet",
    "tv", "laptop", "computer mouse", "tv remote", "computer keyboard", "cell phone", "microwave", "oven", "toaster",
    "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)
# COCO's names as detectors' configs spell them (mmdetection's, which transformers' COCO label file copies), where
# GenEval's `object_names.txt` renames a class.
COCO_NAMES = {"computer mouse": "mouse", "tv remote": "remote", "computer keyboard": "keyboard"}
COLOR_TEMPLATES = ("a photo of a {color} {name}", "a photo of a {color}-colored {name}", "a photo of a {color} object")
CROP_BACKGROUND = (153, 153, 153)  # the benchmark's "#999": what lies outside an object's mask in its crop
DETECTIONS_PER_IMAGE = 100  # mmdetection's Mask2Former test setting (max_per_image)
# mmdetection's test pipeline for GenEval's detector: Resize(img_scale=(1333, 800), keep_ratio=True), Normalize,
# Pad(size_divisor=32).
DETECTOR_SHORT_SIDE, DETECTOR_LONG_SIDE, DETECTOR_PAD = 800, 1333, 32
DETECTOR_MEAN = (123.675, 116.28, 103.53)
DETECTOR_STD = (58.395, 57.12, 57.375)
DETECTOR_INPUT = (f"detector input: short side {DETECTOR_SHORT_SIDE}, long side <= {DETECTOR_LONG_SIDE}, "
                  f"padded to {DETECTOR_PAD}")


@dataclass(frozen=True)
class Rules:
    """The benchmark's evaluation options (its defaults)."""

    threshold: float = 0.3
    counting_threshold: float = 0.9
    max_objects: int = 16
    max_overlap: float = 1.0  # 1.0: no suppression of overlapping boxes
    position_threshold: float = 0.1


@dataclass(frozen=True)
class Detection:
    """One detected object: its box (x1, y1, x2, y2 in pixels), confidence, and binary mask (H x W) if any."""

    box: tuple[float, float, float, float]
    score: float
    mask: Any = None


# ---------------------------------------------------------------------------------------------------------------
# the rules


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two boxes in inclusive pixel coordinates (a box from x1 to x2 is x2 - x1 + 1
    wide), as the benchmark computes it."""
    def area(box: Sequence[float]) -> float:
        return max(box[2] - box[0] + 1, 0) * max(box[3] - box[1] + 1, 0)

    inter = area((max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])))
    union = area(a) + area(b) - inter
    return inter / union if union else 0.0


def keep_detections(found: dict[str, list[Detection]], tag: str, rules: Rules = Rules()) -> dict[str, list[Detection]]:
    """Per class, the detections above the task's threshold, most confident first, at most `max_objects`, with
    greedy suppression of overlaps at `max_overlap` (off at 1.0); classes left empty are dropped."""
    threshold = rules.counting_threshold if tag == "counting" else rules.threshold
    kept: dict[str, list[Detection]] = {}
    for name, detections in found.items():
        ordered = [d for d in sorted(detections, key=lambda d: -d.score) if d.score > threshold][:rules.max_objects]
        chosen: list[Detection] = []
        while ordered:
            best = ordered.pop(0)
            chosen.append(best)
            if rules.max_overlap < 1:
                ordered = [d for d in ordered if iou(best.box, d.box) < rules.max_overlap]
        if chosen:
            kept[name] = chosen
    return kept


def relative_position(a: Detection, b: Detection, position_threshold: float = 0.1) -> set[str]:
    """The relations of A to B ("left of", "right of", "above", "below"; none, one or two of them)."""
    ax1, ay1, ax2, ay2 = a.box
    bx1, by1, bx2, by2 = b.box
    offset = ((ax1 + ax2) / 2 - (bx1 + bx2) / 2, (ay1 + ay2) / 2 - (by1 + by2) / 2)
    sizes = (abs(ax2 - ax1) + abs(bx2 - bx1), abs(ay2 - ay1) + abs(by2 - by1))
    shrunk = [math.copysign(max(abs(o) - position_threshold * s, 0.0), o) for o, s in zip(offset, sizes)]
    if all(abs(v) < 1e-3 for v in shrunk):
        return set()
    length = math.hypot(*offset)
    dx, dy = shrunk[0] / length, shrunk[1] / length
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def evaluate(objects: dict[str, list[Detection]], record: dict[str, Any],
             colours: Callable[[list[Detection], str], list[str]], rules: Rules = Rules()) -> tuple[bool, str]:
    """(correct, reasons) of one image: `objects` are the kept detections per class (most confident first),
    `colours(detections, class)` names each detection's colour."""
    correct, reasons, groups = True, [], []
    for clause in record.get("include", []):
        name, count = clause["class"], clause["count"]
        found = objects.get(name, [])[:count]
        matched = len(found) >= count
        if not matched:
            reasons.append(f"expected {name}>={count}, found {len(found)}")
        elif "color" in clause:
            named = colours(found, name)
            if named.count(clause["color"]) < count:
                matched = False
                seen = ", ".join(f"{named.count(c)} {c}" for c in COLORS if c in named)
                reasons.append(f"expected {clause['color']} {name}>={count}, found {named.count(clause['color'])} "
                               f"{clause['color']}; and {seen}")
        if matched and "position" in clause:
            relation, target = clause["position"]
            if groups[target] is None:
                matched = False
                reasons.append(f"no target for {name} to be {relation}")
            else:
                for obj in found:
                    failing = [other for other in groups[target]
                               if relation not in relative_position(obj, other, rules.position_threshold)]
                    if failing:
                        actual = relative_position(obj, failing[0], rules.position_threshold)
                        matched = False
                        reasons.append(f"expected {name} {relation} target, found {' and '.join(sorted(actual))} "
                                       "target")
                        break
        correct = correct and matched
        groups.append(found if matched else None)
    for clause in record.get("exclude", []):
        name, count = clause["class"], clause["count"]
        if len(objects.get(name, [])) >= count:
            correct = False
            reasons.append(f"expected {name}<{count}, found {len(objects[name])}")
    return correct, "\n".join(reasons)


# ---------------------------------------------------------------------------------------------------------------
# prompt records


def check_record(record: Any, where: str) -> dict[str, Any]:
    """A GenEval metadata record, checked: its tag, its clauses' classes, counts, colours and positions."""
    if not isinstance(record, dict) or not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
        raise InputError(f"{where}: not a GenEval record (a JSON object with prompt, tag, include).")
    if record.get("tag") not in TASKS:
        raise InputError(f"{where}: tag {record.get('tag')!r} is not one of GenEval's tasks {list(TASKS)}.")
    includes = record.get("include")
    if not isinstance(includes, list) or not includes:
        raise InputError(f"{where}: a GenEval record needs a non-empty include list.")
    for index, clause in enumerate(includes + list(record.get("exclude", []))):
        if not isinstance(clause, dict) or clause.get("class") not in CLASSES:
            named = clause.get("class") if isinstance(clause, dict) else clause
            raise InputError(f"{where}: clause {index} names class {named!r}, not one of GenEval's 80 classes.")
        if not isinstance(clause.get("count"), int) or clause["count"] < 1:
            raise InputError(f"{where}: clause {index} has count {clause.get('count')!r}; counts are integers >= 1.")
        if "color" in clause and clause["color"] not in COLORS:
            raise InputError(f"{where}: colour {clause['color']!r} is not one of {list(COLORS)}.")
        if "position" in clause:
            position = clause["position"]
            if (not isinstance(position, list) or len(position) != 2 or position[0] not in RELATIONS
                    or not isinstance(position[1], int) or not 0 <= position[1] < index):
                raise InputError(f"{where}: position {position!r} must be [relation, index of an earlier include "
                                 f"clause], relation one of {list(RELATIONS)}.")
    return record


def read_records(path: Path) -> list[dict[str, Any]] | None:
    """The records of a GenEval metadata file (JSON lines whose objects have `tag` and `include`), or None when
    `path` is not one."""
    if Path(path).suffix != ".jsonl":
        return None
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    try:
        first = json.loads(lines[0]) if lines else None
    except ValueError:
        return None
    if not (isinstance(first, dict) and "tag" in first and "include" in first):
        return None
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError:
            raise InputError(f"{path}:{number} is not valid JSON; GenEval metadata is one JSON object a line.") \
                from None
        records.append(check_record(record, f"{path}:{number}"))
    return records


# ---------------------------------------------------------------------------------------------------------------
# the detector's input, as mmdetection's test pipeline makes it


def detector_size(width: int, height: int) -> tuple[int, int]:
    """(width, height) of an image resized as mmcv's `imrescale` to the scale (1333, 800): the largest factor that
    keeps the long side <= 1333 and the short side <= 800, each side rounded half up."""
    factor = min(DETECTOR_LONG_SIDE / max(width, height), DETECTOR_SHORT_SIDE / min(width, height))
    return int(width * factor + 0.5), int(height * factor + 0.5)


def detector_inputs(image: Image.Image) -> tuple[Any, Any]:
    """(pixel_values [1, 3, H, W], pixel_mask [1, H, W]) of an RGB image as mmdetection's test pipeline feeds the
    detector: resized to `detector_size` (bilinear without antialiasing, rounded to 8 bits, as cv2's INTER_LINEAR),
    normalised, zero-padded at the bottom and right to multiples of 32; the mask is 1 on the image, 0 on padding."""

    width, height = detector_size(*image.size)
    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32)).permute(2, 0, 1)[None]
    pixels = torch.nn.functional.interpolate(pixels, size=(height, width), mode="bilinear", align_corners=False,
                                             antialias=False).round().clamp(0, 255)
    pixels = (pixels - torch.tensor(DETECTOR_MEAN).view(1, 3, 1, 1)) / torch.tensor(DETECTOR_STD).view(1, 3, 1, 1)
    padded = (-height % DETECTOR_PAD, -width % DETECTOR_PAD)
    pixels = torch.nn.functional.pad(pixels, (0, padded[1], 0, padded[0]))
    mask = torch.zeros(1, height + padded[0], width + padded[1], dtype=torch.long)
    mask[:, :height, :width] = 1
    return pixels, mask


# ---------------------------------------------------------------------------------------------------------------
# detections from a transformers Mask2Former


def instance_detections(class_logits: Any, mask_logits: Any, classes: Sequence[str],
                        per_image: int = DETECTIONS_PER_IMAGE) -> dict[str, list[Detection]]:
    """Scored boxes and masks per class from one image's Mask2Former outputs, as mmdetection's Mask2Former turns
    them into instances: `class_logits` [queries, classes + 1 (no object)], `mask_logits` [queries, H, W] at the
    image's size. The top `per_image` (query, class) pairs by class probability; the mask is its logits > 0; the
    score is the class probability times the mean mask probability inside the mask; the box is the mask's extent
    (x2, y2 one past its last pixel)."""

    probs = class_logits.float().softmax(-1)[:, :-1]
    n_classes = probs.shape[1]
    top = probs.flatten().topk(min(per_image, probs.numel()))
    queries, labels = top.indices // n_classes, top.indices % n_classes
    logits = mask_logits.float()[queries]
    binary = logits > 0
    inside = binary.flatten(1).float()
    mask_scores = (logits.sigmoid().flatten(1) * inside).sum(1) / (inside.sum(1) + 1e-6)
    scores = (top.values * mask_scores).tolist()
    found: dict[str, list[Detection]] = {}
    for k, label in enumerate(labels.tolist()):
        mask = binary[k]
        columns, rows = torch.nonzero(mask.any(0)).flatten().tolist(), torch.nonzero(mask.any(1)).flatten().tolist()
        box = (0.0, 0.0, 0.0, 0.0) if not columns else (
            float(columns[0]), float(rows[0]), float(columns[-1] + 1), float(rows[-1] + 1))
        found.setdefault(classes[label], []).append(Detection(box, scores[k], mask.detach().cpu().numpy()))
    return found


# ---------------------------------------------------------------------------------------------------------------
# the scorer


def masked_crop(image: Image.Image, detection: Detection) -> Image.Image:
    """The object on the benchmark's grey background (outside its mask), cropped to its box."""

    if detection.mask is not None:
        blank = Image.new("RGB", image.size, CROP_BACKGROUND)
        mask = Image.fromarray(detection.mask.astype("uint8") * 255)
        image = Image.composite(image, blank, mask)
    return image.crop(tuple(int(round(v)) for v in detection.box))


class GenEvalScorer:
    """`score(images, records)`: 1.0 where an image satisfies its GenEval record, else 0.0; `details` holds the
    last batch's task, reasons and detected counts per image."""

    name = "geneval"
    needs_records = True

    def __init__(self, detector: Any, clip_model: Any, clip_preprocess: Any, tokenizer: Any, model_id: str,
                 device: str, dtype: Any, rules: Rules = Rules()) -> None:
        self.detector = detector
        self.clip_model, self.clip_preprocess, self.tokenizer = clip_model, clip_preprocess, tokenizer
        self.model_id, self.device, self.dtype, self.rules = model_id, device, dtype, rules
        self.scale = ("1 if every object of the record is found in the right count, colour and position, else 0; "
                      "per task the share of correct images, overall the mean over tasks")
        self.classes = detector_classes(detector.config.id2label, "the GenEval detector")
        self._colour_weights: dict[str, Any] = {}
        self.details: list[dict[str, Any]] = []

    def score(self, images: list[Image.Image], records: list[dict[str, Any] | None]) -> np.ndarray:
        if len(images) != len(records):
            raise ValueError(f"{len(images)} images but {len(records)} records")
        out, self.details = [], []
        with torch.inference_mode():
            for image, record in zip(images, records):
                if record is None:
                    raise ValueError("geneval needs each image's GenEval record: pass the benchmark's metadata "
                                     "file (evaluation_metadata.jsonl) as --prompts")
                rgb = image.convert("RGB")
                objects = keep_detections(self.detect(rgb), record["tag"], self.rules)
                correct, reason = evaluate(objects, record, partial(self.colours, rgb), self.rules)
                out.append(1.0 if correct else 0.0)
                self.details.append({"task": record["tag"], "reason": reason,
                                     "detected": {name: len(found) for name, found in objects.items()}})
        return np.asarray(out, dtype=np.float64)

    def detect(self, image: Image.Image) -> dict[str, list[Detection]]:
        """Scored detections per class of an RGB image, the masks at the image's size: the mask logits are
        upsampled to the padded input, cropped to the resized image and resized to the image, as mmdetection's
        Mask2Former post-processing does."""

        pixels, pixel_mask = detector_inputs(image)
        height, width = detector_size(*image.size)[::-1]
        outputs = self.detector(pixel_values=pixels.to(self.device, self.dtype), pixel_mask=pixel_mask.to(self.device))
        masks = outputs.masks_queries_logits[0:1].float()
        masks = torch.nn.functional.interpolate(masks, size=pixels.shape[-2:], mode="bilinear", align_corners=False)
        masks = torch.nn.functional.interpolate(masks[:, :, :height, :width], size=image.size[::-1], mode="bilinear",
                                                align_corners=False)[0]
        return instance_detections(outputs.class_queries_logits[0].cpu(), masks.cpu(), self.classes)

    def colours(self, image: Image.Image, found: list[Detection], name: str) -> list[str]:
        """Each detection's colour: CLIP zero-shot over the ten colours, three templates averaged per colour."""

        if name not in self._colour_weights:
            weights = []
            for colour in COLORS:
                texts = [t.format(color=colour, name=name) for t in COLOR_TEMPLATES]
                features = self.clip_model.encode_text(self.tokenizer(texts).to(self.device)).float()
                mean = (features / features.norm(dim=-1, keepdim=True)).mean(0)
                weights.append(mean / mean.norm())
            self._colour_weights[name] = torch.stack(weights, dim=1)
        crops = torch.stack([self.clip_preprocess(masked_crop(image, d)) for d in found]).to(self.device, self.dtype)
        features = self.clip_model.encode_image(crops).float()
        features = features / features.norm(dim=-1, keepdim=True)
        return [COLORS[i] for i in (features @ self._colour_weights[name]).argmax(1).tolist()]


def detector_classes(id2label: dict[Any, str], where: str) -> tuple[str, ...]:
    """GenEval's class name of each detector label, checked by name: label k must be COCO's k-th class (GenEval's
    name or mmdetection's, in any case, with '_' or '-' for spaces); InputError naming the labels that are not."""
    labels = {int(k): v for k, v in id2label.items()}
    if sorted(labels) != list(range(len(CLASSES))):
        raise InputError(f"{where} has {len(labels)} classes; GenEval reads a COCO instance segmentation model's "
                         f"{len(CLASSES)} (e.g. facebook/mask2former-swin-small-coco-instance).")

    def spelled(name: str) -> str:
        return " ".join(str(name).lower().replace("_", " ").replace("-", " ").split())

    wrong = [(k, labels[k], name) for k, name in enumerate(CLASSES)
             if spelled(labels[k]) not in (name, COCO_NAMES.get(name, name))]
    if wrong:
        shown = ", ".join(f"label {k} is {got!r} (expected {want!r})" for k, got, want in wrong[:4])
        more = f" and {len(wrong) - 4} more" if len(wrong) > 4 else ""
        raise InputError(f"{where}'s labels are not COCO's 80 classes in COCO's order: {shown}{more}; GenEval would "
                         "misname its detections. Pass a COCO instance model such as "
                         "facebook/mask2former-swin-small-coco-instance.")
    return CLASSES


# ---------------------------------------------------------------------------------------------------------------
# model spec: "DETECTOR", "DETECTOR,CLIP", or a folder holding detector/ and clip/ (as `lpo dev tiny-models` writes)

DEFAULT_COLOUR_CLIP = "ViT-L-14:openai"  # the benchmark's colour classifier


def parse_spec(spec: str) -> tuple[str, str]:
    """(detector, colour CLIP) of a geneval model spec."""
    folder = Path(spec).expanduser()
    if folder.is_dir() and (folder / "detector").is_dir():
        return str(folder / "detector"), str(folder / "clip") if (folder / "clip").is_dir() else DEFAULT_COLOUR_CLIP
    detector, _, colour = spec.partition(",")
    return detector.strip(), colour.strip() or DEFAULT_COLOUR_CLIP


def check_geneval(spec: str) -> None:
    detector, colour = parse_spec(spec)
    _, config = checked_config("geneval", detector, "a Mask2Former instance-segmentation model (model_type "
                               "mask2former)", lambda model_type: model_type == "mask2former")
    if config is not None:
        detector_classes(config.get("id2label") or {}, f"the GenEval detector {detector!r}")
    check_clip(colour)


def load_geneval(spec: str, device: str, dtype: Any) -> GenEvalScorer:
    detector_spec, colour_spec = parse_spec(spec)
    logger.info("loading geneval: detector %s, colour classifier %s on %s", detector_spec, colour_spec, device)
    detector = Mask2FormerForUniversalSegmentation.from_pretrained(detector_spec, dtype=dtype).to(device).eval()
    name, tag, _ = _open_clip_spec(colour_spec)
    clip_model, _, preprocess = open_clip.create_model_and_transforms(
        name, pretrained=tag, precision=open_clip_precision("geneval", dtype), device=device)
    return GenEvalScorer(detector, clip_model.eval(), preprocess, open_clip.get_tokenizer(name),
                         f"{detector_spec} + {colour_spec} ({DETECTOR_INPUT})", device, dtype)
