"""Model families, one adapter each: a `Generator` (sampling and LPO) and an `LRMBackbone` (the latent reward
model's view of the denoiser), the interfaces of `base.py`, named in the registry of `family.py`: `sd15`
(SD1.x/2.x) and `sdxl`, UNets sampled with DDIM (`unet.py`, `ddim.py`), and `sd3` (SD3/SD3.5) and `flux` (FLUX.1),
MMDiTs sampled with the flow-matching step, its coefficients-preserving or its SDE form (`mmdit.py`, `flux.py`,
`flow.py`)."""

from lpo.reward.backbones.family import (
    FAMILIES,
    Family,
    diffusers_dtype,
    family_of,
    get_family,
    load_generator,
    pixel_resolution,
    read_subfolder_config,
    resolve_denoiser,
    resolve_lora,
)

__all__ = ["FAMILIES", "Family", "diffusers_dtype", "family_of", "get_family", "load_generator", "pixel_resolution",
           "read_subfolder_config", "resolve_denoiser", "resolve_lora"]
