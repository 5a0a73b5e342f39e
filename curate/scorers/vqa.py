"""VQAScore: P("Yes") for ``Does this figure show "{caption}"? Please answer yes or no.``, computed by teacher
forcing as exp(sum of the answer tokens' log-probs) after the model's chat prompt.

The default VQA model is Qwen/Qwen2.5-VL-7B-Instruct: it runs through the generic transformers path
(AutoModelForImageTextToText + chat template), fits a 24 GB GPU in bf16, and is one of the models t2v_metrics
ships for VQAScore. CLIP-FlanT5-XXL, the model of the VQAScore paper and of LPO's MPCF, needs >= 40 GB and the
legacy ``t2v-metrics==3.0`` release (which pins older torch/transformers), so it is the opt-in ``t2v:`` backend.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

from lpo.core.errors import InputError
from lpo.curate.scorers.base import Scorer
from lpo.curate.scorers.specs import read_json, transformers_config

logger = logging.getLogger(__name__)

VQA_QUESTION_TEMPLATE = 'Does this figure show "{}"? Please answer yes or no.'
VQA_ANSWER = "Yes"
T2V_PREFIX = "t2v:"
T2V_INSTALL_HINT = "pip install t2v-metrics==3.0"


class VqaScorer(Scorer):
    """VQAScore on a transformers vision-language model with a chat template: P(answer | image, question)."""

    def __init__(self, model: Any, processor: Any, model_id: str, device: str, dtype: torch.dtype,
                 question_template: str = VQA_QUESTION_TEMPLATE, answer: str = VQA_ANSWER) -> None:
        super().__init__("vqa", model_id, f"P({answer!r} | image, question), in [0, 1]", device, dtype)
        self.model = model
        self.processor = processor
        self.question_template = question_template
        self.answer = answer
        processor.tokenizer.padding_side = "left"
        # As transformers' apply_chat_template(tokenize=True): add BOS unless the template already starts with it.
        bos = processor.tokenizer.bos_token
        self.add_special_tokens = not (bos and self.prompt("a photo").startswith(bos))
        self.answer_length = self._answer_length()

    def prompt(self, caption: str) -> str:
        """The chat prompt (with generation prompt, without the answer) for one caption."""
        question = self.question_template.format(caption)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def _answer_length(self) -> int:
        tokenizer = self.processor.tokenizer
        prompt = self.prompt("a photo")
        prompt_ids = tokenizer(prompt, add_special_tokens=self.add_special_tokens)["input_ids"]
        full_ids = tokenizer(prompt + self.answer, add_special_tokens=self.add_special_tokens)["input_ids"]
        if full_ids[: len(prompt_ids)] != prompt_ids or len(full_ids) == len(prompt_ids):
            raise InputError(
                f"VQA answer {self.answer!r} does not tokenise as the last tokens after the chat prompt of "
                f"{self.model_id}: expected the prompt's tokens followed by the answer's; pick another answer string"
            )
        return len(full_ids) - len(prompt_ids)

    def _score(self, images: list[Image.Image], captions: list[str]) -> torch.Tensor:
        texts = [self.prompt(caption) + self.answer for caption in captions]
        inputs = self.processor(
            images=images, text=texts, padding=True, add_special_tokens=self.add_special_tokens, return_tensors="pt"
        ).to(self.device)
        inputs = {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in inputs.items()}
        n = self.answer_length
        # Left padding puts every answer in the last n positions; the logits before them predict it.
        logits = self.model(**inputs, logits_to_keep=n + 1).logits[:, -n - 1 : -1].float()
        targets = inputs["input_ids"][:, -n:]
        log_probs = logits.log_softmax(-1).gather(-1, targets[..., None])[..., 0]
        return log_probs.sum(-1).exp()


class T2vVqaScorer(Scorer):
    """VQAScore through the t2v_metrics package (e.g. ``t2v:clip-flant5-xxl``, the model of the paper)."""

    def __init__(self, model_name: str, device: str, dtype: torch.dtype) -> None:
        super().__init__("vqa", T2V_PREFIX + model_name, "P('Yes' | image, question) from t2v_metrics, in [0, 1]",
                         device, dtype)
        import t2v_metrics

        self.t2v = t2v_metrics.VQAScore(model=model_name, device=device)

    def _score(self, images: list[Image.Image], captions: list[str]) -> torch.Tensor:
        # t2v_metrics takes image paths; batch_forward scores pair i alone (its __call__ scores all M x N pairs).
        with tempfile.TemporaryDirectory(prefix="lpo-t2v-") as tmp:
            paths = [os.path.join(tmp, f"{i}.png") for i in range(len(images))]
            for image, path in zip(images, paths, strict=True):
                image.save(path)
            dataset = [{"images": [path], "texts": [caption]} for path, caption in zip(paths, captions, strict=True)]
            scores = self.t2v.batch_forward(dataset=dataset, batch_size=len(dataset))
        return scores[:, 0, 0].float()


def _has_chat_template(path: Path) -> bool:
    if (path / "chat_template.jinja").is_file() or (path / "chat_template.json").is_file():
        return True
    for name in ("processor_config.json", "tokenizer_config.json"):
        if (path / name).is_file() and read_json(path / name).get("chat_template"):
            return True
    return False


def check_vqa(spec: str) -> None:
    if spec.startswith(T2V_PREFIX):
        if not spec.removeprefix(T2V_PREFIX):
            raise InputError(f"vqa model {spec!r}: expected t2v:<model>, e.g. 't2v:clip-flant5-xxl'")
        if importlib.util.find_spec("t2v_metrics") is None:
            raise InputError(
                f"vqa model {spec!r} needs the t2v_metrics package, which is not installed: run "
                f"`{T2V_INSTALL_HINT}` (in its own environment: it pins older torch/transformers)"
            )
        return

    path = transformers_config(
        "vqa", spec, "a vision-language model loadable with AutoModelForImageTextToText",
        lambda t: t in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )
    if path is not None and not _has_chat_template(path):
        raise InputError(
            f"vqa model {str(path)!r} has no chat template (chat_template.jinja or a chat_template entry): the "
            "generic VQAScore path needs one; use an instruction-tuned model or the t2v:<model> backend"
        )


def load_vqa(spec: str, device: str, dtype: torch.dtype, question_template: str = VQA_QUESTION_TEMPLATE,
              answer: str = VQA_ANSWER) -> Scorer:
    if spec.startswith(T2V_PREFIX):
        return T2vVqaScorer(spec.removeprefix(T2V_PREFIX), device, dtype)
    if "{}" not in question_template:
        raise InputError(
            f"vqa question_template {question_template!r} has no '{{}}' for the caption: expected e.g. "
            f"{VQA_QUESTION_TEMPLATE!r}"
        )

    logger.info("loading vqa model %s on %s as %s", spec, device, dtype)
    processor = AutoProcessor.from_pretrained(spec)
    if getattr(processor, "chat_template", None) is None:
        raise InputError(
            f"vqa model {spec!r} has no chat template: the generic VQAScore path needs one; use an "
            "instruction-tuned model or the t2v:<model> backend"
        )
    model = AutoModelForImageTextToText.from_pretrained(spec, dtype=dtype).to(device).eval()
    return VqaScorer(model, processor, spec, device, dtype, question_template, answer)
