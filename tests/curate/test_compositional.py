"""The compositional benchmarks' rules on hand-made inputs: GenEval's correct/incorrect per task (detections, colours
and positions made up, expected verdicts worked out from the benchmark's rules), its detection post-processing
against a hand computation, and T2I-CompBench++'s B-VQA formula and noun phrases."""

from __future__ import annotations

import math

import pytest
import torch

from lpo.curate.errors import InputError
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
    one batch, questions of different lengths get the answers they get alone (no padding leaks into the answer)."""
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
    yes, no, enc = tokenizer.convert_tokens_to_ids(["yes", "no", "[ENC]"])
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
