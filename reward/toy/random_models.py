"""Tiny random-weight models in the real on-disk formats, for offline tests and smoke runs.

`build_tiny_models(out_dir)` writes one folder per role, each loadable by the loader that takes the real model:
``load_scorer("pickscore", dir/"pickscore")`` (and every other metric of `lpo.curate.scorers`),
``StableDiffusionPipeline.from_pretrained(dir/"sd15")``, ``StableDiffusionXLPipeline.from_pretrained(dir/"sdxl")``,
``StableDiffusion3Pipeline.from_pretrained(dir/"sd3")``, ``FluxPipeline.from_pretrained(dir/"flux")``; the
compositional benchmarks' models: `geneval/` (a Mask2Former COCO-instance detector with 80 labels in `detector/`,
an open_clip colour classifier in `clip/`) and `t2i-*/` (a BLIP VQA model).
Weights are random from a fixed seed, the structures are those of the real models at tiny widths, and the
tokenizers are built here, so nothing is downloaded.
"""

from __future__ import annotations

import json
import logging
import shutil
import string
from collections.abc import Callable, Iterable
from functools import partial
from itertools import pairwise
from pathlib import Path
from typing import Any

import open_clip
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    BertTokenizer,
    BlipConfig,
    BlipForQuestionAnswering,
    BlipImageProcessor,
    BlipProcessor,
    BlipTextConfig,
    BlipTextModel,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    Mask2FormerConfig,
    Mask2FormerForUniversalSegmentation,
    Mask2FormerImageProcessor,
    PreTrainedTokenizerFast,
    SwinConfig,
)

from lpo.core.errors import InputError
from lpo.curate.scorers.base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from lpo.curate.scorers.geneval import CLASSES, COCO_NAMES
from lpo.reward.toy import random_pipelines
from lpo.reward.toy.config import TinyModelsConfig
from lpo.reward.toy.random_text import CONTEXT_LENGTH, clip_text_config, clip_tokenizer

logger = logging.getLogger(__name__)

ROLES: tuple[str, ...] = ("pickscore", "clip", "vqa", "aesthetic", "sd15", "sdxl", "sd3", "flux", "hpsv2",
                          "hpsv21", "imagereward", "geneval", "t2i-color", "t2i-shape", "t2i-texture")
SCORER_IMAGE_SIZE = 32  # pixels seen by the tiny CLIP towers
PATCH_SIZE = 8
OPEN_CLIP_PREPROCESS = {"mean": list(OPENAI_CLIP_MEAN), "std": list(OPENAI_CLIP_STD), "interpolation": "bicubic",
                        "resize_mode": "shortest"}
AESTHETIC_HEAD_FILE = "aesthetic_head.safetensors"
VQA_SPECIAL_TOKENS = ("<unk>", "<pad>", "<s>", "</s>", "<image>", "<|im_start|>", "<|im_end|>")
# A ChatML template that takes transformers' structured content (image and text items).
VQA_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _clip_vision_config() -> Any:
    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=SCORER_IMAGE_SIZE,
        patch_size=PATCH_SIZE,
    )


def clip_image_processor(size: int = SCORER_IMAGE_SIZE) -> Any:
    """A CLIP image processor for `size` x `size` inputs with OpenAI CLIP's normalisation."""

    return CLIPImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
    )


def _save_transformers_clip(path: Path, projection_dim: int) -> None:
    tokenizer = clip_tokenizer()
    config = CLIPConfig(
        text_config=clip_text_config(tokenizer).to_dict(),
        vision_config=_clip_vision_config().to_dict(),
        projection_dim=projection_dim,
    )
    CLIPModel(config).save_pretrained(path)
    CLIPProcessor(image_processor=clip_image_processor(), tokenizer=tokenizer).save_pretrained(path)


def _build_pickscore(path: Path) -> None:
    _save_transformers_clip(path, projection_dim=16)


def _open_clip_configs() -> tuple[dict[str, Any], dict[str, Any]]:
    # open_clip's default SimpleTokenizer (bundled BPE, 49408 tokens) is used, as for the real ViT-H-14.
    model_cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": SCORER_IMAGE_SIZE, "layers": 2, "width": 32, "head_width": 16,
                       "patch_size": PATCH_SIZE},
        "text_cfg": {"context_length": CONTEXT_LENGTH, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 2},
    }
    return model_cfg, dict(OPEN_CLIP_PREPROCESS)


def _build_clip(path: Path) -> None:
    model_cfg, preprocess_cfg = _open_clip_configs()
    model = open_clip.CLIP(**model_cfg)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, path / "open_clip_model.safetensors")
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}
    (path / "open_clip_config.json").write_text(json.dumps(config, indent=2))


def _vqa_tokenizer() -> Any:
    vocab = {token: i for i, token in enumerate(VQA_SPECIAL_TOKENS)}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    merges = [("Y", "e"), ("Ye", "s"), ("N", "o")]  # "Yes" and "No" are single tokens, as in real VLM vocabularies
    for left, right in merges:
        vocab[left + right] = len(vocab)
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.add_special_tokens(list(VQA_SPECIAL_TOKENS))
    # Like Llama tokenizers, prepend BOS when special tokens are added (the chat template does not write it).
    bpe.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="<|im_end|>",
        extra_special_tokens={"image_token": "<image>"},
        chat_template=VQA_CHAT_TEMPLATE,
        model_max_length=512,
    )


def _build_vqa(path: Path) -> None:
    tokenizer = _vqa_tokenizer()
    text_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = LlavaConfig(
        vision_config=_clip_vision_config(),
        text_config=text_config,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    LlavaForConditionalGeneration(config).save_pretrained(path)
    processor = LlavaProcessor(
        image_processor=clip_image_processor(),
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        chat_template=VQA_CHAT_TEMPLATE,
        num_additional_image_tokens=1,  # the CLS token, dropped again by the "default" feature strategy
    )
    processor.save_pretrained(path)


def _build_aesthetic(path: Path) -> None:
    projection_dim = 16
    _save_transformers_clip(path / "clip", projection_dim=projection_dim)
    widths = [projection_dim, 32, 16, 8, 4, 1]  # the real head is 768, 1024, 128, 64, 16, 1
    head = {}
    for index, (width_in, width_out) in zip((0, 2, 4, 6, 7), pairwise(widths), strict=True):
        layer = torch.nn.Linear(width_in, width_out)
        head[f"layers.{index}.weight"] = layer.weight.detach().contiguous()
        head[f"layers.{index}.bias"] = layer.bias.detach().contiguous()
    save_file(head, path / AESTHETIC_HEAD_FILE)
    config = {"lpo_scorer": "aesthetic", "clip_model": "clip", "head_file": AESTHETIC_HEAD_FILE}
    (path / "config.json").write_text(json.dumps(config, indent=2))


def _build_hps(path: Path, checkpoint: str) -> None:
    """An open_clip folder whose weights are an HPS-format checkpoint ({"state_dict": ...} in a .pt file)."""

    model_cfg, preprocess_cfg = _open_clip_configs()
    model = open_clip.CLIP(**model_cfg)
    torch.save({"state_dict": model.state_dict()}, path / checkpoint)
    (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg},
                                                           indent=2))


def _build_hpsv21(path: Path) -> None:
    torch.rand(1)  # other weights than hpsv2's from the same seed, so tests can tell the two versions apart
    _build_hps(path, "HPS_v2.1_compressed.pt")


def _bert_tokenizer(path: Path, words: tuple[str, ...] = (), specials: tuple[str, ...] = ()) -> Any:
    """A BERT WordPiece tokenizer over single characters (any lower-case ASCII caption tokenises), with `words` as
    whole tokens and `specials` as special tokens at the end of the vocabulary."""

    chars = string.ascii_lowercase + string.digits + string.punctuation
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *chars, *(f"##{c}" for c in chars), *specials]
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # positional: transformers 4 names it vocab_file, transformers 5 vocab (and ignores vocab_file)
    tokenizer = BertTokenizer(str(path / "vocab.txt"), do_lower_case=True,
                              **({"additional_special_tokens": list(specials)} if specials else {}))
    tokenizer.save_pretrained(path)
    return tokenizer


def _build_imagereward(path: Path) -> None:
    """ImageReward's on-disk format: ImageReward.pt (blip.visual_encoder.*, blip.text_encoder.*, mlp.layers.*) and
    BLIP's med_config.json, plus a config.json naming the tiny ViT and a local BERT tokenizer."""

    from timm.models.vision_transformer import VisionTransformer

    tokenizer = _bert_tokenizer(path / "tokenizer")
    vision_cfg = {"image_size": SCORER_IMAGE_SIZE, "patch_size": PATCH_SIZE, "embed_dim": 32, "depth": 2,
                  "num_heads": 2}
    med = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
           "hidden_dropout_prob": 0.1, "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": 64,
           "layer_norm_eps": 1e-12, "max_position_embeddings": 64, "model_type": "bert", "num_attention_heads": 2,
           "num_hidden_layers": 2, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": len(tokenizer),
           "encoder_width": vision_cfg["embed_dim"], "add_cross_attention": True}
    vision = VisionTransformer(img_size=vision_cfg["image_size"], patch_size=vision_cfg["patch_size"],
                               embed_dim=vision_cfg["embed_dim"], depth=vision_cfg["depth"],
                               num_heads=vision_cfg["num_heads"], num_classes=0, global_pool="",
                               norm_layer=partial(torch.nn.LayerNorm, eps=1e-6))
    text = BlipTextModel(BlipTextConfig(
        vocab_size=med["vocab_size"], hidden_size=med["hidden_size"], intermediate_size=med["intermediate_size"],
        num_hidden_layers=med["num_hidden_layers"], num_attention_heads=med["num_attention_heads"],
        max_position_embeddings=med["max_position_embeddings"], encoder_hidden_size=vision_cfg["embed_dim"],
        pad_token_id=0, bos_token_id=None, eos_token_id=None, sep_token_id=None, is_decoder=True,
    ), add_pooling_layer=False)
    state = {f"blip.visual_encoder.{k}": v for k, v in vision.state_dict().items()}
    state.update({f"blip.text_encoder.{k}": v for k, v in text.state_dict().items()})
    # As in the real file: BLIP's persistent position_ids buffer and its unused contrastive projections.
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(med["max_position_embeddings"])[None]
    for name, width in (("vision_proj", vision_cfg["embed_dim"]), ("text_proj", med["hidden_size"])):
        layer = torch.nn.Linear(width, 16)
        state[f"blip.{name}.weight"], state[f"blip.{name}.bias"] = layer.weight.detach(), layer.bias.detach()
    widths = [med["hidden_size"], 32, 16, 8, 4, 1]  # the real MLP is 768, 1024, 128, 64, 16, 1
    for index, (width_in, width_out) in zip((0, 2, 4, 6, 7), pairwise(widths), strict=True):
        layer = torch.nn.Linear(width_in, width_out)
        state[f"mlp.layers.{index}.weight"] = layer.weight.detach()
        state[f"mlp.layers.{index}.bias"] = layer.bias.detach()
    torch.save({k: v.contiguous() for k, v in state.items()}, path / "ImageReward.pt")
    (path / "med_config.json").write_text(json.dumps(med, indent=2))
    config = {"lpo_scorer": "imagereward", "checkpoint": "ImageReward.pt", "med_config": "med_config.json",
              "tokenizer": "tokenizer", "vision": vision_cfg}
    (path / "config.json").write_text(json.dumps(config, indent=2))


def _build_geneval(path: Path) -> None:
    """`detector/`: a Mask2Former (Swin backbone) labelled as the hub's COCO instance models are (COCO's 80 classes
    by mmdetection's names), with the hub's fixed 384 x 384 image processor (which GenEval does not use); `clip/`: an
    open_clip model for the colour classifier."""

    backbone = SwinConfig(image_size=64, patch_size=4, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                          window_size=2, out_features=["stage1", "stage2", "stage3", "stage4"])
    labels = [COCO_NAMES.get(name, name) for name in CLASSES]
    config = Mask2FormerConfig(backbone_config=backbone, feature_size=32, mask_feature_size=32, hidden_dim=32,
                               encoder_feedforward_dim=32, encoder_layers=1, decoder_layers=2, num_attention_heads=2,
                               dim_feedforward=32, num_queries=8, id2label=dict(enumerate(labels)),
                               label2id={name: i for i, name in enumerate(labels)})
    detector = Mask2FormerForUniversalSegmentation(config)
    with torch.no_grad():  # it sees a car in every query, so the tests reach the colour classifier past the threshold
        detector.class_predictor.bias[CLASSES.index("car")] += 20.0
    detector.save_pretrained(path / "detector")
    Mask2FormerImageProcessor(size={"height": 384, "width": 384}, size_divisor=32, image_mean=[0.485, 0.456, 0.406],
                              image_std=[0.229, 0.224, 0.225]).save_pretrained(path / "detector")
    (path / "clip").mkdir()
    _build_clip(path / "clip")


def _build_blip_vqa(path: Path) -> None:
    """A BLIP VQA model laid out as transformers' BLIP checkpoints are: a BERT tokenizer that knows BLIP's [DEC] (the
    decoder's start token) and the answers yes and no but not BLIP's [ENC], and a vocabulary one token larger than
    the tokenizer's, whose last row is [ENC]'s (as 30523 of the hub checkpoint's 30524)."""

    tokenizer = _bert_tokenizer(path, words=("yes", "no"), specials=("[DEC]",))
    vocab = tokenizer.get_vocab()
    text = {"vocab_size": len(vocab) + 1, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2, "max_position_embeddings": 64, "pad_token_id": vocab["[PAD]"],
            "bos_token_id": vocab["[DEC]"], "sep_token_id": vocab["[SEP]"]}
    vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": SCORER_IMAGE_SIZE, "patch_size": PATCH_SIZE}
    BlipForQuestionAnswering(BlipConfig(text_config=text, vision_config=vision)).save_pretrained(path)
    image_processor = BlipImageProcessor(size={"height": SCORER_IMAGE_SIZE, "width": SCORER_IMAGE_SIZE},
                                         image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD))
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)


_BUILDERS: dict[str, Callable[[Path], None]] = {
    "pickscore": _build_pickscore,
    "clip": _build_clip,
    "vqa": _build_vqa,
    "aesthetic": _build_aesthetic,
    "sd15": random_pipelines.build_sd15,
    "sdxl": random_pipelines.build_sdxl,
    "sd3": random_pipelines.build_sd3,
    "flux": random_pipelines.build_flux,
    "hpsv2": lambda path: _build_hps(path, "HPS_v2_compressed.pt"),
    "hpsv21": _build_hpsv21,
    "imagereward": _build_imagereward,
    "geneval": _build_geneval,
    "t2i-color": _build_blip_vqa,
    "t2i-shape": _build_blip_vqa,
    "t2i-texture": _build_blip_vqa,
}


def build_tiny_models(out_dir: str | Path, roles: Iterable[str] = ROLES, seed: int = 0) -> dict[str, Path]:
    """Write a tiny model folder per role under `out_dir` (replacing old ones); return role -> folder."""

    roles = tuple(roles)
    unknown = [role for role in roles if role not in _BUILDERS]
    if unknown:
        raise InputError(f"unknown tiny model role(s) {unknown}: expected some of {', '.join(ROLES)}")
    paths = {}
    for role in roles:
        path = Path(out_dir) / role
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        torch.manual_seed(seed)  # per role, so a folder does not depend on which roles were built before it
        _BUILDERS[role](path)
        logger.info("wrote tiny %s model to %s", role, path)
        paths[role] = path
    return paths


def run(config: TinyModelsConfig) -> dict[str, Path]:
    """`lpo dev tiny-models`: check the roles, then write their folders."""
    chosen = list(config.roles) or list(ROLES)
    unknown = [r for r in chosen if r not in ROLES]
    if unknown:
        raise InputError(f"unknown role(s) {unknown}; choose from {list(ROLES)}.")
    if config.out is None:
        raise InputError("give the directory to write the models into.")
    return build_tiny_models(config.out, chosen, seed=config.seed)
