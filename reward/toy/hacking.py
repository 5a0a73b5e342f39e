"""The demo's reward-hacking stage (`lpo demo --hacking`): the monitor of `lpo optimize` in a world with an oracle.

A hacking run needs a reward with a flaw the policy can exploit. Here it is planted, so its cause is known: raters who
favour squares (`PLANTED`). Each training caption of another shape gets one more image, its exact scene drawn as a
square, and every pair in which exactly one image is a square is labelled for the square, whatever the caption asks;
the other pairs follow the oracle (`make_pickapic_table(planted=...)`, seed + 2, no flips). An LRM trained on them with
the demo's settings (`lrm-planted`) rewards squares. LPO then runs on it with eight times the demo's learning rate
(`--hacking-lr`) for `--hacking-epochs` under the held-out monitor, with the toy world's `pickscore` and `clip` scorers
as the independent metrics (they never saw the biased labels), on training captions held out of the run (x
`MONITOR_IMAGES`), with the stop rule's defaults. When the rule stops it, the run is continued without the rule to its
last epoch, as an unmonitored run would have gone on (the same checkpoints, so the same trajectory up to the stop). The
demo's held-out captions (which neither the run nor the monitor saw) then measure the oracle alignment of the base, of
the checkpoint the monitor kept and of the unmonitored run's last one, with the same seeds.

Measured before the bias was planted: the demo's own LRM at the demo's rate did not hack (the paper's SD1.5
thresholds, 0.35-0.5, after 30 and 40 epochs: oracle 0.632 and 0.676 against the base's 0.630), and at 4x the rate
the policy swung by up to 12 oracle points from one epoch to the next, so the check the monitor kept was no better
than the last (0.574 against 0.612). A bias planted in only the pairs that happen to hold one square (9% of the
MPCF-kept pairs relabelled) moved the policy too little at the demo's rate (kept 0.642, last 0.622, base 0.630).
With the planted bias, four times the demo's rate took 30 epochs to fall 10-13 oracle points (kept - last +4.9
[-0.8, +11.8] after 10 epochs, seed 0); eight times the rate falls 25-30 points within 5 epochs, so the stage and
its claims test stay short.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lpo.core.errors import InputError
from lpo.core.shipped import resolve_shipped
from lpo.curate import ingest
from lpo.reward.lpo import generation
from lpo.reward.lpo import train as lpo_train
from lpo.reward.lpo.config import GenerationOptions, LPOConfig
from lpo.reward.lpo.monitor import BEST_DIR
from lpo.reward.lpo.sample import image_seed
from lpo.reward.lpo.sampler import sample
from lpo.reward.toy.config import DemoConfig
from lpo.reward.toy.world import Scene, agreement, perceive, write_pickapic_parquet

KEPT_DIR = "hacking-kept"
PLANTED = "square"  # the planted raters' favourite shape
PLANTED_DIR = "hacking-data"  # the biased pairs: train.parquet and its ingested curation folder
PLANTED_LRM = "lrm-planted"
MONITOR_METRICS = ["pickscore", "clip"]  # the toy world's scorers: independent of the LRM, trained on other data
# images per held-out caption at each check: 7 captions x 16 = 112 images, about 3 s a check; with 4 (28 images) a
# check's paired standard error (about 0.2 per-image std) was as large as the run's fall, and the noise-aware rule
# could not tell it from noise
MONITOR_IMAGES = 16


def validate(config: DemoConfig) -> None:
    low_high = list(config.hacking_threshold or config.lpo_threshold)
    if config.hacking_epochs < 1 or config.hacking_lr <= 0 or len(low_high) != 2 or \
            not 0 <= low_high[0] <= low_high[1] < 1:
        raise InputError(f"--hacking-epochs {config.hacking_epochs} must be at least 1, --hacking-lr "
                         f"{config.hacking_lr} above 0 and --hacking-threshold {low_high} two values "
                         "0 <= low <= high < 1.")


def lpo_config(config: DemoConfig, out: Path, lpo: LPOConfig) -> LPOConfig:
    """The monitored hacking run: the demo's LPO settings with the hacking rate, thresholds and epochs."""
    return dataclasses.replace(lpo, out=out / "hacking", threshold=list(config.hacking_threshold or lpo.threshold),
                               lr=config.hacking_lr, epochs=config.hacking_epochs, validation_images=0, monitor=True,
                               monitor_metrics=MONITOR_METRICS, monitor_models_dir=resolve_shipped(config.models),
                               monitor_images=MONITOR_IMAGES,
                               resume=lpo_train.latest_checkpoint(out / "hacking") is not None)


def oracle(config: DemoConfig, base: str, held_out: list[str], lora: str | None) -> list[float]:
    """Per image, the oracle agreement of the generator (`lora` loaded) on the held-out captions, with the demo's
    sampler settings and seeds (images stored caption by caption)."""
    n = config.images_per_prompt
    prompts = [p for p in held_out for _ in range(n)]
    seeds = [image_seed(config.seed, p, i) for p in range(len(held_out)) for i in range(n)]
    model = generation.load(GenerationOptions(base=base, sampler=config.sampler, lora=lora))
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    latents = sample(model, model.encode_prompts(prompts), generators, config.steps, config.guidance,
                     eta=LPOConfig(family=config.family).resolved().eta)["latents"]
    wanted, seen = [Scene.from_caption(p) for p in prompts], [perceive(np.asarray(i)) for i in model.decode(latents)]
    return [agreement(w, s) for w, s in zip(wanted, seen, strict=True)]


def planted_lrm(config: DemoConfig, out: Path, fit_lrm: Callable[..., dict[str, Any]]) -> Path:
    """The biased pairs, ingested, and the LRM trained on them with the demo's settings (`fit_lrm`); its folder."""
    data = out / PLANTED_DIR
    pairs = data / "curate" / ingest.PAIRS_FILE
    if not pairs.is_file():
        write_pickapic_parquet(data / "train.parquet", num_prompts=config.train_prompts, flip_rate=0.0,
                               tie_rate=0.0, seed=config.seed + 2, planted=PLANTED)
        ingest.run(ingest.IngestConfig(source=str(data / "train.parquet"), out=data / "curate"))
    fit_lrm(config, out, pairs, out / PLANTED_LRM)
    return out / PLANTED_LRM / "last"


def hacking(config: DemoConfig, out: Path, lpo: LPOConfig, base: str, held_out: list[str],
            fit_lrm: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    """Train the planted LRM, run the monitored hacking run on it, keep what the monitor kept, continue it
    unmonitored, and measure the three generators' oracle alignment on the held-out captions."""
    monitored = lpo_config(config, out, dataclasses.replace(lpo, lrm=planted_lrm(config, out, fit_lrm)))
    summary = lpo_train.run(monitored)
    verdict = summary["monitor"]
    kept = out / KEPT_DIR
    if not kept.exists():  # a rerun of the stage finds it made (the run's best/ may change after the stop)
        shutil.copytree(out / "hacking" / BEST_DIR, kept)
    stop_round = summary["rounds"] if verdict["stopped"] else None
    if verdict["stopped"]:  # on to the last epoch without the rule: the unmonitored run's last checkpoint
        summary = lpo_train.run(dataclasses.replace(monitored, stop_patience=0, resume=True))
    return {"planted": PLANTED, "lrm": str(monitored.lrm), "threshold": monitored.threshold, "lr": monitored.lr,
            "epochs": config.hacking_epochs,
            "rounds": summary["rounds"], "stopped_round": stop_round, "reason": verdict["reason"],
            "best_round": json.loads((kept / "monitor.json").read_text())["round"], "checks": verdict["checks"],
            "monitor_plot": str(out / "hacking" / "monitor.png"),
            "oracle_per_image": {"base": oracle(config, base, held_out, None),
                                 "kept": oracle(config, base, held_out, str(kept / "lora")),
                                 "last": oracle(config, base, held_out, str(out / "hacking" / "lora"))}}
