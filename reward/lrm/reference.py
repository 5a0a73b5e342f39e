"""`lpo reward import-reference`: an LRM saved by the reference code (the released LRM-1.5 and LRM-XL) converted
into the toolkit's format, with the settings those models were trained with.

The reference layout: `unet/` (the whole UNet, up blocks included, though they never run), `text_encoder/` (and
`text_encoder_2/` for SDXL; absent when the text encoders were frozen) and `state_dict.pt` =
{"visual_projection": {"weight"}, "text_projection": {"weight"} (SD1.x only), "logit_scale"}. Its score is
exp(logit_scale) * cos(visual, text) with the visual feature from the down blocks' last resnets (conditional branch
only) and the mid block guided at 7.5 (VFE), and the text feature the first encoder's projected pooler output
(SD1.x) or the second encoder's text_embeds (SDXL): exactly `LatentRewardModel` with its default taps,
`multi_scale=True`, `vfe_scale=7.5`, `vfe_down=False` (design/method.md sections 1.3-1.6).

`state_dict.pt` is a pickle: it is read with `torch.load(weights_only=True)` and anything in it but those tensors
(or a float logit scale) is refused, so a checkpoint cannot run code or smuggle in other weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel

from lpo.core.errors import InputError
from lpo.core.refs import ModelRef, load_args, weight_args
from lpo.reward.backbones import family_of, read_subfolder_config
from lpo.reward.backbones.unet import default_taps, res_channels
from lpo.reward.lrm.config import ImportReferenceConfig
from lpo.reward.lrm.model import LatentRewardModel, export_components

logger = logging.getLogger(__name__)

STATE_FILE = "state_dict.pt"
REFERENCE_SETTINGS = {"multi_scale": True, "vfe_scale": 7.5, "vfe_down": False}  # the released configs' (9.1)
PROVENANCE_FILE = "reference.json"


def _file(spec: str, name: str, required: bool = True) -> Path | None:
    """A file of the reference checkpoint (`name` relative to it), local or downloaded; None if absent and optional."""
    path = ModelRef.parse(spec).file(name, required=False)
    if path is None and required:
        raise InputError(f"{spec} has no {name}: not an LRM in the reference layout (unet/, text_encoder/, "
                         f"{STATE_FILE}).")
    return path


def _component(spec: str, name: str) -> tuple[str, dict[str, Any]]:
    """(path or repo, keywords) for a `from_pretrained` of the checkpoint's `name/` folder (a pinned reference's
    revision included)."""
    ref = ModelRef.parse(spec)
    if ref.local:
        return str(Path(ref.root) / name), {}
    return load_args(spec, name)


def read_state(path: Path, family: str) -> dict[str, Any]:
    """The projections and logit scale of `state_dict.pt`, as tensors; anything else in it is refused."""

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # weights_only refuses any pickled object that is not a tensor or a plain container
        raise InputError(f"{path} is not a plain tensor checkpoint ({type(err).__name__}: {str(err)[:200]}); "
                         "refusing to load it. Pass the reference code's state_dict.pt.") from None
    allowed = {"visual_projection", "logit_scale"} | ({"text_projection"} if family == "sd15" else set())
    if not isinstance(state, dict) or not {"visual_projection", "logit_scale"} <= set(state) or set(state) - allowed:
        found = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise InputError(f"{path} holds {found}; the reference {family} layout holds exactly {sorted(allowed)}. "
                         "Refusing a checkpoint with anything else in it.")
    out = {}
    for name in sorted(allowed - {"logit_scale"}):
        value = state.get(name)
        if isinstance(value, dict) and set(value) == {"weight"}:
            value = value["weight"]
        if not (torch.is_tensor(value) and value.dim() == 2 and value.is_floating_point()):
            raise InputError(f"{path}: {name} must be a 2-D float weight (a Linear's state dict {{'weight': W}}); "
                             f"it is {type(value).__name__}.")
        out[name] = value
    scale = state["logit_scale"]
    if torch.is_tensor(scale) and scale.numel() == 1 and scale.is_floating_point():
        scale = float(scale.reshape(()))
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise InputError(f"{path}: logit_scale must be a float or a one-element float tensor; it is "
                         f"{type(scale).__name__}.")
    out["logit_scale"] = float(scale)
    return out


def validate(config: ImportReferenceConfig) -> tuple[Any, dict[str, Any], Path]:
    """Everything checkable before a model is built: the layout, the family, the state file's contents."""

    for name in ("source", "base", "out"):
        if not getattr(config, name):
            raise InputError(f"--{name} is required, e.g. `lpo reward import-reference casiatao/LRM/lrm_sd15 --base "
                             "sd-legacy/stable-diffusion-v1-5 --out lrm-1.5`.")
    out = Path(config.out)
    if (out / "config.json").exists():
        raise InputError(f"{out} already holds a model; pick a new --out (nothing was changed).")
    family = family_of(config.base)
    if family.name not in ("sd15", "sdxl"):
        raise InputError(f"{config.base} is a pipeline of the {family.name} family; the reference code released LRMs "
                         "for SD1.x (sd15) and SDXL (sdxl) only.")
    unet_config = json.loads(_file(config.source, "unet/config.json").read_text())
    if not family.accepts(unet_config) or "UNet" not in unet_config.get("_class_name", ""):
        raise InputError(f"{config.source}'s unet does not fit the {family.title} pipeline {config.base}; pass the "
                         "base the LRM was trained from.")
    state_path = _file(config.source, STATE_FILE)
    state = read_state(state_path, family.name)
    for name, shape in expected_shapes(config.base, family.name, unet_config).items():
        if tuple(state[name].shape) != shape:
            raise InputError(f"{state_path}: {name} has shape {tuple(state[name].shape)}, the {family.title} LRM of "
                             f"{config.base} needs {shape}; pass the base the LRM was trained from.")
    return family, state, state_path


def expected_shapes(base: str, family: str, unet_config: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """The projections' shapes of the LRM built on `base` with the reference settings, from config files alone."""

    channels = res_channels(unet_config)
    width = sum(channels[i] for i in default_taps(unet_config)) + unet_config["block_out_channels"][-1]
    if family == "sdxl":
        return {"visual_projection": (read_subfolder_config(base, "text_encoder_2")["projection_dim"], width)}
    hidden = read_subfolder_config(base, "text_encoder")["hidden_size"]
    return {"visual_projection": (hidden, width), "text_projection": (hidden, hidden)}


def run(config: ImportReferenceConfig) -> dict[str, Any]:
    """Build the toolkit's LRM from the base's configs with the reference settings, load the checkpoint's weights
    into it, and save it with the VAE and noise schedule beside it."""

    family, state, state_path = validate(config)
    model = LatentRewardModel.from_base(config.base, **REFERENCE_SETTINGS, text_projection_init=None,
                                        pretrained=False)
    backbone = model.backbone
    unet_source, where = _component(config.source, "unet")
    unet = UNet2DConditionModel.from_pretrained(unet_source, **where)
    missing, unexpected = backbone.unet.load_state_dict(unet.state_dict(), strict=False)
    dropped = ("up_blocks.", "conv_norm_out.", "conv_out.")
    if missing or [k for k in unexpected if not k.startswith(dropped)]:
        raise InputError(f"{config.source}'s unet does not match {config.base}'s architecture (missing "
                         f"{missing[:3]}, unexpected {[k for k in unexpected if not k.startswith(dropped)][:3]}).")
    del unet
    encoders = {}
    for name, encoder in zip(backbone.encoder_names, backbone._encoder_classes()):
        found = _file(config.source, f"{name}/config.json", required=False) is not None
        source, where = _component(config.source, name) if found else weight_args(config.base, name)
        if not found:
            logger.info("%s has no %s/ (trained frozen): using the base's", config.source, name)
        loaded = encoder.from_pretrained(source, **where)
        getattr(backbone, name).load_state_dict(loaded.state_dict())
        encoders[name] = "checkpoint" if found else "base"
    with torch.no_grad():
        model.visual_projection.weight.copy_(state["visual_projection"])
        if model.text_projection is not None:
            model.text_projection.weight.copy_(state["text_projection"])
        model.logit_scale.fill_(state["logit_scale"])
    out = Path(config.out)
    model.save_pretrained(out)
    export_components(out, config.base, config.vae)
    provenance = {"source": config.source, "base": config.base, "vae": config.vae or f"{config.base} (vae/)",
                  "family": family.name, "settings": REFERENCE_SETTINGS, "text_encoders": encoders,
                  "logit_scale": state["logit_scale"],
                  "state_dict_sha256": hashlib.sha256(state_path.read_bytes()).hexdigest()}
    (out / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
    return {"out": str(out), **provenance}
