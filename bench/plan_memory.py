"""The `--dry-run` memory model against measured peaks: one training step of a real-size model, planned and run.

    python bench/plan_memory.py [--cases lrm-sd15 lpo-sd15] [--pairs 1 2] [--out bench/results/plan_memory.md]

Each case builds the architecture from its published config (`reward/backbones/published.py`) with random weights and
runs two training steps at each batch size (the second with the optimizer's state held, as every later one) in a
process of its own, on the CPU: the peak resident memory above the process's baseline (taken after the imports, before
the model is built), twice: with glibc's malloc returning every freed block of 64 KB or more (`RETURNING`), so the
peak is the live memory, what CUDA's `max_memory_allocated` reports (the GPU side: `bench/gpu_check.py`), and with
its default settings, whose heap keeps the transients' slack. The plan is the real `--dry-run` of the same run
(float32: the CPU computes in full precision). Two batch sizes separate what is fixed (weights, gradients, moments)
from what grows with the batch (activations). Cases:

- `lrm-sd15`: the SD1.5 LRM (the truncated UNet and CLIP-L, 476M parameters, all trained) at 512 px, without feature
  guidance, AdamW, no gradient checkpointing: Bradley-Terry updates on `pairs` pairs.
- `lpo-sd15`: LPO on SD1.5 at 512 px: the pipeline (UNet, VAE, CLIP-L) and an LRM held, a rank-4 LoRA trained, CFG
  5, no gradient checkpointing: one update on `pairs` tuples (`--pairs` counts tuples here).

What does not fit this machine's 24 GB is planned only: the SDXL LRM (2.07B trained parameters: 33 GB of weights,
gradients and moments in float32) and SD3.5-Medium's (1.7B, 27 GB); LPO on SDXL and SD3.5 (their frozen weights and
text encoders alone pass 24 GB in float32).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

GB = 1e9


def resident() -> int:
    """This process's resident memory now, in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_resident() -> int:
    """This process's peak resident memory since it started, in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def materialize(model: Any) -> Any:
    """A model built on the meta device, given CPU memory and small random weights (CLIP's position ids set)."""
    import torch

    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
        for buffer_name, buffer in model.named_buffers():  # to_empty leaves buffers unset: CLIP's position ids
            if buffer_name.endswith("position_ids"):
                buffer.copy_(torch.arange(buffer.shape[-1]).expand_as(buffer))
            else:
                raise RuntimeError(f"unexpected buffer {buffer_name}: initialise it here")
    return model


def measure_lrm(family: str, name: str, pairs: int, work: Path) -> dict:
    import torch

    from lpo.reward.backbones import FAMILIES
    from lpo.reward.backbones.published import write_pipeline_configs
    from lpo.reward.lrm.loss import bradley_terry_loss, pair_labels, pair_weights
    from lpo.reward.plan import meta_lrm

    torch.manual_seed(0)
    base = write_pipeline_configs(name, work / name)
    model = meta_lrm(FAMILIES[family], str(base), vfe_scale=1.0)
    baseline = resident()
    model = materialize(model)
    with torch.no_grad():
        model.logit_scale.fill_(2.0)
    model.train().requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    latents = torch.randn(2 * pairs, *model.config.latent_shape)
    steps = torch.full((2 * pairs,), 501)
    encoder = model.backbone.text_encoder
    labels = pair_labels(torch.zeros(pairs, dtype=torch.long), torch.zeros(pairs, dtype=torch.bool))
    for _ in range(2):  # the second update runs with AdamW's moments already held: the run's steady peak
        out = encoder(torch.zeros(2 * pairs, encoder.config.max_position_embeddings, dtype=torch.long))
        text = {"context": out.last_hidden_state, "text": out.pooler_output}
        if model.text_projection is not None:
            text["text"] = model.text_projection(text["text"])
        scores = model.score(latents, steps, [""] * (2 * pairs), text)
        bradley_terry_loss(scores[:pairs], scores[pairs:], labels, pair_weights(torch.ones(pairs))).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {"measured_bytes": peak_resident() - baseline,
            "parameters_trained": sum(p.numel() for p in params)}


def plan_lrm(family: str, name: str, pairs: int, work: Path) -> dict:
    from lpo.curate import ingest
    from lpo.reward.backbones.published import write_pipeline_configs
    from lpo.reward.lrm import train
    from lpo.reward.lrm.config import RewardTrainConfig
    from lpo.reward.toy.world import write_pickapic_parquet

    source = write_pickapic_parquet(work / "pairs.parquet", num_prompts=2, flip_rate=0.0, corrupt_images=0, seed=0)
    ingest.run(ingest.IngestConfig(source=str(source), out=work / "curate"))
    base = write_pipeline_configs(name, work / name)
    plan = train.run(RewardTrainConfig(manifest=work / "curate" / ingest.PAIRS_FILE, base=str(base),
                                       out=work / "run", dry_run=True, batch_size=pairs, processes=1,
                                       mixed_precision="no", vfe_scale=1.0, gradient_checkpointing=False,
                                       text_projection_init="", device="cpu"))["plan"]
    return {"planned_bytes": plan.total_bytes, "rows": {k: v for k, v in plan.rows if k != "base"}}  # no tmp path


def _gpu_check() -> Any:
    """bench/gpu_check.py as a module: its real-size generator and LRM builders."""
    spec = importlib.util.spec_from_file_location("gpu_check", Path(__file__).with_name("gpu_check.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def measure_lpo(family: str, name: str, tuples: int, work: Path) -> dict:
    """One LPO update on `tuples` tuples, as the trainer makes it: the generator (UNet, VAE, text encoder) and an LRM
    held, a rank-4 LoRA trained, the policy forward with both CFG halves and the reference's without gradients."""
    import torch
    from peft import LoraConfig

    from lpo.reward.backbones import FAMILIES
    from lpo.reward.backbones.published import write_pipeline_configs
    from lpo.reward.lpo.config import LPOConfig
    from lpo.reward.lpo.loss import lpo_loss
    from lpo.reward.lpo.objectives import step_log_probs
    from lpo.reward.lpo.train import Reference
    from lpo.reward.plan import meta_lrm

    torch.manual_seed(0)
    gpu_check = _gpu_check()
    baseline = resident()
    model = gpu_check.generator(family, None, "cpu", torch.float32)
    # the LRM built where it runs (gpu_check's deep copy of the whole UNet would leave its freed up-blocks in the
    # process's heap, which the resident peak then counts)
    lrm = materialize(meta_lrm(FAMILIES[family], str(write_pipeline_configs(name, work / name)))).eval()
    lrm.requires_grad_(False)
    held = resident() - baseline
    unet = model.unet
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=list(model.family.lora_targets)))
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=6e-5)
    reference, config = Reference(unet, lora=True), LPOConfig(guidance=5.0, eta=1.0)
    model.timesteps(20)
    shape = (tuples, *model.latent_shape)
    batch = {"x_t": torch.randn(shape), "t": torch.tensor([501] * tuples), "x_w": torch.randn(shape),
             "x_l": torch.randn(shape)}
    cond = model.encode_prompts(["a castle on a hill at dawn"] * tuples)
    # one update: the LoRA's moments (a few MB) change nothing the second time
    log_probs = step_log_probs(model, unet, reference, batch, cond, config)
    lpo_loss(log_probs["w"], log_probs["l"], log_probs["ref_w"], log_probs["ref_l"])["loss"].backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"measured_bytes": peak_resident() - baseline, "held_before_the_step_bytes": held,
            "parameters_trained": sum(p.numel() for p in params)}


def plan_lpo(family: str, name: str, tuples: int, work: Path) -> dict:
    from lpo.reward.backbones import FAMILIES
    from lpo.reward.backbones.published import write_pipeline_configs
    from lpo.reward.lpo import train
    from lpo.reward.lpo.config import LPOConfig
    from lpo.reward.plan import meta_lrm

    base = write_pipeline_configs(name, work / name)
    meta_lrm(FAMILIES[family], str(base)).save_config(work / "lrm")
    (work / "prompts.txt").write_text("a castle on a hill at dawn\n")
    plan = train.run(LPOConfig(family=family, base=str(base), lrm=work / "lrm", prompts=work / "prompts.txt",
                               out=work / "run", dry_run=True, train_batch_size=tuples, processes=1, guidance=5.0,
                               mixed_precision="no", lora_rank=4, gradient_checkpointing=False, device="cpu",
                               monitor=False))["plan"]
    return {"planned_bytes": plan.total_bytes, "rows": {k: v for k, v in plan.rows if k != "base"}}


CASES = {"lrm-sd15": ("sd15", "sd15", measure_lrm, plan_lrm), "lpo-sd15": ("sd15", "sd15", measure_lpo, plan_lpo)}
BATCHES = {"lrm-sd15": [1, 2, 4], "lpo-sd15": [1, 2]}  # what fits 24 GB (LPO at 4 tuples plans 20 GB)


def one(case: str, pairs: int) -> dict:
    """Measure and plan one case at one batch size (run in a fresh process: the peak is the process's own)."""
    family, name, measure, plan = CASES[case]
    with tempfile.TemporaryDirectory() as work:
        measured = measure(family, name, pairs, Path(work) / "m")
        planned = plan(family, name, pairs, Path(work) / "p")
    return {"case": case, "pairs": pairs, **measured, **planned}


# glibc's malloc keeps freed memory in its heap (and raises its mmap threshold as large blocks are freed), so the
# resident peak counts the transients' slack too; with a fixed mmap threshold every block of 64 KB or more is
# returned when freed, and the resident peak is the live memory, what CUDA's max_memory_allocated reports
RETURNING = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def run(cases: list[str], batches: list[int] | None) -> list[dict]:
    results = []
    for case in cases:
        for pairs in batches or BATCHES[case]:
            row = {}
            for allocator, extra in (("live", RETURNING), ("default", {})):
                child = subprocess.run([sys.executable, __file__, "--one", case, str(pairs)], capture_output=True,
                                       text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", **extra})
                if child.returncode != 0:
                    raise RuntimeError(child.stderr[-3000:])
                measured = json.loads(child.stdout.strip().splitlines()[-1])
                row = measured | row if allocator == "default" else measured
                row[f"measured_{allocator}_bytes"] = measured["measured_bytes"]
            row["measured_bytes"] = row["measured_live_bytes"]
            results.append(row)
    return results


def table(results: list[dict]) -> str:
    lines = ["| case | pairs | planned | measured (live) | measured / planned | resident, glibc's default allocator |",
             "|---|---|---|---|---|---|"]
    for r in results:
        default = r["measured_default_bytes"]
        lines.append(f"| {r['case']} | {r['pairs']} | {r['planned_bytes'] / GB:.2f} GB | "
                     f"{r['measured_bytes'] / GB:.2f} GB | {r['measured_bytes'] / r['planned_bytes']:.2f} | "
                     f"{default / GB:.2f} GB ({default / r['planned_bytes']:.2f}) |")
    by_case: dict[str, dict[int, dict]] = {}
    for r in results:
        by_case.setdefault(r["case"], {})[r["pairs"]] = r
    for case, runs in by_case.items():
        if len(runs) >= 2:
            (a, ra), (b, rb) = sorted(runs.items())[:2]
            for what in ("planned_bytes", "measured_bytes"):
                per = (rb[what] - ra[what]) / (b - a)
                lines.append(f"\n{case} {what.split('_')[0]}: {ra[what] - a * per:,.0f} B fixed + {per:,.0f} B per "
                             "pair")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=sorted(CASES))
    parser.add_argument("--pairs", nargs="*", type=int, help="batch sizes (default: each case's, BATCHES)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]))))
        return []
    results = run(args.cases, args.pairs)
    text = table(results)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
