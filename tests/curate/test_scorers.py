"""Scorer registry: each formula against an independent computation, batch invariance, caching, spec checks."""

from __future__ import annotations

import functools
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lpo.core.errors import InputError
from lpo.curate.scorers import CURATION_METRICS, METRICS, check_model_spec, load_scorer
from lpo.curate.scorers.base import Scorer, TextFeatureCache

CAPTIONS = ["a red cube on a table", "cat", "two dogs playing in the snow at night, photorealistic"]


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    """Hand-made images of different sizes and modes (RGB, L, RGBA)."""
    rng = np.random.default_rng(7)
    rgb = Image.fromarray(rng.integers(0, 256, (40, 52, 3), dtype=np.uint8), "RGB")
    gray = Image.fromarray(rng.integers(0, 256, (64, 48), dtype=np.uint8), "L")
    rgba = Image.fromarray(rng.integers(0, 256, (33, 33, 4), dtype=np.uint8), "RGBA")
    return [rgb, gray, rgba]


@pytest.fixture(scope="module")
def loaded(tiny_models_dir: Path) -> dict[str, Scorer]:
    return {metric: load_scorer(metric, str(tiny_models_dir / metric)) for metric in CURATION_METRICS}


def test_scores_are_float64_one_per_image(loaded: dict[str, Scorer], images: list[Image.Image]) -> None:
    for metric, scorer in loaded.items():
        scores = scorer.score(images, CAPTIONS)
        assert scores.dtype == np.float64 and scores.shape == (3,), metric
        assert np.isfinite(scores).all(), metric
        assert scorer.name == metric and scorer.scale
        assert scorer.score([], []).shape == (0,)
        with pytest.raises(ValueError, match="2 images but 1 captions"):
            scorer.score(images[:2], CAPTIONS[:1])


def test_pickscore_is_exp_logit_scale_times_cosine(tiny_models_dir: Path, loaded, images) -> None:
    from transformers import CLIPModel, CLIPProcessor

    path = tiny_models_dir / "pickscore"
    model = CLIPModel.from_pretrained(path).eval()
    processor = CLIPProcessor.from_pretrained(path)
    got = loaded["pickscore"].score(images, CAPTIONS)
    with torch.no_grad():
        for i, (image, caption) in enumerate(zip(images, CAPTIONS, strict=True)):
            pixels = processor(images=[image.convert("RGB")], return_tensors="pt")["pixel_values"]
            image_embedding = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)[0]
            tokens = processor.tokenizer([caption], return_tensors="pt")
            text_embedding = model.text_projection(model.text_model(**tokens).pooler_output)[0]
            cosine = image_embedding @ text_embedding / (image_embedding.norm() * text_embedding.norm())
            expected = model.logit_scale.exp() * cosine
            assert got[i] == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    assert model.logit_scale.exp().item() > 2  # so a missing logit scale could not pass


def test_clip_is_raw_cosine_of_open_clip_embeddings(tiny_models_dir: Path, loaded, images) -> None:
    import open_clip

    name = f"local-dir:{tiny_models_dir / 'clip'}"
    model, _, preprocess = open_clip.create_model_and_transforms(name)
    tokenizer = open_clip.get_tokenizer(name)
    got = loaded["clip"].score(images, CAPTIONS)
    with torch.no_grad():
        for i, (image, caption) in enumerate(zip(images, CAPTIONS, strict=True)):
            image_embedding = model.eval().encode_image(preprocess(image.convert("RGB"))[None])[0]
            text_embedding = model.encode_text(tokenizer([caption]))[0]
            expected = torch.nn.functional.cosine_similarity(image_embedding, text_embedding, dim=0)
            assert got[i] == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)


def test_aesthetic_is_the_mlp_on_the_normalised_embedding(tiny_models_dir: Path, loaded, images) -> None:
    from safetensors.torch import load_file
    from transformers import AutoImageProcessor, CLIPModel

    path = tiny_models_dir / "aesthetic"
    config = json.loads((path / "config.json").read_text())
    head = load_file(path / config["head_file"])
    clip = CLIPModel.from_pretrained(path / "clip").eval()
    processor = AutoImageProcessor.from_pretrained(path / "clip")
    got = loaded["aesthetic"].score(images, CAPTIONS)
    with torch.no_grad():
        for i, image in enumerate(images):
            pixels = processor(images=[image.convert("RGB")], return_tensors="pt")["pixel_values"]
            x = clip.visual_projection(clip.vision_model(pixel_values=pixels).pooler_output)[0]
            x = x / x.norm()
            for layer in (0, 2, 4, 6, 7):
                x = head[f"layers.{layer}.weight"] @ x + head[f"layers.{layer}.bias"]
            assert got[i] == pytest.approx(x.item(), rel=1e-5, abs=1e-7)


LLAVA_IMAGE = "<image>"
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


@functools.cache
def _vlm(path: Path) -> tuple:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    return AutoProcessor.from_pretrained(path), AutoModelForImageTextToText.from_pretrained(path).eval()


def _vqa_reference(path: Path, image: Image.Image, caption: str, answer_tokens: list[str], image_text: str) -> float:
    """P(answer) from one unpadded forward with a hand-written prompt and an explicit softmax per answer token."""
    processor, model = _vlm(path)
    question = f'Does this figure show "{caption}"? Please answer yes or no.'
    prompt = f"<|im_start|>user\n{image_text}{question}<|im_end|>\n<|im_start|>assistant\n" + "".join(answer_tokens)
    inputs = processor(images=[image.convert("RGB")], text=[prompt], return_tensors="pt")
    ids = processor.tokenizer.convert_tokens_to_ids(answer_tokens)
    assert inputs["input_ids"][0, -len(ids):].tolist() == ids
    with torch.no_grad():
        logits = model(**inputs).logits[0].double()
    probability = 1.0
    for k, token_id in enumerate(ids):
        position = logits.shape[0] - len(ids) - 1 + k
        weights = torch.exp(logits[position] - logits[position].max())
        probability *= (weights[token_id] / weights.sum()).item()
    return probability


def test_vqa_is_probability_of_yes(tiny_models_dir: Path, loaded, images) -> None:
    path = tiny_models_dir / "vqa"
    got = loaded["vqa"].score(images, CAPTIONS)
    pairs = zip(images, CAPTIONS, strict=True)
    expected = [_vqa_reference(path, image, caption, ["Yes"], LLAVA_IMAGE) for image, caption in pairs]
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    assert len(set(np.round(got, 8))) == 3  # distinct per pair, so a mix-up of rows could not pass
    # The template does not write BOS, so the tokenizer adds it (as apply_chat_template(tokenize=True) would).
    tokenizer = loaded["vqa"].processor.tokenizer
    assert loaded["vqa"].add_special_tokens and tokenizer("x")["input_ids"][0] == tokenizer.bos_token_id


def test_vqa_multi_token_answer_multiplies_token_probabilities(tiny_models_dir: Path, images) -> None:
    path = tiny_models_dir / "vqa"
    scorer = load_scorer("vqa", str(path), answer="Yes!")
    assert scorer.answer_length == 2
    got = scorer.score(images, CAPTIONS)
    pairs = zip(images, CAPTIONS, strict=True)
    expected = [_vqa_reference(path, image, caption, ["Yes", "!"], LLAVA_IMAGE) for image, caption in pairs]
    np.testing.assert_allclose(got, expected, rtol=1e-4)


def _build_tiny_qwen2_5_vl(path: Path) -> None:
    """A tiny Qwen2.5-VL (the default VQA architecture: windowed ViT, M-RoPE, variable image token counts)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
    vocab = {token: i for i, token in enumerate(specials)}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    merges = [("Y", "e"), ("Ye", "s")]
    vocab.update({"Ye": len(vocab), "Yes": len(vocab) + 1})
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.add_special_tokens(specials)
    template = (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% for item in message['content'] %}"
        "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
        "{% else %}{{ item['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                        chat_template=template)
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112),
        video_processor=Qwen2VLVideoProcessor(),
        tokenizer=tokenizer,
        chat_template=template,
    )
    torch.manual_seed(0)
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 512, "pad_token_id": 0,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        },
        vision_config={"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 32,
                       "fullatt_block_indexes": [1], "window_size": 56},
        image_token_id=vocab["<|image_pad|>"],
        video_token_id=vocab["<|video_pad|>"],
        vision_start_token_id=vocab["<|vision_start|>"],
        vision_end_token_id=vocab["<|vision_end|>"],
    )
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(path)
    processor.save_pretrained(path)


def test_vqa_on_a_qwen2_5_vl_architecture(tmp_path: Path, images) -> None:
    path = tmp_path / "qwen2_5_vl"
    _build_tiny_qwen2_5_vl(path)
    scorer = load_scorer("vqa", str(path))
    got = scorer.score(images, CAPTIONS)
    pairs = zip(images, CAPTIONS, strict=True)
    expected = [_vqa_reference(path, image, caption, ["Yes"], QWEN_IMAGE) for image, caption in pairs]
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    alone = scorer.score(images[2:], CAPTIONS[2:])[0]
    assert got[2] == pytest.approx(alone, rel=1e-5)


@pytest.mark.parametrize("metric", CURATION_METRICS)
def test_score_does_not_depend_on_the_batch(metric: str, loaded, images) -> None:
    scorer = loaded[metric]
    alone = scorer.score([images[1]], [CAPTIONS[1]])[0]
    in_batch = scorer.score(images, CAPTIONS)[1]
    reordered = scorer.score(images[::-1], CAPTIONS[::-1])[1]
    assert in_batch == pytest.approx(alone, rel=1e-5, abs=1e-7)
    assert reordered == pytest.approx(alone, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("metric", ["pickscore", "clip"])
def test_text_features_are_cached_per_caption(metric: str, tiny_models_dir: Path, images) -> None:
    scorer = load_scorer(metric, str(tiny_models_dir / metric))
    first = scorer.score(images, ["a", "b", "a"])
    assert (scorer.text_features.misses, scorer.text_features.hits, len(scorer.text_features)) == (2, 0, 2)
    second = scorer.score(images, ["a", "c", "b"])
    assert (scorer.text_features.misses, scorer.text_features.hits, len(scorer.text_features)) == (3, 2, 3)
    assert second[0] == first[0]
    fresh = load_scorer(metric, str(tiny_models_dir / metric)).score(images[:1], ["a"])
    np.testing.assert_allclose(second[0], fresh[0], rtol=1e-5)


def test_text_feature_cache_is_bounded_and_drops_the_oldest() -> None:
    encoded: list[list[str]] = []

    def encode(captions: list[str]) -> torch.Tensor:
        encoded.append(captions)
        return torch.tensor([[float(len(c))] for c in captions])

    cache = TextFeatureCache(encode, max_entries=2)
    assert cache(["a", "bb", "a"]).tolist() == [[1.0], [2.0], [1.0]]
    cache(["ccc"])
    assert len(cache) == 2
    assert cache(["bb", "ccc", "a"]).tolist() == [[2.0], [3.0], [1.0]]
    assert encoded == [["a", "bb"], ["ccc"], ["a"]]


def test_reduced_precision_is_close_to_float32(tiny_models_dir: Path, loaded, images) -> None:
    # open_clip's bf16 keeps embeddings and layer norms in float32, so look at a projection weight.
    weights = {"pickscore": lambda m: m.visual_projection.weight, "clip": lambda m: m.visual.conv1.weight}
    for metric, weight in weights.items():
        scorer = load_scorer(metric, str(tiny_models_dir / metric), dtype=torch.bfloat16)
        assert weight(scorer.model).dtype == torch.bfloat16
        np.testing.assert_allclose(scorer.score(images, CAPTIONS), loaded[metric].score(images, CAPTIONS),
                                   rtol=0.05, atol=0.02)


def test_aesthetic_head_is_sized_from_its_weights_and_must_match_clip(tiny_models_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "aesthetic"
    shutil.copytree(tiny_models_dir / "aesthetic", folder)
    head = load_file(folder / "aesthetic_head.safetensors")
    head["layers.0.weight"] = torch.zeros(32, 8)  # takes 8-d embeddings; the tiny CLIP projects to 16
    save_file(head, folder / "aesthetic_head.safetensors")
    with pytest.raises(InputError, match="takes 8-d embeddings"):
        load_scorer("aesthetic", str(folder))
    del head["layers.7.bias"]
    save_file(head, folder / "aesthetic_head.safetensors")
    with pytest.raises(InputError, match="aesthetic MLP keys"):
        load_scorer("aesthetic", str(folder))


def test_check_rejects_an_unknown_metric() -> None:
    with pytest.raises(InputError, match="unknown metric 'hps'.*pickscore, hpsv2, hpsv21, imagereward, aesthetic"):
        check_model_spec("hps", "some/model")
    with pytest.raises(InputError, match="unknown metric"):
        load_scorer("hps")


@pytest.mark.parametrize("metric", METRICS)
def test_check_rejects_a_missing_path(metric: str, tmp_path: Path) -> None:
    missing = tmp_path / "no_such_model"
    with pytest.raises(InputError, match="does not exist") as info:
        check_model_spec(metric, str(missing))
    assert str(missing) in str(info.value)


@pytest.mark.parametrize(
    ("metric", "role", "found"),
    [
        ("pickscore", "sd15", "diffusers pipeline"),
        ("pickscore", "aesthetic", "lpo 'aesthetic' scorer folder"),
        ("clip", "pickscore", "transformers model of type 'clip'"),
        ("vqa", "pickscore", "model_type 'clip'"),
        ("aesthetic", "clip", "open_clip model"),
    ],
)
def test_check_rejects_a_model_of_the_wrong_type(metric: str, role: str, found: str, tiny_models_dir: Path) -> None:
    path = tiny_models_dir / role
    with pytest.raises(InputError, match=found) as info:
        check_model_spec(metric, str(path))
    assert str(path) in str(info.value)


@pytest.mark.parametrize("metric", METRICS)
def test_check_accepts_the_tiny_folders(metric: str, tiny_models_dir: Path) -> None:
    check_model_spec(metric, str(tiny_models_dir / metric))


def test_check_clip_arch_and_tag_without_network() -> None:
    check_model_spec("clip", "ViT-H-14:laion2b_s32b_b79k")
    with pytest.raises(InputError, match="not a pretrained tag|neither a pretrained tag"):
        check_model_spec("clip", "ViT-H-14:no_such_tag")
    with pytest.raises(InputError, match="not an open_clip architecture"):
        check_model_spec("clip", "ViT-Q-99:laion2b_s32b_b79k")
    with pytest.raises(InputError, match="neither a local folder nor a hub id"):
        check_model_spec("clip", "ViT-H-14")


def test_check_vqa_needs_a_chat_template(tiny_models_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "vqa"
    shutil.copytree(tiny_models_dir / "vqa", folder)
    (folder / "chat_template.jinja").unlink()
    for name in ("processor_config.json", "tokenizer_config.json"):
        config = json.loads((folder / name).read_text())
        config.pop("chat_template", None)
        (folder / name).write_text(json.dumps(config))
    with pytest.raises(InputError, match="no chat template") as info:
        check_model_spec("vqa", str(folder))
    assert str(folder) in str(info.value)


def test_t2v_backend_without_the_package_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "t2v_metrics" else real_find_spec(name, *a)
    )
    with pytest.raises(InputError, match=r"pip install t2v-metrics==3\.0") as info:
        load_scorer("vqa", "t2v:clip-flant5-xxl")
    assert "t2v:clip-flant5-xxl" in str(info.value)


def test_unknown_option_is_an_input_error(tiny_models_dir: Path) -> None:
    with pytest.raises(InputError, match="unknown clip scorer option.*softmax"):
        load_scorer("clip", str(tiny_models_dir / "clip"), softmax=True)


def test_pickscore_processor_option_must_be_a_processor(tiny_models_dir: Path) -> None:
    path = tiny_models_dir / "sd15"
    with pytest.raises(InputError, match="preprocessor_config.json") as info:
        load_scorer("pickscore", str(tiny_models_dir / "pickscore"), processor=str(path))
    assert str(path) in str(info.value)


def _hub_error(cls: type[Exception]) -> Exception:
    error = cls.__new__(cls)  # the HTTP error classes want a live response; only the type matters here
    Exception.__init__(error, "simulated hub answer")
    return error


@pytest.fixture()
def fake_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, object]:
    """Replace hf_hub_download: each (repo, filename) maps to a JSON dict to serve or an exception to raise."""
    import huggingface_hub

    answers: dict[str, object] = {}

    def download(repo_id: str, filename: str, **kwargs: object) -> str:
        answer = answers[f"{repo_id}/{filename}"]
        if isinstance(answer, Exception):
            raise answer
        path = tmp_path / repo_id.replace("/", "--") / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(answer))
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    return answers


def test_check_hub_ids_from_their_config_only(fake_hub: dict[str, object]) -> None:
    from huggingface_hub.errors import LocalEntryNotFoundError, RemoteEntryNotFoundError, RepositoryNotFoundError

    fake_hub["org/pick/config.json"] = {"model_type": "clip"}
    fake_hub["org/vlm/config.json"] = {"model_type": "qwen2_5_vl"}
    fake_hub["org/bert/config.json"] = {"model_type": "bert"}
    fake_hub["org/sdxl/config.json"] = _hub_error(RemoteEntryNotFoundError)
    fake_hub["org/typo/config.json"] = _hub_error(RepositoryNotFoundError)
    fake_hub["org/offline/config.json"] = LocalEntryNotFoundError("no connection")
    fake_hub["org/oc/open_clip_config.json"] = {"model_cfg": {"embed_dim": 16}}
    fake_hub["org/pick/open_clip_config.json"] = _hub_error(RemoteEntryNotFoundError)

    check_model_spec("pickscore", "org/pick")
    check_model_spec("vqa", "org/vlm")
    check_model_spec("clip", "org/oc")
    check_model_spec("clip", "hf-hub:org/oc")
    check_model_spec("pickscore", "org/offline")  # unreachable hub: skipped with a warning, the load reports it
    with pytest.raises(InputError, match=r"'org/bert'.*expected a CLIP model.*model_type 'bert'"):
        check_model_spec("pickscore", "org/bert")
    with pytest.raises(InputError, match="'org/bert'.*AutoModelForImageTextToText"):
        check_model_spec("vqa", "org/bert")
    with pytest.raises(InputError, match="'org/sdxl' has no config.json"):
        check_model_spec("pickscore", "org/sdxl")
    with pytest.raises(InputError, match="'org/typo' is neither an existing local path nor a model on the Hub"):
        check_model_spec("pickscore", "org/typo")
    with pytest.raises(InputError, match="'org/pick' has no open_clip_config.json"):
        check_model_spec("clip", "org/pick")


def test_a_metric_model_pinned_to_a_revision_loads_that_revisions_files(tiny_models_dir: Path, loaded, images,
                                                                         monkeypatch) -> None:
    """`--pickscore-model owner/repo@rev` (and open_clip's `hf-hub:owner/repo@rev`): checked and loaded from the
    snapshot of that revision, scoring as the same model from its folder does."""
    import huggingface_hub

    calls = []

    def snapshot(repo, revision=None, **_):
        calls.append((repo, revision))
        return str(tiny_models_dir / repo.split("/")[1])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    captions = ["a red circle"] * len(images)
    for metric, spec in (("pickscore", "owner/pickscore@abc"), ("clip", "hf-hub:owner/clip@def")):
        check_model_spec(metric, spec)
        scores = load_scorer(metric, spec).score(images, captions)
        np.testing.assert_allclose(scores, loaded[metric].score(images, captions), rtol=1e-6)
    assert ("owner/pickscore", "abc") in calls and ("owner/clip", "def") in calls
