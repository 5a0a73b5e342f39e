"""`lpo reward train`: train a latent reward model on MPCF-filtered pairs with a soft-label Bradley-Terry loss.

A plain accelerate loop: per pair one timestep drawn uniformly from the candidates ({1, 51, ..., 951} by default),
independent noise for the two images, AdamW with warmup then linear decay, explicit gradient accumulation. VAE
latents come from an on-disk cache built once before training. Checkpoints (`save_state`) every N updates;
`--resume` continues from the latest; the best model by validation accuracy and the last are exported in the
loadable format. Data order and noise are functions of (seed, step, rank), so a resumed run continues exactly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow.parquet as pq
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, set_seed

from lpo.core import config as cfg
from lpo.core import rundir
from lpo.core.device import check_mixed_precision, mixed_precision, precision_dtype
from lpo.core.errors import InputError, TrainingDiverged
from lpo.core.progress import progress
from lpo.curate.manifest import PAIRS_SCHEMA, check_schema, curation_dir_of, read_pairs
from lpo.reward import checkpoints, engine
from lpo.reward.backbones import family_of, get_family, read_subfolder_config
from lpo.reward.backbones.family import base_resolution, check_base_resolution
from lpo.reward.checkpoints import CHECKPOINTS
from lpo.reward.lrm.accuracy import accuracy_per_timestep, plot_accuracy, usable_pairs
from lpo.reward.lrm.config import RewardTrainConfig
from lpo.reward.lrm.latents import LatentCache, build_cache, only_encoded, pair_uids
from lpo.reward.lrm.loss import bradley_terry_loss, pair_labels, pair_weights, pairwise_correct
from lpo.reward.lrm.model import LatentRewardModel, check_text_projection_init, export_components
from lpo.reward.plan import lrm_plan

logger = logging.getLogger(__name__)

# Fields that may change between a run and its resume; any other change makes it a different run.
RESUMABLE_FIELDS = {"resume", "max_steps", "eval_every", "save_every", "log_with", "device", "latent_cache",
                    "timeout_minutes", "dry_run", "processes", "sharding", "gpu_memory_gb", "gpu", "mfu"}
CONFIG_FILE = "train_config.json"


def validate(config: RewardTrainConfig) -> tuple[RewardTrainConfig, Any]:
    """Everything checkable before a model loads; returns the config with the family's defaults, and the family."""

    for name in ("manifest", "base", "out"):
        if not getattr(config, name):
            raise InputError(f"--{name} is required.")
    if not config.dry_run:
        rundir.claim(config.out, "lrm")
    check_schema(config.manifest, PAIRS_SCHEMA, "filtered")
    if "reason" in pq.read_schema(config.manifest).names:
        raise InputError(f"{config.manifest} holds the pairs the filter rejected (each with its `reason`); train on "
                         "the kept pairs, filtered.parquet beside it.")
    check_mixed_precision(config.mixed_precision)
    _check_ranges(config)
    if config.val_manifest is not None:
        check_schema(config.val_manifest, PAIRS_SCHEMA, "validation")
    family = family_of(config.base)
    check_base_resolution(config.resolution, config.base, family)
    if config.depth is not None and family.denoiser != "transformer":
        raise InputError(f"--depth sets the joint blocks of a transformer family's LRM; {config.base} is an "
                         f"{family.name} UNet (its taps fix what runs). Drop --depth.")
    if config.depth is not None:
        blocks = int(read_subfolder_config(config.base, family.denoiser)["num_layers"])
        if not 1 <= config.depth <= blocks:
            raise InputError(f"--depth {config.depth}: {config.base}'s transformer has {blocks} joint blocks; give "
                             f"1..{blocks}.")
    config = config.resolved(family.name)
    for name in ("batch_size", "grad_accum", "max_steps"):
        if getattr(config, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1.")
    if not 0 <= config.val_fraction < 1:
        raise InputError("--val-fraction must be in [0, 1).")
    if config.init not in ("diffusion", "random"):
        raise InputError(f"--init {config.init!r} is not diffusion or random.")
    if config.init == "diffusion":
        check_text_projection_init(family.name, config.text_projection_init)
    if not config.dry_run:
        checkpoints.check_run_dir(config, Path(config.out), CONFIG_FILE, RESUMABLE_FIELDS, "step")
    return config, family


def _check_ranges(config: RewardTrainConfig) -> None:
    """Numbers that would train wrongly without an error: each refused with the option's name and its range."""
    cfg.check_rules([(name, getattr(config, name), holds, rule) for name, holds, rule in (
        ("lr", config.lr > 0, "> 0"), ("weight_decay", config.weight_decay >= 0, ">= 0"),
        ("max_grad_norm", config.max_grad_norm >= 0, ">= 0 (0 turns clipping off)"),
        ("warmup_steps", config.warmup_steps >= 0, ">= 0"), ("eval_every", config.eval_every >= 1, ">= 1"),
        ("save_every", config.save_every >= 1, ">= 1"), ("keep_checkpoints", config.keep_checkpoints >= 1, ">= 1"))])
    if config.warmup_steps > config.max_steps:
        logger.warning("--warmup-steps %d exceeds --max-steps %d: the run ends at lr %.3g, before its learning rate "
                       "reaches --lr %g; lower --warmup-steps to train at the full rate.", config.warmup_steps,
                       config.max_steps, config.lr * config.max_steps / config.warmup_steps, config.lr)


def latest_checkpoint(out: Path) -> Path | None:
    return checkpoints.latest(out, "step")


def split_validation(pairs: pl.DataFrame, fraction: float, seed: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Hold out whole captions (so no prompt is in both sets), chosen by a stable hash."""
    if fraction == 0:
        return pairs, pairs.clear()

    def held_out(caption: str) -> bool:
        digest = hashlib.blake2b(f"{seed}|{caption}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") / 2**64 < fraction

    captions = pairs["caption"].unique().sort().to_list()
    val_captions = [c for c in captions if held_out(c)]
    if not val_captions and len(captions) > 1:
        val_captions = captions[:1]
    mask = pl.col("caption").is_in(val_captions)
    return pairs.filter(~mask), pairs.filter(mask)


def _plan(config: RewardTrainConfig, family: Any, train_pairs: pl.DataFrame, uids: set[str]) -> Any:
    """The --dry-run plan; the images to encode are those no cache folder of this VAE and resolution holds."""

    resolution = base_resolution(config.base, family, config.resolution, config.vae)
    vae, subfolder = (config.vae, None) if config.vae else (config.base, "vae")
    cached: set[str] = set()
    for meta in Path(config.latent_cache or Path(config.out) / "latent_cache").glob("vae-*/cache.json"):
        found = json.loads(meta.read_text())
        if (found.get("vae"), found.get("vae_subfolder"), found.get("resolution")) == (vae, subfolder, resolution):
            cached |= set(LatentCache(meta.parent).index)
    return lrm_plan(config, family, train_pairs.height, len(uids - cached), config.processes, config.sharding)


def batch_indices(step: int, rank: int, world: int, n: int, batch_size: int, seed: int) -> list[int]:
    """Pairs of micro-step `step` on `rank`: epochs are seeded permutations, split across ranks, cycling."""
    per_epoch = max(1, math.ceil(n / (batch_size * world)))
    epoch, position = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    start = (position * world + rank) * batch_size
    return [order[(start + j) % n] for j in range(batch_size)]


def lr_lambda(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def run(config: RewardTrainConfig) -> dict[str, Any]:
    """Train; returns a summary (steps, effective batch, best validation accuracy, export paths)."""

    config, family = validate(config)
    out = Path(config.out)
    pairs = usable_pairs(read_pairs(config.manifest))
    if pairs.is_empty():
        raise InputError(f"{config.manifest} has no kept pairs (none with a winner or a kept tie); loosen the "
                         "filter rule or check the curation summary.")
    if config.val_manifest is not None:
        train_pairs, val_pairs = pairs, usable_pairs(read_pairs(config.val_manifest, "validation"))
    else:
        train_pairs, val_pairs = split_validation(pairs, config.val_fraction, config.seed)
    if train_pairs.is_empty():
        raise InputError("no training pairs are left after holding out validation captions; lower --val-fraction.")
    if config.dry_run:
        return {"plan": _plan(config, family, train_pairs, pair_uids(pairs) | pair_uids(val_pairs))}

    cuda = torch.cuda.is_available() and config.device != "cpu"
    precision = mixed_precision(config.mixed_precision, cuda, auto="bf16")
    accelerator = Accelerator(
        cpu=not cuda, mixed_precision=precision, gradient_accumulation_steps=config.grad_accum,
        log_with=config.log_with or None, project_dir=str(out),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=family.lrm_backbone.unused_parameters),
                         InitProcessGroupKwargs(timeout=timedelta(minutes=config.timeout_minutes))],
    )
    engine.agree(accelerator, config.batch_size, config.grad_accum, config.max_grad_norm)
    out.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:
        cfg.save(config, out / CONFIG_FILE)
        if not config.resume:
            checkpoints.save_inputs(config, out)

    # 1. latents, once per unique image: every process encodes its shard, then all read the whole cache
    resolution = base_resolution(config.base, family, config.resolution, config.vae)
    vae_source, subfolder = (config.vae, None) if config.vae else (config.base, "vae")
    uids = pair_uids(pairs) | pair_uids(val_pairs)
    # each manifest's images live in its own curation directory: encode them from there
    sources = {curation_dir_of(config.manifest): pair_uids(pairs)}
    if config.val_manifest is not None:
        sources.setdefault(curation_dir_of(config.val_manifest), set()).update(pair_uids(val_pairs))
    cache = build_cache(Path(config.latent_cache or out / "latent_cache"), sources, vae_source, resolution,
                        device=str(accelerator.device), subfolder=subfolder, rank=accelerator.process_index,
                        world=accelerator.num_processes)
    accelerator.wait_for_everyone()
    cache.refresh()  # what could not be encoded is absent from it
    missing = [u for u in uids if u not in cache]
    train_pairs, val_pairs = only_encoded(train_pairs, cache), only_encoded(val_pairs, cache)

    # 2. model, optimizer, schedule
    set_seed(config.seed)
    model = LatentRewardModel.from_base(
        config.base, multi_scale=config.multi_scale, vfe_scale=config.vfe_scale, vfe_down=config.vfe_down,
        text_projection_init=config.text_projection_init or None, pretrained=config.init == "diffusion",
        depth=config.depth, frozen_dtype=precision_dtype(precision), resolution=config.resolution)
    if config.gradient_checkpointing:
        model.backbone.enable_gradient_checkpointing()
    model.train()
    noise_scheduler = family.noise_schedule(config.base)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr,
                                  weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config.warmup_steps, config.max_steps))
    # The schedule is stepped here once per optimizer update. Prepared by accelerate it would step once per update
    # *per process* (its default when batches are not split): with 8 processes the warmup would end 8x too early.
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(schedule)

    state = {"step": 0, "best_accuracy": -1.0, "best_step": None, "history": []}
    if config.resume:
        state = checkpoints.resume(accelerator, out, "step", state)

    world = accelerator.num_processes
    effective = config.batch_size * config.grad_accum * world
    logger.info("training on %d pairs (validation %d): %d pairs/process/micro-step x %d accumulation x %d processes "
                "= effective batch %d pairs; %d optimizer updates", train_pairs.height, val_pairs.height,
                config.batch_size, config.grad_accum, world, effective, config.max_steps)
    if config.log_with:
        accelerator.init_trackers("lpo-reward", config={k: str(v) for k, v in dataclasses.asdict(config).items()})

    train = {
        "uid0": train_pairs["image_0_uid"].to_list(), "uid1": train_pairs["image_1_uid"].to_list(),
        "caption": train_pairs["caption"].to_list(),
        "winner": torch.tensor(train_pairs["winner"].fill_null(-1).to_list()),
        "tie": torch.tensor(train_pairs["is_tie"].to_list()),
        "weight": torch.tensor(train_pairs["num_example_per_prompt"].fill_null(0).to_list()),
    }
    summary = Training(config, accelerator, model, optimizer, schedule, cache, noise_scheduler, train, val_pairs,
                       state, out).loop()
    accelerator.end_training()
    return summary | {"effective_batch_size": effective, "train_pairs": train_pairs.height,
                      "validation_pairs": val_pairs.height, "skipped_images": len(missing)}


@dataclasses.dataclass
class Training:
    """One `lpo reward train` run: what the loop reads, and the state it updates (`state`: the update count, the
    best validation accuracy and its update, the validation history)."""

    config: RewardTrainConfig
    accelerator: Accelerator
    model: Any  # prepared by accelerate
    optimizer: torch.optim.Optimizer
    schedule: Any
    cache: LatentCache
    noise_scheduler: Any
    train: dict[str, Any]  # the training pairs' columns
    val_pairs: pl.DataFrame
    state: dict[str, Any]
    out: Path

    def loop(self) -> dict[str, Any]:
        config, accelerator, model, optimizer, schedule = (self.config, self.accelerator, self.model, self.optimizer,
                                                           self.schedule)
        cache, noise_scheduler, train, state, out = self.cache, self.noise_scheduler, self.train, self.state, self.out
        n = len(train["caption"])
        rank, world = accelerator.process_index, accelerator.num_processes
        to_latents = accelerator.unwrap_model(model).to_latents
        candidates = torch.tensor(config.timesteps)
        micro = state["step"] * config.grad_accum
        running = {"loss": 0.0, "correct": 0.0, "count": 0}
        metrics = checkpoints.MetricsLog(out, accelerator.is_main_process, state["step"])
        with progress("LRM", config.max_steps, completed=state["step"], unit="updates",
                      enabled=accelerator.is_main_process) as tracker:
            while state["step"] < config.max_steps:
                idx = batch_indices(micro, rank, world, n, config.batch_size, config.seed)
                generator = torch.Generator().manual_seed(config.seed * 1_000_003 + micro * 1_009 + rank)
                uids = [train["uid0"][i] for i in idx] + [train["uid1"][i] for i in idx]
                clean = to_latents(cache.sample(uids, generator))
                t = candidates[torch.randint(len(candidates), (len(idx),), generator=generator)]
                steps = torch.cat([t, t])
                noisy = noise_scheduler.add_noise(clean, torch.randn(clean.shape, generator=generator), steps)
                labels = pair_labels(train["winner"][idx], train["tie"][idx]).to(accelerator.device)
                weights = pair_weights(train["weight"][idx]).to(accelerator.device)
                total = accelerator.reduce(weights.sum().detach(), reduction="sum")
                with accelerator.accumulate(model):
                    scores = model(noisy.to(accelerator.device), steps.to(accelerator.device),
                                   [train["caption"][i] for i in idx] * 2)
                    s0, s1 = scores[: len(idx)], scores[len(idx):]
                    # DDP averages gradients over processes; scale so the result is the global weighted mean
                    loss = bradley_terry_loss(s0, s1, labels, weights, total) * world
                    if not torch.isfinite(loss):
                        raise TrainingDiverged(f"loss became {loss.item()} at update {state['step']}; the last "
                                               f"checkpoint in {out / CHECKPOINTS} is intact. Lower --lr or check "
                                               "the data.")
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and config.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                    lr = optimizer.param_groups[0]["lr"]  # the rate this update applies
                    optimizer.step()
                    schedule.step() if accelerator.sync_gradients else None
                    optimizer.zero_grad()
                micro += 1
                running["loss"] += loss.item() / world
                running["correct"] += pairwise_correct(s0.detach(), s1.detach(), labels).sum().item()
                running["count"] += len(idx)
                if not accelerator.sync_gradients:
                    continue
                state["step"] += 1
                # over every process: the loss of the global batch (each process's is its share times world) and the
                # share of its pairs ranked as labelled
                totals = accelerator.reduce(torch.tensor([running["loss"], running["correct"], running["count"]],
                                                         dtype=torch.float64, device=accelerator.device), "sum")
                logs = {"loss": totals[0].item() / config.grad_accum, "train_accuracy": totals[1].item() /
                        max(totals[2].item(), 1), "lr": lr}
                running = {"loss": 0.0, "correct": 0.0, "count": 0}
                accelerator.log(logs, step=state["step"])
                metrics.write({"update": state["step"], **logs})
                tracker.update(state["step"], f"loss {logs['loss']:.3f} acc {logs['train_accuracy']:.2f}")
                final = state["step"] == config.max_steps
                if self.val_pairs.height and (state["step"] % config.eval_every == 0 or final):
                    self._validate()
                if state["step"] % config.save_every == 0 or final:
                    checkpoints.save(accelerator, out, "step", state["step"], state, config.keep_checkpoints)
        last = out / "last"
        self._export(last)
        if accelerator.is_main_process:
            if state["best_step"] is None:  # no validation set: the last model is the only candidate
                shutil.copytree(last, out / "best", dirs_exist_ok=True)
            if state["history"]:
                plot_accuracy({"validation": {float(t): a for t, a in state["history"][-1]["accuracy"].items()}},
                              out / "accuracy.png",
                              sigma=get_family(accelerator.unwrap_model(model).config.family).flow_matching)
            (out / "train_summary.json").write_text(json.dumps(state, indent=2) + "\n")
        accelerator.wait_for_everyone()
        return {"steps": state["step"], "best_step": state["best_step"], "best_accuracy": state["best_accuracy"],
                "history": state["history"], "best": str(out / "best"), "last": str(out / "last")}

    def _export(self, directory: Path) -> None:
        """Save the model where `from_pretrained` loads it, with its VAE and noise schedule. Every process takes
        part: under FSDP the full weights are gathered from the shards."""
        accelerator = self.accelerator
        state_dict = accelerator.get_state_dict(self.model)
        if accelerator.is_main_process:
            accelerator.unwrap_model(self.model).save_pretrained(directory, state_dict=state_dict)
            export_components(directory, self.config.base, self.config.vae)
        accelerator.wait_for_everyone()

    def _validate(self) -> None:
        """Every process scores its share of the validation pairs; the main process keeps the record and the
        best."""
        config, accelerator, model, state = self.config, self.accelerator, self.model, self.state
        unwrapped = accelerator.unwrap_model(model)
        accuracy = accuracy_per_timestep(model, self.cache, self.val_pairs, self.noise_scheduler,
                                         config.eval_timesteps, seed=config.seed, batch_size=config.batch_size,
                                         rank=accelerator.process_index, world=accelerator.num_processes,
                                         total=lambda x: accelerator.reduce(x.to(accelerator.device), "sum").cpu(),
                                         to_latents=unwrapped.to_latents)
        record = {"step": state["step"], "accuracy": {str(t): a for t, a in accuracy.items()}}
        state["history"].append(record)
        accelerator.log({f"val_accuracy_t{t}": a for t, a in accuracy.items()}, step=state["step"])
        logger.info("update %d: validation accuracy %s", state["step"],
                    ", ".join(f"t={t}: {a:.3f}" for t, a in accuracy.items()))
        selected = accuracy.get(config.select_timestep, next(iter(accuracy.values())))
        if selected > state["best_accuracy"]:  # the same numbers on every process: the same bookkeeping
            state["best_accuracy"], state["best_step"] = selected, state["step"]
            self._export(self.out / "best")
        accelerator.wait_for_everyone()
