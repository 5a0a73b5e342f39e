"""Model families, one adapter each: a `Generator` (sampling and LPO) and an `LRMBackbone` (the latent reward
model's view of the denoiser), the interfaces of `base.py`, named in the registry of `family.py`. Today: `sd15`
(SD1.x/2.x) and `sdxl`, both UNets sampled with DDIM (`unet.py`, `ddim.py`); a flow-matching family (SD3, FLUX.1)
is one more adapter module and one more entry in `FAMILIES`."""

from lpo.reward.backbones.family import (
    FAMILIES,
    Family,
    diffusers_dtype,
    family_of,
    get_family,
    load_generator,
    pixel_resolution,
    read_subfolder_config,
    resolve_lora,
)

__all__ = ["FAMILIES", "Family", "diffusers_dtype", "family_of", "get_family", "load_generator", "pixel_resolution",
           "read_subfolder_config", "resolve_lora"]
