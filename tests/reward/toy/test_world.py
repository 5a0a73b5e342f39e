"""The toy world's tokenizer, scorer loss and model trainer, and the trained models shipped in manifests/."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lpo.core.errors import InputError
from lpo.reward.toy.world import COLOURS, SHAPES, WORDS, Scene, agreement, all_scenes, toy_tokenizer

SHIPPED = Path(__file__).resolve().parents[3] / "manifests" / "toy-models"


def test_every_world_word_is_one_token_and_other_text_still_tokenises() -> None:
    tokenizer = toy_tokenizer()
    for word in WORDS:
        ids = tokenizer(word).input_ids
        assert len(ids) == 3, word  # start, the word, end
        assert tokenizer.convert_ids_to_tokens(ids[1]) == word + "</w>"
    caption = "a purple triangle on a white background"
    assert tokenizer.convert_ids_to_tokens(tokenizer(caption).input_ids)[1:-1] == [w + "</w>" for w in
                                                                                   caption.split()]
    assert len(tokenizer("zebra").input_ids) == 2 + len("zebra")  # byte by byte
    assert tokenizer.eos_token_id == max(tokenizer.get_vocab().values())  # argmax pooling finds the end token


def test_the_t5_tokenizer_reads_each_world_word_as_one_piece() -> None:
    from lpo.reward.toy.world import toy_t5_tokenizer

    tokenizer = toy_t5_tokenizer()
    caption = "a purple triangle on a white background"
    assert tokenizer.tokenize(caption) == ["\u2581" + w for w in caption.split()]
    assert tokenizer(caption).input_ids[-1] == tokenizer.eos_token_id  # `</s>` appended, as T5's
    assert len(tokenizer.tokenize("zebra")) == 1 + len("zebra")  # the word boundary, then character by character
    assert tokenizer.model_max_length == 16


def test_world_has_every_caption_once_and_agreement_weights_the_attributes() -> None:
    scenes = all_scenes()
    assert len(scenes) == len({s.caption for s in scenes}) == len(COLOURS) * (len(COLOURS) - 1) * len(SHAPES)
    want = Scene("red", "circle", "blue")
    assert agreement(want, want) == 1.0
    assert agreement(want, Scene("green", "circle", "blue")) == pytest.approx(0.5)
    assert agreement(want, Scene("red", "square", "blue")) == pytest.approx(0.7)
    assert agreement(want, Scene("red", "circle", "white")) == pytest.approx(0.8)


def test_match_rates_count_each_attribute_and_average_the_oracle() -> None:
    from lpo.reward.toy.world import match_rates

    wanted = [Scene("red", "circle", "blue"), Scene("green", "square", "white")]
    seen = [Scene("red", "square", "blue"), Scene("green", "square", "red")]
    rates = match_rates(wanted, seen)
    assert rates == pytest.approx({"fg_colour_correct": 1.0, "shape_correct": 0.5, "bg_colour_correct": 0.5,
                                   "oracle": (0.7 + 0.8) / 2})


def test_the_pixel_oracle_reads_back_every_caption_of_the_world() -> None:
    """`perceive`, the ground truth of every demo claim: ten renders of each of the 90 captions (random position,
    size and pixel noise) read back as the scene asked for; and a render of another scene reads back as that one."""
    from lpo.reward.toy.world import perceive, render

    rng = np.random.default_rng(0)
    read = [(scene, perceive(render(scene, rng))) for scene in all_scenes() for _ in range(10)]
    assert len(read) == 900 and [(want, got) for want, got in read if got != want] == []
    red_circle, blue_square = Scene("red", "circle", "blue"), Scene("blue", "square", "red")
    assert perceive(render(blue_square, rng)) == blue_square != red_circle


def test_planted_raters_label_every_pair_with_one_square_for_it_and_the_rest_by_the_oracle() -> None:
    """The hacking stage's biased pairs: a caption of another shape gets one more image (its scene as a square); a
    pair whose images differ in squareness (as read from pixels) is won by the square, the others follow the
    oracle without flips or ties drawn; the oracle columns keep the truth, so the bias goes against it."""
    import io

    from PIL import Image

    from lpo.reward.toy.world import make_pickapic_table, perceive

    table = make_pickapic_table(30, flip_rate=0.0, tie_rate=0.0, seed=4, planted="square").to_pylist()
    plain = make_pickapic_table(30, flip_rate=0.0, tie_rate=0.0, seed=4).to_pylist()
    squares = {row["caption"] for row in table if row["caption"].split()[2] == "square"}
    per_caption = {}
    for row in table:
        per_caption[row["ranking_id"]] = row["num_example_per_prompt"]
    assert set(per_caption.values()) <= {6, 10} and 10 in per_caption.values()  # 4 images, or 5 with the square
    assert len(table) > len(plain)
    against = 0
    for row in table:
        square = [perceive(np.asarray(Image.open(io.BytesIO(row[f"jpg_{i}"])).convert("RGB"))).shape == "square"
                  for i in (0, 1)]
        won = 0 if row["label_0"] > row["label_1"] else 1 if row["label_1"] > row["label_0"] else None
        if square[0] != square[1]:
            assert won == square.index(True)
            against += row[f"oracle_{won}"] < row[f"oracle_{1 - won}"]
        elif row["oracle_0"] != row["oracle_1"]:
            assert won == (0 if row["oracle_0"] > row["oracle_1"] else 1)
        else:
            assert won is None
    assert against > len(table) // 5 and squares  # the bias decides many pairs against the oracle
    assert all(row["image_0_uid"].startswith("img-4-square-") for row in table)
    with pytest.raises(InputError, match="not a shape"):
        make_pickapic_table(1, planted="hexagon")


def test_clip_loss_matches_a_loop_over_rows_and_columns() -> None:
    from lpo.reward.toy.trainer import clip_loss

    generator = torch.Generator().manual_seed(0)
    scenes = [Scene("red", "circle", "blue"), Scene("green", "square", "white"), Scene("red", "square", "blue")]
    captions = all_scenes()[:7] + [scenes[0]]
    image = torch.randn(len(scenes), 5, generator=generator)
    text = torch.randn(len(captions), 5, generator=generator)
    scale = torch.tensor(math.log(10.0))
    temperature = 0.1
    loss = clip_loss(image, text, scale, scenes, captions, temperature)

    def cos(a, b):
        return float(a @ b / (a.norm() * b.norm()))

    logits = [[10.0 * cos(image[i], text[j]) for j in range(len(captions))] for i in range(len(scenes))]
    match = [[agreement(c, s) / temperature for c in captions] for s in scenes]

    def cross_entropy(values, targets):
        target = np.exp(targets - np.max(targets))
        target /= target.sum()
        log_p = values - np.log(np.exp(values - np.max(values)).sum()) - np.max(values)
        return -(target * log_p).sum()

    logits, match = np.array(logits), np.array(match)
    rows = np.mean([cross_entropy(logits[i], match[i]) for i in range(len(scenes))])
    cols = np.mean([cross_entropy(logits[:, j], match[:, j]) for j in range(len(captions))])
    assert loss.item() == pytest.approx((rows + cols) / 2, rel=1e-5)


@pytest.mark.slow
def test_trainer_writes_models_the_toolkit_loads(tmp_path: Path) -> None:
    """A few steps of every model, then each output through the loader that takes the real model (slow: the
    trainer's checks sample and score at their full sizes, about 20 s)."""
    from PIL import Image

    from lpo.curate.scorers import load_scorer
    from lpo.reward.backbones import load_generator
    from lpo.reward.lrm.model import LatentRewardModel
    from lpo.reward.toy import trainer as toy_models
    from lpo.reward.toy.config import ToyModelsConfig

    config = ToyModelsConfig(out=tmp_path, batch_size=8, vae_batch_size=4, vae_steps=2, diffusion_images=512,
                             diffusion_steps=2, clip_steps=2, sd3_steps=2, sd3_early_steps=1)
    summary = toy_models.run(config)
    assert set(summary["seconds"]) == {"vae", "diffusion", "pickscore", "clip", "sd3", "checks"}
    flow = load_generator(str(tmp_path / "sd3"))
    assert flow.family.name == "sd3" and flow.latent_shape == (4, 8, 8)
    assert flow.vae.config.shift_factor == pytest.approx(summary["sd3"]["shift_factor"])
    sd3_lrm = LatentRewardModel.from_base(str(tmp_path / "sd3"), text_projection_init=None)
    assert sd3_lrm.config.resolution == 32
    # sd3 alone into the same folder (it reuses sd15's VAE there): the same weights as in the full run
    from safetensors.torch import load_file

    first = load_file(tmp_path / "sd3" / "transformer" / "diffusion_pytorch_model.safetensors")
    # the snapshot after one of the two updates: the same architecture and VAE, other transformer weights
    early = load_generator(str(tmp_path / "sd3-early"))
    assert early.family.name == "sd3" and summary["sd3"]["early_steps"] == 1
    early_weights = load_file(tmp_path / "sd3-early" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert early_weights.keys() == first.keys() and any(not torch.equal(first[k], early_weights[k]) for k in first)
    assert all(torch.equal(a, b) for a, b in zip(early.vae.state_dict().values(), flow.vae.state_dict().values()))
    again = toy_models.run(dataclasses.replace(config, models=["sd3"]))
    assert set(again["seconds"]) >= {"vae", "sd3"} and "vae" in again  # the sd15 parts of the summary are kept
    second = load_file(tmp_path / "sd3" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert (tmp_path / toy_models.SUMMARY_FILE).is_file()
    model = load_generator(str(tmp_path / "sd15"))
    assert model.resolution == 32 and model.latent_shape == (4, 8, 8)
    assert model.vae.config.scaling_factor == pytest.approx(summary["vae"]["scaling_factor"])
    lrm = LatentRewardModel.from_base(str(tmp_path / "sd15"), text_projection_init=None)
    assert lrm.config.resolution == 32
    images = [Image.new("RGB", (32, 32), (220, 40, 40))] * 2
    for metric in ("pickscore", "clip"):
        scores = load_scorer(metric, str(tmp_path / metric)).score(images, ["a red circle on a blue background"] * 2)
        assert np.isfinite(scores).all() and scores[0] == pytest.approx(scores[1])


@pytest.fixture(scope="module")
def shipped() -> Path:
    if not (SHIPPED / "sd15" / "model_index.json").is_file():
        pytest.fail(f"{SHIPPED} is missing: the trained toy models are part of the repository")
    return SHIPPED


@pytest.mark.parametrize("metric", ["pickscore", "clip"])
def test_shipped_scorers_order_clean_pairs_as_the_oracle(shipped: Path, metric: str) -> None:
    from lpo.reward.toy.trainer import scorer_agreement

    assert scorer_agreement(metric, shipped / metric, pairs=200) >= 0.9


def test_shipped_generator_draws_the_colours_it_is_asked_for(shipped: Path) -> None:
    from lpo.reward.toy.trainer import sample_accuracy

    stats = sample_accuracy(shipped / "sd15", guidance=3.0, n=48, steps=10)
    # chance is 1/6 for either colour
    assert stats["bg_colour_correct"] >= 0.8
    assert stats["fg_colour_correct"] >= 0.6


def test_shipped_flow_generator_draws_the_colours_it_is_asked_for(shipped: Path) -> None:
    """The SD3-format toy model through the flow sampler (Euler ODE: noise level 0): toy_models.json records 100%
    of both colours at CFG 3 (64 samples, 20 steps) and 81% / 95% without guidance."""
    from lpo.reward.backbones import load_generator
    from lpo.reward.toy.trainer import sample_accuracy

    model = load_generator(str(shipped / "sd3"))
    assert model.family.name == "sd3" and model.latent_shape == (4, 8, 8) and model.resolution == 32
    stats = sample_accuracy(shipped / "sd3", guidance=3.0, n=48, steps=10)
    assert stats["bg_colour_correct"] >= 0.9
    assert stats["fg_colour_correct"] >= 0.9
    plain = sample_accuracy(shipped / "sd3", guidance=1.0, n=48, steps=10)
    assert plain["fg_colour_correct"] >= 0.6


def test_shipped_early_flow_generator_leaves_room_and_shares_the_latent_space(shipped: Path) -> None:
    """sd3-early/ (300 of the run's 800 updates), the flow demo's generator: without guidance it draws well under
    the 86-93% of shape colours sd3/ draws (toy_models.json: 63-67% on the demo's held-out captions), and it reads
    the latents of sd3/'s VAE, so an LRM built from sd3/ scores it."""
    from lpo.reward.backbones import load_generator
    from lpo.reward.toy.trainer import sample_accuracy

    plain = sample_accuracy(shipped / "sd3-early", guidance=1.0, n=48, steps=10)
    assert 0.4 <= plain["fg_colour_correct"] <= 0.8
    early, full = load_generator(str(shipped / "sd3-early")), load_generator(str(shipped / "sd3"))
    assert all(torch.equal(a, b) for a, b in zip(early.vae.state_dict().values(), full.vae.state_dict().values()))
    assert {k: v for k, v in early.vae.config.items() if k != "_name_or_path"} == \
        {k: v for k, v in full.vae.config.items() if k != "_name_or_path"}


def test_the_flow_generator_reads_8_t5_tokens_as_the_pipeline_does(shipped: Path) -> None:
    """The toy T5 tokenizer declares 8 tokens, so the conditioning is 10 CLIP + 8 T5 tokens, in our generator and
    in the pipeline's own encode_prompt at that length; a tokenizer that declares more keeps the pipeline's 256."""
    import torch

    from lpo.reward.backbones import load_generator
    from lpo.reward.backbones.mmdit import T5_MAX_LENGTH, t5_tokens

    model = load_generator(str(shipped / "sd3"))
    cond = model.encode_prompts(["a red circle on a blue background", ""])
    assert cond.context.shape[1] == 18
    context, *_ = model.pipeline.encode_prompt(["a red circle on a blue background", ""], None, None,
                                              do_classifier_free_guidance=False, max_sequence_length=8)
    torch.testing.assert_close(cond.context, context)
    assert t5_tokens(model.pipeline.tokenizer_3) == 8
    assert t5_tokens(None) == T5_MAX_LENGTH == 256
    model.pipeline.tokenizer_3.model_max_length = 512  # what T5 tokenizers declare
    assert t5_tokens(model.pipeline.tokenizer_3) == 256


def test_cli_rejects_bad_training_settings_before_training(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from lpo.cli import app

    result = CliRunner().invoke(app, ["dev", "toy-models", str(tmp_path / "out"), "--vae-steps", "0"])
    assert result.exit_code == 2
    assert "--vae-steps must be at least 1" in result.output
    assert not (tmp_path / "out").exists()
