"""Configs of `lpo demo` and `lpo dev tiny-models | toy-models | sample-data` (light imports only)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lpo.core.config import option


@dataclass
class DemoConfig:
    out: Path = option(Path("runs/demo"), "Run directory: data, curation, LRMs, LPO, samples, demo.md, demo.png.")
    family: str = option("sd15", "Toy generator: sd15 (a UNet sampled with DDIM) or sd3 (an SD3 transformer sampled "
                                 "with a stochastic flow-matching step; LRMs from sd3/, LPO on sd3-early/).")
    models: Path = option(Path("manifests/toy-models"), "Toy world models (sd15/, sd3/, pickscore/, clip/), as "
                                                        "`lpo dev toy-models` writes them.")
    train_prompts: int = option(1000, "Toy prompts of the training pairs (4 images and 6 pairs each).")
    val_prompts: int = option(150, "Toy prompts of the clean held-out pairs the LRMs are evaluated on.")
    flip_rate: float = option(0.3, "Share of training labels flipped against the oracle (noisy raters).")
    tie_rate: float = option(0.05, "Share of training pairs labelled as ties.")
    lrm_steps: int | None = option(None, "Optimizer updates of each of the three LRMs, the same budget for all "
                                         "(sd15 400; sd3 300).")
    lrm_batch_size: int = option(64, "Pairs per LRM update.")
    lrm_lr: float = option(1e-3, "LRM learning rate (tiny models learn fast).")
    vfe_scale: float = option(1.0, "LRM Visual Feature Enhancement scale (1 = off, which halves the cost).")
    held_out_prompts: int = option(18, "Captions kept out of LPO training and used to compare the generators.")
    lpo_epochs: int | None = option(None, "LPO (and GRPO) passes over the training captions (sd15 20; sd3 14).")
    lpo_sample_batch_size: int = option(24, "Prompts per LPO sampling round.")
    lpo_train_batch_size: int = option(16, "Preference tuples per LPO optimizer step.")
    lpo_lr: float = option(1e-3, "LPO learning rate.")
    lpo_lora_rank: int = option(8, "LPO LoRA rank (0 = full fine-tuning).")
    lpo_beta: float = option(500.0, "LPO beta.")
    lpo_beta_schedule: str | None = option(None, "LPO's --beta-schedule: constant or kappa (default: the family's "
                                                 "demo setting).")
    lpo_threshold_scale: str | None = option(None, "LPO's --threshold-scale: std or sigma (default: the family's demo "
                                                   "setting).")
    sampler: str | None = option(None, "The stochastic step of LPO, GRPO and every sampler in the demo: ddim (sd15); "
                                       "cps or sde (sd3). Default: the family's (sd3 cps).")
    lpo_threshold: list[float] | None = option(None, "LPO softmax-gap thresholds at the least and the noisiest step "
                                                     "(sd15 0.05,0.3; sd3 0.05,0.3): lower than SD1.5's 0.35..0.5, "
                                                     "as the toy LRM's score gaps are smaller.")
    grpo: bool = option(False, "Also fine-tune with step-wise GRPO (`--objective grpo`) on as many sampled "
                               "trajectories as LPO, and compare it (off by default: about 5 more minutes on 2 CPU "
                               "cores, and its numbers are reported, not claimed).")
    grpo_kl: float = option(0.1, "GRPO's KL weight (the paper's 0.1).")
    hacking: bool = option(False, "Also run the reward-hacking stage: an LRM trained on pairs from raters with a "
                                  "planted bias (squares win, whatever the caption), then LPO on it with "
                                  "--hacking-lr for --hacking-epochs under the held-out monitor (the toy pickscore "
                                  "and clip as its metrics), continued past the monitor's stop; the checkpoint the "
                                  "monitor kept against the unmonitored run's last (off by default: about 2-3 more "
                                  "minutes).")
    hacking_epochs: int = option(6, "Epochs of the hacking run.")
    hacking_lr: float = option(8e-3, "Learning rate of the hacking run (8x the demo's: the planted LRM's reward rises "
                                     "while the oracle alignment falls far below the base's within a few epochs).")
    hacking_threshold: list[float] | None = option(None, "Thresholds of the hacking run (default: --lpo-threshold).")
    score_timestep: str = option("parent", "Timestep the LRM scores candidates at in LPO and guided sampling: "
                                           "parent or child.")
    candidates: int = option(4, "K: candidates per step in LPO and in LRM-guided sampling.")
    steps: int = option(10, "Sampler steps of every sampler in the demo.")
    guidance: float | None = option(None, "Classifier-free guidance of every sampler in the demo, low enough to leave "
                                          "the base model room to improve (sd15 1.5; sd3 1.0, no guidance).")
    images_per_prompt: int = option(8, "Images per held-out prompt and generator.")
    seed: int = option(0, "Seed of the data, the training runs and the sampling noise.")


@dataclass
class ToyModelsConfig:
    out: Path = option(None, "Directory to write sd15/, pickscore/, clip/, sd3/ and toy_models.json into.")
    models: list[str] = option(help="Models to train (default all): sd15, pickscore, clip, sd3 (sd3 reuses the VAE "
                                    "of sd15/, trained in the same run or already in the folder).", factory=list)
    seed: int = option(0, "Seed for the renders, the initial weights and the training noise.")
    batch_size: int = option(128, "Images per training step of the diffusion model and the scorers.")
    vae_batch_size: int = option(64, "Images per VAE training step.")
    vae_steps: int = option(300, "VAE training steps.")
    diffusion_images: int = option(16384, "Rendered images whose VAE latents the diffusion model trains on.")
    diffusion_steps: int = option(700, "UNet + text encoder training steps.")
    clip_steps: int = option(400, "Training steps of each CLIP-style scorer.")
    sd3_steps: int = option(800, "Transformer + text encoders training steps of the SD3-format generator.")
    sd3_early_steps: int = option(300, "Updates after which the same SD3 run is also saved as sd3-early/ (a generator "
                                       "with room to improve; at most --sd3-steps).")
    pickscore_temperature: float = option(0.1, "Soft-target temperature of the pickscore model (oracle ordering).")
    clip_temperature: float = option(0.03, "Soft-target temperature of the clip model (near-exact caption matching).")


@dataclass
class TinyModelsConfig:
    out: Path = option(None, "Directory to write one tiny model folder per role into.")
    roles: list[str] = option(help="Roles to write (default: all): pickscore, clip, vqa, aesthetic, sd15, sdxl, "
                                   "sd3, flux, hpsv2, hpsv21, imagereward, geneval, t2i-color, t2i-shape, "
                                   "t2i-texture.", factory=list)
    seed: int = option(0, "Seed for the random weights.")


@dataclass
class SampleDataConfig:
    out: Path = option(None, "Parquet file to write, in Pick-a-Pic's schema.")
    prompts: int = option(12, "Number of prompts (each gives 4 images and 6 pairs).")
    flip_rate: float = option(0.3, "Share of labels flipped against the oracle.")
    corrupt_images: int = option(1, "Images given undecodable bytes.")
    seed: int = option(0, "Random seed.")
