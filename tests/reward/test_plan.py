"""--dry-run: the plan of a run from configs alone (nothing written, no weights read), with parameter counts that
match a direct count on the tiny models and on the real SD1.5 and SDXL architectures."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from lpo.cli import app
from lpo.curate import ingest
from lpo.reward.backbones import FAMILIES
from lpo.reward.backbones.published import write_pipeline_configs
from lpo.reward.lrm import train
from lpo.reward.lrm.config import RewardTrainConfig
from lpo.reward.plan import lora_parameters
from lpo.reward.toy.world import write_pickapic_parquet

GB = 1e9


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("plan")
    source = write_pickapic_parquet(base / "src.parquet", num_prompts=3, flip_rate=0.0, corrupt_images=0, seed=2)
    ingest.run(ingest.IngestConfig(source=str(source), out=base / "cur"))
    return base / "cur" / "pairs.parquet"


def _rows(plan) -> dict[str, str]:
    return dict(plan.rows)


def _millions(text: str) -> list[float]:
    return [float(part.strip().rstrip("M").replace(",", "")) for part in text.split("/")]


def test_lrm_plan_on_the_tiny_model_counts_what_training_builds(manifest: Path, tiny_models_dir: Path,
                                                                tmp_path: Path) -> None:
    from lpo.reward.lrm.model import LatentRewardModel

    config = RewardTrainConfig(manifest=manifest, base=str(tiny_models_dir / "sd15"), out=tmp_path / "run",
                               text_projection_init="", dry_run=True, batch_size=4, grad_accum=2, max_steps=10,
                               processes=2, device="cpu")
    plan = train.run(config)["plan"]
    rows = _rows(plan)
    built = LatentRewardModel.from_base(str(tiny_models_dir / "sd15"), text_projection_init=None)
    trained, frozen = _millions(rows["parameters trained / frozen"])
    assert trained == pytest.approx(sum(p.numel() for p in built.parameters()) / 1e6, abs=0.05) and frozen == 0
    assert rows["effective batch"].endswith("= 16 pairs")  # 4 x 2 accumulation x 2 processes
    assert rows["images to encode"].startswith("12 ")  # 3 prompts x 4 images, none cached yet
    assert not (tmp_path / "run").exists()  # nothing written


def _direct_lrm_count(family: str) -> int:
    """The LRM's parameters counted without the toolkit: the stock UNet minus what the LRM drops, the text
    encoders, and the projections of the paper's tap widths (4800 SD1.5, 3520 SDXL)."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from lpo.reward.backbones.published import PIPELINES

    components = PIPELINES[family]
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(components["unet"])
        encoders = [CLIPTextModel(CLIPTextConfig.from_dict(components["text_encoder"]))]
        if "text_encoder_2" in components:
            encoders.append(CLIPTextModelWithProjection(CLIPTextConfig.from_dict(components["text_encoder_2"])))
    dropped = ("up_blocks.", "conv_norm_out.", "conv_out.")
    count = sum(p.numel() for name, p in unet.named_parameters() if not name.startswith(dropped))
    count += sum(p.numel() for encoder in encoders for p in encoder.parameters())
    if family == "sd15":
        return count + 4800 * 768 + 768 * 768 + 1  # visual and text projections, logit scale
    return count + 3520 * 1280 + 1  # SDXL: the second encoder's own projection


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_lrm_plan_on_the_real_architectures(family: str, manifest: Path, tmp_path: Path) -> None:
    base = write_pipeline_configs(family, tmp_path / family)
    config = RewardTrainConfig(manifest=manifest, base=str(base), out=tmp_path / "run", text_projection_init="",
                               dry_run=True, batch_size=4 if family == "sdxl" else 16, processes=8,
                               gradient_checkpointing=family == "sdxl", device="cpu")
    plan = train.run(config)["plan"]
    trained, _ = _millions(_rows(plan)["parameters trained / frozen"])
    assert trained == pytest.approx(_direct_lrm_count(family) / 1e6, abs=0.05)
    if family == "sdxl":
        assert 2000 < trained < 2100  # truncated UNet 1.24B + both text encoders: about 2.06B, all trained
    # under plain DDP an SDXL LRM in float32 AdamW holds 16 bytes per parameter before activations
    assert plan.total_bytes > trained * 1e6 * 16


@pytest.mark.slow  # builds 7.3B parameters on the meta device twice: in the full run, not the quick loop
def test_sd35_medium_lrm_plan_trains_the_first_18_blocks_and_freezes_the_text_encoders(manifest: Path,
                                                                                        tmp_path: Path) -> None:
    """Counted without the toolkit: the stock SD3.5-Medium transformer minus its last 6 blocks and output head, the
    2048 -> 1280 text projection, three 1536-wide taps' visual projection; CLIP-L, CLIP-G and T5-XXL frozen."""
    from accelerate import init_empty_weights
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from lpo.reward.backbones.published import PIPELINES

    components = PIPELINES["sd35m"]
    with init_empty_weights(include_buffers=True):  # without buffers transformers leaves T5's embeddings untied
        stock = SD3Transformer2DModel.from_config(components["transformer"])
        encoders = [CLIPTextModelWithProjection(CLIPTextConfig.from_dict(components[name]))
                    for name in ("text_encoder", "text_encoder_2")]
        encoders.append(T5EncoderModel(T5Config.from_dict(components["text_encoder_3"])))
    dropped = tuple(f"transformer_blocks.{i}." for i in range(18, 24)) + ("norm_out.", "proj_out.")
    kept = sum(p.numel() for name, p in stock.named_parameters() if not name.startswith(dropped))
    expected_trained = kept + 3 * 1536 * 1280 + 2048 * 1280 + 1  # visual and text projections, logit scale
    expected_frozen = sum(p.numel() for encoder in encoders for p in encoder.parameters())
    base = write_pipeline_configs("sd35m", tmp_path / "sd35m")
    plan = train.run(RewardTrainConfig(manifest=manifest, base=str(base), out=tmp_path / "run", dry_run=True,
                                       batch_size=4, processes=8, device="cpu"))["plan"]
    trained, frozen = _millions(_rows(plan)["parameters trained / frozen"])
    assert trained == pytest.approx(expected_trained / 1e6, abs=0.05)
    assert frozen == pytest.approx(expected_frozen / 1e6, abs=0.05)
    assert sum(p.numel() for p in encoders[2].parameters()) == pytest.approx(4.762e9, rel=1e-3)  # T5-XXL, tied
    assert sum(p.numel() for p in stock.parameters()) == pytest.approx(2.243e9, rel=1e-3)
    assert _rows(plan)["resolution / latent"] == "1024 px / [16, 128, 128]"


def test_sharding_divides_the_optimizer_state_and_the_warning_names_the_fixes(manifest: Path,
                                                                             tmp_path: Path) -> None:
    base = str(write_pipeline_configs("sdxl", tmp_path / "sdxl"))
    plans = {}
    for sharding in ("none", "zero2", "fsdp"):
        config = RewardTrainConfig(manifest=manifest, base=base, out=tmp_path / "run", text_projection_init="",
                                   dry_run=True, batch_size=4, processes=8, sharding=sharding, gpu_memory_gb=40,
                                   gradient_checkpointing=False, device="cpu")
        plans[sharding] = train.run(config)["plan"]
    assert plans["none"].total_bytes > plans["zero2"].total_bytes > plans["fsdp"].total_bytes
    assert plans["none"].warnings and "--gradient-checkpointing" in plans["none"].warnings[0]
    checkpointed = train.run(RewardTrainConfig(manifest=manifest, base=base, out=tmp_path / "run",
                                               text_projection_init="", dry_run=True, batch_size=4, processes=8,
                                               sharding="zero2", device="cpu"))["plan"]
    assert _rows(checkpointed)["gradient checkpointing"] == "on"  # SDXL's default
    activations = {name: float(_rows(p)["activations of one micro-batch"].split()[0]) for name, p in
                   (("plain", plans["zero2"]), ("checkpointed", checkpointed))}
    assert activations["checkpointed"] < activations["plain"] / 3


def test_lora_parameter_count_matches_peft(tiny_models_dir: Path) -> None:
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    unet = UNet2DConditionModel.from_pretrained(str(tiny_models_dir / "sd15"), subfolder="unet")
    targets = FAMILIES["sd15"].lora_targets
    expected = lora_parameters(unet, targets, 4)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=list(targets)))
    assert sum(p.numel() for p in unet.parameters() if p.requires_grad) == expected > 0


def test_optimize_dry_run_through_the_command_line(tiny_models_dir: Path, tmp_path: Path) -> None:
    from lpo.reward.lrm.model import LatentRewardModel

    lrm = tmp_path / "lrm"
    LatentRewardModel.from_base(str(tiny_models_dir / "sd15"), text_projection_init=None).save_pretrained(lrm)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    result = CliRunner().invoke(app, ["optimize", "sd15", "--base", str(tiny_models_dir / "sd15"), "--lrm", str(lrm),
                                      "--prompts", str(prompts), "--out", str(tmp_path / "run"), "--dry-run",
                                      "--device", "cpu"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "parameters trained / frozen" in text and "rank 4 on to_k, to_q, to_v, to_out.0" in text
    assert not (tmp_path / "run").exists()
    fsdp = CliRunner().invoke(app, ["optimize", "sd15", "--base", str(tiny_models_dir / "sd15"), "--lrm", str(lrm),
                                    "--prompts", str(prompts), "--out", str(tmp_path / "run"), "--dry-run",
                                    "--sharding", "fsdp", "--device", "cpu"], env={"COLUMNS": "200"})
    assert fsdp.exit_code == 2 and "does not run under FSDP" in " ".join(fsdp.output.split())
