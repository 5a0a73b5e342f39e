"""--dry-run: the plan of a run from configs alone (nothing written, no weights read), with parameter counts that
match a direct count on the tiny models and on the real SD1.5 and SDXL architectures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from lpo.cli import app
from lpo.curate import ingest
from lpo.reward.backbones import FAMILIES
from lpo.reward.backbones.published import write_pipeline_configs
from lpo.reward.lrm import train
from lpo.reward.lrm.config import RewardTrainConfig
from lpo.reward.plan import lora_parameters, meta_lrm, train_as_run
from lpo.reward.toy.world import write_pickapic_parquet
from lpo.reward.tracing import forward_flops, trace

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


class _Small(nn.Module):
    """A convolution, a linear layer and a two-head attention over the 64 positions of an 8x8 map."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.proj = nn.Linear(8, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.proj(self.conv(x).flatten(2).transpose(1, 2))  # [B, 64, 16]
        heads = tokens.view(x.shape[0], 64, 2, 8).transpose(1, 2)  # [B, 2, 64, 8]
        return nn.functional.scaled_dot_product_attention(heads, heads, heads)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_forward_flops_equal_a_hand_count(device: str) -> None:
    model, batch = _Small().to(device), 3
    conv = 2 * batch * 8 * 3 * 3 * 3 * 64  # 2 x out x in x k^2 per output position
    linear = 2 * batch * 64 * 8 * 16
    attention = 2 * (2 * batch * 2 * 64 * 64 * 8)  # q k^T and the weights times v, per head
    assert forward_flops(lambda: model(torch.zeros(batch, 3, 8, 8, device=device))) == conv + linear + attention


def _saved_by_autograd(module: nn.Module, forward: Any, autocast: bool) -> int:
    """Bytes autograd keeps for backward in a real forward on the CPU (its saved tensors, one count per storage,
    weights and tables left out), under the CPU's own bf16 autocast where asked."""
    held = {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]}
    kept: dict[int, tuple[int, torch.Tensor]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in held:
            kept[t.untyped_storage().data_ptr()] = (t.untyped_storage().nbytes(), t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        forward()
    return sum(size for size, _ in kept.values())


@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_the_trace_keeps_what_autograd_keeps(family: str, tiny_models_dir: Path) -> None:
    """The meta trace (fused attention stood in, autocast's casts emulated) against a real forward of the same LRM
    on the CPU, in float32 and under bf16 autocast: the same bytes, up to the norms' per-row statistics (which the
    CPU keeps in another dtype). On CUDA's rules a bf16 MMDiT keeps more: its layer norms run in float32."""
    from lpo.reward.lrm.model import LatentRewardModel

    base = str(tiny_models_dir / family)
    real = LatentRewardModel.from_base(base, text_projection_init=None)
    meta = meta_lrm(FAMILIES[family], base)
    for half in (None, torch.bfloat16):
        kept = _saved_by_autograd(real.backbone, lambda: real.backbone.trace(4), half is not None)
        traced = trace(meta.backbone, lambda: meta.backbone.trace(4), False, half, "cpu")
        assert traced.activations == pytest.approx(kept, rel=0.01)
    on_cuda = trace(meta.backbone, lambda: meta.backbone.trace(4), False, torch.bfloat16, "cuda").activations
    on_cpu = trace(meta.backbone, lambda: meta.backbone.trace(4), False, torch.bfloat16, "cpu").activations
    assert (on_cuda > 1.05 * on_cpu) if family == "sd3" else on_cuda >= on_cpu


def test_a_lora_trace_keeps_what_a_peft_lora_keeps(tiny_models_dir: Path) -> None:
    """Under a LoRA the plan's trace trains the targeted layers' weights in place of the adapters: autograd keeps
    those layers' inputs, as PEFT's adapters do. Their rank-r outputs come on top, r / width of the inputs: rank 1
    here, where the tiny UNet is 32 wide (a real rank 4 to 64 on 320 to 1280 channels is as small a share)."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    base = str(tiny_models_dir / "sd15")
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    unet.requires_grad_(False)
    targets = FAMILIES["sd15"].lora_targets
    unet.add_adapter(LoraConfig(r=1, lora_alpha=1, target_modules=list(targets)))
    kept = _saved_by_autograd(unet, lambda: FAMILIES["sd15"].generator.trace(unet, 4), False)
    stand_in = UNet2DConditionModel.from_config(unet.config).to("meta")
    train_as_run(stand_in, targets, None)
    traced = trace(stand_in, lambda: FAMILIES["sd15"].generator.trace(stand_in, 4), False)
    assert traced.activations == pytest.approx(kept, rel=0.05)
    train_as_run(stand_in, None, None)  # every weight trained keeps more: the convolutions' inputs too
    assert trace(stand_in, lambda: FAMILIES["sd15"].generator.trace(stand_in, 4), False).activations > \
        1.1 * traced.activations


def test_the_backward_sweep_equals_a_hand_count() -> None:
    """A chain of n Linear layers with ReLUs between them, float32, every weight trained. Autograd keeps each layer's
    input (B x D floats; a ReLU's output is the next layer's input, kept once), and each ReLU's output; backward frees
    them last to first while it makes each layer's gradients ((D + 1) x D floats). During layer k's backward it holds
    the inputs of layers 1..k and the gradients of layers k..n; during the last ReLU's, every activation and no
    gradient."""
    batch, width, layers = 64, 32, 4
    chain = [module for _ in range(layers) for module in (nn.Linear(width, width), nn.ReLU())]
    model = nn.Sequential(*chain).to("meta")
    traced = trace(model, lambda: model(torch.zeros(batch, width, device="meta")), False, None)
    row, grads = batch * width * 4, (width + 1) * width  # bytes of one activation, elements of one layer's grads
    assert traced.activations == (layers + 1) * row  # the input and the n ReLU outputs
    held = [k * row + (layers - k + 1) * grads * 4 for k in range(1, layers + 1)]
    held.append((layers + 1) * row + 0)  # the last ReLU's backward, before any gradient
    assert traced.peak(4, layers * grads) == max(max(held), layers * grads * 4)
    assert traced.peak(2, layers * grads) == max([k * row + (layers - k + 1) * grads * 2
                                                 for k in range(1, layers + 1)] + [(layers + 1) * row])


def test_training_costs_three_forwards_and_a_lora_two(tiny_models_dir: Path) -> None:
    """The plan's training factors against torch's count of a real backward on the tiny SD1.5 UNet: every weight
    trained, about 3x the forward; a LoRA alone trained, about 2x (the frozen weights need no weight gradients)."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    from torch.utils.flop_counter import FlopCounterMode

    unet = UNet2DConditionModel.from_pretrained(str(tiny_models_dir / "sd15"), subfolder="unet")
    side = unet.config.sample_size

    def step(backward: bool) -> float:
        with FlopCounterMode(display=False) as counter:
            x = torch.zeros(2, unet.config.in_channels, side, side)
            out = unet(x, torch.zeros(2, dtype=torch.long),
                       encoder_hidden_states=torch.zeros(2, 77, unet.config.cross_attention_dim)).sample
            if backward:
                out.sum().backward()
        return counter.get_total_flops()

    forward = step(False)
    assert step(True) / forward == pytest.approx(3.0, rel=0.1)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=list(FAMILIES["sd15"].lora_targets)))
    assert step(True) / step(False) == pytest.approx(2.0, rel=0.15)


def test_plans_count_flops_and_turn_them_into_gpu_hours(manifest: Path, tiny_models_dir: Path,
                                                       tmp_path: Path) -> None:
    from lpo.reward.lpo import train as lpo_train
    from lpo.reward.lpo.config import LPOConfig
    from lpo.reward.lrm.model import LatentRewardModel

    base = str(tiny_models_dir / "sd15")
    lrm_config = RewardTrainConfig(manifest=manifest, base=base, out=tmp_path / "run", text_projection_init="",
                                   dry_run=True, batch_size=4, grad_accum=2, max_steps=10, processes=2, device="cpu",
                                   vfe_scale=1.0, gpu="h100", mfu=0.5)
    plan = train.run(lrm_config)["plan"]
    built = LatentRewardModel.from_base(base, text_projection_init=None, vfe_scale=1.0)
    one = forward_flops(lambda: built.backbone.trace(1))
    per_update = 3 * one * 2 * 16  # both images of every pair of the effective batch (4 x 2 x 2)
    assert plan.gpu_hours == pytest.approx(per_update * 10 / (989e12 * 0.5) / 3600, rel=1e-6)
    rows = _rows(plan)
    assert "H100 at MFU 0.5" in next(k for k in rows if k.startswith("GPU-hours"))
    lrm = tmp_path / "lrm"
    built.save_pretrained(lrm)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"prompt {i}\n" for i in range(10)))
    settings = dict(family="sd15", base=base, lrm=lrm, prompts=prompts, out=tmp_path / "lpo", dry_run=True,
                    epochs=2, sample_batch_size=5, steps=4, candidates=3, guidance=5.0, device="cpu", monitor=False,
                    gpu="a100", mfu=0.25)
    from diffusers import UNet2DConditionModel

    denoiser = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    cfg_forward = forward_flops(lambda: FAMILIES["sd15"].generator.trace(denoiser, 2))
    for objective, forwards in (("lpo", 2), ("grpo", 2)):  # GRPO's KL to the reference: 2 forwards an item
        plan = lpo_train.run(LPOConfig(**settings, objective=objective))["plan"]
        rounds = 2 * 2  # 10 prompts in rounds of 5, 2 epochs
        sampling = 5 * 4 * (cfg_forward + 3 * one)
        training = 5 * 4 * cfg_forward * (forwards + 1)  # LoRA: the backward costs one forward
        assert plan.gpu_hours == pytest.approx((sampling + training) * rounds / (312e12 * 0.25) / 3600, rel=1e-6)
    bad = CliRunner().invoke(app, ["optimize", "sd15", "--base", base, "--lrm", str(lrm), "--prompts", str(prompts),
                                   "--out", str(tmp_path / "x"), "--dry-run", "--gpu", "v100"])
    assert bad.exit_code == 2 and "--gpu v100 is not one of a100, h100, h200" in " ".join(bad.output.split())
    bad = CliRunner().invoke(app, ["reward", "train", "--manifest", str(manifest), "--base", base, "--out",
                                   str(tmp_path / "y"), "--text-projection-init", "", "--dry-run", "--mfu", "1.5"])
    assert bad.exit_code == 2 and "--mfu 1.5 must be in (0, 1]" in " ".join(bad.output.split())


def _at_native_side(base: Path, pixels: int, out: Path) -> Path:
    """A copy of the pipeline `base` whose own image side is `pixels` (its UNet's sample_size changed): what a plan
    at `--resolution pixels` must size, found without the resolution option."""
    import shutil

    shutil.copytree(base, out)
    config_file = out / "unet" / "config.json"
    unet = json.loads(config_file.read_text())
    vae = json.loads((out / "vae" / "config.json").read_text())
    unet["sample_size"] = pixels // 2 ** (len(vae["block_out_channels"]) - 1)
    config_file.write_text(json.dumps(unet))
    return out


def test_plans_trace_at_the_resolution_asked(manifest: Path, tiny_models_dir: Path, tmp_path: Path) -> None:
    """--resolution sizes the activations and FLOPs (the plans traced the pipeline's own side and only said so):
    both plans at twice the tiny SDXL's side equal the plans of a copy whose own side is that."""
    from lpo.reward.lpo import train as lpo_train
    from lpo.reward.lpo.config import LPOConfig
    from lpo.reward.lrm.model import LatentRewardModel

    base = tiny_models_dir / "sdxl"
    native = json.loads((base / "unet" / "config.json").read_text())["sample_size"] * 2 ** (
        len(json.loads((base / "vae" / "config.json").read_text())["block_out_channels"]) - 1)
    wide = _at_native_side(base, 2 * native, tmp_path / "wide")

    def lrm_plan(pipeline: Path, resolution: int | None) -> Any:
        return train.run(RewardTrainConfig(manifest=manifest, base=str(pipeline), out=tmp_path / "run",
                                           dry_run=True, batch_size=2, device="cpu", resolution=resolution,
                                           text_projection_init=""))["plan"]

    asked, own, small = lrm_plan(base, 2 * native), lrm_plan(wide, None), lrm_plan(base, None)
    # bytes (weights and activations) and GPU-hours (the traced forward's FLOPs; 4x the pixels: more than 2x)
    assert (asked.total_bytes, asked.gpu_hours) == (own.total_bytes, own.gpu_hours)
    assert asked.total_bytes > small.total_bytes and asked.gpu_hours > 2 * small.gpu_hours
    lrm = tmp_path / "lrm"
    LatentRewardModel.from_base(str(base), text_projection_init=None).save_pretrained(lrm)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")

    def lpo_plan(pipeline: Path, resolution: int | None) -> Any:
        return lpo_train.run(LPOConfig(family="sdxl", base=str(pipeline), lrm=lrm, prompts=prompts,
                                       out=tmp_path / "lpo", dry_run=True, resolution=resolution, device="cpu",
                                       monitor=False))["plan"]

    asked, own, small = lpo_plan(base, 2 * native), lpo_plan(wide, None), lpo_plan(base, None)
    assert (asked.total_bytes, asked.gpu_hours) == (own.total_bytes, own.gpu_hours)
    assert asked.total_bytes > small.total_bytes and asked.gpu_hours > 2 * small.gpu_hours
    assert _rows(asked)["resolution"] == f"{2 * native} px"


def test_fixed_tables_are_planned(manifest: Path, tmp_path: Path) -> None:
    """SD3's sin-cos position table is a buffer, not a parameter: pos_embed_max_size^2 x the width, 0.45 GB in half
    precision, held by the policy and by the LRM's truncated transformer (measured: bench/results/plan_memory.md)."""
    from lpo.reward.backbones.published import PIPELINES
    from lpo.reward.lpo import train as lpo_train
    from lpo.reward.lpo.config import LPOConfig

    base = write_pipeline_configs("sd35m", tmp_path / "sd35m", ("text_encoder_3",))
    config = PIPELINES["sd35m"]["transformer"]
    table = config["pos_embed_max_size"] ** 2 * config["num_attention_heads"] * config["attention_head_dim"]
    plan = train.run(RewardTrainConfig(manifest=manifest, base=str(base), out=tmp_path / "run", dry_run=True,
                                       mixed_precision="bf16", resolution=512, text_projection_init="",
                                       device="cpu"))["plan"]
    assert _rows(plan)["fixed tables (buffers: SD3's position embeddings)"] == f"{2 * table / GB:.2f} GB"
    meta_lrm(FAMILIES["sd3"], str(base), resolution=512).save_config(tmp_path / "lrm")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    plan = lpo_train.run(LPOConfig(family="sd3", base=str(base), lrm=tmp_path / "lrm", prompts=prompts,
                                   out=tmp_path / "lpo", dry_run=True, resolution=512, mixed_precision="bf16",
                                   device="cpu", monitor=False))["plan"]
    assert _rows(plan)["fixed tables (buffers: SD3's position embeddings)"] == f"{2 * 2 * table / GB:.2f} GB"
    sd15 = train.run(RewardTrainConfig(manifest=manifest, base=str(write_pipeline_configs("sd15", tmp_path / "sd15")),
                                       out=tmp_path / "run15", dry_run=True, text_projection_init="", device="cpu"))
    assert not any(key.startswith("fixed tables") for key in _rows(sd15["plan"]))  # a UNet has none


@pytest.mark.slow  # builds FLUX.1-dev (12B) and SD3.5-Large (8B) with their text encoders on the meta device
@pytest.mark.parametrize(("family", "name", "published"), [("flux", "flux", 12e9), ("sd3", "sd35l", 8.1e9)])
def test_flux_and_sd35_large_are_planned_at_their_published_size(family: str, name: str, published: float,
                                                                 tmp_path: Path) -> None:
    """The LPO plan of FLUX.1-dev and SD3.5-Large from their published configs (a config-only LRM of each): the
    LoRA counted as peft would, the denoiser at its published size, and one forward's FLOPs equal to a count by hand:
    2 x in x out for every linear layer times the tokens it sees (image tokens, text tokens, both in FLUX's
    single-stream blocks, or one per sample for the timestep, guidance and pooled-text embedders and the adaptive
    norms' modulation), the patch embedding's convolution, and the joint attention's 4 T^2 D per block."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    from lpo.reward.lpo import train as lpo_train
    from lpo.reward.lpo.config import LPOConfig

    base = write_pipeline_configs(name, tmp_path / name)
    lrm = tmp_path / "lrm"
    meta_lrm(FAMILIES[family], str(base)).save_config(lrm)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    plan = lpo_train.run(LPOConfig(family=family, base=str(base), lrm=lrm, prompts=prompts, out=tmp_path / "run",
                                   dry_run=True, lora_rank=32, device="cpu", monitor=False))["plan"]
    rows = _rows(plan)
    with torch.device("meta"):
        stock = (FluxTransformer2DModel if family == "flux" else SD3Transformer2DModel).from_config(
            json.loads((base / "transformer" / "config.json").read_text()))
    total = sum(p.numel() for p in stock.parameters())
    assert total == pytest.approx(published, rel=0.02)
    trained, _ = _millions(rows["parameters trained / frozen"])
    assert trained == pytest.approx(lora_parameters(stock, FAMILIES[family].lora_targets, 32) / 1e6, abs=0.05)
    image, text = 4096, 512 if family == "flux" else 77 + 256  # 1024 px in 2x2 patches; the pipelines' prompt length
    once = ("norm", "time_text_embed")  # the adaptive norms' modulation and the embedders: one vector a sample
    stream = ("context", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")  # the text stream's own weights
    by_hand = 0
    for layer_name, layer in stock.named_modules():
        if isinstance(layer, nn.Linear):
            tokens = 1 if any(part in layer_name for part in once) else text if any(
                part in layer_name for part in stream) else image + text if layer_name.startswith(
                "single_transformer_blocks") else image
            by_hand += 2 * layer.in_features * layer.out_features * tokens
        elif isinstance(layer, nn.Conv2d):  # SD3's patch embedding: one output position per image token
            by_hand += 2 * layer.out_channels * layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1] * image
    blocks = len(stock.transformer_blocks) + len(getattr(stock, "single_transformer_blocks", []))
    by_hand += blocks * 4 * (image + text) ** 2 * stock.inner_dim if hasattr(stock, "inner_dim") else \
        blocks * 4 * (image + text) ** 2 * stock.config.num_attention_heads * stock.config.attention_head_dim
    value, unit = rows["FLOPs of one denoiser forward (one latent, both CFG halves)"].split()
    halves = 2 if family == "sd3" else 1  # SD3.5 samples with classifier-free guidance; FLUX.1-dev is distilled
    forward = float(value.replace(",", "")) * {"TFLOP": 1e12, "PFLOP": 1e15}[unit] / halves
    assert forward == pytest.approx(by_hand, rel=2e-3), (forward / 1e12, by_hand / 1e12)
    assert plan.gpu_hours > 0
