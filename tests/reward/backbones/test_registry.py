"""The family registry: a pipeline's family from its own files, refusals that name the supported families, and the
one generator loader (LoRA from a run directory, a fine-tuned denoiser swapped in)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lpo.core.errors import InputError
from lpo.reward.backbones import FAMILIES, family_of, get_family, load_generator, resolve_denoiser, resolve_lora


def test_the_family_is_read_from_the_pipeline_files(tiny_models_dir: Path, tmp_path: Path) -> None:
    assert family_of(str(tiny_models_dir / "sd15")).name == "sd15"
    assert family_of(str(tiny_models_dir / "sdxl")).name == "sdxl"
    assert family_of(str(tiny_models_dir / "sd3")).name == "sd3"
    (tmp_path / "empty" / "transformer").mkdir(parents=True)
    with pytest.raises(InputError, match="has no unet/config.json or transformer/config.json"):
        family_of(str(tmp_path / "empty"))
    (tmp_path / "upscaler" / "unet").mkdir(parents=True)
    (tmp_path / "upscaler" / "unet" / "config.json").write_text(json.dumps(
        {"_class_name": "UNet2DConditionModel", "class_embed_type": "timestep"}))
    assert family_of(str(tiny_models_dir / "flux")).name == "flux"
    supported = r"\(SD1.x/2.x \(sd15\), SDXL \(sdxl\), SD3/SD3.5 \(sd3\), FLUX.1 \(flux\)\)"
    with pytest.raises(InputError, match=f"none of the supported families {supported}"):
        family_of(str(tmp_path / "upscaler"))
    (tmp_path / "pixart" / "transformer").mkdir(parents=True)
    (tmp_path / "pixart" / "transformer" / "config.json").write_text(json.dumps(
        {"_class_name": "PixArtTransformer2DModel"}))
    with pytest.raises(InputError, match=f"a PixArtTransformer2DModel belongs to none of the supported families "
                                         f"{supported}"):
        family_of(str(tmp_path / "pixart"))
    with pytest.raises(InputError, match="not one of sd15, sdxl, sd3, flux"):
        get_family("sd4")


def test_every_family_names_both_adapters_and_its_lpo_defaults() -> None:
    from lpo.reward.backbones.base import Generator, LRMBackbone
    from lpo.reward.lpo.config import LPOConfig

    fields = set(LPOConfig.__dataclass_fields__)
    for family in FAMILIES.values():
        assert issubclass(family.generator, Generator) and family.generator.family is family
        assert issubclass(family.lrm_backbone, LRMBackbone) and family.lrm_backbone.family is family
        assert set(family.lpo_defaults) <= fields
        assert all(getattr(LPOConfig(), key) is None for key in family.lpo_defaults)  # left for the family to set


def test_a_fine_tuned_denoiser_replaces_the_base_one(tiny_models_dir: Path, tmp_path: Path) -> None:
    from diffusers import UNet2DConditionModel

    base = str(tiny_models_dir / "sd15")
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    with torch.no_grad():
        unet.conv_in.weight.add_(1.0)
    unet.save_pretrained(tmp_path / "unet")
    model = load_generator(base, denoiser=tmp_path / "unet")
    assert model.denoiser is model.pipeline.unet
    assert torch.equal(model.denoiser.conv_in.weight, unet.conv_in.weight)
    assert not torch.equal(load_generator(base).denoiser.conv_in.weight, unet.conv_in.weight)
    with pytest.raises(InputError, match="is a pipeline of the sd15 family, not sdxl"):
        load_generator(base, family=FAMILIES["sdxl"])


def test_a_lora_is_found_in_its_run_directory(tmp_path: Path) -> None:
    (tmp_path / "run" / "lora").mkdir(parents=True)
    (tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors").write_bytes(b"")
    assert resolve_lora(tmp_path / "run") == tmp_path / "run" / "lora"
    assert resolve_lora(tmp_path / "run" / "lora") == tmp_path / "run" / "lora"
    with pytest.raises(InputError, match="holds no LoRA"):
        resolve_lora(tmp_path)


def test_a_half_precision_generator_decodes_in_float32(tiny_models_dir: Path) -> None:
    """The SDXL VAE overflows in float16 (black images): every generator keeps its VAE in float32."""
    model = load_generator(str(tiny_models_dir / "sdxl"), dtype=torch.float16)
    assert model.denoiser.dtype == torch.float16 and model.vae.dtype == torch.float32
    images = model.decode(torch.randn(1, *model.latent_shape, generator=torch.Generator().manual_seed(0)))
    assert np.asarray(images[0]).std() > 0


def test_a_denoiser_is_found_in_folders_run_directories_hub_ids_and_hub_subfolders(tiny_models_dir: Path,
                                                                                   tmp_path: Path,
                                                                                   fake_hub) -> None:
    """`--unet/--transformer` specs: a saved folder, a pipeline folder, `lpo optimize --merge`'s run directory, a hub
    id and a folder inside a hub repository (the released checkpoints' layout) all load the same weights; a denoiser
    of another family is refused before any weights load."""
    from diffusers import UNet2DConditionModel

    base, sd15 = str(tiny_models_dir / "sd15"), get_family("sd15")
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    with torch.no_grad():
        unet.conv_in.weight.add_(1.0)
    unet.save_pretrained(tmp_path / "run" / "merged_unet")
    fake_hub("peer/merged-models", {"lpo_sd15_merge/unet": tmp_path / "run" / "merged_unet"})
    fake_hub("peer/pipeline", {"unet": tmp_path / "run" / "merged_unet"})
    resolve = resolve_denoiser
    assert resolve(tmp_path / "run" / "merged_unet", sd15)[:2] == (str(tmp_path / "run" / "merged_unet"), None)
    assert resolve(tmp_path / "run", sd15)[:2] == (str(tmp_path / "run" / "merged_unet"), None)
    assert resolve(base, sd15)[:2] == (str(Path(base) / "unet"), None)
    assert resolve("peer/merged-models/lpo_sd15_merge/unet", sd15)[:2] == ("peer/merged-models", "lpo_sd15_merge/unet")
    assert resolve("peer/pipeline", sd15)[:2] == ("peer/pipeline", "unet")
    for spec in (tmp_path / "run", "peer/merged-models/lpo_sd15_merge/unet", "peer/pipeline"):
        loaded = load_generator(base, denoiser=spec).denoiser
        assert torch.equal(loaded.conv_in.weight, unet.conv_in.weight), spec
    with pytest.raises(InputError, match="could not read config.json of 'peer/merged-models/lpo_sdxl_merge/unet'"):
        resolve("peer/merged-models/lpo_sdxl_merge/unet", sd15)  # offline: not in the cache
    with pytest.raises(InputError, match="could not read config.json of 'nobody/missing'"):
        resolve("nobody/missing", sd15)
    with pytest.raises(InputError, match="holds no unet"):
        resolve(tmp_path, sd15)
    with pytest.raises(InputError, match="does not fit a SD1.x/2.x pipeline's unet"):
        resolve(tiny_models_dir / "sdxl", sd15)
    with pytest.raises(InputError, match="SD3Transformer2DModel that does not fit a SD1.x/2.x"):
        resolve(tiny_models_dir / "sd3" / "transformer", sd15)
    assert resolve(tiny_models_dir / "sd3", get_family("sd3"))[0] == str(tiny_models_dir / "sd3" / "transformer")
