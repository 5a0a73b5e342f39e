"""`lpo eval`: generate every (prompt, image) with its own seed (`seed + 1000 * prompt + image`), score every image
against its own prompt, and write the per-image table, the summary and the grid. An interrupted run continues
where it stopped; changed generation settings are refused."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from PIL import Image

from lpo.core import config as cfg
from lpo.core import rundir
from lpo.core.device import resolve_device, resolve_dtype
from lpo.core.errors import InputError
from lpo.core.files import atomic_path, write_text_atomic
from lpo.core.parts import RecordLog
from lpo.reward.backbones import family_of
from lpo.reward.eval.config import EvalConfig
from lpo.reward.eval.items import IMAGES_DIR, RECORDS_FILE, RUN_FILE, EvalItem
from lpo.reward.eval.score import (
    _progress,
    _versions,
    check_records,
    resolve_metric_specs,
    resolve_prompt_records,
    score_items,
)
from lpo.reward.eval.stats import write_outputs
from lpo.reward.lpo import generation
from lpo.reward.lpo.sample import image_seed
from lpo.reward.lpo.sampler import sample
from lpo.reward.lrm.model import LatentRewardModel
from lpo.reward.serve.client import remote_lrm, remote_scorers

logger = logging.getLogger(__name__)

MAX_IMAGES_PER_PROMPT = 1000  # the seed of image i of prompt p is seed + 1000 * p + i
# The settings a resumed run must share with the images already on disk.
GENERATION_KEYS = ("base", "lora", "denoiser", "lrm", "candidates", "steps", "guidance", "eta", "sampler",
                   "resolution", "seed", "dtype")


def generation_settings(config: EvalConfig) -> dict[str, Any]:
    """What the images depend on, with the family's defaults filled in (guidance; eta with an LRM)."""
    return generation.settings(config) | {"seed": config.seed, "dtype": config.dtype}


class Checked(NamedTuple):
    """What `validate` found: the prompts, the metric specs, the prompts' benchmark records (GenEval's metadata, if
    the prompt file carries them) and where a --denoiser's weights are read (a run directory names its merged_*)."""

    prompts: list[str]
    specs: dict[str, str]
    records: list[dict[str, Any]] | None
    denoiser_weights: str | None


def validate(config: EvalConfig) -> Checked:
    """Check everything that can be checked before a model loads."""

    missing = [f"--{name}" for name in ("base", "prompts", "out") if not getattr(config, name)]
    if missing:
        raise InputError(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} required, e.g. "
                         "`lpo eval --base DIR --prompts prompts.txt --out runs/eval-base`.")
    cfg.check_positive(images_per_prompt=config.images_per_prompt, batch_size=config.batch_size,
                    score_batch_size=config.score_batch_size, max_prompts=config.max_prompts)
    if config.images_per_prompt > MAX_IMAGES_PER_PROMPT:
        raise InputError(f"--images-per-prompt {config.images_per_prompt}: at most {MAX_IMAGES_PER_PROMPT} (image i "
                         "of prompt p uses seed + 1000 * p + i, so more would share seeds).")
    if config.grid_prompts < 0:
        raise InputError(f"--grid-prompts {config.grid_prompts} must be 0 or more.")
    rundir.claim(config.out, "eval")
    resolve_device(config.device)  # a GPU asked for where there is none: refused before anything is written
    _, denoiser_weights = generation.check(config, reward_url=config.reward_url, has_reward_url=True)
    resolve_dtype(config.dtype, option="--dtype")
    resolve_dtype(config.score_dtype, option="--score-dtype", auto=None)
    prompts, records = resolve_prompt_records(config.prompts, config.max_prompts)
    check_records(config.metrics, records, config.prompts)
    specs = resolve_metric_specs(config.metrics, config.models, config.models_dir)
    if config.reward_url is not None:
        remote_scorers(config.reward_url, list(specs))  # reachable, before anything is generated
    _check_same_run(Path(config.out), generation_settings(config))
    return Checked(prompts, specs, records, denoiser_weights)


def _check_same_run(out: Path, settings: dict[str, Any]) -> None:
    path = out / RUN_FILE
    if not path.is_file():
        return
    stored = json.loads(path.read_text())
    changed = [f"{k}={stored.get(k)!r} (now {settings[k]!r})" for k in GENERATION_KEYS if stored.get(k) != settings[k]]
    if changed:
        raise InputError(f"{out} holds a run made with {', '.join(changed)}; resume with the same generation "
                         "settings, or pick a new --out.")


def plan(prompts: Sequence[str], images_per_prompt: int, seed: int, out: Path,
         records: Sequence[dict[str, Any]] | None = None) -> list[EvalItem]:
    """Every (prompt, image) of a run, with its seed, its file and its prompt's record."""

    items = []
    for p, prompt in enumerate(prompts):
        for i in range(images_per_prompt):
            item = EvalItem(p, i, prompt, image_seed(seed, p, i), Path(), None if records is None else records[p])
            items.append(dataclasses.replace(item, path=out / IMAGES_DIR / f"{item.key}.png"))
    return items


def finished(out: Path, items: Sequence[EvalItem]) -> set[str]:
    """Keys of the items whose record and image file are on disk. A torn last record line (an interrupted write) is
    dropped; a record that names another prompt or seed than the plan stops the run."""
    records = RecordLog(out / RECORDS_FILE).records()
    done = set()
    for item in items:
        record = records.get(item.key)
        if record is None:
            continue
        if record["prompt"] != item.prompt or record["seed"] != item.seed:
            raise InputError(f"{out}: image {item.key} was made for prompt {record['prompt']!r} with seed "
                             f"{record['seed']}, but prompt {item.prompt_index} is now {item.prompt!r} with seed "
                             f"{item.seed}: the prompt file changed. Use the same prompts to resume, or a new --out.")
        if item.path.is_file():
            done.add(item.key)
    return done


def _save_image_atomic(image: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def _generation_dtype(config: EvalConfig, device: str) -> Any:
    """--dtype: auto is the family's half precision on CUDA (float16; FLUX.1 bfloat16; the VAE stays float32) and
    float32 on the CPU."""

    half = torch.bfloat16 if family_of(config.base).half_precision == "bf16" else torch.float16
    auto = half if device.startswith("cuda") else torch.float32
    return resolve_dtype(config.dtype, option="--dtype", auto=auto)


def _load_models(config: EvalConfig, device: str) -> tuple[Any, Any]:
    """The generator (LoRA loaded) and the LRM that guides it, if any (local, or served with --reward-url)."""

    model = generation.load(config, device=device, dtype=_generation_dtype(config, device))
    if config.lrm is not None:
        lrm = LatentRewardModel.from_pretrained(config.lrm).to(device)
    elif config.reward_url is not None and config.candidates > 1:
        lrm = remote_lrm(config.reward_url, model.family.name, config.base)
    else:
        lrm = None
    return model, lrm


def generate(config: EvalConfig, todo: Sequence[EvalItem], out: Path, device: str) -> None:
    """Generate `todo` in batches, each image from its own generator; append a record once its file is in place."""

    model, lrm = _load_models(config, device)
    settings = generation_settings(config)
    eta, guidance = settings["eta"], settings["guidance"]
    logger.info("generating %d images (%d steps, CFG %s, eta %s, batch %d) on %s", len(todo), config.steps,
                guidance, eta, config.batch_size, device)
    with RecordLog(out / RECORDS_FILE).appending() as append, _progress("generating", len(todo)) as advance:
        for start in range(0, len(todo), config.batch_size):
            batch = todo[start : start + config.batch_size]
            prompts = [item.prompt for item in batch]
            cond = model.encode_prompts(prompts)
            generators = [torch.Generator().manual_seed(item.seed) for item in batch]
            latents = sample(model, cond, generators, config.steps, guidance, eta, lrm=lrm, prompts=prompts,
                             candidates=config.candidates)["latents"]
            for item, image in zip(batch, model.decode(latents), strict=True):
                _save_image_atomic(image, item.path)
            append({"key": item.key, "prompt_index": item.prompt_index, "image_index": item.image_index,
                    "prompt": item.prompt, "seed": item.seed, "path": f"{IMAGES_DIR}/{item.path.name}"}
                   for item in batch)
            advance(len(batch))


def run(config: EvalConfig) -> dict[str, Any]:
    """Generate every (prompt, image) with its own seed (skipping finished images), score every image with every
    metric, and write the per-image table, the summary and the grid."""

    prompts, specs, records, denoiser_weights = validate(config)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = generation_settings(config)
    cfg.save(config, out / "config.json")
    write_text_atomic(json.dumps(settings, indent=2) + "\n", out / RUN_FILE)
    items = plan(prompts, config.images_per_prompt, config.seed, out, records)
    done = finished(out, items)
    todo = [item for item in items if item.key not in done]
    device = resolve_device(config.device)
    if todo:
        logger.info("%d of %d images already generated; generating %d", len(done), len(items), len(todo))
        generate(config, todo, out, device)
    else:
        logger.info("all %d images already generated", len(items))
    with Image.open(items[0].path) as first:
        resolution = list(first.size)
    score_dtype = resolve_dtype(config.score_dtype, option="--score-dtype", auto=None)
    scores, models = score_items(items, specs, out, config.score_batch_size, device, score_dtype,
                                 remote_scorers(config.reward_url, list(specs)))
    if denoiser_weights is not None:
        settings = settings | {"denoiser_weights": denoiser_weights}
    made_with = {"sampler": family_of(config.base).sampler, **settings,
                 "torch_dtype": str(_generation_dtype(config, device)).removeprefix("torch."),
                 "images_per_prompt": config.images_per_prompt, "resolution": resolution,
                 "prompts_file": str(config.prompts)}
    meta = {"generation": made_with, "generated_now": len(todo), "versions": _versions()}
    return write_outputs(items, scores, models, out, meta, config.grid_prompts)
