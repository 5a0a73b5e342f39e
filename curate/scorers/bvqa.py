"""T2I-CompBench++ attribute binding (Huang et al.): the B-VQA score of the colour, shape and texture categories.

For each noun phrase of the prompt ("a green bench and a red car": "a green bench", "a red car"), BLIP's VQA model
is asked "<phrase>?" and gives P(yes) = p("yes") / (p("yes") + p("no")) over the first answer token; the image's
score is the product over the phrases (the benchmark asks at most 8). A category's score is the mean over its
images. As the benchmark (`BLIPvqa_eval`): the question is cleaned as BLIP's `pre_question` does (lower case, no
`.!"()*#:;~`, at most 50 words), tokenised to at most 35 tokens with BLIP's encoder token `[ENC]` in place of the
first, the answer decoder starts from BLIP's decoder token, and the weights are BLIP's VQA capfilt-large
(`Salesforce/blip-vqa-capfilt-large` in transformers' format). transformers' BLIP tokenizer does not declare
`[ENC]` (its BLIP never uses it); BLIP's own tokenizer adds it right after `[DEC]`, the text decoder's start token,
so where the tokenizer does not know it, its id is the start token's + 1, which must lie inside the checkpoint's
vocabulary (30523 of 30524 for capfilt-large). The image is resized as BLIP's `transform_test` does (bicubic to a
square, then the checkpoint's mean and std) to 480 px, the size BLIP's VQA model was fine-tuned and is run at
there: 5/4 of the 384 px in the transformers checkpoint's config, whose position embeddings are interpolated to
the larger grid (bicubic, as BLIP's own loader does). Any BLIP VQA checkpoint runs at 5/4 of its configured size,
rounded to whole patches.

Noun phrases: the benchmark takes spaCy's `en_core_web_sm` noun chunks, less the chunks "top", "the side", "the
left" and "the right". Where spaCy and that model are installed they are used; otherwise a rule for the
attribute-binding prompts splits the prompt at "and", commas and "with", "on", "in", "of", "next to" (each part one
phrase), which gives spaCy's chunks on the category's "a <attribute> <noun> and a <attribute> <noun>" prompts. The
model id of the scores names the splitter used and the encoder token's id.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import AutoTokenizer, BlipForQuestionAnswering, BlipProcessor

from lpo.core.errors import InputError
from lpo.curate.scorers.specs import checked_config

logger = logging.getLogger(__name__)

MAX_PHRASES = 8  # the benchmark's np_num
RUN_SCALE = 480 / 384  # the benchmark's image size over the size the transformers checkpoint is configured for
QUESTION_TOKENS = 35
EXCLUDED_PHRASES = ("top", "the side", "the left", "the right")  # the benchmark's noun chunks not asked about
MAX_QUESTION_WORDS = 50  # BLIP's pre_question
QUESTION_PUNCTUATION = re.compile(r'[.!"()*#:;~]')
SPLIT = re.compile(r"\s*(?:,|;|\band\b|\bwith\b|\bnext to\b|\bon\b|\bin\b|\bof\b)\s*", re.IGNORECASE)


def rule_phrases(prompt: str) -> list[str]:
    """Noun phrases of an attribute-binding prompt by splitting at conjunctions, commas and prepositions."""
    parts = [part.strip(" .") for part in SPLIT.split(prompt.strip())]
    return [part for part in parts if part]


def spacy_chunker() -> Any | None:
    """spaCy's `en_core_web_sm` pipeline when installed (the benchmark's noun chunks), else None."""
    try:
        import spacy

        return spacy.load("en_core_web_sm")
    except Exception:  # not installed, or the model not downloaded
        return None


def noun_phrases(prompt: str, nlp: Any | None = None) -> list[str]:
    """The phrases asked about, at most `MAX_PHRASES`: spaCy's noun chunks with `nlp`, else `rule_phrases`, less
    the benchmark's `EXCLUDED_PHRASES`."""
    phrases = [chunk.text for chunk in nlp(prompt).noun_chunks] if nlp is not None else rule_phrases(prompt)
    return [phrase for phrase in phrases if phrase not in EXCLUDED_PHRASES][:MAX_PHRASES]


def question(phrase: str) -> str:
    """The question asked about a phrase, "<phrase>?", cleaned as BLIP's `pre_question`: lower case, without
    `.!"()*#:;~`, trailing spaces dropped, at most 50 words."""
    text = QUESTION_PUNCTUATION.sub("", f"{phrase}?".lower()).rstrip(" ")
    return " ".join(text.split(" ")[:MAX_QUESTION_WORDS])


def encoder_token(tokenizer: Any, start_token: int, vocab_size: int) -> tuple[int, str]:
    """(id, where it came from) of BLIP's `[ENC]` token: the tokenizer's, else the decoder start token's id + 1, as
    BLIP's `init_tokenizer` adds `[ENC]` right after `[DEC]`; InputError when that id is outside the vocabulary."""
    known = tokenizer.convert_tokens_to_ids("[ENC]")
    if known is not None and known != tokenizer.unk_token_id:
        return int(known), "the tokenizer's [ENC]"
    if start_token + 1 >= vocab_size:
        raise InputError(
            f"the B-VQA model's tokenizer has no [ENC] token and its decoder start token {start_token} is the last "
            f"of its {vocab_size}-token vocabulary, so BLIP's encoder token (start + 1) does not exist: pass a BLIP "
            "VQA checkpoint trained with [DEC] and [ENC], such as Salesforce/blip-vqa-capfilt-large")
    return start_token + 1, "[DEC] + 1"


def run_image_size(image_size: int, patch_size: int) -> int:
    """The side the benchmark runs a BLIP VQA model at: 5/4 of its configured size in whole patches (384 -> 480)."""
    return max(1, round(image_size * RUN_SCALE / patch_size)) * patch_size


def benchmark_pixels(images: list[Image.Image], size: int, mean: Sequence[float], std: Sequence[float]) -> Any:
    """BLIP's `transform_test`: each image resized bicubic to size x size, scaled to 0-1, normalised (mean, std)."""

    arrays = [np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
              for image in images]
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def b_vqa(yes_probabilities: Sequence[float]) -> float:
    """An image's B-VQA score: the product of P(yes) over its phrases (1 for a prompt without any)."""
    score = 1.0
    for p in yes_probabilities:
        score *= float(p)
    return score


class BVQAScorer:
    """`score(images, prompts)`: B-VQA of each image against its prompt."""

    needs_records = False

    def __init__(self, name: str, model: Any, processor: Any, model_id: str, device: str, dtype: Any,
                 nlp: Any | None) -> None:
        self.name, self.model, self.processor = name, model, processor
        self.device, self.dtype, self.nlp = device, dtype, nlp
        vision = model.config.vision_config
        self.image_size = run_image_size(vision.image_size, vision.patch_size)
        tokenizer = processor.tokenizer
        self.yes, self.no = tokenizer.convert_tokens_to_ids("yes"), tokenizer.convert_tokens_to_ids("no")
        text = model.config.text_config
        self.encoder_token, source = encoder_token(tokenizer, text.bos_token_id, text.vocab_size)
        splitter = "spaCy en_core_web_sm noun chunks" if nlp is not None else "rule-based phrases (spaCy absent)"
        self.model_id = f"{model_id} at {self.image_size} px, [ENC] = {self.encoder_token} ({source}) ({splitter})"
        self.scale = "product over the prompt's noun phrases of P(yes | image, '<phrase>?'), 0-1"
        self.details: list[dict[str, Any]] = []

    def yes_probability(self, images: list[Image.Image], questions: list[str]) -> Any:
        """P(yes) / (P(yes) + P(no)) of the first answer token, one per (image, question); an image object passed
        for several questions is encoded once. Questions run in groups of one token length, unpadded: transformers
        5's BLIP text layers drop the cross-attention mask, so a padded question's answer would attend to its
        padding and depend on what it was batched with (the benchmark masks padding; unpadded is the same)."""

        image_processor = self.processor.image_processor
        unique = list({id(image): image for image in images}.values())
        slots = {id(image): k for k, image in enumerate(unique)}
        pixels = benchmark_pixels(unique, self.image_size, image_processor.image_mean, image_processor.image_std)
        image_embeds = self.model.vision_model(pixel_values=pixels.to(self.device, self.dtype),
                                               interpolate_pos_encoding=True)[0]
        encoded = self.processor.tokenizer(questions, truncation=True, max_length=QUESTION_TOKENS)["input_ids"]
        by_length: dict[int, list[int]] = {}
        for index, ids in enumerate(encoded):
            by_length.setdefault(len(ids), []).append(index)
        result = torch.empty(len(questions), dtype=torch.float32)
        for indices in by_length.values():
            ids = torch.tensor([encoded[i] for i in indices], device=self.device)
            ids[:, 0] = self.encoder_token  # BLIP's questions start with its encoder token, not [CLS]
            embeds = image_embeds[[slots[id(images[i])] for i in indices]]
            image_mask = torch.ones(embeds.shape[:-1], dtype=torch.long, device=self.device)
            question = self.model.text_encoder(input_ids=ids, attention_mask=torch.ones_like(ids),
                                               encoder_hidden_states=embeds, encoder_attention_mask=image_mask)[0]
            start = torch.full((len(indices), 1), self.model.config.text_config.bos_token_id, device=self.device)
            logits = self.model.text_decoder(input_ids=start, encoder_hidden_states=question).logits[:, 0].float()
            probs = logits.softmax(-1)
            result[indices] = (probs[:, self.yes] / (probs[:, self.yes] + probs[:, self.no])).cpu()
        return result

    def score(self, images: list[Image.Image], prompts: list[str]) -> np.ndarray:
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        asked = [(i, phrase) for i, prompt in enumerate(prompts) for phrase in noun_phrases(prompt, self.nlp)]
        yes: list[list[float]] = [[] for _ in images]
        if asked:
            with torch.inference_mode():  # RGB conversion happens once per image, in benchmark_pixels
                values = self.yes_probability([images[i] for i, _ in asked], [question(phrase) for _, phrase in asked])
            for (i, _), value in zip(asked, values.tolist()):
                yes[i].append(value)
        self.details = [{"phrases": noun_phrases(p, self.nlp), "p_yes": y} for p, y in zip(prompts, yes)]
        return np.asarray([b_vqa(y) for y in yes], dtype=np.float64)


def check_bvqa(metric: str, spec: str) -> None:
    """A BLIP VQA model whose encoder token exists (its tokenizer's `[ENC]` or `[DEC]` + 1); a hub model is checked
    where its config and tokenizer can be read."""

    path, config = checked_config(metric, spec, "a BLIP visual question answering model (model_type blip)",
                                  lambda model_type: model_type == "blip")
    text = (config or {}).get("text_config") or {}
    if "bos_token_id" not in text or "vocab_size" not in text:
        return  # unreadable here, or transformers' BLIP defaults: checked again when the model loads
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path) if path is not None else spec)
    except OSError:
        return  # not downloaded yet: checked when the model loads
    encoder_token(tokenizer, int(text["bos_token_id"]), int(text["vocab_size"]))


def load_bvqa(metric: str, spec: str, device: str, dtype: Any) -> BVQAScorer:
    logger.info("loading %s: %s on %s", metric, spec, device)
    model = BlipForQuestionAnswering.from_pretrained(spec, dtype=dtype).to(device).eval()
    return BVQAScorer(metric, model, BlipProcessor.from_pretrained(spec), spec, device, dtype, spacy_chunker())
