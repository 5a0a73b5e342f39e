"""A procedurally rendered toy world in Pick-a-Pic's schema, where the true preference is known.

Images are a coloured shape on a background of another colour; captions describe them ("a red circle on a blue
background"). An oracle measures on pixels how well an image matches a caption. Preference pairs share a caption;
the better-matching image wins, and a configurable share of human labels is flipped to model noisy raters. The
bundled sample in manifests/sample/ is made with `write_pickapic_parquet`.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPTextConfig, CLIPTokenizer, T5TokenizerFast

from lpo.core.errors import InputError
from lpo.reward.toy.config import SampleDataConfig

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 215, 40),
    "purple": (150, 50, 190),
    "white": (240, 240, 240),
}
SHAPES = ("circle", "square", "triangle")
ORACLE_WEIGHTS = {"fg": 0.5, "shape": 0.3, "bg": 0.2}
WORDS = ("a", "on", "background", *COLOURS, *SHAPES)
IMAGE_SIZE = 32  # the toy models' image side
TEXT_WIDTH = 64  # the toy models' text encoder width
TOKENIZER_MAX_LENGTH = 16  # a caption is 9 words, 11 tokens with the start and end tokens


@dataclass(frozen=True)
class Scene:
    fg: str
    shape: str
    bg: str

    @property
    def caption(self) -> str:
        return f"a {self.fg} {self.shape} on a {self.bg} background"

    @classmethod
    def from_caption(cls, caption: str) -> Scene:
        words = caption.split()
        return cls(fg=words[1], shape=words[2], bg=words[5])


def all_scenes() -> list[Scene]:
    """Every scene of the world (6 x 5 colour pairs x 3 shapes = 90 captions), in a fixed order."""
    return [Scene(fg, shape, bg) for fg in COLOURS for bg in COLOURS if bg != fg for shape in SHAPES]


def agreement(want: Scene, seen: Scene) -> float:
    """The oracle's weighting of the attributes two scenes share: 1 for the same scene."""
    return (ORACLE_WEIGHTS["fg"] * (want.fg == seen.fg) + ORACLE_WEIGHTS["shape"] * (want.shape == seen.shape)
            + ORACLE_WEIGHTS["bg"] * (want.bg == seen.bg))


def match_rates(wanted: list[Scene], seen: list[Scene]) -> dict[str, float]:
    """Shares of images whose shape colour, shape and background were read back as asked, and the mean oracle."""
    pairs = list(zip(wanted, seen))
    return {"fg_colour_correct": float(np.mean([w.fg == s.fg for w, s in pairs])),
            "shape_correct": float(np.mean([w.shape == s.shape for w, s in pairs])),
            "bg_colour_correct": float(np.mean([w.bg == s.bg for w, s in pairs])),
            "oracle": float(np.mean([agreement(w, s) for w, s in pairs]))}


def random_scene(rng: np.random.Generator) -> Scene:
    fg, bg = rng.choice(list(COLOURS), size=2, replace=False)
    return Scene(str(fg), str(rng.choice(SHAPES)), str(bg))


def render(scene: Scene, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """An RGB uint8 image of `scene` at a random position and size, with light pixel noise."""
    image = np.empty((size, size, 3), dtype=np.float64)
    image[:] = COLOURS[scene.bg]
    radius = rng.uniform(0.22, 0.34) * size
    cy, cx = rng.uniform(radius + 1, size - radius - 1, size=2)
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    if scene.shape == "circle":
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
    elif scene.shape == "square":
        half = radius * 0.89
        mask = (np.abs(yy - cy) <= half) & (np.abs(xx - cx) <= half)
    else:
        top, bottom = cy - radius, cy + radius
        rel = np.clip((yy - top) / (bottom - top), 0, None)
        mask = (yy >= top) & (yy <= bottom) & (np.abs(xx - cx) <= rel * radius)
    image[mask] = COLOURS[scene.fg]
    image += rng.normal(0, 4.0, size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def _nearest_colour(pixels: np.ndarray) -> np.ndarray:
    palette = np.array(list(COLOURS.values()), dtype=np.float64)
    dist = ((pixels[..., None, :].astype(np.float64) - palette) ** 2).sum(-1)
    return dist.argmin(-1)


def perceive(image: np.ndarray) -> Scene:
    """Read the scene back from pixels: border colour = background, commonest other colour = shape colour,
    fill ratio of the shape's bounding box = shape (square ~1, circle ~0.79, triangle ~0.5)."""
    names = list(COLOURS)
    labels = _nearest_colour(image)
    border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    bg = int(np.bincount(border, minlength=len(names)).argmax())
    inner = labels != bg
    if not inner.any():
        return Scene(names[(bg + 1) % len(names)], "square", names[bg])
    fg = int(np.bincount(labels[inner], minlength=len(names)).argmax())
    ys, xs = np.nonzero(labels == fg)
    fill = len(ys) / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    shape = "square" if fill > 0.9 else "circle" if fill > 0.64 else "triangle"
    return Scene(names[fg], shape, names[bg])


def oracle(image: np.ndarray, caption: str) -> float:
    """How well `image` matches `caption`, in [0, 1]: 0.5 colour of the shape, 0.3 shape, 0.2 background."""
    return agreement(Scene.from_caption(caption), perceive(image))


def render_batch(rng: np.random.Generator, n: int) -> tuple[list[Scene], Any]:
    """n random scenes and their renders as a float tensor [n, 3, 32, 32] in [0, 1] (for the toy models' trainers)."""

    scenes = [random_scene(rng) for _ in range(n)]
    pixels = np.stack([render(scene, rng, IMAGE_SIZE) for scene in scenes])
    return scenes, torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0


def text_encoder_config(tokenizer: Any) -> Any:
    """The toy models' CLIP text encoder config (2 layers, width 64) over `tokenizer`."""

    return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=2 * TEXT_WIDTH,
                          num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=TOKENIZER_MAX_LENGTH,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)


def toy_tokenizer(max_length: int = TOKENIZER_MAX_LENGTH):
    """A CLIPTokenizer whose byte-level BPE merges make each word of the world one token ("red</w>", ...); any
    other text still tokenises, byte by byte. Built here, so nothing is downloaded; the end token has the highest
    id, as in CLIP (open_clip's argmax pooling finds it)."""

    chars = sorted(ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    merges: list[tuple[str, str]] = []
    for word in WORDS:
        # Add merges until BPE (lowest rank first) ends at one token. A new merge has the lowest priority, so it
        # never changes how an earlier word is merged.
        while len(parts := _bpe(word, merges)) > 1:
            merges.append((parts[0], parts[1]))
            vocab.setdefault(parts[0] + parts[1], len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def toy_t5_tokenizer(max_length: int = TOKENIZER_MAX_LENGTH):
    """A T5 tokenizer (SentencePiece-style unigram, `</s>` appended) with each word of the world one piece
    ("\u2581red"); any other text still tokenises, character by character. Its `model_max_length` is what the SD3
    toy model's T5 reads (`lpo.reward.backbones.mmdit.t5_tokens`)."""

    specials = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    words = [("\u2581" + word, 0.0) for word in WORDS]  # a whole word scores far above its characters
    chars = [(c, -10.0) for c in sorted(ByteLevel.alphabet())] + [("\u2581", -10.0)]
    tokenizer = Tokenizer(models.Unigram(specials + words + chars, unk_id=2))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                           extra_ids=0, model_max_length=max_length)


def _bpe(word: str, merges: list[tuple[str, str]]) -> list[str]:
    parts = [*word[:-1], word[-1] + "</w>"]
    ranks = {pair: rank for rank, pair in enumerate(merges)}
    while len(parts) > 1:
        rank, i = min((ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(parts, parts[1:])))
        if rank == len(ranks):
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def corrupt(scene: Scene, rng: np.random.Generator) -> Scene:
    """The same scene with one attribute wrong: shape colour (50%), shape (25%) or background (25%)."""
    kind = rng.choice(["fg", "shape", "bg"], p=[0.5, 0.25, 0.25])
    if kind == "shape":
        return Scene(scene.fg, str(rng.choice([s for s in SHAPES if s != scene.shape])), scene.bg)
    others = [c for c in COLOURS if c not in (scene.fg, scene.bg)]
    colour = str(rng.choice(others))
    return Scene(colour, scene.shape, scene.bg) if kind == "fg" else Scene(scene.fg, scene.shape, colour)


def encode_png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def make_pickapic_table(
    num_prompts: int,
    images_per_prompt: int = 4,
    flip_rate: float = 0.3,
    tie_rate: float = 0.05,
    corrupt_images: int = 0,
    size: int = 32,
    seed: int = 0,
    planted: str | None = None,
) -> pa.Table:
    """Preference pairs in Pick-a-Pic's schema: each prompt gets `images_per_prompt` renders (the exact scene and
    corrupted variants), every pair of them is one row, like a user's ranking split into pairs. A pair's label
    follows the oracle, flipped with probability `flip_rate`; equal-oracle pairs and a `tie_rate` share are ties.
    `corrupt_images` images get undecodable bytes (for testing the error path).

    `planted` (a shape): raters with a bias the oracle does not share. A caption of another shape gets one more
    image, its exact scene drawn as that shape, and every pair in which exactly one image shows that shape (as
    `perceive` reads it) is labelled for it, whatever the caption asks; the oracle columns keep the truth."""
    if planted is not None and planted not in SHAPES:
        raise InputError(f"planted bias {planted!r} is not a shape of the world ({', '.join(SHAPES)}).")
    rng = np.random.default_rng(seed)
    columns: dict[str, list] = {k: [] for k in (
        "caption", "image_0_uid", "image_1_uid", "jpg_0", "jpg_1", "label_0", "label_1", "has_label",
        "are_different", "num_example_per_prompt", "user_id", "ranking_id", "best_image_uid", "model_0", "model_1",
        "oracle_0", "oracle_1")}
    uid = 0
    for prompt in range(num_prompts):
        scene = random_scene(rng)
        scenes = [scene] + [corrupt(scene, rng) for _ in range(images_per_prompt - 1)]
        if planted is not None and scene.shape != planted:
            scenes.append(Scene(scene.fg, planted, scene.bg))
        images = [render(s, rng, size) for s in scenes]
        data = [encode_png(im) for im in images]
        scores = [oracle(im, scene.caption) for im in images]
        favoured = [planted is not None and perceive(im).shape == planted for im in images]
        uids = [f"img-{seed}-{planted + '-' if planted else ''}{uid + i:06d}" for i in range(len(images))]
        uid += len(images)
        pairs = [(i, j) for i in range(len(images)) for j in range(i + 1, len(images))]
        for i, j in pairs:
            a, b = (i, j) if rng.random() < 0.5 else (j, i)
            if favoured[a] != favoured[b]:
                labels = (1.0, 0.0) if favoured[a] else (0.0, 1.0)
            elif scores[a] == scores[b] or rng.random() < tie_rate:
                labels = (0.5, 0.5)
            else:
                a_wins = scores[a] > scores[b]
                if rng.random() < flip_rate:
                    a_wins = not a_wins
                labels = (1.0, 0.0) if a_wins else (0.0, 1.0)
            row = {
                "caption": scene.caption, "image_0_uid": uids[a], "image_1_uid": uids[b], "jpg_0": data[a],
                "jpg_1": data[b], "label_0": labels[0], "label_1": labels[1], "has_label": True,
                "are_different": True, "num_example_per_prompt": len(pairs), "user_id": int(prompt % 7),
                "ranking_id": prompt, "best_image_uid": uids[a] if labels[0] >= labels[1] else uids[b],
                "model_0": "toy-renderer", "model_1": "toy-renderer", "oracle_0": scores[a], "oracle_1": scores[b],
            }
            for key, value in row.items():
                columns[key].append(value)
    broken = {columns["image_0_uid"][k * 7 % len(columns["caption"])] for k in range(corrupt_images)}
    for key, col in (("image_0_uid", "jpg_0"), ("image_1_uid", "jpg_1")):
        columns[col] = [b"not an image" if u in broken else d for u, d in zip(columns[key], columns[col])]
    return pa.table(columns)


def write_pickapic_parquet(path: str | Path, **kwargs) -> Path:
    """Write `make_pickapic_table(**kwargs)` to `path`."""

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(make_pickapic_table(**kwargs), path)
    return path


def run(config: SampleDataConfig) -> Path:
    """`lpo dev sample-data`: check the settings, then write the pairs."""

    if config.prompts < 1 or not 0 <= config.flip_rate <= 1:
        raise InputError("--prompts must be at least 1 and --flip-rate in [0, 1].")
    if config.out is None:
        raise InputError("give the parquet file to write.")
    return write_pickapic_parquet(config.out, num_prompts=config.prompts, flip_rate=config.flip_rate,
                                  corrupt_images=config.corrupt_images, seed=config.seed)
