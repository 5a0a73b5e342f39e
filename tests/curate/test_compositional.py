"""The compositional benchmarks' rules on hand-made inputs: GenEval's correct/incorrect per task (detections, colours
and positions made up, expected verdicts worked out from the benchmark's rules), its detection post-processing
against a hand computation, and T2I-CompBench++'s B-VQA formula and noun phrases."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from lpo.core.errors import InputError
from lpo.curate.scorers.bvqa import b_vqa, noun_phrases, rule_phrases
from lpo.curate.scorers.geneval import (
    Detection,
    Rules,
    check_record,
    evaluate,
    instance_detections,
    iou,
    keep_detections,
    relative_position,
)


def box(x1, y1, x2, y2, score=0.99):
    return Detection((x1, y1, x2, y2), score)


LEFT, RIGHT = box(0, 40, 20, 60), box(60, 40, 80, 60)  # two objects side by side, apart
TOP, BOTTOM = box(40, 0, 60, 20), box(40, 60, 60, 80)

COLOURS = {}  # id(detection) -> colour, for the made-up colour classifier


def painted(detection: Detection, colour: str) -> Detection:
    COLOURS[id(detection)] = colour
    return detection


def colour_of(found, name):
    return [COLOURS[id(d)] for d in found]


RED_CAR, BLUE_CAR = painted(box(0, 0, 10, 10, 0.95), "red"), painted(box(50, 50, 60, 60, 0.9), "blue")
GREEN_BOWL = painted(box(20, 20, 30, 30), "green")

CASES = [
    # (name, record, detections kept, correct, reason contains)
    ("single object found", {"tag": "single_object", "include": [{"class": "dog", "count": 1}]},
     {"dog": [box(0, 0, 5, 5)]}, True, ""),
    ("single object missing", {"tag": "single_object", "include": [{"class": "dog", "count": 1}]},
     {"cat": [box(0, 0, 5, 5)]}, False, "expected dog>=1, found 0"),
    ("two objects, both", {"tag": "two_object",
                           "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}]},
     {"cat": [LEFT], "dog": [RIGHT]}, True, ""),
    ("two objects, one missing", {"tag": "two_object",
                                  "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}]},
     {"cat": [LEFT]}, False, "expected dog>=1, found 0"),
    ("counting: exactly two", {"tag": "counting", "include": [{"class": "clock", "count": 2}],
                               "exclude": [{"class": "clock", "count": 3}]},
     {"clock": [LEFT, RIGHT]}, True, ""),
    ("counting: one too few", {"tag": "counting", "include": [{"class": "clock", "count": 2}],
                               "exclude": [{"class": "clock", "count": 3}]},
     {"clock": [LEFT]}, False, "expected clock>=2, found 1"),
    ("counting: one too many", {"tag": "counting", "include": [{"class": "clock", "count": 2}],
                                "exclude": [{"class": "clock", "count": 3}]},
     {"clock": [LEFT, RIGHT, TOP]}, False, "expected clock<3, found 3"),
    ("colour right", {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}]},
     {"car": [RED_CAR]}, True, ""),
    ("colour wrong", {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "blue"}]},
     {"car": [RED_CAR]}, False, "expected blue car>=1, found 0 blue; and 1 red"),
    ("colour: only the most confident object counts", {"tag": "colors",
                                                       "include": [{"class": "car", "count": 1, "color": "blue"}]},
     {"car": [RED_CAR, BLUE_CAR]}, False, "found 0 blue"),
    ("position right", {"tag": "position", "include": [{"class": "teddy bear", "count": 1},
                                                       {"class": "dog", "count": 1, "position": ["right of", 0]}]},
     {"teddy bear": [LEFT], "dog": [RIGHT]}, True, ""),
    ("position wrong side", {"tag": "position", "include": [
        {"class": "teddy bear", "count": 1}, {"class": "dog", "count": 1, "position": ["right of", 0]}]},
     {"teddy bear": [RIGHT], "dog": [LEFT]}, False, "expected dog right of target, found left of target"),
    ("position above", {"tag": "position", "include": [{"class": "kite", "count": 1},
                                                       {"class": "wine glass", "count": 1, "position": ["above", 0]}]},
     {"kite": [BOTTOM], "wine glass": [TOP]}, True, ""),
    ("position: the target is missing", {"tag": "position", "include": [
        {"class": "teddy bear", "count": 1}, {"class": "dog", "count": 1, "position": ["right of", 0]}]},
     {"dog": [RIGHT]}, False, "no target for dog to be right of"),
    ("position: overlapping objects stand in no relation", {"tag": "position", "include": [
        {"class": "teddy bear", "count": 1}, {"class": "dog", "count": 1, "position": ["left of", 0]}]},
     {"teddy bear": [box(10, 10, 50, 50)], "dog": [box(8, 10, 48, 50)]}, False, "expected dog left of target"),
    ("colour attribution right", {"tag": "color_attr", "include": [
        {"class": "car", "count": 1, "color": "red"}, {"class": "bowl", "count": 1, "color": "green"}]},
     {"car": [RED_CAR], "bowl": [GREEN_BOWL]}, True, ""),
    ("colour attribution swapped", {"tag": "color_attr", "include": [
        {"class": "car", "count": 1, "color": "green"}, {"class": "bowl", "count": 1, "color": "red"}]},
     {"car": [RED_CAR], "bowl": [GREEN_BOWL]}, False, "expected green car>=1"),
]


@pytest.mark.parametrize(("name", "record", "objects", "correct", "reason"), CASES, ids=[c[0] for c in CASES])
def test_geneval_rules_give_the_benchmarks_verdict(name, record, objects, correct, reason) -> None:
    got, why = evaluate(objects, {"prompt": name, **record}, colour_of)
    assert got is correct
    assert (why == "") if correct else (reason in why), why


def test_kept_detections_follow_the_thresholds_the_cap_and_the_order() -> None:
    scores = [0.95, 0.3, 0.92, 0.5, 0.89]
    found = {"clock": [box(i, 0, i + 1, 1, s) for i, s in enumerate(scores)]}
    kept = keep_detections(found, "two_object")
    assert [d.score for d in kept["clock"]] == [0.95, 0.92, 0.89, 0.5]  # strictly above 0.3, most confident first
    assert [d.score for d in keep_detections(found, "counting")["clock"]] == [0.95, 0.92]  # above 0.9 to count
    many = {"cup": [box(0, 0, 1, 1, 0.4 + i / 100) for i in range(20)]}
    assert len(keep_detections(many, "single_object")["cup"]) == 16
    assert keep_detections({"cup": [box(0, 0, 1, 1, 0.2)]}, "single_object") == {}
    # with suppression on, an overlapping lower-scored box goes, a separate one stays
    overlapping = {"cup": [box(0, 0, 10, 10, 0.9), box(1, 0, 11, 10, 0.8), box(50, 50, 60, 60, 0.7)]}
    kept = keep_detections(overlapping, "single_object", Rules(max_overlap=0.5))
    assert [d.score for d in kept["cup"]] == [0.9, 0.7]
    assert iou((0, 0, 10, 10), (1, 0, 11, 10)) == pytest.approx(110 / 132)  # a 10x11 overlap of two 11x11 boxes


@pytest.mark.parametrize(("a", "b", "expected"), [
    ((0, 0, 10, 10), (30, 0, 40, 10), {"left of"}),  # dx = -(30 - 0.1 * 20) / 30 = -0.93
    ((0, 0, 10, 10), (12, 0, 22, 10), {"left of"}),  # dx = -(12 - 2) / 12 = -0.83
    ((0, 0, 10, 10), (1, 0, 11, 10), set()),  # the shift (1) is under 0.1 x the widths (2): no relation
    ((20, 20, 22, 22), (0, 0, 2, 2), {"right of", "below"}),  # 19.6 / 28.28 = 0.69 on both axes
    ((1, 20, 3, 22), (0, 0, 2, 2), {"below"}),  # dx = 0.6 / 20.02 = 0.03, dy = 19.6 / 20.02 = 0.98
    ((0, 0, 10, 10), (0, 12, 10, 22), {"above"}),
])
def test_relative_position_by_hand(a, b, expected) -> None:
    assert relative_position(box(*a), box(*b)) == expected


def test_detections_from_mask2former_outputs_by_hand() -> None:
    """Two queries, two classes: probabilities [0.6, 0.3 | 0.1] and [0.2, 0.7 | 0.1]; query 0's mask logit is 2 on a
    2x2 block (rows 1-2, columns 0-1), query 1's is 1 on row 3, columns 2-3; the top 3 (query, class) pairs."""
    class_logits = torch.log(torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1]]))
    masks = torch.full((2, 4, 4), -3.0)
    masks[0, 1:3, 0:2] = 2.0
    masks[1, 3, 2:4] = 1.0
    found = instance_detections(class_logits, masks, ("cat", "dog"), per_image=3)
    s0, s1 = 1 / (1 + math.exp(-2.0)), 1 / (1 + math.exp(-1.0))  # mean mask probability inside each mask
    assert sorted((d.box, round(d.score, 6)) for d in found["dog"]) == sorted(
        [((2.0, 3.0, 4.0, 4.0), round(0.7 * s1, 6)), ((0.0, 1.0, 2.0, 3.0), round(0.3 * s0, 6))])
    assert [(d.box, round(d.score, 6)) for d in found["cat"]] == [((0.0, 1.0, 2.0, 3.0), round(0.6 * s0, 6))]
    assert found["cat"][0].mask.sum() == 4


def test_records_are_checked() -> None:
    good = {"prompt": "a photo of two clocks", "tag": "counting", "include": [{"class": "clock", "count": 2}],
            "exclude": [{"class": "clock", "count": 3}]}
    assert check_record(good, "x") is good
    for bad, needle in [({**good, "tag": "counting_objects"}, "not one of GenEval's tasks"),
                        ({**good, "include": [{"class": "unicorn", "count": 1}]}, "'unicorn', not one of"),
                        ({**good, "include": [{"class": "clock", "count": 0}]}, "counts are integers"),
                        ({**good, "include": [{"class": "dog", "count": 1, "position": ["near", 0]}]}, "position"),
                        ({**good, "include": [{"class": "car", "count": 1, "color": "teal"}]}, "'teal'")]:
        with pytest.raises(InputError, match=needle):
            check_record(bad, "x")


def test_b_vqa_is_the_product_of_the_yes_probabilities() -> None:
    assert b_vqa([0.9, 0.5]) == pytest.approx(0.45)
    assert b_vqa([0.8, 0.5, 0.25]) == pytest.approx(0.1)
    assert b_vqa([]) == 1.0  # a prompt without phrases asks nothing (the benchmark's empty question scores 1)
    assert rule_phrases("a green bench and a red car") == ["a green bench", "a red car"]
    assert rule_phrases("A blue backpack, a red book and a yellow cup.") == ["A blue backpack", "a red book",
                                                                             "a yellow cup"]
    assert rule_phrases("a fabric bag next to a glass vase") == ["a fabric bag", "a glass vase"]
    assert len(noun_phrases(" and ".join(f"a red car {i}" for i in range(12)))) == 8  # the benchmark asks 8 at most


def test_b_vqa_scores_an_image_as_the_product_over_its_phrases(monkeypatch) -> None:
    from PIL import Image

    from lpo.curate.scorers.bvqa import BVQAScorer

    scorer = BVQAScorer.__new__(BVQAScorer)
    scorer.nlp = None
    asked = []

    def yes_probability(images, questions):
        asked.extend(questions)
        return torch.tensor([{"a green bench?": 0.9, "a red car?": 0.4, "a cat?": 0.7}[q] for q in questions])

    monkeypatch.setattr(scorer, "yes_probability", yes_probability)
    images = [Image.new("RGB", (8, 8)), Image.new("RGB", (8, 8))]
    scores = scorer.score(images, ["a green bench and a red car", "a cat"])
    assert scores.tolist() == pytest.approx([0.9 * 0.4, 0.7])
    assert asked == ["a green bench?", "a red car?", "a cat?"]
    assert scorer.details[0] == {"phrases": ["a green bench", "a red car"], "p_yes": pytest.approx([0.9, 0.4])}


def test_b_vqa_runs_blip_as_the_benchmark_does(tmp_path) -> None:
    """P(yes) against an independent path: the benchmark's image transform written with torchvision, and transformers'
    own VQA `generate` (one question at a time, BLIP's [ENC] token first), its first answer token's logits. Asked in
    one batch, questions of different lengths get the answers they get alone (no padding leaks into the answer). The
    tokenizer does not know [ENC] (as transformers' BLIP tokenizers): its id is the config's decoder start + 1."""
    from PIL import Image
    from torchvision import transforms
    from transformers import BlipForQuestionAnswering, BlipProcessor

    from lpo.curate.scorers.bvqa import load_bvqa, run_image_size
    from lpo.reward.toy.random_models import build_tiny_models

    assert run_image_size(384, 16) == 480  # the benchmark's size for the transformers checkpoint's 384
    build_tiny_models(tmp_path, ["t2i-color"])
    path = tmp_path / "t2i-color"
    scorer = load_bvqa("t2i-color", str(path), "cpu", torch.float32)
    assert scorer.image_size == 40 and "at 40 px" in scorer.model_id  # 5/4 of the tiny model's 32, in 8-px patches
    enc = json.loads((path / "config.json").read_text())["text_config"]["bos_token_id"] + 1
    assert scorer.encoder_token == enc and f"[ENC] = {enc} ([DEC] + 1)" in scorer.model_id
    generator = torch.Generator().manual_seed(0)
    first, second = (Image.fromarray((torch.rand(50, 70, 3, generator=generator) * 255).byte().numpy())
                     for _ in range(2))
    images = [first, second, first, second]  # questions of four token lengths, asked in one batch
    questions = ["a green bench?", "a red car?", "a cat?", "a green bench and a red car?"]
    assert len({len(scorer.processor.tokenizer(q).input_ids) for q in questions}) == 4
    got = scorer.yes_probability(images, questions)

    processor = BlipProcessor.from_pretrained(path)
    model = BlipForQuestionAnswering.from_pretrained(path).eval()
    mean, std = processor.image_processor.image_mean, processor.image_processor.image_std
    transform = transforms.Compose([transforms.Resize((40, 40), interpolation=transforms.InterpolationMode.BICUBIC),
                                    transforms.ToTensor(), transforms.Normalize(mean, std)])
    tokenizer = processor.tokenizer
    yes, no = tokenizer.convert_tokens_to_ids(["yes", "no"])
    expected = []
    for image, question in zip(images, questions):
        ids = tokenizer(question, return_tensors="pt").input_ids
        ids[:, 0] = enc
        with torch.no_grad():
            out = model.generate(input_ids=ids, pixel_values=transform(image)[None], interpolate_pos_encoding=True,
                                 max_new_tokens=1, output_logits=True, return_dict_in_generate=True)
        probs = out.logits[0][0].softmax(-1)
        expected.append(float(probs[yes] / (probs[yes] + probs[no])))
    assert got.tolist() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert len(set(round(v, 6) for v in expected)) == 4  # the images and questions tell apart


def _blip_without_a_vocabulary_row_for_enc(tmp_path):
    """A tiny BLIP VQA folder whose vocabulary ends at the decoder start token: no id is left for [ENC]."""
    from transformers import BlipForQuestionAnswering

    from lpo.reward.toy.random_models import build_tiny_models

    build_tiny_models(tmp_path, ["t2i-color"])
    path = tmp_path / "t2i-color"
    model = BlipForQuestionAnswering.from_pretrained(path)
    model.config.text_config.vocab_size -= 1
    BlipForQuestionAnswering(model.config).save_pretrained(path)
    return path


def test_b_vqa_takes_the_tokenizers_enc_token_or_refuses_when_none_exists(tmp_path) -> None:
    """A tokenizer that declares [ENC] gives its id; one that does not, with no vocabulary row after [DEC], is refused
    before any weights load (the check) and when loading, naming the fix."""
    from transformers import BertTokenizer

    from lpo.curate.scorers.bvqa import check_bvqa, encoder_token, load_bvqa

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "yes", "no"]) + "\n")
    declared = BertTokenizer(str(vocab), additional_special_tokens=["[DEC]", "[ENC]"])
    assert encoder_token(declared, start_token=7, vocab_size=9) == (8, "the tokenizer's [ENC]")
    plain = BertTokenizer(str(vocab), additional_special_tokens=["[DEC]"])
    assert encoder_token(plain, start_token=7, vocab_size=9) == (8, "[DEC] + 1")
    with pytest.raises(InputError, match="no \\[ENC\\] token.*Salesforce/blip-vqa-capfilt-large"):
        encoder_token(plain, start_token=7, vocab_size=8)

    path = _blip_without_a_vocabulary_row_for_enc(tmp_path / "models")
    with pytest.raises(InputError, match="encoder token \\(start \\+ 1\\) does not exist"):
        check_bvqa("t2i-color", str(path))
    with pytest.raises(InputError, match="encoder token \\(start \\+ 1\\) does not exist"):
        load_bvqa("t2i-color", str(path), "cpu", torch.float32)


def test_b_vqa_asks_every_question_with_the_encoder_token_first(tmp_path, monkeypatch) -> None:
    """Through `score`: the first token of every question the text encoder sees is [DEC] + 1, whatever the tokenizer
    puts there ([CLS]); the questions are the benchmark's cleaned "<phrase>?" (lower case, punctuation dropped)."""
    from PIL import Image

    from lpo.curate.scorers.bvqa import load_bvqa
    from lpo.reward.toy.random_models import build_tiny_models

    build_tiny_models(tmp_path, ["t2i-color"])
    scorer = load_bvqa("t2i-color", str(tmp_path / "t2i-color"), "cpu", torch.float32)
    start = scorer.model.config.text_config.bos_token_id
    seen = []
    encoder = scorer.model.text_encoder
    original = encoder.forward

    def record(input_ids=None, **kwargs):
        seen.extend(input_ids.tolist())
        return original(input_ids=input_ids, **kwargs)

    monkeypatch.setattr(encoder, "forward", record)
    image = Image.new("RGB", (20, 30), (200, 40, 40))
    scorer.score([image, image], ["A Red Car and a green bench.", "the (big) cat"])
    tokenizer = scorer.processor.tokenizer
    assert len(seen) == 3 and all(ids[0] == start + 1 for ids in seen)
    assert tokenizer.cls_token_id not in [ids[0] for ids in seen]
    assert sorted(tokenizer.decode(ids[1:-1]) for ids in seen) == ["a green bench?", "a red car?", "the big cat?"]


def test_b_vqa_phrases_leave_out_the_benchmarks_exclusions_and_questions_are_cleaned() -> None:
    from lpo.curate.scorers.bvqa import EXCLUDED_PHRASES, question

    class Chunk:
        def __init__(self, text):
            self.text = text

    class Doc:
        def __init__(self, chunks):
            self.noun_chunks = [Chunk(c) for c in chunks]

    chunks = ["a red book", "top", "a blue table", "the left", "the side", "the right", "The left"]
    assert noun_phrases("ignored", nlp=lambda prompt: Doc(chunks)) == ["a red book", "a blue table", "The left"]
    assert set(EXCLUDED_PHRASES) == {"top", "the side", "the left", "the right"}
    assert rule_phrases("a red book on top") == ["a red book", "top"]
    assert noun_phrases("a red book on top") == ["a red book"]
    assert question('A "Red" Car: (big)!') == "a red car big?"
    assert question("a cat ~") == "a cat ?"
    assert question(" ".join(["word"] * 60)).split(" ") == ["word"] * 50


def _bilinear_by_hand(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """cv2's INTER_LINEAR written out: pixel centres at +0.5, sources clamped to the edges, no antialiasing."""
    def axis(out_size, in_size):
        source = np.clip((np.arange(out_size) + 0.5) * in_size / out_size - 0.5, 0, in_size - 1)
        low = np.floor(source).astype(int)
        return low, np.minimum(low + 1, in_size - 1), source - low

    y0, y1, wy = axis(height, image.shape[0])
    x0, x1, wx = axis(width, image.shape[1])
    rows = image[y0] * (1 - wy)[:, None, None] + image[y1] * wy[:, None, None]
    return rows[:, x0] * (1 - wx)[None, :, None] + rows[:, x1] * wx[None, :, None]


@pytest.mark.parametrize("size, expected", [((512, 512), (800, 800)), ((512, 768), (800, 1200)),
                                            ((1024, 1024), (800, 800)), ((2000, 500), (1333, 333)),
                                            ((64, 48), (1067, 800))])
def test_detector_size_is_mmdetections_keep_ratio_resize(size, expected) -> None:
    from lpo.curate.scorers.geneval import detector_size

    assert detector_size(*size) == expected  # (width, height): short side 800 unless the long one passes 1333


def test_the_detector_sees_the_benchmarks_scale_whatever_its_processor_says(tmp_path, monkeypatch) -> None:
    """A 512 px image reaches the detector as 800 x 800, a 512 x 768 one as 800 wide x 1200 tall (padded to 1216),
    although the checkpoint's image processor (as the hub's) says 384 x 384; the pixels equal a hand computation of
    mmdetection's pipeline (bilinear to the size, 8-bit, ImageNet mean/std in 0-255, zeros below the image)."""
    from PIL import Image
    from transformers import AutoImageProcessor

    from lpo.curate.scorers.geneval import DETECTOR_INPUT, load_geneval
    from lpo.reward.toy.random_models import build_tiny_models

    build_tiny_models(tmp_path, ["geneval"])
    assert AutoImageProcessor.from_pretrained(tmp_path / "geneval" / "detector").size == {"height": 384, "width": 384}
    scorer = load_geneval(str(tmp_path / "geneval"), "cpu", torch.float32)
    assert DETECTOR_INPUT in scorer.model_id and "short side 800" in scorer.model_id
    seen = []
    original = scorer.detector.forward

    def record(pixel_values=None, pixel_mask=None, **kwargs):
        seen.append((pixel_values, pixel_mask))
        return original(pixel_values=pixel_values, pixel_mask=pixel_mask, **kwargs)

    monkeypatch.setattr(scorer.detector, "forward", record)
    generator = np.random.default_rng(0)
    square = generator.integers(0, 256, (512, 512, 3), dtype=np.uint8)
    tall = generator.integers(0, 256, (768, 512, 3), dtype=np.uint8)  # 512 wide, 768 tall
    for array in (square, tall):
        found = scorer.detect(Image.fromarray(array))
        assert all(d.mask.shape == array.shape[:2] for detections in found.values() for d in detections)
    (square_pixels, square_mask), (tall_pixels, tall_mask) = seen
    assert square_pixels.shape == (1, 3, 800, 800) and bool(square_mask.all())
    assert tall_pixels.shape == (1, 3, 1216, 800)
    assert tall_mask[0, :1200].all() and not tall_mask[0, 1200:].any()
    mean, std = np.array([123.675, 116.28, 103.53]), np.array([58.395, 57.12, 57.375])
    by_hand = (np.clip(np.round(_bilinear_by_hand(tall.astype(np.float64), 1200, 800)), 0, 255) - mean) / std
    got = tall_pixels[0].permute(1, 2, 0).numpy()
    # The 25/16 upscale puts many values exactly on .5 before 8-bit rounding, where float32 and float64 may round
    # apart: at most one 8-bit step, and on few values; everywhere else equal to float32 precision.
    assert np.abs(got[:1200] - by_hand).max() < 1.5 / 57
    assert np.mean(np.abs(got[:1200] - by_hand) > 1e-4) < 1e-2
    assert (got[1200:] == 0).all()


def test_detector_labels_are_checked_by_name(tmp_path) -> None:
    """COCO's 80 classes in COCO's order by mmdetection's names (the hub's) or GenEval's pass; another order, another
    label set or unnamed labels are refused, by the spec check before any weights load."""
    from lpo.curate.scorers.geneval import CLASSES, COCO_NAMES, check_geneval, detector_classes
    from lpo.reward.toy.random_models import build_tiny_models

    mmdet = [COCO_NAMES.get(name, name) for name in CLASSES]
    assert detector_classes(dict(enumerate(mmdet)), "d") == CLASSES
    assert detector_classes({str(k): name.upper().replace(" ", "_") for k, name in enumerate(CLASSES)}, "d") == CLASSES
    swapped = list(mmdet)
    swapped[1], swapped[2] = swapped[2], swapped[1]
    with pytest.raises(InputError, match="label 1 is 'car' \\(expected 'bicycle'\\), label 2 is 'bicycle'"):
        detector_classes(dict(enumerate(swapped)), "d")
    with pytest.raises(InputError, match="label 0 is 'LABEL_0'.* and 76 more"):
        detector_classes({k: f"LABEL_{k}" for k in range(80)}, "d")
    with pytest.raises(InputError, match="has 81 classes"):
        detector_classes(dict(enumerate([*mmdet, "extra"])), "d")

    build_tiny_models(tmp_path, ["geneval"])
    config_file = tmp_path / "geneval" / "detector" / "config.json"
    check_geneval(str(tmp_path / "geneval"))
    config = json.loads(config_file.read_text())
    config["id2label"] = {str(k): name for k, name in enumerate(swapped)}
    config_file.write_text(json.dumps(config))
    with pytest.raises(InputError, match="not COCO's 80 classes in COCO's order"):
        check_geneval(str(tmp_path / "geneval"))
