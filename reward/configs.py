"""Config dataclasses of the `lpo reward` commands (light imports only, so `lpo --help` stays fast)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from curate.config import option

CANDIDATE_TIMESTEPS = list(range(1, 952, 50))
EVAL_TIMESTEPS = (1, 251, 501, 751, 951)


@dataclass
class RewardTrainConfig:
    manifest: Path = option(None, "Kept pairs to train on: filtered.parquet from `lpo curate filter`.")
    base: str = option(None, "Diffusers SD1.x/2.x or SDXL pipeline (hub id or local directory) to build the LRM from.")
    out: Path = option(None, "Run directory: checkpoints, latent cache, best/ and last/ exports, logs.")
    val_manifest: Path | None = option(None, "Validation pairs (e.g. filtered from validation_unique); default: "
                                             "hold out --val-fraction of the captions of --manifest.")
    val_fraction: float = option(0.05, "Share of captions held out for validation when no --val-manifest is given.")
    vae: str | None = option(None, "VAE to encode images with (default: the base's vae/; for SDXL the paper used "
                                   "madebyollin/sdxl-vae-fp16-fix).")
    timesteps: list[int] = option(help="Candidate timesteps, one drawn uniformly per pair.",
                                  factory=lambda: list(CANDIDATE_TIMESTEPS))
    eval_timesteps: list[int] = option(help="Timesteps of the validation accuracy.", factory=lambda: [1, 251, 501, 751,
                                                                                                       951])
    select_timestep: int = option(1, "Validation timestep whose accuracy picks the best checkpoint.")
    batch_size: int = option(16, "Pairs per process per micro-step.")
    grad_accum: int = option(1, "Micro-steps per optimizer update.")
    max_steps: int = option(4000, "Optimizer updates.")
    lr: float = option(1e-5, "AdamW learning rate.")
    weight_decay: float = option(0.3, "AdamW weight decay.")
    warmup_steps: int = option(500, "Linear warmup updates, then linear decay to 0 at max_steps.")
    max_grad_norm: float = option(1.0, "Gradient clipping norm (0 disables).")
    mixed_precision: str = option("auto", "auto (bf16 on CUDA, none on CPU), no, bf16, fp16.")
    gradient_checkpointing: bool = option(False, "Trade compute for memory in the UNet and text encoders.")
    multi_scale: bool = option(True, "Pool the down-block taps as well as the mid block.")
    vfe_scale: float = option(7.5, "Visual Feature Enhancement guidance on the mid feature (1 disables).")
    vfe_down: bool = option(False, "Also guide the down-block features.")
    text_projection_init: str | None = option("openai/clip-vit-large-patch14", "CLIP model whose text projection "
                                              "initialises the SD1.x/2.x one ('' for random).")
    init: str = option("diffusion", "Backbone init: diffusion (the base's trained UNet and text encoder, as the "
                                    "paper) or random (the same architecture with fresh weights, for ablations).")
    eval_every: int = option(100, "Validate every N updates.")
    save_every: int = option(500, "save_state every N updates.")
    keep_checkpoints: int = option(2, "How many save_state checkpoints to keep.")
    seed: int = option(42, "Seed for init, data order, timesteps and noise.")
    resume: bool = option(False, "Continue from the latest checkpoint in --out.")
    log_with: list[str] = option(help="accelerate trackers (tensorboard, wandb, ...).", factory=list)
    device: str = option("auto", "auto, cpu or cuda (under accelerate launch, each process's own).")


@dataclass
class RewardEvalConfig:
    lrm: Path = option(None, "Latent reward model directory (from `lpo reward train`).")
    manifest: Path = option(None, "Pairs manifest to evaluate on (filtered.parquet, or a curation dir's "
                                  "pairs.parquet).")
    out: Path | None = option(None, "Where to write accuracy.json and accuracy.png (default: next to the LRM).")
    timesteps: list[int] = option(help="Timesteps to evaluate.", factory=lambda: list(EVAL_TIMESTEPS))
    seed: int = option(1234, "Noise seed (the same seed gives the same noise for every model).")
    batch_size: int = option(32, "Pairs per forward.")
    device: str = option("auto", "Device: auto, cpu, cuda.")


# Per-family defaults of the released LPO runs (method: section 9.2), applied where a field is left at None.
LPO_FAMILY_DEFAULTS = {
    "sd15": {"lora_rank": 4, "lr": 6e-5, "threshold": [0.35, 0.5], "sample_batch_size": 5, "train_batch_size": 10,
             "gradient_checkpointing": False},
    "sdxl": {"lora_rank": 64, "lr": 1e-5, "threshold": [0.45, 0.6], "sample_batch_size": 4, "train_batch_size": 4,
             "gradient_checkpointing": True},
}


@dataclass
class LPOConfig:
    family: str = option("sd15", "Base model family: sd15 (SD1.x/2.x) or sdxl.")
    base: str = option(None, "Diffusers pipeline to fine-tune (hub id or local directory).")
    lrm: Path = option(None, "Latent reward model directory (from `lpo reward train`), same latent space as --base.")
    reward_url: str | None = option(None, "Use the LRM of a running `lpo reward serve` at this URL instead of "
                                          "--lrm (token from LPO_REWARD_TOKEN).")
    prompts: Path = option(None, "Training prompts: .txt (one per line), .json list, or a manifest with `caption`.")
    out: Path = option(None, "Run directory: checkpoints, validation grids, the LoRA (or full UNet) output.")
    epochs: int = option(5, "Passes over the prompts.")
    sample_batch_size: int | None = option(None, "Prompts per process per sampling round (sd15 5, sdxl 4).")
    train_batch_size: int | None = option(None, "Preference tuples per optimizer step (sd15 10, sdxl 4).")
    candidates: int = option(4, "K: children sampled from each x_t and scored by the LRM.")
    steps: int = option(20, "DDIM steps per trajectory.")
    guidance: float = option(5.0, "Classifier-free guidance in sampling and in the loss.")
    eta: float = option(1.0, "DDIM eta (must be > 0: the step must be stochastic to have a likelihood).")
    beta: float = option(500.0, "DPO inverse temperature on the log-ratio difference.")
    clip_eps: float = option(0.1, "Ratio clip: r is clamped to [1 - eps, 1 + eps].")
    threshold: list[float] | None = option(None, "Softmax-gap threshold range [least noisy, noisiest step], "
                                                 "interpolated on the step's sigma (sd15 0.35,0.5; sdxl 0.45,0.6).")
    score_timestep: str = option("parent", "Timestep the LRM scores a child at: parent (reference) or child.")
    logprob_reduction: str = option("mean", "Reduce the step log-density over latent elements: mean (reference) "
                                            "or sum.")
    lora_rank: int | None = option(None, "LoRA rank on attention q/k/v/out (sd15 4, sdxl 64); 0 = full fine-tuning.")
    lr: float | None = option(None, "AdamW learning rate (sd15 6e-5, sdxl 1e-5).")
    weight_decay: float = option(1e-4, "AdamW weight decay.")
    max_grad_norm: float = option(1.0, "Gradient clipping that really clips (the reference runs had it silently "
                                       "off); 0 disables.")
    mixed_precision: str = option("auto", "auto (fp16 on CUDA, none on CPU), no, fp16, bf16.")
    gradient_checkpointing: bool | None = option(None, "Gradient checkpointing in the UNet (sd15 off, sdxl on).")
    save_every_rounds: int = option(0, "Also save_state every N sampling rounds (0: only each epoch).")
    validation_prompts: list[str] = option(help="Prompts of the per-epoch validation grid (default: the first "
                                                "3 training prompts).", factory=list)
    validation_images: int = option(2, "Images per validation prompt.")
    merge: bool = option(False, "Also write a full UNet with the LoRA merged in (out/merged_unet).")
    seed: int = option(42, "Seed for prompt order, sampling noise and child choice.")
    resume: bool = option(False, "Continue from the latest checkpoint in --out.")
    log_with: list[str] = option(help="accelerate trackers (tensorboard, wandb, ...).", factory=list)
    device: str = option("auto", "auto, cpu or cuda (under accelerate launch, each process's own).")

    def resolved(self) -> LPOConfig:
        """A copy with the family defaults filled in."""
        import dataclasses

        defaults = LPO_FAMILY_DEFAULTS[self.family]
        return dataclasses.replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})


@dataclass
class SampleConfig:
    base: str = option(None, "Diffusers pipeline (hub id or local directory).")
    prompts: list[str] = option(help="Prompts to generate.", factory=list)
    out: Path = option(None, "Directory for the images and samples.json.")
    lora: Path | None = option(None, "A LoRA directory to load into the pipeline (e.g. `lpo optimize`'s out/lora).")
    lrm: Path | None = option(None, "Latent reward model for guided sampling (with --candidates K > 1).")
    candidates: int = option(1, "K: candidates per step for LRM-guided sampling (continue from the best).")
    images_per_prompt: int = option(1, "Images per prompt; image i of prompt p uses seed + 1000 * p + i.")
    steps: int = option(20, "DDIM steps.")
    guidance: float = option(5.0, "Classifier-free guidance scale.")
    eta: float | None = option(None, "DDIM eta (default: 1.0 with --lrm, which needs a stochastic step; 0.0 without).")
    score_timestep: str = option("parent", "Timestep the LRM scores candidates at: parent or child.")
    seed: int = option(0, "Base seed.")
    device: str = option("auto", "auto, cpu or cuda.")


# ---------------------------------------------------------------------------------------------------------------
# lpo eval (metric names live in curate.eval_metrics, which imports nothing heavy)

EVAL_METRICS_HELP = "Comma-separated metrics, from: pickscore, hpsv2, hpsv21, imagereward, aesthetic, clip, vqa."


def _default_eval_metrics() -> list[str]:
    from curate.eval_metrics import DEFAULT_EVAL_METRICS

    return list(DEFAULT_EVAL_METRICS)


@dataclass
class EvalConfig:
    base: str = option(None, "Diffusers SD1.x/2.x or SDXL pipeline (hub id or local directory) to generate with.")
    prompts: Path = option(None, "Prompts: .txt, .json, a manifest with `caption` or a curation directory (e.g. "
                                 "`lpo curate ingest ID --split validation_unique --out DIR`).")
    out: Path = option(None, "Run directory: images/, images.parquet, summary.json, summary.md, grid.png.")
    lora: Path | None = option(None, "A LoRA directory to load into the pipeline (e.g. `lpo optimize`'s out/lora).")
    lrm: Path | None = option(None, "Latent reward model for LRM-guided sampling (with --candidates K > 1).")
    candidates: int = option(1, "K: candidates per step for LRM-guided sampling.")
    metrics: list[str] = option(help=EVAL_METRICS_HELP, factory=_default_eval_metrics)
    models: dict[str, str] = option(help="Model per metric (hub id or local directory); unset metrics use the "
                                         "registry default.", factory=dict)
    models_dir: Path | None = option(None, "A directory with one model folder per metric (as `lpo dev tiny-models` "
                                           "writes); used for metrics without an explicit model.")
    reward_url: str | None = option(None, "Score the metrics that a running `lpo reward serve` at this URL serves "
                                          "there (and guide with its LRM when --candidates > 1 and no --lrm).")
    images_per_prompt: int = option(4, "Images per prompt; image i of prompt p uses seed + 1000 * p + i.")
    max_prompts: int | None = option(None, "Use only the first N prompts (default: all).")
    steps: int = option(20, "DDIM steps.")
    guidance: float = option(5.0, "Classifier-free guidance scale (the reference used 7.5 for the SD1.5 base and "
                                  "Diffusion-DPO-1.5, 5.0 otherwise).")
    eta: float | None = option(None, "DDIM eta (default: 0.0, as the reference; 1.0 with --lrm).")
    seed: int = option(42, "Base seed.")
    batch_size: int = option(4, "Images per generation batch (a seed gives the same image in any batch).")
    score_batch_size: int = option(16, "Images per scorer forward.")
    grid_prompts: int = option(4, "Prompts shown in grid.png (one row each).")
    device: str = option("auto", "auto, cpu or cuda.")
    dtype: str = option("auto", "Generation dtype: auto (float16 on CUDA with the VAE in float32; float32 on CPU), "
                                "float32, float16, bfloat16.")
    score_dtype: str = option("float32", "Scorer dtype: float32, float16, bfloat16.")


@dataclass
class EvalScoreConfig:
    images: Path = option(None, "Images: a manifest (.json/.csv/.parquet with `path` and `prompt` columns, a "
                                "samples.json of `lpo sample`, or an eval run directory), or a folder of files "
                                "named <prompt index>_<image index>.png or <prompt index>.png matched to --prompts.")
    out: Path = option(None, "Run directory: images.parquet, summary.json, summary.md, grid.png.")
    prompts: Path | None = option(None, "Prompts of an images folder (index = line / item, from 0); with a "
                                        "manifest, a check that every image's prompt is in this set.")
    metrics: list[str] = option(help=EVAL_METRICS_HELP, factory=_default_eval_metrics)
    models: dict[str, str] = option(help="Model per metric (hub id or local directory).", factory=dict)
    models_dir: Path | None = option(None, "A directory with one model folder per metric.")
    reward_url: str | None = option(None, "Score the metrics a running `lpo reward serve` at this URL serves there.")
    score_batch_size: int = option(16, "Images per scorer forward.")
    grid_prompts: int = option(4, "Prompts shown in grid.png (one row each).")
    device: str = option("auto", "auto, cpu or cuda.")
    score_dtype: str = option("float32", "Scorer dtype: float32, float16, bfloat16.")


@dataclass
class EvalCompareConfig:
    run_a: Path = option(None, "Baseline run directory (`lpo eval` or `lpo eval score` output).")
    run_b: Path = option(None, "Run to compare against the baseline.")
    out: Path | None = option(None, "Write the comparison here as markdown (and JSON beside it, same stem).")


@dataclass
class ToyModelsConfig:
    out: Path = option(None, "Directory to write sd15/, pickscore/, clip/ and toy_models.json into.")
    seed: int = option(0, "Seed for the renders, the initial weights and the training noise.")
    batch_size: int = option(128, "Images per training step of the diffusion model and the scorers.")
    vae_batch_size: int = option(64, "Images per VAE training step.")
    vae_steps: int = option(300, "VAE training steps.")
    diffusion_images: int = option(16384, "Rendered images whose VAE latents the diffusion model trains on.")
    diffusion_steps: int = option(700, "UNet + text encoder training steps.")
    clip_steps: int = option(400, "Training steps of each CLIP-style scorer.")
    pickscore_temperature: float = option(0.1, "Soft-target temperature of the pickscore model (oracle ordering).")
    clip_temperature: float = option(0.03, "Soft-target temperature of the clip model (near-exact caption matching).")


@dataclass
class DemoConfig:
    out: Path = option(Path("runs/demo"), "Run directory: data, curation, LRMs, LPO, samples, demo.md, demo.png.")
    models: Path = option(Path("manifests/toy-models"), "Toy world models (sd15/, pickscore/, clip/), as "
                                                        "`lpo dev toy-models` writes them.")
    train_prompts: int = option(1000, "Toy prompts of the training pairs (4 images and 6 pairs each).")
    val_prompts: int = option(150, "Toy prompts of the clean held-out pairs the LRMs are evaluated on.")
    flip_rate: float = option(0.3, "Share of training labels flipped against the oracle (noisy raters).")
    tie_rate: float = option(0.05, "Share of training pairs labelled as ties.")
    lrm_steps: int = option(400, "Optimizer updates of each of the three LRMs (the same budget for all).")
    lrm_batch_size: int = option(64, "Pairs per LRM update.")
    lrm_lr: float = option(1e-3, "LRM learning rate (tiny models learn fast).")
    vfe_scale: float = option(1.0, "LRM Visual Feature Enhancement scale (1 = off, which halves the cost).")
    held_out_prompts: int = option(18, "Captions kept out of LPO training and used to compare the generators.")
    lpo_epochs: int = option(20, "LPO passes over the training captions.")
    lpo_sample_batch_size: int = option(24, "Prompts per LPO sampling round.")
    lpo_train_batch_size: int = option(16, "Preference tuples per LPO optimizer step.")
    lpo_lr: float = option(1e-3, "LPO learning rate.")
    lpo_lora_rank: int = option(8, "LPO LoRA rank (0 = full fine-tuning).")
    lpo_beta: float = option(500.0, "LPO beta.")
    lpo_threshold: list[float] = option(help="LPO softmax-gap threshold range [least noisy, noisiest step]; lower "
                                             "than SD1.5's 0.35..0.5, as the toy LRM's score gaps are smaller.",
                                        factory=lambda: [0.05, 0.3])
    score_timestep: str = option("parent", "Timestep the LRM scores candidates at in LPO and guided sampling: "
                                           "parent or child.")
    candidates: int = option(4, "K: candidates per step in LPO and in LRM-guided sampling.")
    steps: int = option(10, "DDIM steps of every sampler in the demo.")
    guidance: float = option(1.5, "Classifier-free guidance of every sampler in the demo (low enough to leave the "
                                  "base model room to improve).")
    images_per_prompt: int = option(8, "Images per held-out prompt and generator.")
    seed: int = option(0, "Seed of the data, the training runs and the sampling noise.")
