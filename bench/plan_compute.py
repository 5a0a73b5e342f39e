"""The plan's compute for the paper's recipes and every family: FLOPs and GPU-hours from `--dry-run`, beside the
paper's reported A100-hours.

    python bench/plan_compute.py [--gpu a100] [--mfu 0.3] [--out bench/results/plan_compute.md]

Writes the published configs of SD1.5, SDXL, SD3.5-Medium, SD3.5-Large and FLUX.1-dev as config-only pipelines
(`reward/backbones/published.py`) and a config-only LRM of each (`plan.meta_lrm`), then runs the real `--dry-run`
of `lpo reward train` and `lpo optimize` (LPO and GRPO) with each family's defaults, which for SD1.5 and SDXL are the
paper's recipe (4,000 prompts, 5 epochs, 20 DDIM steps, K = 4, CFG 5; the LRM on 8 GPUs: 16 / 4 pairs per GPU for
4,000 / 8,000 micro-steps, the same pairs seen under either reading of its accumulation, docs/scaling.md). Nothing
is downloaded and no weight is built. The LPO rows are an upper bound (every step's pair passes the threshold); the
paper's A100-hours are its LPO training costs (23 SD1.5, 92 SDXL); the MFU that would make the plan agree is printed
beside them.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

from lpo.curate import ingest
from lpo.reward.backbones import FAMILIES
from lpo.reward.backbones.published import write_pipeline_configs
from lpo.reward.lpo import train as lpo_train
from lpo.reward.lpo.config import LPOConfig
from lpo.reward.lrm import train as lrm_train
from lpo.reward.lrm.config import RewardTrainConfig
from lpo.reward.plan import GPUS, meta_lrm
from lpo.reward.toy.world import write_pickapic_parquet

# (published pipeline, family, LRM pairs per GPU, LRM micro-steps, LPO processes, the paper's LPO A100-hours)
RECIPES = {
    "SD1.5": ("sd15", "sd15", 16, 4000, 4, 23.0),
    "SDXL": ("sdxl", "sdxl", 4, 8000, 4, 92.0),
    "SD3.5-Medium": ("sd35m", "sd3", 4, 8000, 8, None),
    "SD3.5-Large": ("sd35l", "sd3", 4, 8000, 8, None),
    "FLUX.1-dev": ("flux", "flux", 4, 8000, 8, None),
}
LRM_GPUS = 8
PROMPTS = 4000


def plans(work: Path, gpu: str, mfu: float, only: list[str] | None = None) -> list[dict]:
    source = write_pickapic_parquet(work / "pairs.parquet", num_prompts=3, flip_rate=0.0, corrupt_images=0, seed=0)
    ingest.run(ingest.IngestConfig(source=str(source), out=work / "curate"))
    prompts = work / "prompts.txt"
    prompts.write_text("".join(f"prompt {i}\n" for i in range(PROMPTS)))
    rows = []
    for title, (name, family, pairs, micro_steps, processes, paper) in RECIPES.items():
        if only and name not in only:
            continue
        base = write_pipeline_configs(name, work / name)
        lrm = work / f"lrm-{name}"
        meta_lrm(FAMILIES[family], str(base)).save_config(lrm)
        lrm_plan = lrm_train.run(RewardTrainConfig(
            manifest=work / "curate" / ingest.PAIRS_FILE, base=str(base), out=work / "runs" / name, dry_run=True,
            batch_size=pairs, max_steps=micro_steps, processes=LRM_GPUS, gpu=gpu, mfu=mfu, device="cpu",
            text_projection_init=""))["plan"]
        row = {"run": title, "lrm_gpu_hours": lrm_plan.gpu_hours, "lrm": dict(lrm_plan.rows), "paper": paper}
        for objective in ("lpo", "grpo"):
            plan = lpo_train.run(LPOConfig(family=family, base=str(base), lrm=lrm, prompts=prompts,
                                           out=work / "runs" / f"{objective}-{name}", objective=objective,
                                           dry_run=True, processes=processes, gpu=gpu, mfu=mfu, device="cpu",
                                           monitor=False))["plan"]
            row[f"{objective}_gpu_hours"] = plan.gpu_hours
            row[objective] = dict(plan.rows)
        rows.append(row)
    return rows


def table(rows: list[dict], gpu: str, mfu: float) -> str:
    peak = GPUS[gpu]
    lines = [f"GPU-hours on {gpu.upper()} at MFU {mfu:g} (dense bf16 peak {peak / 1e12:,.0f} TFLOP/s), the families' "
             "defaults; LPO an upper bound (every step's pair passes)", "",
             "| run | LRM forward, one latent | LRM training | LPO: denoiser forward (CFG) | LPO | GRPO | paper's "
             "LPO A100-hours | plan / paper | MFU that would agree |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lpo = row["lpo"]
        ratio = agree = "-"
        if row["paper"] is not None and gpu == "a100":
            ratio = f"{row['lpo_gpu_hours'] / row['paper']:.2f}"
            agree = f"{mfu * row['lpo_gpu_hours'] / row['paper']:.2f}"
        lines.append(f"| {row['run']} | {row['lrm']['FLOPs of one LRM forward (one latent)']} | "
                     f"{row['lrm_gpu_hours']:,.1f} h | "
                     f"{lpo['FLOPs of one denoiser forward (one latent, both CFG halves)']} | "
                     f"{row['lpo_gpu_hours']:,.1f} h | {row['grpo_gpu_hours']:,.1f} h | "
                     f"{row['paper'] if row['paper'] is not None else '-'} | {ratio} | {agree} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", default="a100", choices=sorted(GPUS))
    parser.add_argument("--mfu", type=float, default=0.3)
    parser.add_argument("--only", nargs="*", help="published pipelines to plan (default: all)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as work:
        text = table(plans(Path(work), args.gpu, args.mfu, args.only), args.gpu, args.mfu)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return text


if __name__ == "__main__":
    main()
