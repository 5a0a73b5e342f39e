"""The evaluation metrics of the scorer registry on hand-made weights: HPS v2 / v2.1 (100 x cosine of its own
checkpoint, versions never mixed), ImageReward (the authors' normalisation, strict loading), PickScore's logit
scale, and the messages for a missing extra or an unavailable checkpoint."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lpo.core.errors import InputError
from lpo.curate.scorers import check_model_spec, load_scorer
from lpo.curate.scorers.clip import HPS_CHECKPOINTS
from lpo.curate.scorers.imagereward import IMAGEREWARD_MEAN, IMAGEREWARD_STD


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(5)
    return [Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)),
            Image.fromarray(rng.integers(0, 256, (30, 30), dtype=np.uint8), "L")]


def hps_transform_by_torchvision(image: Image.Image, size: int, mean, std) -> torch.Tensor:
    """HPS's `image_transform(..., resize_longest_max=True)` written with torchvision: the long side resized bicubic
    to `size`, zero-padded to a centred square (left/top get half the padding, rounded down), to tensor, normalised."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    scale = size / max(image.size)
    height, width = round(image.height * scale), round(image.width * scale)
    resized = F.resize(image.convert("RGB"), [height, width], InterpolationMode.BICUBIC)
    pad_h, pad_w = size - height, size - width
    padded = F.pad(resized, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)
    return F.normalize(F.to_tensor(padded), mean, std)


def test_hps_transform_resizes_the_long_side_and_pads(tiny_models_dir: Path) -> None:
    """On non-square images HPS's transform equals the torchvision computation and differs from open_clip's default
    (short side resized, centre-cropped); on a square image the two agree."""
    import open_clip

    from lpo.curate.scorers.clip import LongSideTransform

    mean, std = (0.48, 0.45, 0.40), (0.26, 0.26, 0.27)
    transform = LongSideTransform(32, mean, std)
    default = open_clip.image_transform(32, is_train=False, mean=mean, std=std)
    rng = np.random.default_rng(3)
    for height, width in ((48, 40), (37, 100), (45, 45)):
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        got = transform(image)
        assert got.shape == (3, 32, 32)
        torch.testing.assert_close(got, hps_transform_by_torchvision(image, 32, mean, std), rtol=0, atol=1e-6)
        assert torch.allclose(got, default(image), atol=1e-6) == (height == width)
    wide = transform(Image.new("RGB", (100, 37), (255, 255, 255)))
    black = (torch.zeros(3) - torch.tensor(mean)) / torch.tensor(std)
    assert torch.allclose(wide[:, 0, :], black[:, None].expand(3, 32))  # the padding is black, above the image
    assert torch.allclose(wide[:, -1, :], black[:, None].expand(3, 32))  # and below it


def test_hps_is_100_times_the_cosine_of_the_hps_checkpoint(tiny_models_dir: Path, images) -> None:
    import open_clip

    captions = ["a red cube", "two dogs"]
    scores = {}
    for metric, file in HPS_CHECKPOINTS.items():
        folder = tiny_models_dir / metric
        config = json.loads((folder / "open_clip_config.json").read_text())
        model = open_clip.CLIP(**config["model_cfg"]).eval()
        model.load_state_dict(torch.load(folder / file, weights_only=True)["state_dict"])

        def preprocess(image, config=config):
            return hps_transform_by_torchvision(image, config["model_cfg"]["vision_cfg"]["image_size"],
                                                config["preprocess_cfg"]["mean"], config["preprocess_cfg"]["std"])

        tokenizer = open_clip.get_tokenizer("ViT-H-14")
        with torch.no_grad():
            image = model.encode_image(torch.stack([preprocess(im.convert("RGB")) for im in images]))
            text = model.encode_text(tokenizer(captions))
        cosine = torch.nn.functional.cosine_similarity(image, text).double().numpy()
        scores[metric] = load_scorer(metric, str(folder)).score(images, captions)
        np.testing.assert_allclose(scores[metric], 100 * cosine, rtol=1e-5)
    assert not np.allclose(scores["hpsv2"], scores["hpsv21"])  # two checkpoints, two metric names


def test_hps_versions_are_never_mixed(tiny_models_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="looks like an HPS v2.1 checkpoint"):
        check_model_spec("hpsv2", str(tiny_models_dir / "hpsv21" / "HPS_v2.1_compressed.pt"))
    with pytest.raises(InputError, match="has no HPS_v2.1_compressed.pt"):
        check_model_spec("hpsv21", str(tiny_models_dir / "hpsv2"))


def _imagereward_with_head(tiny: Path, tmp_path: Path, head: dict[str, torch.Tensor]) -> Path:
    folder = tmp_path / "imagereward"
    shutil.copytree(tiny / "imagereward", folder)
    state = torch.load(folder / "ImageReward.pt", weights_only=True)
    state.update({f"mlp.{k}": v for k, v in head.items()})
    torch.save(state, folder / "ImageReward.pt")
    return folder


def test_imagereward_normalises_the_mlp_output_with_the_authors_constants(tiny_models_dir, tmp_path, images):
    width = 32  # the tiny text encoder's hidden size; layers 32 -> 32 -> 16 -> 8 -> 4 -> 1
    shapes = {0: (32, width), 2: (16, 32), 4: (8, 16), 6: (4, 8), 7: (1, 4)}
    # A head whose output is the constant c = mean + 2 std: the score must be exactly 2.
    constant = {f"layers.{i}.weight": torch.zeros(s) for i, s in shapes.items()}
    constant |= {f"layers.{i}.bias": torch.zeros(s[0]) for i, s in shapes.items()}
    constant["layers.7.bias"] = torch.tensor([IMAGEREWARD_MEAN + 2 * IMAGEREWARD_STD])
    scorer = load_scorer("imagereward", str(_imagereward_with_head(tiny_models_dir, tmp_path / "c", constant)))
    np.testing.assert_allclose(scorer.score(images, ["a cat", "a dog"]), [2.0, 2.0], rtol=1e-6)
    # A head that reads feature 0 of the text [CLS]: the score is (feature 0 - mean) / std.
    readout = {f"layers.{i}.weight": torch.eye(*s) for i, s in shapes.items()}
    readout |= {f"layers.{i}.bias": torch.zeros(s[0]) for i, s in shapes.items()}
    scorer = load_scorer("imagereward", str(_imagereward_with_head(tiny_models_dir, tmp_path / "r", readout)))
    captions = ["a cat", "a cat"]
    with torch.no_grad():
        features = scorer.features([im.convert("RGB") for im in images], captions)
    expected = (features[:, 0].double().numpy() - 0.16717362830052426) / 1.0333394966054072
    np.testing.assert_allclose(scorer.score(images, captions), expected, rtol=1e-6)
    assert features[0, 0] != features[1, 0]  # the text encoder attends to the image


def _blip_vision_from_the_checkpoint(state: dict[str, torch.Tensor], vision: dict[str, int]):
    """transformers' BlipVisionModel holding ImageReward.pt's `blip.visual_encoder.*` weights (BLIP's ViT: LayerNorm
    eps 1e-6, exact GELU), renamed from BLIP's layout to transformers' by hand."""
    from transformers import BlipVisionConfig, BlipVisionModel

    config = BlipVisionConfig(hidden_size=vision["embed_dim"], intermediate_size=4 * vision["embed_dim"],
                              num_hidden_layers=vision["depth"], num_attention_heads=vision["num_heads"],
                              image_size=vision["image_size"], patch_size=vision["patch_size"], layer_norm_eps=1e-6,
                              hidden_act="gelu")
    model = BlipVisionModel(config).eval()
    blip = {k.removeprefix("blip.visual_encoder."): v for k, v in state.items()
            if k.startswith("blip.visual_encoder.")}
    renamed = {"embeddings.class_embedding": blip["cls_token"], "embeddings.position_embedding": blip["pos_embed"],
               "embeddings.patch_embedding.weight": blip["patch_embed.proj.weight"],
               "embeddings.patch_embedding.bias": blip["patch_embed.proj.bias"],
               "post_layernorm.weight": blip["norm.weight"], "post_layernorm.bias": blip["norm.bias"]}
    parts = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv",
             "attn.proj": "self_attn.projection", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    for layer in range(vision["depth"]):
        for ours, theirs in parts.items():
            for kind in ("weight", "bias"):
                renamed[f"encoder.layers.{layer}.{theirs}.{kind}"] = blip[f"blocks.{layer}.{ours}.{kind}"]
    missing, unexpected = model.load_state_dict(renamed, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    return model


def test_imagereward_features_equal_transformers_blip_on_the_checkpoint(tiny_models_dir, images) -> None:
    """ImageReward's [CLS] feature recomputed with transformers alone from ImageReward.pt: its BLIP vision model
    (not timm) on the benchmark's transform (bicubic short side, centre crop, CLIP mean/std, by torchvision), then
    transformers' BLIP text encoder cross-attending to all image tokens; equal to the scorer's to float32 rounding."""
    from torchvision import transforms
    from transformers import AutoTokenizer, BlipTextConfig, BlipTextModel

    folder = tiny_models_dir / "imagereward"
    config = json.loads((folder / "config.json").read_text())
    med = json.loads((folder / "med_config.json").read_text())
    state = torch.load(folder / "ImageReward.pt", weights_only=True)
    vision = _blip_vision_from_the_checkpoint(state, config["vision"])
    text = BlipTextModel(BlipTextConfig(
        vocab_size=med["vocab_size"], hidden_size=med["hidden_size"], intermediate_size=med["intermediate_size"],
        num_hidden_layers=med["num_hidden_layers"], num_attention_heads=med["num_attention_heads"],
        max_position_embeddings=med["max_position_embeddings"], encoder_hidden_size=config["vision"]["embed_dim"],
        pad_token_id=0, bos_token_id=None, eos_token_id=None, sep_token_id=None, is_decoder=True,
    ), add_pooling_layer=False).eval()
    text.load_state_dict({k.removeprefix("blip.text_encoder."): v for k, v in state.items()
                          if k.startswith("blip.text_encoder.") and not k.endswith("position_ids")}, strict=False)
    size = config["vision"]["image_size"]
    transform = transforms.Compose([transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
                                    transforms.CenterCrop(size), transforms.ToTensor(),
                                    transforms.Normalize((0.48145466, 0.4578275, 0.40821073),
                                                         (0.26862954, 0.26130258, 0.27577711))])
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    captions = ["a red cube", "two dogs"]
    rgb = [image.convert("RGB") for image in images]
    with torch.no_grad():
        tokens = tokenizer(captions, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
        image_tokens = vision(pixel_values=torch.stack([transform(image) for image in rgb])).last_hidden_state
        expected = text(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                        encoder_hidden_states=image_tokens).last_hidden_state[:, 0]
        got = load_scorer("imagereward", str(folder)).features(rgb, captions)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got[0], got[1])


def test_imagereward_refuses_a_checkpoint_of_another_shape(tiny_models_dir, tmp_path) -> None:
    folder = _imagereward_with_head(tiny_models_dir, tmp_path, {"layers.0.weight": torch.zeros(32, 7)})
    with pytest.raises(InputError, match="MLP"):
        load_scorer("imagereward", str(folder))


def test_pickscore_keeps_the_logit_scale(tiny_models_dir: Path, tmp_path: Path, images) -> None:
    from transformers import CLIPModel

    folder = tmp_path / "pickscore"
    shutil.copytree(tiny_models_dir / "pickscore", folder)
    model = CLIPModel.from_pretrained(folder)
    model.logit_scale.data.fill_(math.log(100.0))  # PickScore_v1's value: scores are ~100 x cosine
    model.save_pretrained(folder)
    captions = ["a red cube", "two dogs"]
    processor = load_scorer("pickscore", str(folder)).processor
    with torch.no_grad():
        pixels = processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        image = model.get_image_features(pixel_values=pixels)
        text = model.get_text_features(**processor(text=captions, padding=True, return_tensors="pt"))
    image, text = (getattr(x, "pooler_output", x) for x in (image, text))
    cosine = torch.nn.functional.cosine_similarity(image, text).double().numpy()
    np.testing.assert_allclose(load_scorer("pickscore", str(folder)).score(images, captions), 100 * cosine,
                               rtol=1e-5)


def test_missing_timm_names_the_eval_extra(monkeypatch, tiny_models_dir) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "timm" else real(name, *a))
    with pytest.raises(InputError, match=r"pip install 'lpo\[eval\]'"):
        check_model_spec("imagereward", str(tiny_models_dir / "imagereward"))


def test_unavailable_hub_checkpoint_says_how_to_get_it() -> None:
    with pytest.raises(InputError, match="hf download xswu/HPSv2 HPS_v2.1_compressed.pt"):
        load_scorer("hpsv21")
