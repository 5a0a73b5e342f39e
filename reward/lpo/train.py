"""`lpo optimize <family>`: Latent Preference Optimization, step by step, in latent space.

Each round samples trajectories for a batch of prompts with the current policy (`lpo.reward.lpo.sampler.rollout`):
at every step K children of the same x_t are scored by the latent reward model, and the best and worst form a
preference tuple when their softmax gap exceeds the step's threshold. Tuples are gathered across processes, put
in one order (step, trajectory), shuffled, dealt out in turn, and trained on once with the LPO loss
(`lpo.reward.lpo.loss`). Winner and loser share x_t, t and the prompt, so one policy forward and one reference
forward (the same denoiser with its LoRA adapter disabled) give both log-densities. With `--objective grpo` the
items are whole groups of K children instead, trained with step-wise GRPO (`lpo.reward.lpo.grpo`): one policy
forward per parent, and one reference forward when the KL term is on. Trajectory noise is seeded per trajectory of
the round and the items are dealt so that chunk j of every process together is chunk j of a single process with
the processes' batch: N processes train as one process with N times the batch. The family's `Generator` gives the
step maths; nothing here is family-specific.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, gather_object, set_seed
from peft import LoraConfig

from lpo.core import config as cfg
from lpo.core import rundir
from lpo.core.device import check_mixed_precision, mixed_precision, precision_dtype
from lpo.core.errors import InputError, TrainingDiverged
from lpo.core.files import write_json_atomic
from lpo.core.progress import progress
from lpo.curate.prompts import read_prompts
from lpo.reward import checkpoints, engine
from lpo.reward.backbones import FAMILIES, family_of, get_family, load_generator
from lpo.reward.backbones.family import check_base_resolution
from lpo.reward.checkpoints import CHECKPOINTS
from lpo.reward.lpo.config import BETA_SCHEDULES, THRESHOLD_SCALES, LPOConfig, check_calibration
from lpo.reward.lpo.monitor import BEST_DIR, Monitor, Watch, check_monitor
from lpo.reward.lpo.objectives import OBJECTIVES, Objective, stack_items
from lpo.reward.lpo.outputs import export, merge, save_best, validation_grid
from lpo.reward.lpo.preflight import Check, run_checks
from lpo.reward.lpo.sampler import rollout
from lpo.reward.lpo.step import threshold_schedule
from lpo.reward.lrm.model import LatentRewardModel, check_lrm_matches
from lpo.reward.plan import lpo_plan
from lpo.reward.serve.client import remote_lrm

logger = logging.getLogger(__name__)

RESUMABLE_FIELDS = {"resume", "epochs", "save_every_rounds", "log_with", "device", "merge", "timeout_minutes",
                    "dry_run", "processes", "sharding", "gpu_memory_gb", "gpu", "mfu", "monitor_every",
                    "stop_patience", "stop_margin", "stop_noise"}
CONFIG_FILE = "lpo_config.json"


def validate(config: LPOConfig) -> list[str]:
    """Everything checkable before any model loads; returns the prompts."""

    for name in ("base", "prompts", "out"):
        if not getattr(config, name):
            raise InputError(f"--{name} is required.")
    if not config.dry_run:
        rundir.claim(config.out, "lpo")
    if (config.lrm is None) == (config.reward_url is None):
        raise InputError("give the latent reward model as either --lrm DIR or --reward-url URL (one of them).")
    if config.family not in FAMILIES:
        raise InputError(f"family {config.family!r} is not one of {', '.join(FAMILIES)}.")
    found = family_of(config.base).name
    if found != config.family:
        raise InputError(f"{config.base} is a pipeline of the {found} family; run `lpo optimize {found}` instead.")
    FAMILIES[found].generator.check_lpo(config.base)
    if config.lrm is not None:
        check_lrm_matches(config.lrm, found, config.base)
    else:
        remote_lrm(config.reward_url, found, config.base)
    prompts = read_prompts(config.prompts)
    if config.resolved().eta <= 0:
        raise InputError("--eta must be > 0: LPO needs a stochastic step to have a likelihood.")
    if config.candidates < 2:
        raise InputError("--candidates must be at least 2 to form a winner and a loser.")
    if config.score_timestep not in ("parent", "child") or config.logprob_reduction not in ("mean", "sum"):
        raise InputError("--score-timestep is parent or child; --logprob-reduction is mean or sum.")
    if config.objective not in OBJECTIVES:
        raise InputError(f"--objective {config.objective!r} is not one of {', '.join(OBJECTIVES)}.")
    OBJECTIVES[config.objective].check(config)
    resolved = config.resolved()
    FAMILIES[found].check_sampler(resolved.sampler)
    check_calibration(resolved.beta_schedule, resolved.threshold_scale)
    if config.lora_single_stream and found != "flux":
        raise InputError("--lora-single-stream adapts FLUX.1's single-stream blocks; an "
                         f"{found} model has none.")
    if config.lora_alpha is not None and config.lora_alpha <= 0:
        raise InputError(f"--lora-alpha {config.lora_alpha} must be > 0 (the LoRA's scale is alpha / rank).")
    check_mixed_precision(config.mixed_precision)
    cfg.check_rules([(name, getattr(resolved, name), holds, rule) for name, holds, rule in (
        ("lr", resolved.lr > 0, "> 0"), ("weight_decay", config.weight_decay >= 0, ">= 0"),
        ("max_grad_norm", config.max_grad_norm >= 0, ">= 0 (0 turns clipping off)"),
        ("save_every_rounds", config.save_every_rounds >= 0, ">= 0 (0: each epoch)"))])
    if not 0 < config.clip_eps < 1 or config.grpo_kl < 0:
        raise InputError("--clip-eps must be in (0, 1) and --grpo-kl at least 0.")
    threshold = resolved.threshold
    if threshold is not None and (len(threshold) != 2 or not 0 <= threshold[0] <= threshold[1] < 1):
        raise InputError(f"--threshold {threshold} must be two values 0 <= low <= high < 1.")
    check_base_resolution(config.resolution, config.base, FAMILIES[found])
    for name in ("epochs", "steps", "sample_batch_size", "train_batch_size"):
        if getattr(resolved, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1.")
    if config.validation_images < 0:
        raise InputError(f"--validation-images {config.validation_images} must be 0 (no grid) or more.")
    if not config.dry_run:
        checkpoints.check_run_dir(resolved, Path(config.out), CONFIG_FILE, RESUMABLE_FIELDS, "round")
    return prompts


def latest_checkpoint(out: Path) -> Path | None:
    return checkpoints.latest(out, "round")


def round_prompts(prompts: list[str], round_index: int, rank: int, world: int, batch: int,
                  seed: int) -> tuple[int, list[int]]:
    """(epoch, prompt indices) of a round on a rank: each epoch is a seeded permutation split over ranks."""
    per_epoch = max(1, math.ceil(len(prompts) / (batch * world)))
    epoch, position = divmod(round_index, per_epoch)
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed * 7_919 + epoch)).tolist()
    start = (position * world + rank) * batch
    return epoch, [order[(start + j) % len(prompts)] for j in range(batch)]


def rounds_per_epoch(n_prompts: int, batch: int, world: int) -> int:
    return max(1, math.ceil(n_prompts / (batch * world)))


class Reference:
    """The frozen reference: the policy denoiser with its LoRA adapter disabled, or a frozen copy when the whole
    denoiser is trained. Calls run without gradients."""

    def __init__(self, denoiser: Any, lora: bool):
        self.denoiser = denoiser if lora else copy.deepcopy(denoiser).requires_grad_(False).eval()
        self.lora = lora

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            if not self.lora:
                return self.denoiser(*args, **kwargs)
            self.denoiser.disable_adapters()
            try:
                return self.denoiser(*args, **kwargs)
            finally:
                self.denoiser.enable_adapters()


def step_thresholds(model: Any, config: LPOConfig) -> dict:
    """Per trained timestep of the grid the last `model.timesteps` call set: the softmax-gap threshold, linear
    between --threshold's low (least noisy trained step) and high (noisiest) in the step's std or in the forward
    process's noise share (`--threshold-scale`)."""

    timesteps, stds = model.step_stds(config.eta)
    if config.threshold_scale not in THRESHOLD_SCALES:
        raise ValueError(f"threshold_scale {config.threshold_scale!r} (resolve the config first)")
    scale = stds if config.threshold_scale == "std" else model.noise_sigmas(timesteps)
    return threshold_schedule(timesteps, scale, *config.threshold)


def log_ratio_scales(model: Any, config: LPOConfig) -> dict | None:
    """`--beta-schedule kappa`: per trained timestep, the factor median(kappa) / kappa_t each step's log-ratio is
    multiplied by before the clamp and beta; None for the constant schedule."""
    if config.beta_schedule not in BETA_SCHEDULES:
        raise ValueError(f"beta_schedule {config.beta_schedule!r} (resolve the config first)")
    if config.beta_schedule == "constant":
        return None
    timesteps, kappas = model.step_kappas(config.eta)
    reference = kappas.median()
    return {t: float(reference / kappa) for t, kappa in zip(timesteps, kappas)}


def lora_targets(denoiser: Any, family: Any, config: LPOConfig) -> list[str]:
    """The modules LoRA adapts: the family's (matched by name suffix, as PEFT does), and with
    `--lora-single-stream` FLUX's single-stream blocks' MLP in and out projections (named in full, so the model's
    own output head `proj_out` is not among them)."""
    targets = list(family.lora_targets)
    if config.lora_single_stream:
        targets += [name for name, _ in denoiser.named_modules()
                    if name.startswith("single_transformer_blocks.") and name.endswith((".proj_mlp", ".proj_out"))]
    return targets


def run(config: LPOConfig) -> dict[str, Any]:
    """Fine-tune; returns a summary (rounds, tuples trained on, per-round logs, output paths)."""

    prompts = validate(config)
    prompts, held_out, monitor_specs, monitor_required = check_monitor(config, prompts)
    config = config.resolved()
    family = get_family(config.family)
    if config.dry_run:
        return {"plan": lpo_plan(config, family, OBJECTIVES[config.objective],
                                 lambda world: rounds_per_epoch(len(prompts), config.sample_batch_size, world),
                                 config.processes, config.sharding)}
    out = Path(config.out)
    cuda = torch.cuda.is_available() and config.device != "cpu"
    precision = mixed_precision(config.mixed_precision, cuda, auto=family.half_precision)
    accelerator = Accelerator(cpu=not cuda, mixed_precision=precision, log_with=config.log_with or None,
                              project_dir=str(out),
                              kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(minutes=config.timeout_minutes))])
    engine.agree(accelerator, config.train_batch_size, 1, config.max_grad_norm)  # one update per micro-batch
    engine.no_fsdp(accelerator, "lpo optimize", "the sampler runs the policy outside the training wrapper, and a "
                   "LoRA's few weights gain nothing from sharding (the frozen half-precision base fits every GPU).")
    out.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:
        cfg.save(config, out / CONFIG_FILE)
        if not config.resume:
            checkpoints.save_inputs(config, out)
    set_seed(config.seed)
    frozen_dtype = precision_dtype(precision)
    model = load_generator(config.base, family=family, dtype=frozen_dtype, device=str(accelerator.device))
    if config.reward_url is not None:
        lrm = remote_lrm(config.reward_url, config.family, config.base)
    else:
        lrm = LatentRewardModel.from_pretrained(config.lrm, dtype=frozen_dtype).to(accelerator.device)
        lrm.requires_grad_(False)
    denoiser = model.denoiser
    lora = config.lora_rank > 0
    if lora:
        denoiser.requires_grad_(False)
        denoiser.add_adapter(LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha or config.lora_rank,
                                        init_lora_weights="gaussian", target_modules=lora_targets(denoiser, family,
                                                                                                  config)))
        for param in denoiser.parameters():
            if param.requires_grad:
                param.data = param.data.float()  # trainable LoRA weights in fp32, the frozen base in half
    else:
        denoiser.requires_grad_(True)
        denoiser.to(torch.float32)
    reference = Reference(denoiser, lora)
    if config.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    params = [p for p in denoiser.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.999),
                                  eps=1e-8)
    denoiser, optimizer = accelerator.prepare(denoiser, optimizer)
    model.use_sampler(config.sampler)
    model.use_resolution(config.resolution)
    if config.threshold is None:  # the family's thresholds at the side sampled at
        config = dataclasses.replace(config, threshold=family.threshold_at(model.resolution))
    model.timesteps(config.steps)
    thresholds = step_thresholds(model, config)
    scales = log_ratio_scales(model, config)

    objective = OBJECTIVES[config.objective]
    unit = objective.unit
    state = {"round": 0, "updates": 0, f"{unit}_trained": 0, "rounds": []}
    if config.resume:
        state = checkpoints.resume(accelerator, out, "round", state)
    metrics = checkpoints.MetricsLog(out, accelerator.is_main_process, state.get("updates", 0))
    run = Run(config, objective, accelerator, model, denoiser, reference, lrm, optimizer, prompts, thresholds, scales,
              metrics, state)
    per_epoch = rounds_per_epoch(len(prompts), config.sample_batch_size, run.world)
    total_rounds = per_epoch * config.epochs
    if config.preflight is not False and state["round"] < total_rounds:
        checks = run.preflight(total_rounds, mixed=precision != "no")
        for check in checks:
            logger.info("pre-flight: %s: %s", check.name, check.value)
        if config.preflight:
            accelerator.end_training()
            return {"preflight": [dataclasses.asdict(check) for check in checks], "rounds": state["round"]}
    monitor = Monitor(config, out, held_out, monitor_specs, monitor_required, accelerator.device, frozen_dtype,
                      per_epoch) if held_out and accelerator.is_main_process else None
    watch = Watch(accelerator, monitor, bool(held_out), total_rounds,
                  save_best=lambda row: save_best(config, model, accelerator.unwrap_model(denoiser), out, row),
                  check=lambda: (model, accelerator.unwrap_model(denoiser), lrm, state["round"], state["updates"]))
    logger.info("%s on %d prompts: %d prompts/process/round x %d processes, %d rounds per epoch, %d epochs; "
                "K=%d, %d steps, guidance %.1f, %s", config.objective.upper(), len(prompts), config.sample_batch_size,
                run.world, per_epoch, config.epochs, config.candidates, config.steps, config.guidance,
                objective.settings(config, thresholds))
    if config.log_with:
        accelerator.init_trackers("lpo-optimize", config={k: str(v) for k, v in dataclasses.asdict(config).items()})
    validation_prompts = config.validation_prompts or prompts[:3]

    with progress(config.objective.upper(), total_rounds, completed=state["round"], unit="rounds",
                  enabled=accelerator.is_main_process) as tracker:
        stop = watch.check()  # the start (or, resumed, where the history left off)
        while state["round"] < total_rounds and not stop:
            record = run.round()
            state["rounds"].append(record)
            state[f"{unit}_trained"] += record[f"{unit}_trained"]
            state["round"] += 1
            accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=state["round"])
            tracker.update(state["round"], objective.progress(record))
            epoch_done = state["round"] % per_epoch == 0
            stop = watch.check()
            if epoch_done or stop or (config.save_every_rounds and state["round"] % config.save_every_rounds == 0):
                checkpoints.save(accelerator, out, "round", state["round"], state)
            if epoch_done and accelerator.is_main_process and config.validation_images > 0:
                validation_grid(model, accelerator.unwrap_model(denoiser), validation_prompts, config,
                                out / "validation" / f"epoch-{state['round'] // per_epoch}.png")
            accelerator.wait_for_everyone()
    outputs = export(config, accelerator, model, denoiser, out)
    monitored = watch.summary()
    if config.merge and (out / BEST_DIR / "lora").is_dir() and monitored.get("best_round") is not None:
        outputs[f"{BEST_DIR}_merged_{family.denoiser}"] = merge(config, model, out / BEST_DIR)
    if accelerator.is_main_process:
        write_json_atomic(state | {"monitor": monitored}, out / "lpo_summary.json")
    accelerator.end_training()
    return {"rounds": state["round"], f"{unit}_trained": state[f"{unit}_trained"], "history": state["rounds"],
            "objective": {"unit": unit, "found": objective.found, "shared": objective.shared}, "outputs": outputs,
            "monitor": monitored, **outputs}


@dataclass
class Run:
    """One `lpo optimize` run: what every round reads, and the state it updates (`state`: rounds done, updates,
    items trained, the per-round records)."""

    config: LPOConfig
    objective: Objective
    accelerator: Accelerator
    model: Any  # the family's Generator
    denoiser: Any  # the policy, prepared by accelerate
    reference: Reference
    lrm: Any
    optimizer: torch.optim.Optimizer
    prompts: list[str]
    thresholds: dict
    scales: dict | None
    metrics: checkpoints.MetricsLog
    state: dict[str, Any]
    rolled: tuple | None = None  # the current round's rollout, made by the pre-flight
    spreads: list[float] = dataclasses.field(default_factory=list)  # GRPO: the last rollout's groups' gaps

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    def _base_seed(self) -> int:
        return (self.config.seed * 1_000_003 + self.state["round"]) * 1_009 + self.rank

    def rollout(self) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """This round's items (gathered from every process, in one order) and its record so far."""
        config, rank, world = self.config, self.rank, self.world
        epoch, indices = round_prompts(self.prompts, self.state["round"], rank, world, config.sample_batch_size,
                                       config.seed)
        batch_prompts = [self.prompts[i] for i in indices]
        # trajectory j of rank r is trajectory r x batch + j of the round: the same noise for any number of processes
        round_seed = (self._base_seed() - rank) * 101 + rank * config.sample_batch_size
        generators = [torch.Generator().manual_seed(round_seed + j) for j in range(len(batch_prompts))]
        return self._rollout(batch_prompts, generators, epoch)

    def preflight(self, total_rounds: int, mixed: bool) -> list[Check]:
        """The pre-flight checks on this round's rollout, which the round then trains on (no extra sampling)."""
        self.rolled = self.rollout()
        return run_checks(self, *self.rolled, self.spreads, total_rounds, mixed)

    def round(self) -> dict[str, Any]:
        """Sample this round's trajectories with the current policy, gather the objective's items from every
        process in one order, and train on them once; returns the round's record."""
        config, rank, world = self.config, self.rank, self.world
        items, record = self.rolled or self.rollout()
        self.rolled = None
        base_seed = self._base_seed()
        share = len(items) // world
        if share == 0:
            return record
        started = time.perf_counter()
        order = torch.randperm(len(items), generator=torch.Generator().manual_seed(base_seed - rank)).tolist()
        # interleaved: chunk j of every process together is chunk j of one process with world x the batch size
        mine = [items[i] for i in order[rank:share * world:world]]
        record.update(self._train(mine))
        record[f"{self.objective.unit}_trained"] = share * world
        record.update({"updates": math.ceil(share / config.train_batch_size),
                       "train_forwards": self.objective.forwards(config) * share * world,
                       "train_seconds": round(time.perf_counter() - started, 3)})
        return record

    def _rollout(self, batch_prompts: list[str], generators: list[torch.Generator],
                 epoch: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        config, model, lrm, objective = self.config, self.model, self.lrm, self.objective
        policy = self.accelerator.unwrap_model(self.denoiser)
        policy.eval()
        cond = model.encode_prompts(batch_prompts)
        started = time.perf_counter()
        result = rollout(model, cond, batch_prompts, lrm, generators, self.thresholds, config.steps, config.guidance,
                         config.eta, config.candidates, config.score_timestep, denoiser=policy,
                         objective=objective.name, reduce=config.logprob_reduction, group_filter=config.grpo_filter)
        self.spreads = result.spreads
        final_scores = lrm.score(result.final.to(lrm.device, lrm.dtype),
                                 torch.full((len(batch_prompts),), model.clean_timestep(), device=lrm.device),
                                 batch_prompts).float()
        # (step, trajectory of the round): the same order of items for any number of processes
        local = [{"x_t": result.x_t[i], "t": result.timesteps[i], "prompt": batch_prompts[result.prompt_index[i]],
                  "key": (result.step_index[i], self.rank * config.sample_batch_size + result.prompt_index[i]),
                  **{name: getattr(result, name)[i] for name in objective.fields}} for i in range(len(result))]
        items = sorted(gather_object(local) if self.world > 1 else local, key=lambda item: item["key"])
        bands = dict(result.valid_per_band)
        if self.world > 1:
            bands = {name: sum(counts) for name, counts in zip(bands, zip(*gather_object([list(bands.values())])))}
        record: dict[str, Any] = {"round": self.state["round"], "epoch": epoch, objective.found: len(items),
                                  f"{objective.unit}_trained": 0,
                                  "final_lrm_score": self.accelerator.gather(final_scores).mean().item(),
                                  **{f"valid_{name}": count for name, count in bands.items()}}
        record["sample_seconds"] = round(time.perf_counter() - started, 3)
        return items, record

    def _train(self, mine: list[dict[str, Any]]) -> dict[str, Any]:
        """One optimizer update per chunk of `train_batch_size` items; the means of the logged losses, and the
        objective's round summary."""
        config, accelerator, objective, denoiser = self.config, self.accelerator, self.objective, self.denoiser
        denoiser.train()
        logs: dict[str, list[float]] = {key: [] for key in objective.logged}
        per_chunk = []
        for start in range(0, len(mine), config.train_batch_size):
            chunk = mine[start:start + config.train_batch_size]
            device = accelerator.device  # latents stay float32 for the step maths; the denoiser casts its input
            batch = stack_items(chunk, objective.fields, device)
            chunk_cond = self.model.encode_prompts([c["prompt"] for c in chunk])
            with accelerator.autocast():
                losses = objective.losses(self.model, denoiser, self.reference, batch, chunk_cond, config,
                                          self.scales)
            if not torch.isfinite(losses["loss"]):
                raise TrainingDiverged(f"{config.objective.upper()} loss became {losses['loss'].item()} in round "
                                       f"{self.state['round']}; the last checkpoint in "
                                       f"{Path(config.out) / CHECKPOINTS} is intact. Lower --lr (or --beta).")
            accelerator.backward(losses["loss"])
            if config.max_grad_norm > 0 and accelerator.sync_gradients:
                accelerator.clip_grad_norm_([p for p in denoiser.parameters() if p.requires_grad],
                                            config.max_grad_norm)
            lr = self.optimizer.param_groups[0]["lr"]
            self.optimizer.step()
            self.optimizer.zero_grad()
            for key in logs:
                logs[key].append(losses[key].item())
            per_chunk.append({key: value.detach() for key, value in losses.items()})
            # every process trains the same number of chunks: the update's numbers over all of them
            shared = accelerator.reduce(torch.tensor([losses["loss"].item(), losses[objective.shared].item()],
                                                     dtype=torch.float64, device=accelerator.device), "mean")
            self.state["updates"] = self.state.get("updates", 0) + 1
            self.metrics.write({"update": self.state["updates"], "round": self.state["round"], "lr": lr,
                                "loss": shared[0].item(), objective.shared: shared[1].item(),
                                objective.unit: len(chunk) * self.world})
        return {**{key: sum(values) / len(values) for key, values in logs.items()},
                **objective.summary(per_chunk, lambda tensor: accelerator.gather(tensor.to(accelerator.device)))}
