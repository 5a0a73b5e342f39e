"""The scorer registry on the command line: one `--<metric>-model` option per metric, filling a config's `models`
field (metric -> model spec), each help naming the metric's default model."""

from __future__ import annotations

from typing import Any, Optional

from lpo.core.commands import Field, OptionGroup
from lpo.curate.scorers.specs import DEFAULT_MODELS, PAPER_FILTER_MODELS

HELPS = {
    "pickscore": "PickScore model: hub id or local directory.",
    "clip": "CLIP model: hf-hub:ID, ARCH:TAG or local open_clip directory.",
    "vqa": "VQA model: vision-language hub id or directory, or t2v:MODEL.",
    "aesthetic": "Aesthetic predictor: hub id or local directory.",
    "hpsv2": "HPS v2 model: hub repo with HPS_v2_compressed.pt, a folder holding it, or the file.",
    "hpsv21": "HPS v2.1 model: hub repo with HPS_v2.1_compressed.pt, a folder holding it, or the file.",
    "imagereward": "ImageReward model: hub id or a folder with ImageReward.pt and med_config.json.",
    "geneval": "GenEval detector (a transformers Mask2Former COCO instance model), optionally ',CLIP' for the colour "
               "classifier (open_clip spec; default ViT-L-14:openai), or a folder with detector/ and clip/.",
    **{f"t2i-{kind}": f"T2I-CompBench++ {kind} B-VQA model: a transformers BLIP VQA hub id or directory."
       for kind in ("color", "shape", "texture")},
}
FLAGS = {"geneval": ("--geneval-model", "--geneval-detector")}


def parameter_name(metric: str) -> str:
    """The parameter name of a metric's model option (`t2i-color` -> `t2i_color_model`)."""
    return f"{metric.replace('-', '_')}_model"


def help_for(metric: str) -> str:
    text = f"{HELPS[metric]} Default: {DEFAULT_MODELS[metric]}."
    if metric in PAPER_FILTER_MODELS and PAPER_FILTER_MODELS[metric] != DEFAULT_MODELS[metric]:
        text += f" The lpo-paper filter rules: the paper's {PAPER_FILTER_MODELS[metric]}."
    return text


def model_options(metrics: tuple[str, ...]) -> OptionGroup:
    """`--<metric>-model` for each of `metrics`, collected into the `models` field (None when none is given)."""
    names = {parameter_name(m): m for m in metrics}

    def collect(given: dict[str, Any]) -> dict[str, str] | None:
        return {names[name]: value for name, value in given.items() if value} or None

    return OptionGroup("models", [Field(parameter_name(m), Optional[str],  # noqa: UP045
                                        FLAGS.get(m, (f"--{m}-model",)), help_for(m)) for m in metrics], collect)
