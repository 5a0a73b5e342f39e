"""LPO on the flow toy world: which stochastic step and which calibration, measured on the demo's own stages.

    python bench/flow_ablation.py --out runs/flow-ablation [--seeds 0 1] [--variants lpo-sde lpo-cps ...]

For each seed, `lpo demo --family sd3 --no-grpo` runs once with the flow defaults of the code before this ablation
(the SDE step, one beta, thresholds linear in the step's std): its data, curation and LRMs are then shared by every
variant, which reruns only LPO (or GRPO) and the comparison of generators on the held-out captions with the same
seeds. Each variant changes one thing:

- `lpo-sde`: the SDE step (Flow-GRPO's), constant beta, thresholds on the step's std (the run itself);
- `lpo-cps`: the coefficients-preserving step (children at their nominal noise level);
- `lpo-kappa`: `--beta-schedule kappa` (each step's log-ratio in units of the model's output);
- `lpo-sigma`: `--threshold-scale sigma` (thresholds linear in the noise share, not the step's std);
- `lpo-cps-kappa`, `lpo-cps-sigma`, `lpo-cps-kappa-sigma`: the combinations on the CPS step;
- `grpo`, `grpo-cps`: step-wise GRPO on the same trajectories, with the SDE and the CPS step.

The variant's sampler is also the comparison's: base, guided and tuned images all come from it, so each row has its
own base. Printed and written to OUT/ablation.json and OUT/ablation.md: per seed and variant, the base's and the
tuned model's oracle alignment with the effect's 95% interval (bootstrap over captions, as the demo's claims),
guided sampling's, the tuned model's LRM reward, the items trained and the training seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VARIANTS: dict[str, dict[str, Any]] = {
    "lpo-sde": {},
    "lpo-cps": {"sampler": "cps"},
    "lpo-kappa": {"lpo_beta_schedule": "kappa"},
    "lpo-sigma": {"lpo_threshold_scale": "sigma"},
    "lpo-cps-kappa": {"sampler": "cps", "lpo_beta_schedule": "kappa"},
    "lpo-cps-sigma": {"sampler": "cps", "lpo_threshold_scale": "sigma"},
    "lpo-cps-kappa-sigma": {"sampler": "cps", "lpo_beta_schedule": "kappa", "lpo_threshold_scale": "sigma"},
    "grpo": {"grpo": True},
    "grpo-cps": {"grpo": True, "sampler": "cps"},
}
BEFORE = {"sampler": "sde", "lpo_beta_schedule": "constant", "lpo_threshold_scale": "std"}  # the rows' common ground
SHARED = ("data", "curate", "val", "lrm-raw", "lrm-mpcf", "lrm-mpcf-fresh", "latent_cache", "lpo_prompts.txt")
SHARED_STAGES = ("data", "curate", "lrm-raw", "lrm-mpcf", "lrm-mpcf-fresh")


def share(source: Path, target: Path, objective: str) -> None:
    """Link the finished shared stages of `source` into `target`; for GRPO also its LPO stage (so only GRPO runs)."""
    (target / "stages").mkdir(parents=True, exist_ok=True)
    names = SHARED + (("lpo",) if objective == "grpo" else ())
    for name in names:
        if (source / name).exists() and not (target / name).exists():
            (target / name).symlink_to((source / name).resolve())
    for stage in SHARED_STAGES + (("lpo",) if objective == "grpo" else ()):
        shutil.copy(source / "stages" / f"{stage}.json", target / "stages" / f"{stage}.json")


def row(summary: dict[str, Any], variant: str) -> dict[str, Any]:
    from lpo.reward.toy import claims as judged

    evidence = judged.evidence(summary)["generators"]
    tuned = "grpo" if variant.startswith("grpo") else "lpo"
    base = evidence["base"]
    out: dict[str, Any] = {"base_oracle": float(base["oracle"].mean())}
    for name in (tuned, "guided"):
        diff = evidence[name]["oracle"] - base["oracle"]
        out[f"{name}_oracle"] = float(evidence[name]["oracle"].mean())
        out[f"{name}_effect"] = float(diff.mean())
        out[f"{name}_interval"] = list(judged.mean_interval(diff))
        out[f"{name}_lrm_reward"] = float(evidence[name]["lrm_reward"].mean())
    out["base_lrm_reward"] = float(base["lrm_reward"].mean())
    stage = summary[tuned]
    out["items"] = stage.get("tuples_trained", stage.get("groups_trained"))
    out["train_seconds"] = stage.get("train_seconds")
    out["tuned"] = tuned
    return out


def main() -> None:
    from lpo.reward.toy import demo
    from lpo.reward.toy.config import DemoConfig

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--models", type=Path, default=Path("manifests/toy-models"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    results: dict[str, dict[str, Any]] = {}
    path = args.out / "ablation.json"
    if path.is_file():
        results = json.loads(path.read_text())
    for seed in args.seeds:
        first = args.out / f"seed-{seed}" / "lpo-sde"
        config = DemoConfig(family="sd3", out=first, models=args.models, seed=seed, grpo=False, **BEFORE)
        for variant in ["lpo-sde"] + [v for v in args.variants if v != "lpo-sde"]:
            key = f"{seed}/{variant}"
            if key in results:
                continue
            changes = {**BEFORE, "grpo": False, **VARIANTS[variant]}
            out = args.out / f"seed-{seed}" / variant
            if variant != "lpo-sde":
                share(first, out, "grpo" if changes["grpo"] else "lpo")
            started = time.perf_counter()
            summary = demo.run(dataclasses.replace(config, out=out, **changes))
            results[key] = {"seed": seed, "variant": variant, **row(summary, variant),
                            "seconds": round(time.perf_counter() - started, 1)}
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(results, indent=2) + "\n")
            print(json.dumps(results[key]), flush=True)
    (args.out / "ablation.md").write_text(table(results))
    print(table(results))


def table(results: dict[str, dict[str, Any]]) -> str:
    lines = ["| seed | variant | base oracle | tuned oracle | effect [95% interval] | guided oracle | guided effect | "
             "tuned LRM reward (base) | items | training s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results.values():
        tuned = r["tuned"]
        low, high = r[f"{tuned}_interval"]
        g_low, g_high = r["guided_interval"]
        lines.append(f"| {r['seed']} | {r['variant']} | {r['base_oracle']:.3f} | {r[f'{tuned}_oracle']:.3f} | "
                     f"{100 * r[f'{tuned}_effect']:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}] | "
                     f"{r['guided_oracle']:.3f} | {100 * r['guided_effect']:+.1f} [{100 * g_low:+.1f}, "
                     f"{100 * g_high:+.1f}] | {r[f'{tuned}_lrm_reward']:.2f} ({r['base_lrm_reward']:.2f}) | "
                     f"{r['items']} | {r['train_seconds']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
