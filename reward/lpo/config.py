"""Configs of `lpo optimize <family>` and `lpo sample` (light imports only, so `lpo --help` stays fast)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from lpo.core.config import option
from lpo.core.errors import InputError
from lpo.core.refs import REVISION_HELP, VARIANT_HELP, pin_base
from lpo.reward.backbones import get_family

BETA_SCHEDULES = ("constant", "kappa")  # --beta-schedule
THRESHOLD_SCALES = ("std", "sigma")  # --threshold-scale
# The help of a field whose default is the family's: `lpo optimize <family> --help` shows that family's value instead
# (`family_helps`), so each family's command prints its own defaults from the one `Family.lpo_defaults` record.
FAMILY_DEFAULT = "Default: the family's."


def check_calibration(beta_schedule: str, threshold_scale: str, prefix: str = "") -> None:
    """Refuse (InputError) an unknown beta schedule or threshold scale; `prefix` names the options (`lpo-` for the
    demo's)."""

    if beta_schedule not in BETA_SCHEDULES or threshold_scale not in THRESHOLD_SCALES:
        raise InputError(f"--{prefix}beta-schedule is {' or '.join(BETA_SCHEDULES)}; --{prefix}threshold-scale is "
                         f"{' or '.join(THRESHOLD_SCALES)}.")


def _shown(value: object) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def family_helps(family: str) -> dict[str, str]:
    """The help of each LPOConfig field whose default is the family's, with `family`'s value in it."""

    record = get_family(family)
    defaults = dict(record.lpo_defaults)
    if record.thresholds_by_resolution:  # by the image side: the nearest side's
        defaults["threshold"] = "; ".join(f"{_shown(v)} at {side} px" for side, v in
                                          sorted(record.thresholds_by_resolution.items())) + ", the nearest side's"
    helps = {}
    for f in dataclasses.fields(LPOConfig):
        text = f.metadata.get("help", "")
        if FAMILY_DEFAULT in text:
            if f.name not in defaults:
                raise KeyError(f"LPOConfig.{f.name} says its default is the family's, but {family} sets none")
            helps[f.name] = text.replace(FAMILY_DEFAULT, f"(default for {family}: {_shown(defaults[f.name])})")
    return helps


@dataclass
class LPOConfig:
    family: str = option("sd15", "Base model family (`lpo optimize <family>`): sd15 (SD1.x/2.x), sdxl, sd3 "
                                 "(SD3/SD3.5) or flux (FLUX.1).")
    base: str = option(None, "Diffusers pipeline to fine-tune (hub id or local directory).")
    revision: str | None = option(None, REVISION_HELP)
    variant: str | None = option(None, VARIANT_HELP)
    lrm: Path = option(None, "Latent reward model of the same latent space as --base: a folder or run "
                             "directory of `lpo reward train`, or a hub id.")
    reward_url: str | None = option(None, "Use the LRM of a running `lpo reward serve` at this URL instead of "
                                          "--lrm (token from LPO_REWARD_TOKEN).")
    prompts: Path = option(None, "Training prompts: .txt (one per line), .json list, or a manifest with `caption`.")
    out: Path = option(None, "Run directory: checkpoints, validation grids, the LoRA (or full UNet) output.")
    objective: str = option("lpo", "lpo: one winner/loser pair per step whose LRM softmax gap passes --threshold "
                                   "(the paper's method); grpo: step-wise GRPO, every trained step's K children "
                                   "with group z-score advantages, a PPO clip (--clip-eps) and --grpo-kl.")
    epochs: int = option(5, "Passes over the prompts.")
    sample_batch_size: int | None = option(None, f"Prompts per process per sampling round. {FAMILY_DEFAULT}")
    train_batch_size: int | None = option(None, "Preference tuples (GRPO: groups) per process per optimizer step. "
                                                f"{FAMILY_DEFAULT}")
    candidates: int = option(4, "K: children sampled from each x_t and scored by the LRM.")
    steps: int = option(20, "Sampler steps per trajectory.")
    resolution: int | None = option(None, "Image side in pixels to sample and train at (default: the pipeline's own: "
                                          "SD1.5 512, SDXL 1024, SD3.5-Medium 1024, FLUX.1-dev 1024).")
    guidance: float | None = option(None, "Guidance in sampling and in the loss: classifier-free (sd15, sdxl, sd3) "
                                          f"or FLUX.1's embedded guidance (flux). {FAMILY_DEFAULT}")
    sampler: str | None = option(None, "The stochastic step: ddim (sd15, sdxl); for sd3 and flux cps (the "
                                       "coefficients-preserving step: a child sits at its nominal noise level) or "
                                       "sde (Flow-GRPO's SDE). A flow sampler's last step, to sigma 0, is "
                                       f"deterministic. {FAMILY_DEFAULT}")
    eta: float | None = option(None, "Step noise: DDIM eta (sd15, sdxl) or the flow step's noise level a (sd3, "
                                     "flux); must be > 0, the step must be stochastic to have a likelihood. "
                                     f"{FAMILY_DEFAULT}")
    beta: float = option(500.0, "LPO: DPO inverse temperature on the log-ratio difference (per latent element: with "
                                "--logprob-reduction sum it is divided by the element count).")
    beta_schedule: str | None = option(None, "LPO: constant (one beta and one ratio clamp for every step, the "
                                             "paper's) or kappa (each step's log-ratio divided by its kappa / the "
                                             "median kappa of the trained steps before the clamp and beta, kappa = "
                                             "|d mean / d model output| / std: a unit change of the model's output "
                                             f"then weighs the same at every step). {FAMILY_DEFAULT}")
    clip_eps: float = option(0.1, "Ratio clip: LPO clamps r = p_theta / p_ref to [1 - eps, 1 + eps]; GRPO clips "
                                  "r = p_theta / p_sampling there (PPO).")
    grpo_kl: float = option(0.1, "GRPO: weight of the exact KL of the policy's step to the reference's (mean over "
                                 "latent elements of (mean - mean_ref)^2 / (2 std^2); 0 skips the reference "
                                 "forward). Flow-GRPO's KL is this times the step's -dt, so its weights mean 4-55x "
                                 "less than the same number here.")
    grpo_filter: bool = option(False, "GRPO: train only the groups whose best and worst child pass LPO's "
                                      "--threshold (the rest carry little signal).")
    threshold: list[float] | None = option(None, "LPO's softmax-gap thresholds at the least and the noisiest step. "
                                                 f"{FAMILY_DEFAULT}")
    threshold_scale: str | None = option(None, "What the thresholds are linear in between the least and the noisiest "
                                         "trained step: std (the step's std, the paper's) or sigma (the forward "
                                         "process's noise share at the step: sigma for flow models, "
                                         f"sqrt(1 - alphas_cumprod) for DDPM). {FAMILY_DEFAULT}")
    score_timestep: str = option("parent", "Timestep the LRM scores a child at: parent (reference) or child.")
    logprob_reduction: str = option("mean", "Reduce the step log-density over latent elements: mean (reference) "
                                            "or sum (the sample's likelihood; the ratio clip then bounds it; LPO "
                                            "only: GRPO's clip and KL weight are per element).")
    lora_rank: int | None = option(None, "LoRA rank on attention q/k/v/out (sd3 and flux: both streams, flux also "
                                         f"the MLPs); 0 = full fine-tuning. {FAMILY_DEFAULT}")
    lora_alpha: float | None = option(None, "LoRA alpha, the update's scale being alpha / rank (default: the rank, "
                                            "scale 1, the reference's; Flow-GRPO and diffusers' scripts use 2 x "
                                            "rank). Saved with the LoRA, so `load_lora_weights` applies it.")
    lora_single_stream: bool = option(False, "flux: also adapt the single-stream blocks' MLP projections (proj_mlp, "
                                             "proj_out; not the model's output head).")
    detach_uncond: bool = option(False, "CFG families: stop the gradient through the unconditional half of the "
                                        "training forward (Flow-GRPO does; the reference LPO code trains both).")
    lr: float | None = option(None, f"AdamW learning rate. {FAMILY_DEFAULT}")
    weight_decay: float = option(1e-4, "AdamW weight decay.")
    max_grad_norm: float = option(1.0, "Gradient clipping that really clips (the reference runs had it silently "
                                       "off); 0 disables.")
    mixed_precision: str = option("auto", "auto (on CUDA fp16, flux bf16; none on CPU), no, fp16, bf16.")
    gradient_checkpointing: bool | None = option(None, f"Gradient checkpointing in the denoiser. {FAMILY_DEFAULT}")
    save_every_rounds: int = option(0, "Also save_state every N sampling rounds (0: only each epoch).")
    validation_prompts: list[str] = option(help="Prompts of the per-epoch validation grid (default: the first "
                                                "3 training prompts).", factory=list)
    validation_images: int = option(2, "Images per validation prompt (0: no per-epoch validation grid).")
    merge: bool = option(False, "Also write the full denoiser with the LoRA merged in (out/merged_unet or "
                                "out/merged_transformer).")
    monitor: bool = option(True, "Held-out monitor: at the start and every --monitor-every rounds, sample held-out "
                                 "prompts with fixed seeds and score them with independent metrics and the LRM "
                                 "(OUT/monitor.jsonl, OUT/monitor.png); keep the best check in OUT/best and stop "
                                 "a run whose held-out metrics fall while its reward rises (--stop-patience).")
    monitor_every: int = option(0, "Rounds between monitor checks (0: once per epoch).")
    monitor_prompts: Path | None = option(None, "Held-out prompts of the monitor (a prompt file); default: up to "
                                                "--monitor-held-out training prompts, one in ten at most, drawn "
                                                "(seeded) out of training.")
    monitor_held_out: int = option(32, "Training prompts held out for the monitor when --monitor-prompts is not "
                                       "given.")
    monitor_images: int = option(2, "Images per held-out prompt at each check (fixed seeds, eta 0).")
    monitor_metrics: list[str] | None = option(None, "Independent metrics of the monitor, from the metric registry "
                                                     "(default: pickscore,hpsv21, each where its weights can be "
                                                     "had; named here, each must load).")
    monitor_models: dict[str, str] = option(help="A monitor metric's model (a folder or hub id).", factory=dict)
    monitor_models_dir: Path | None = option(None, "Folder with one model folder per monitor metric "
                                                   "(<dir>/<metric>), as `lpo eval --models-dir`.")
    stop_patience: int = option(3, "Stop after this many bad monitor checks in a row (held-out metrics fell while "
                                   "the LRM reward rose, or more than --stop-margin below their best); 0: never.")
    stop_margin: float = option(0.1, "How far below its best the held-out score may fall before a check counts as "
                                      "bad, in per-image standard deviations of the first check's scores.")
    stop_noise: float = option(2.0, "How many standard errors of the paired per-image change (the same prompts and "
                                    "seeds at every check) a fall must also exceed to count, below the previous "
                                    "check or below the best (0: every fall counts).")
    preflight: bool | None = option(None, "Pre-flight checks on the first round's rollout before any update (stored "
                                          "dtypes, the on-policy ratio, the LoRA's reach, the steps that pass the "
                                          "threshold, the run's time): --preflight runs them and stops, "
                                          "--no-preflight trains without them; default: check, then train.")
    seed: int = option(42, "Seed for prompt order, sampling noise and child choice.")
    resume: bool = option(False, "Continue from the latest checkpoint in --out.")
    log_with: list[str] = option(help="accelerate trackers (tensorboard, wandb, ...).", factory=list)
    device: str = option("auto", "auto, cpu or cuda (under accelerate launch, each process's own).")
    timeout_minutes: float = option(120.0, "Process-group timeout under accelerate launch.")
    dry_run: bool = option(False, "Print the plan per process (parameters, memory, batch, rounds) from the configs "
                                  "alone, and stop: no weights read, nothing sampled.")
    processes: int | None = option(None, "--dry-run: processes to plan for (default: accelerate launch's, else 1).")
    sharding: str = option("auto", "--dry-run: none or zero2 to plan for (default: accelerate launch's; LPO does not "
                                   "run under FSDP).")
    gpu_memory_gb: float = option(80.0, "--dry-run: warn when the estimate per process exceeds this.")
    gpu: str = option("a100", "--dry-run: GPU the time is planned on: a100, h100 or h200 (dense bf16 peaks 312, 989 "
                              "and 989 TFLOP/s).")
    mfu: float = option(0.3, "--dry-run: model-FLOPs utilisation assumed for the GPU-hours: the share of the GPU's "
                             "peak the run achieves.")

    def __post_init__(self) -> None:
        pin_base(self)

    def resolved(self) -> LPOConfig:
        """A copy with the family's defaults filled in where a field is left at None."""

        defaults = get_family(self.family).lpo_defaults
        return dataclasses.replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})


@dataclass
class GenerationOptions:
    """The options an image is generated with, besides its prompt and seed, declared once for every command that
    generates (`lpo sample`, `lpo eval`); `lpo.reward.lpo.generation` checks them and loads the generator."""

    base: str = option(None, "Diffusers pipeline of a supported family (SD1.x/2.x, SDXL, SD3/SD3.5, FLUX.1; hub id "
                             "or local directory) to generate with.")
    revision: str | None = option(None, REVISION_HELP)
    variant: str | None = option(None, VARIANT_HELP)
    lora: Path | None = option(None, "A LoRA to load into the pipeline: `lpo optimize`'s out/lora (or its run "
                                        "directory).")
    denoiser: str | None = option(None, "A fine-tuned UNet or transformer in place of the base's: a folder saved "
                                        "with save_pretrained, a pipeline folder or `lpo optimize --merge`'s run "
                                        "directory, a hub id, or owner/repo/sub/folder (a folder inside a hub "
                                        "repository, e.g. casiatao/LPO/lpo_sd15_merge/unet).")
    lrm: Path | None = option(None, "Latent reward model for LRM-guided sampling (with --candidates K > 1): a "
                                       "folder or run directory of `lpo reward train`, or a hub id.")
    candidates: int = option(1, "K: candidates per step for LRM-guided sampling (continue from the best).")
    steps: int = option(20, "Sampler steps (DDIM for sd15/sdxl, the flow-matching step for sd3/flux).")
    resolution: int | None = option(None, "Image side in pixels (default: the pipeline's own).")
    guidance: float | None = option(None, "Guidance scale (default: the family's LPO value: CFG sd15/sdxl 5.0, sd3 "
                                          "4.5; FLUX.1's embedded guidance 3.5; the reference used CFG 7.5 for the "
                                          "SD1.5 base and Diffusion-DPO-1.5).")
    sampler: str | None = option(None, "The stochastic step where eta > 0: ddim (sd15, sdxl); cps (default) or sde "
                                       "(sd3, flux). A flow sampler's last step is deterministic.")
    eta: float | None = option(None, "Step noise: DDIM eta or the flow step's noise level (default: 0.0, as the "
                                     "reference; with --lrm, which needs a stochastic step, the family's LPO value: "
                                     "sd15/sdxl 1.0, sd3 0.7, flux 0.9).")

    def __post_init__(self) -> None:
        pin_base(self)


@dataclass
class SampleConfig(GenerationOptions):
    prompts: list[str] = option(help="Prompts to generate.", factory=list)
    out: Path = option(None, "Directory for the images and samples.json.")
    images_per_prompt: int = option(1, "Images per prompt; image i of prompt p uses seed + 1000 * p + i.")
    score_timestep: str = option("parent", "Timestep the LRM scores candidates at: parent or child.")
    seed: int = option(42, "Base seed (the default of `lpo eval` and the trainers too: a prompt index and seed give "
                           "`lpo eval`'s image).")
    device: str = option("auto", "auto, cpu or cuda.")
