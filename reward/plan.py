"""`--dry-run` of `lpo reward train` and `lpo optimize`: a plan before launch, per process, from configs alone.

The models are built on the meta device from their config files (nothing else is downloaded, no weight is read, no
image encoded), and one training forward is traced there to size the activations. Per process, the plan gives the
parameters trained and frozen, the bytes of weights, gradients and AdamW's two moments under the precision and the
sharding, the activations of one micro-batch, the effective batch, the number of updates, the images to encode and
the latent cache's size on disk; and a warning when the total passes `--gpu-memory-gb`.

Memory model (bytes per parameter): trained weights are float32 (mixed precision computes in half precision from
float32 masters), frozen ones take the run's dtype; gradients 4 and AdamW's moments 8 per trained parameter. Fixed
tables kept as buffers (SD3's sin-cos position embedding, 0.45 GB in half precision in each SD3.5 transformer) take
the frozen dtype too.
`zero2` (DeepSpeed ZeRO-2) shards gradients and moments over the processes, `fsdp` (full shard) the weights too.
Activations: what autograd keeps for backward in one training forward traced on the meta device
(`saved_tensors_hooks`: each saved storage once, weights and tables left out), with the run's trained weights
requiring gradients (under a LoRA the targeted layers stand in for its adapters), attention kept as the fused kernels
keep it (query, key, value, output, log-sum-exp; the meta device would keep every attention matrix), and autocast's
casts made as on the run's device (CUDA's: matmuls and convolutions in half precision, norms and softmax in float32;
the CPU's: no float32 list), trained weights' half copies included. With gradient checkpointing, a checkpointed
block keeps its output, and its inside is held again while backward recomputes it. Backward frees activations as it
makes gradients, last layer first: the plan holds the most the two hold together along that sweep (at the end, every
gradient), or at the optimizer step the gradients and, on CUDA, foreach AdamW's float32 temporary, whichever is
more. The text encoders' activations, small next to the denoiser's, are not counted. It is an estimate: allocator
slack and kernels' workspaces come on top (measured against real peaks in `bench/plan_memory.py` on the CPU and
`bench/gpu_check.py` on a GPU: within 0.96-1.11).

Compute: the same traced forward is counted by torch's FLOP counter (`torch.utils.flop_counter`: 2 FLOPs per
multiply-add of every matmul, convolution and attention; elementwise work is not counted), per latent. A training
forward costs 3x its forward where every weight trains (the forward, the gradients of the activations and of the
weights), 2x where only a LoRA's do (the frozen weights need no weight gradients), and a frozen reference's forward 1x.
An LRM update: 3x the LRM's forward on every latent of the effective batch. An LPO/GRPO round: sampling (each step one
denoiser forward per prompt, both CFG halves, and the LRM on the K candidates) plus training (per item, the
objective's forwards and the policy's backward; LPO trains at most one tuple per step and prompt, GRPO one group per
step and prompt). Text encoders, the VAE, validation and monitor sampling are not counted. GPU-hours = FLOPs /
(the GPU's dense bf16 peak x `--mfu`), summed over the processes; `--mfu` is an assumption, printed with the result.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import diffusers
import torch
import transformers
from accelerate import init_empty_weights
from torch import nn

from lpo.core.errors import InputError
from lpo.reward.backbones import pixel_resolution, read_subfolder_config
from lpo.reward.backbones.family import latent_side_at
from lpo.reward.lrm.model import LatentRewardModel, latent_shape_at, read_lrm_config
from lpo.reward.tracing import Trace, forward_flops, trace

SHARDINGS = ("auto", "none", "zero2", "fsdp")
GB = 1e9
# dense bf16/fp16 tensor-core peaks, FLOP/s, without sparsity (A100 SXM; H100 and H200 SXM share one compute die)
GPUS = {"a100": 312e12, "h100": 989e12, "h200": 989e12}
@dataclass
class Plan:
    """What one process will hold and do; `rows` are printed in order."""

    title: str
    rows: list[tuple[str, str]] = field(default_factory=list)
    total_bytes: float = 0.0
    gpu_hours: float = 0.0
    warnings: list[str] = field(default_factory=list)

    def add(self, what: str, value: Any) -> None:
        self.rows.append((what, str(value)))


def size(n: float) -> str:
    return f"{n / GB:.2f} GB"


def launch_setup(processes: int | None, sharding: str) -> tuple[int, str]:
    """The process count and sharding to plan for: given, else what `accelerate launch` set in the environment."""
    if sharding not in SHARDINGS:
        raise InputError(f"--sharding {sharding} is not one of {', '.join(SHARDINGS)}.")
    world = processes or int(os.environ.get("WORLD_SIZE", os.environ.get("ACCELERATE_NUM_PROCESSES", "1")))
    if world < 1:
        raise InputError(f"--processes {world} must be at least 1.")
    if sharding == "auto":
        if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
            sharding = "fsdp"
        elif os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" and \
                os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2") in ("2", "3"):
            sharding = "zero2"
        else:
            sharding = "none"
    return world, sharding


def count(module: nn.Module) -> tuple[int, int]:
    """(trained, frozen) parameter counts."""
    trained = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return trained, sum(p.numel() for p in module.parameters()) - trained


def flops(n: float) -> str:
    """FLOPs in the largest unit that keeps a number >= 1: 3.2 TFLOP, 1.4 PFLOP, 2.1 EFLOP."""
    for unit, scale in (("EFLOP", 1e18), ("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n:,.0f} FLOP"


def check_time_settings(config: Any) -> None:
    """--gpu and --mfu, checked before any model is built (InputError, exit 2)."""
    if config.gpu not in GPUS:
        raise InputError(f"--gpu {config.gpu} is not one of {', '.join(GPUS)}.")
    if not 0 < config.mfu <= 1:
        raise InputError(f"--mfu {config.mfu} must be in (0, 1]: the share of the GPU's peak the run achieves.")


def time_rows(plan: Plan, total_flops: float, world: int, config: Any) -> None:
    """The run's FLOPs turned into GPU-hours (all processes) and wall-clock hours at `world` processes."""
    peak = GPUS[config.gpu]
    hours = total_flops / (peak * config.mfu) / 3600
    plan.gpu_hours = hours
    plan.add("FLOPs, whole run", flops(total_flops))
    plan.add(f"GPU-hours on {config.gpu.upper()} at MFU {config.mfu:g} (assumed; --gpu, --mfu)",
             f"{hours:,.1f} ({hours / world:,.1f} h wall-clock on {world} process(es); "
             f"{config.gpu.upper()} dense bf16 peak {peak / 1e12:,.0f} TFLOP/s)")


def memory_rows(plan: Plan, trained: int, frozen: int, frozen_bytes: int, world: int, sharding: str,
                traced: Trace, gpu_memory_gb: float, buffers: int = 0, device_type: str = "cuda",
                traced_weights_train: bool = True) -> None:
    """Add the per-process memory of the parameters, gradients, moments, fixed tables (`buffers`: floating-point
    buffers, in the frozen dtype and never sharded) and activations, and the warning. `traced_weights_train`: the
    weights that required gradients in `traced` are the trained ones (not a LoRA's stand-ins), so their gradients
    are placed along the backward sweep."""
    shard = world if sharding in ("zero2", "fsdp") else 1
    weights = (trained * 4 + frozen * frozen_bytes) / (world if sharding == "fsdp" else 1)
    gradients = trained * 4 / shard
    moments = trained * 8 / shard
    tables = buffers * frozen_bytes
    backward = traced.peak(4 / shard, trained) if traced_weights_train else traced.peak(0, 0) + gradients
    # AdamW on CUDA runs foreach: its step makes one float32 temporary per trained parameter (the CPU's loops)
    step = gradients + (trained * 4 / shard if device_type == "cuda" else 0)
    plan.add("parameters trained / frozen", f"{trained / 1e6:,.1f}M / {frozen / 1e6:,.1f}M")
    plan.add(f"weights (trained float32, frozen {frozen_bytes} B)", size(weights))
    if tables:
        plan.add("fixed tables (buffers: SD3's position embeddings)", size(tables))
    plan.add("gradients (float32)", size(gradients))
    plan.add("AdamW moments (2 x float32)", size(moments))
    plan.add("activations of one micro-batch", size(traced.activations))
    plan.add("activations and gradients at their peak (backward frees the one as it makes the other)",
             size(backward))
    plan.add("optimizer step (gradients" + (" and foreach AdamW's float32 temporary)" if device_type == "cuda"
                                            else ")"), size(step))
    plan.total_bytes = weights + tables + moments + max(backward, step)
    plan.add("total per process (estimate)", size(plan.total_bytes))
    if plan.total_bytes > gpu_memory_gb * GB:
        plan.warnings.append(f"the estimate, {size(plan.total_bytes)} per process, exceeds --gpu-memory-gb "
                             f"{gpu_memory_gb:g}: turn on --gradient-checkpointing, lower --batch-size (with "
                             "--grad-accum for the same effective batch), or shard (accelerate config with "
                             "DeepSpeed ZeRO-2 or FSDP, see examples/accelerate/).")


def half_dtype(config: Any) -> torch.dtype | None:
    """The half dtype of a mixed-precision run, None for a float32 one; `auto` is planned as bf16 (LPO picks fp16
    on CUDA for the UNets: the same 2 bytes, cast at the same places)."""
    if config.mixed_precision == "fp16":
        return torch.float16
    return torch.bfloat16 if config.mixed_precision in ("bf16", "auto") else None


def device_type(config: Any) -> str:
    """Whose autocast rules the run follows: the CPU's for `--device cpu`, else CUDA's."""
    return "cpu" if str(config.device).startswith("cpu") else "cuda"


def train_as_run(denoiser: nn.Module, lora_targets: tuple[str, ...] | None, half: torch.dtype | None) -> None:
    """Make the meta denoiser's weights what a run trains and holds, so its trace keeps what the run's keeps: under a
    LoRA the base is frozen in the run's dtype and the targeted layers' inputs are kept (a trained weight stands in
    for each adapter, whose own rank-r tensors are negligible); under full fine-tuning every weight trains in float32
    (autocast casts it)."""
    if lora_targets is None:
        denoiser.requires_grad_(True)
        return
    if half is not None:
        nn.Module.to(denoiser, half)  # (diffusers' own `to` warns about modules kept in float32: these have none)
    denoiser.requires_grad_(False)
    for layer in lora_layers(denoiser, lora_targets):
        layer.weight.requires_grad_(True)


def _meta(build: Callable[[], nn.Module]) -> nn.Module:
    with init_empty_weights(include_buffers=True):
        return build()


def lrm_plan(config: Any, family: Any, train_pairs: int, images: int, processes: int | None, sharding: str) -> Plan:
    """The plan of `lpo reward train`: the reward model on the meta device, one training micro-step traced."""

    world, sharding = launch_setup(processes, sharding)
    check_time_settings(config)
    model = meta_lrm(family, config.base, config.vae, config.depth, config.multi_scale, config.vfe_scale,
                     config.vfe_down, config.resolution)
    resolution = model.config.resolution
    trained, frozen = count(model)
    # frozen parts the reward model holds outside its module (SD3's text encoders), on every process
    externals = [component_module(part) for part in model.backbone.external_components().values()]
    frozen += sum(p.numel() for part in externals for p in part.parameters())
    buffers = buffer_elements(model) + sum(buffer_elements(part) for part in externals)
    half = half_dtype(config)
    latents = 2 * config.batch_size * (2 if config.vfe_scale != 1.0 else 1)  # both images; VFE doubles the batch
    traced = trace(model.backbone, lambda: model.backbone.trace(latents, model.config.latent_shape),
                   config.gradient_checkpointing, half, device_type(config))
    forward = traced.flops
    effective = config.batch_size * config.grad_accum * world
    per_update = 3 * forward / config.batch_size * effective  # every weight trains; `forward` ran one micro-batch
    plan = Plan(f"lpo reward train --dry-run: {family.title} LRM, {world} process(es), sharding {sharding}")
    plan.add("base", config.base)
    plan.add("resolution / latent", f"{resolution} px / {list(model.config.latent_shape)}")
    # the frozen parts (SD3's and FLUX's text encoders) are loaded in the run's half precision
    memory_rows(plan, trained, frozen, 2 if half else 4, world, sharding, traced, config.gpu_memory_gb, buffers,
                device_type(config))
    plan.add("micro-batch per process", f"{config.batch_size} pairs ({latents} latents through the "
                                        f"{family.denoiser})")
    plan.add("effective batch", f"{config.batch_size} x {config.grad_accum} accumulation x {world} = {effective} "
                                "pairs")
    plan.add("optimizer updates", f"{config.max_steps} ({config.max_steps * effective / max(train_pairs, 1):.2f} "
                                  f"epochs of {train_pairs:,} pairs)")
    plan.add("gradient checkpointing", "on" if config.gradient_checkpointing else "off")
    plan.add("FLOPs of one LRM forward (one latent)", flops(forward / latents))
    plan.add("training FLOPs per update (3x the forward, every latent of the effective batch)", flops(per_update))
    time_rows(plan, per_update * config.max_steps, world, config)
    latent_bytes = 2 * 2 * int(torch.Size(model.config.latent_shape).numel())  # mean and std, float16
    plan.add("images to encode", f"{images:,} (those not in the cache yet)")
    plan.add("latent cache on disk", size(images * latent_bytes))
    return plan


def meta_lrm(family: Any, base: str, vae: str | None = None, depth: int | None = None, multi_scale: bool = True,
             vfe_scale: float = 7.5, vfe_down: bool = False, resolution: int | None = None) -> LatentRewardModel:
    """The LRM `lpo reward train` would build from `base` (reading images of side `resolution`, default the base's
    own), on the meta device (from its configs alone); its `save_config(folder)` writes a config-only LRM that
    `--dry-run` plans read as the trained one."""
    backbone_class = family.lrm_backbone
    components = backbone_class.components_from_base(base)
    native = pixel_resolution(components[family.denoiser], base, vae)

    def build() -> LatentRewardModel:
        backbone = backbone_class.from_components(components, native, depth, base)
        latent_shape = latent_shape_at(backbone, family, base, resolution)
        width = backbone.text_width if backbone.text_projected else backbone.projection_dim
        return LatentRewardModel(family=family.name, base=base, taps=backbone.default_taps(), projection_dim=width,
                                 resolution=backbone.resolution, components=components, multi_scale=multi_scale,
                                 vfe_scale=vfe_scale, vfe_down=vfe_down, latent_shape=latent_shape,
                                 depth=backbone.depth, backbone=backbone)

    return _meta(build)


def lora_layers(denoiser: nn.Module, targets: tuple[str, ...]) -> list[nn.Linear]:
    """The Linear layers a LoRA on `targets` (PEFT's names: a layer's name or its last parts) adapts."""
    return [module for name, module in denoiser.named_modules()
            if isinstance(module, nn.Linear) and any(name == t or name.endswith(f".{t}") for t in targets)]


def lora_parameters(denoiser: nn.Module, targets: tuple[str, ...], rank: int) -> int:
    """Parameters of a rank-`rank` LoRA on the Linear layers named by `targets`: r x (in + out) each."""
    return sum(rank * (module.in_features + module.out_features) for module in lora_layers(denoiser, targets))


def component_module(part: dict[str, Any]) -> nn.Module:
    """A pipeline component (a diffusers or transformers model) built from its config on the meta device."""

    if "_class_name" in part:
        return _meta(lambda: getattr(diffusers, part["_class_name"]).from_config(part))
    architecture = (part.get("architectures") or ["CLIPTextModel"])[0]
    config_class = getattr(transformers, architecture).config_class
    return _meta(lambda: getattr(transformers, architecture)(config_class.from_dict(part)))


def buffer_elements(module: nn.Module) -> int:
    """Elements of the module's floating-point buffers (fixed tables such as SD3's sin-cos position embedding: 226M
    in SD3.5's transformer, 0.45 GB in half precision), which a parameter count leaves out."""
    return sum(b.numel() for b in module.buffers() if b.is_floating_point())


def _frozen_parts(config: Any, family: Any) -> tuple[int, int]:
    """(parameters, buffer elements) of what LPO keeps frozen besides the denoiser: text encoders, VAE, and the
    local LRM with the text encoders it loads for itself."""

    parts = []
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae"):
        try:
            parts.append(component_module(read_subfolder_config(config.base, name)))
        except InputError:
            continue  # the pipeline has no such component
    if config.lrm is not None:
        lrm_config = {k: v for k, v in read_lrm_config(config.lrm).items() if not k.startswith("_")}
        lrm = _meta(lambda: LatentRewardModel(**lrm_config))
        parts += [lrm, *(component_module(part) for part in lrm.backbone.external_components().values())]
    return (sum(p.numel() for part in parts for p in part.parameters()),
            sum(buffer_elements(part) for part in parts))


def lpo_plan(config: Any, family: Any, objective: Any, rounds_per_epoch: Callable[[int], int],
             processes: int | None, sharding: str) -> Plan:
    """The plan of `lpo optimize <family>`: the denoiser on the meta device, one training forward traced;
    `objective` the run's (its forwards per item), `rounds_per_epoch(processes)` the trainer's."""

    world, sharding = launch_setup(processes, sharding)
    check_time_settings(config)
    if sharding == "fsdp":
        raise InputError("lpo optimize does not run under FSDP (its sampler runs the policy outside the training "
                         "wrapper); plan it with --sharding none or zero2.")
    denoiser_config = read_subfolder_config(config.base, family.denoiser)
    denoiser = _meta(lambda: getattr(diffusers, denoiser_config["_class_name"]).from_config(denoiser_config))
    total = sum(p.numel() for p in denoiser.parameters())
    if config.lora_rank > 0:
        trained, frozen = lora_parameters(denoiser, family.lora_targets, config.lora_rank), total
    else:
        trained, frozen = total, total  # full fine-tuning: the reference is a frozen copy
    frozen_parts, buffers = _frozen_parts(config, family)
    frozen += frozen_parts
    buffers += buffer_elements(denoiser) * (1 if config.lora_rank > 0 else 2)  # full fine-tuning: a reference copy
    half = half_dtype(config)
    cfg = family.generator.classifier_free and config.guidance != 1.0
    batch = config.train_batch_size * (2 if cfg else 1)  # CFG runs both halves in one batch
    native = pixel_resolution(denoiser_config, config.base)
    side = latent_side_at(config.base, config.resolution or native)  # where the policy samples and the LRM scores
    train_as_run(denoiser, family.lora_targets if config.lora_rank > 0 else None, half)
    traced = trace(denoiser, lambda: family.generator.trace(denoiser, batch, side),
                   bool(config.gradient_checkpointing), half, device_type(config))
    forward = traced.flops
    plan = Plan(f"lpo optimize {family.name} --dry-run: {world} process(es), sharding {sharding}")
    plan.add("base", config.base)
    plan.add("resolution", f"{config.resolution or native} px")
    memory_rows(plan, trained, frozen, 2 if half else 4, world, sharding, traced, config.gpu_memory_gb, buffers,
                device_type(config), traced_weights_train=config.lora_rank == 0)
    per_epoch = rounds_per_epoch(world)
    plan.add("LoRA", f"rank {config.lora_rank} on {', '.join(family.lora_targets)}" if config.lora_rank else
             "none: the whole denoiser is trained")
    plan.add("micro-batch per process", f"{config.train_batch_size} tuples ({batch} latents through the denoiser)")
    plan.add("sampling per round", f"{config.sample_batch_size} prompts x {world} processes, {config.steps} steps, "
                                   f"K = {config.candidates}")
    plan.add("rounds", f"{per_epoch} per epoch x {config.epochs} epochs = {per_epoch * config.epochs}")
    plan.add("gradient checkpointing", "on" if config.gradient_checkpointing else "off")
    rounds = per_epoch * config.epochs
    per_round = round_flops(config, forward / batch * (2 if cfg else 1), lrm_forward(config, side), objective)
    plan.add("FLOPs of one denoiser forward (one latent, both CFG halves)",
             flops(forward / batch * (2 if cfg else 1)))
    plan.add("sampling FLOPs per round and process", flops(per_round["sampling"]))
    plan.add("training FLOPs per round and process" + (" (at most: every step's pair passes the threshold)"
                                                      if config.objective == "lpo" else ""),
             flops(per_round["training"]))
    time_rows(plan, (per_round["sampling"] + per_round["training"]) * rounds * world, world, config)
    return plan


def lrm_forward(config: Any, side: int | None = None) -> float:
    """FLOPs of the local LRM's scoring of one latent of side `side` (default: the side the LRM was trained at), twice
    with its feature guidance; 0 for a served LRM."""
    if config.lrm is None:
        return 0.0
    lrm_config = {k: v for k, v in read_lrm_config(config.lrm).items() if not k.startswith("_")}
    lrm = _meta(lambda: LatentRewardModel(**lrm_config))
    guided = 2 if lrm.config.vfe_scale != 1.0 else 1
    channels, *own = lrm.config.latent_shape
    return guided * forward_flops(lambda: lrm.backbone.trace(1, [channels, side, side] if side else [channels, *own]))


def round_flops(config: Any, denoiser: float, lrm: float, objective: Any) -> dict[str, float]:
    """FLOPs of one round on one process: `denoiser` is one denoiser forward on one latent with both CFG halves,
    `lrm` the LRM's score of one latent (see the module docstring)."""
    items = config.sample_batch_size * config.steps  # LPO: at most one tuple per step; GRPO: one group per step
    backward = 1 if config.lora_rank > 0 else 2
    return {"sampling": config.sample_batch_size * config.steps * (denoiser + config.candidates * lrm),
            "training": items * denoiser * (objective.forwards(config) + backward)}
