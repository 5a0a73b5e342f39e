"""The generator under test, assembled once for every command that generates (`lpo sample`, `lpo eval` and its suite
rows) and for the demo's comparison: the checks of `GenerationOptions` before any model loads, the settings an image
depends on with the family's defaults filled in, and the loaded generator with its sampler and side set."""

from __future__ import annotations

from typing import Any

from lpo.core.config import check_positive
from lpo.core.errors import InputError
from lpo.reward.backbones import family_of, load_generator, resolve_denoiser, resolve_lora
from lpo.reward.backbones.family import Family, check_base_resolution
from lpo.reward.lpo.config import GenerationOptions
from lpo.reward.lrm.model import check_lrm_matches


def settings(options: GenerationOptions, family: Family | None = None) -> dict[str, Any]:
    """What the images depend on besides prompt and seed, with the family's defaults filled in (sampler, guidance;
    eta, which is the family's LPO value when an LRM guides)."""
    family = family or family_of(options.base)
    eta, guidance = family.sampling(options.eta, options.guidance, guided=options.lrm is not None)
    return {"sampler": options.sampler or family.default_sampler, "base": options.base,
            "lora": str(options.lora) if options.lora else None,
            "denoiser": str(options.denoiser) if options.denoiser else None,
            "lrm": str(options.lrm) if options.lrm else None, "candidates": options.candidates,
            "steps": options.steps, "guidance": guidance, "eta": eta, "resolution": options.resolution}


def check(options: GenerationOptions, *, reward_url: str | None = None,
          has_reward_url: bool = False) -> tuple[Family, str | None]:
    """Everything about the generator checkable before a model loads: the family and its sampler, the side, the
    LoRA or fine-tuned denoiser, the LRM, and the settings guided sampling needs (a command with `--reward-url` says
    so with `has_reward_url`: a served LRM can guide instead of --lrm). Returns the family and where a --denoiser's
    weights are read (a run directory names its merged_*), or None."""
    if not options.base:
        raise InputError("--base is required: a diffusers pipeline (hub id or local directory).")
    check_positive(candidates=options.candidates, steps=options.steps)
    if options.candidates > 1 and options.lrm is None and reward_url is None:
        raise InputError(f"--candidates > 1 needs --lrm{' (or --reward-url)' if has_reward_url else ''} to choose "
                         "between the candidates.")
    family = family_of(options.base)
    family.check_sampler(options.sampler)
    check_base_resolution(options.resolution, options.base, family)
    eta = settings(options, family)["eta"]
    if options.lrm is not None and eta <= 0:
        raise InputError(f"--eta {eta}: LRM-guided sampling needs eta > 0 (with eta 0 every candidate is the same).")
    if options.denoiser is not None and options.lora is not None:
        raise InputError("give --lora or --denoiser, not both: a LoRA adapts the base's own denoiser.")
    if options.lora is not None:
        resolve_lora(options.lora)
    weights = None
    if options.denoiser is not None:
        source, subfolder, _ = resolve_denoiser(options.denoiser, family)
        weights = f"{source}/{subfolder}" if subfolder else source
    if options.lrm is not None:
        check_lrm_matches(options.lrm, family.name, options.base)
    return family, weights


def load(options: GenerationOptions, *, device: str = "cpu", dtype: Any = None) -> Any:
    """The generator (its LoRA loaded or its denoiser swapped in) with the options' sampler and side."""
    model = load_generator(options.base, lora=options.lora, denoiser=options.denoiser, dtype=dtype, device=device)
    model.use_sampler(options.sampler)
    model.use_resolution(options.resolution)
    return model
