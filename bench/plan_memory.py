"""The `--dry-run` memory model against measured peaks: one training step of a real-size model, planned and run.

    python bench/plan_memory.py [--cases lrm-sd15 lpo-sd15 ...] [--pairs 1 2] [--allocators live default]
                                [--out bench/results/plan_memory.md]
    python bench/plan_memory.py --replan --out bench/results/plan_memory.md  # the same measurements, planned again

Each case builds the architecture from its published config (`reward/backbones/published.py`) with random weights and
runs a training step at each batch size in a process of its own, on the CPU: the step's peak resident memory (the
peak restarted when the step starts, so a transient of building the models is not counted) above the process's
baseline (taken after the imports, before the model is built), with glibc's malloc returning every freed
block of 64 KB or more (`RETURNING`), so the peak is the live memory, what CUDA's `max_memory_allocated` reports (the
GPU side: `bench/gpu_check.py`), and (`--allocators default`) with its default settings, whose heap keeps the
transients' slack. The plan is the real `--dry-run` of the same run. Two batch sizes separate what is fixed (weights,
gradients, moments) from what grows with the batch (activations). Cases (`CASES`):

- `lrm-sd15`: the SD1.5 LRM (the truncated UNet and CLIP-L, 476M parameters, all trained) at 512 px in float32,
  without feature guidance, AdamW, no gradient checkpointing: two Bradley-Terry updates (the second with AdamW's
  moments held, as every later one) on `pairs` pairs.
- `lrm-sd15-bf16`: the same under bf16 autocast (the trained weights stay float32).
- `lpo-sd15`, `grpo-sd15`: one LPO update on `pairs` tuples, one GRPO update on `pairs` groups of 4 (with its KL to
  the reference), SD1.5 at 512 px in float32: the pipeline (UNet, VAE, CLIP-L) and an LRM held, a rank-4 LoRA
  trained, CFG 5, no checkpointing.
- `lrm-sd35m`: SD3.5-Medium's LRM at 512 px, bf16 autocast over float32 trained weights, its frozen CLIP-L and
  CLIP-G held in bf16; `--depth 6` and no T5 (below); `lrm-sd35m-fp32` the same in float32.
- `lpo-sd35m`, `lpo-sdxl`: one LPO update at 512 px with gradient checkpointing, the frozen weights in bf16 and bf16
  autocast, the family's LoRA rank (32 and 64) in float32, an LRM held (SD3.5-Medium without T5, below).

What does not fit this machine's 24 GB is planned only: every weight of the SDXL LRM trains (2.07B parameters: 33 GB
of weights, gradients and moments in float32), SD3.5-Medium's at its default depth of 18 blocks too (1.7B, 27 GB);
T5-XXL (4.76B parameters, 9.5 GB in bf16) is held twice by SD3.5 LPO (the pipeline's and the LRM's own text
encoders), which with the rest passes 24 GB. So the SD3.5-Medium cases read a pipeline without T5 (a configuration
the pipeline accepts: 256 zero tokens stand in its place, the transformer's shapes and cost unchanged) and the LRM
runs 6 of the 24 blocks; what they leave out is weights, which the plan counts by parameters.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GB = 1e9


def resident() -> int:
    """This process's resident memory now, in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_resident() -> int:
    """This process's peak resident memory since it started or since `restart_peak`, in bytes (Linux reports KiB)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def restart_peak() -> None:
    """Start the peak again from the memory resident now (Linux: 5 to clear_refs resets VmHWM), so a step's peak is
    its own and not a transient of building the models."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def materialize(model: Any, dtype: Any = None) -> Any:
    """A model built on the meta device, given CPU memory in `dtype` (default: its own) and small random weights
    (CLIP's position ids set; SD3's fixed sin-cos position table zeroed: its values change no memory)."""
    import torch

    if dtype is not None:
        model = model.to(dtype)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
        for buffer_name, buffer in model.named_buffers():  # to_empty leaves buffers unset
            if buffer_name.endswith("position_ids"):
                buffer.copy_(torch.arange(buffer.shape[-1]).expand_as(buffer))
            elif buffer_name.endswith("pos_embed"):
                buffer.zero_()
            else:
                raise RuntimeError(f"unexpected buffer {buffer_name}: initialise it here")
    return model


@dataclass(frozen=True)
class Case:
    """One measured run: `kind` is lrm, lpo or grpo; `name` the published configs; `precision` the run's mixed
    precision (no: float32; bf16: frozen weights in bf16 and bf16 autocast)."""

    kind: str
    family: str
    name: str
    precision: str = "no"
    checkpointing: bool = False
    resolution: int | None = None
    depth: int | None = None
    t5: bool = True
    batches: tuple[int, ...] = (1, 2)
    vfe_scale: float = 1.0  # the LRM's feature guidance (1: none)
    device: str = "cpu"  # where the step runs: the plan follows that device's autocast and AdamW


CASES = {"lrm-sd15": Case("lrm", "sd15", "sd15", batches=(1, 2, 4)),
         "lrm-sd15-bf16": Case("lrm", "sd15", "sd15", "bf16", batches=(1, 2, 4)),
         "lpo-sd15": Case("lpo", "sd15", "sd15"),  # at 4 tuples it plans 20 GB
         "grpo-sd15": Case("grpo", "sd15", "sd15"),
         "lrm-sd35m": Case("lrm", "sd3", "sd35m", "bf16", resolution=512, depth=6, t5=False),
         "lrm-sd35m-fp32": Case("lrm", "sd3", "sd35m", resolution=512, depth=6, t5=False),
         "lpo-sd35m": Case("lpo", "sd3", "sd35m", "bf16", checkpointing=True, resolution=512, t5=False),
         "lpo-sdxl": Case("lpo", "sdxl", "sdxl", "bf16", checkpointing=True, resolution=512)}
K = 4  # GRPO's group size


def published_base(case: Case, work: Path) -> Path:
    """The case's pipeline folder of published configs (without T5 where the case drops it)."""
    from lpo.reward.backbones.published import write_pipeline_configs

    return write_pipeline_configs(case.name, work / case.name, () if case.t5 else ("text_encoder_3",))


def frozen_dtype(case: Case) -> Any:
    import torch

    return torch.bfloat16 if case.precision == "bf16" else torch.float32


def autocast(case: Case) -> Any:
    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=case.precision == "bf16")


def random_generator(case: Case, base: Path) -> Any:
    """The pipeline at `base` as `load_generator` holds it, every component in the run's frozen dtype, random weights
    (built on meta, then given memory: no float32 copy on the way)."""
    import diffusers

    from lpo.reward.backbones import get_family
    from lpo.reward.plan import component_module
    from lpo.reward.toy.random_text import clip_tokenizer

    adapter, dtype = get_family(case.family), frozen_dtype(case)
    index = json.loads((base / "model_index.json").read_text())
    parts: dict[str, Any] = {}
    for name, entry in index.items():
        if name.startswith("_"):
            continue
        if name == "scheduler":
            parts[name] = getattr(diffusers, entry[1]).from_pretrained(base, subfolder="scheduler")
            continue
        config = json.loads((base / name / "config.json").read_text())
        parts[name] = materialize(component_module(config), dtype).requires_grad_(False).eval()
        if name.startswith("text_encoder"):
            parts[name.replace("text_encoder", "tokenizer")] = clip_tokenizer()
    if case.family == "sd15":
        parts |= {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    if case.family == "sd3" and "text_encoder_3" not in parts:
        parts |= {"text_encoder_3": None, "tokenizer_3": None}
    pipeline = getattr(diffusers, adapter.pipeline)(**parts)
    pipeline.set_progress_bar_config(disable=True)
    return adapter.generator(pipeline, f"random {case.name} (published config)")


def hold_lrm_encoders(lrm: Any, dtype: Any) -> None:
    """A flow family's LRM loads its own frozen text encoders at its first prompt: give it them, as the run holds."""
    from lpo.reward.plan import component_module

    configs = lrm.backbone.encoder_configs
    lrm.backbone._encoders = {name: materialize(component_module(config), dtype).requires_grad_(False).eval()
                              for name, config in configs.items()}


def measure_lrm(case: Case, pairs: int, work: Path) -> dict:
    import torch

    from lpo.reward.backbones import FAMILIES
    from lpo.reward.lrm.loss import bradley_terry_loss, pair_labels, pair_weights
    from lpo.reward.plan import meta_lrm

    torch.manual_seed(0)
    base = published_base(case, work)
    model = meta_lrm(FAMILIES[case.family], str(base), depth=case.depth, vfe_scale=1.0, resolution=case.resolution)
    baseline = resident()
    model = materialize(model)
    with torch.no_grad():
        model.logit_scale.fill_(2.0)
    flow = FAMILIES[case.family].flow_matching
    if flow:
        hold_lrm_encoders(model, frozen_dtype(case))
    model.train().requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    latents = torch.randn(2 * pairs, *model.config.latent_shape)
    steps = torch.full((2 * pairs,), 501)
    labels = pair_labels(torch.zeros(pairs, dtype=torch.long), torch.zeros(pairs, dtype=torch.bool))
    restart_peak()
    for _ in range(2):  # the second update runs with AdamW's moments already held: the run's steady peak
        with autocast(case):
            if flow:  # the frozen encoders' output: the token sequence and pooled vector of the backbone's shapes
                config = model.backbone.transformer.config
                text = model.text_from_embeddings(
                    torch.zeros(2 * pairs, model.backbone.text_tokens, config.joint_attention_dim),
                    torch.zeros(2 * pairs, config.pooled_projection_dim))
            else:  # SD1.x/2.x and SDXL train their text encoder
                encoder = model.backbone.text_encoder
                out = encoder(torch.zeros(2 * pairs, encoder.config.max_position_embeddings, dtype=torch.long))
                text = {"context": out.last_hidden_state, "text": out.pooler_output}
                if model.text_projection is not None:
                    text["text"] = model.text_projection(text["text"])
            scores = model.score(latents, steps, [""] * (2 * pairs), text)
            loss = bradley_terry_loss(scores[:pairs], scores[pairs:], labels, pair_weights(torch.ones(pairs)))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {"measured_bytes": peak_resident() - baseline,
            "parameters_trained": sum(p.numel() for p in params)}


def pairs_manifest(work: Path) -> Path:
    """A small manifest for the LRM plans (its size changes no byte of a plan), written once in `work`."""
    from lpo.curate import ingest
    from lpo.reward.toy.world import write_pickapic_parquet

    manifest = work / "curate" / ingest.PAIRS_FILE
    if not manifest.exists():
        source = write_pickapic_parquet(work / "pairs.parquet", num_prompts=2, flip_rate=0.0, corrupt_images=0,
                                        seed=0)
        ingest.run(ingest.IngestConfig(source=str(source), out=work / "curate"))
    return manifest


def plan_lrm(case: Case, pairs: int, work: Path, base: Path | None = None) -> dict:
    """The `lpo reward train --dry-run` of the case's step on `base` (default: its published configs)."""
    from lpo.reward.lrm import train
    from lpo.reward.lrm.config import RewardTrainConfig

    base = base or published_base(case, work)
    plan = train.run(RewardTrainConfig(manifest=pairs_manifest(work), base=str(base), out=work / "plan-lrm",
                                       dry_run=True, batch_size=pairs, processes=1, mixed_precision=case.precision,
                                       vfe_scale=case.vfe_scale, gradient_checkpointing=case.checkpointing,
                                       text_projection_init="", device=case.device, depth=case.depth,
                                       resolution=case.resolution))["plan"]
    return {"planned_bytes": plan.total_bytes, "rows": {k: v for k, v in plan.rows if k != "base"}}  # no tmp path


def step_config(case: Case, base: Path, items: int, lrm: Path | None = None, prompts: Path | None = None,
                out: Path | None = None) -> Any:
    """The `lpo optimize` settings of the case (the family's LoRA rank and sampler), resolved; with `out`, its
    `--dry-run`."""
    from lpo.reward.lpo.config import LPOConfig

    return LPOConfig(family=case.family, base=str(base), lrm=lrm, prompts=prompts, out=out, dry_run=out is not None,
                     objective=case.kind,
                     train_batch_size=items, processes=1, guidance=5.0, mixed_precision=case.precision,
                     gradient_checkpointing=case.checkpointing, resolution=case.resolution, candidates=K,
                     device=case.device, monitor=False).resolved()


def measure_step(case: Case, items: int, work: Path) -> dict:
    """One LPO update on `items` tuples or one GRPO update on `items` groups of K, as the trainer makes it: the
    generator and an LRM held, a LoRA trained, the policy forward with both CFG halves and the reference's without
    gradients."""
    import torch
    from peft import LoraConfig

    from lpo.reward.backbones import FAMILIES
    from lpo.reward.lpo.objectives import OBJECTIVES
    from lpo.reward.lpo.train import Reference, lora_targets
    from lpo.reward.plan import meta_lrm

    torch.manual_seed(0)
    base = published_base(case, work)
    config = step_config(case, base, items)
    family, dtype = FAMILIES[case.family], frozen_dtype(case)
    baseline = resident()
    model = random_generator(case, base)
    lrm = materialize(meta_lrm(family, str(base)), dtype).eval().requires_grad_(False)
    if family.flow_matching:
        hold_lrm_encoders(lrm, dtype)
    held = resident() - baseline
    denoiser = model.denoiser
    targets = lora_targets(denoiser, family, config)
    denoiser.add_adapter(LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha or config.lora_rank,
                                    init_lora_weights="gaussian", target_modules=targets))
    params = [p for p in denoiser.parameters() if p.requires_grad]
    for param in params:
        param.data = param.data.float()  # as the trainer: the LoRA in float32, the frozen base in the run's dtype
    if case.checkpointing:
        denoiser.enable_gradient_checkpointing()
    denoiser.train()
    optimizer = torch.optim.AdamW(params, lr=config.lr)
    reference = Reference(denoiser, lora=True)
    model.use_sampler(config.sampler)
    model.use_resolution(case.resolution)
    timesteps = model.timesteps(20)
    shape = (items, *model.latent_shape)
    batch = {"x_t": torch.randn(shape), "t": torch.tensor([timesteps[len(timesteps) // 2]] * items)}
    if case.kind == "lpo":
        batch |= {"x_w": torch.randn(shape), "x_l": torch.randn(shape)}
    else:
        batch |= {"children": torch.randn(items, K, *shape[1:]), "old_log_prob": torch.zeros(items, K),
                  "advantages": torch.randn(items, K)}
    with torch.no_grad():
        cond = model.encode_prompts(["a castle on a hill at dawn"] * items)
    # one update: the LoRA's moments (a few MB) change nothing the second time
    restart_peak()
    with autocast(case):
        loss = OBJECTIVES[case.kind].losses(model, denoiser, reference, batch, cond, config, None)["loss"]
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"measured_bytes": peak_resident() - baseline, "held_before_the_step_bytes": held,
            "parameters_trained": sum(p.numel() for p in params)}


def plan_step(case: Case, items: int, work: Path, base: Path | None = None) -> dict:
    """The `lpo optimize --dry-run` of the case's step on `base` (default: its published configs), a config-only LRM
    of the base held."""
    from lpo.reward.backbones import FAMILIES
    from lpo.reward.lpo import train
    from lpo.reward.plan import meta_lrm

    base = base or published_base(case, work)
    lrm = work / f"lrm-{case.family}"
    meta_lrm(FAMILIES[case.family], str(base)).save_config(lrm)
    (work / "prompts.txt").write_text("a castle on a hill at dawn\n")
    plan = train.run(step_config(case, base, items, lrm, work / "prompts.txt", work / "plan-step"))["plan"]
    return {"planned_bytes": plan.total_bytes, "rows": {k: v for k, v in plan.rows if k != "base"}}


def one(case: str, pairs: int) -> dict:
    """Measure and plan one case at one batch size (run in a fresh process: the peak is the process's own)."""
    spec = CASES[case]
    measure, plan = (measure_lrm, plan_lrm) if spec.kind == "lrm" else (measure_step, plan_step)
    with tempfile.TemporaryDirectory() as work:
        measured = measure(spec, pairs, Path(work) / "m")
        planned = plan(spec, pairs, Path(work) / "p")
    return {"case": case, "pairs": pairs, **measured, **planned}


def replan(row: dict) -> dict:
    """An earlier row with its plan made again by today's `--dry-run`."""
    spec = CASES[row["case"]]
    plan = plan_lrm if spec.kind == "lrm" else plan_step
    with tempfile.TemporaryDirectory() as work:
        return row | plan(spec, row["pairs"], Path(work) / "p")


# glibc's malloc keeps freed memory in its heap (and raises its mmap threshold as large blocks are freed), so the
# resident peak counts the transients' slack too; with a fixed mmap threshold every block of 64 KB or more is
# returned when freed, and the resident peak is the live memory, what CUDA's max_memory_allocated reports
RETURNING = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
ALLOCATORS = {"live": RETURNING, "default": {}}


def run(cases: list[str], batches: list[int] | None, allocators: list[str]) -> list[dict]:
    results = []
    for case in cases:
        for pairs in batches or CASES[case].batches:
            row: dict = {}
            for allocator in allocators:
                child = subprocess.run([sys.executable, __file__, "--one", case, str(pairs)], capture_output=True,
                                       text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", **ALLOCATORS[allocator]})
                if child.returncode != 0:
                    raise RuntimeError(child.stderr[-3000:])
                measured = json.loads(child.stdout.strip().splitlines()[-1])
                row = measured | row
                row[f"measured_{allocator}_bytes"] = measured["measured_bytes"]
            row["measured_bytes"] = row.get("measured_live_bytes", row["measured_bytes"])
            print(json.dumps({k: v for k, v in row.items() if k != "rows"}), flush=True)
            results.append(row)
    return results


def table(results: list[dict]) -> str:
    lines = ["| case | batch | planned | measured (live) | measured / planned | resident, glibc's default allocator |",
             "|---|---|---|---|---|---|"]
    for r in results:
        default = r.get("measured_default_bytes")
        lines.append(f"| {r['case']} | {r['pairs']} | {r['planned_bytes'] / GB:.2f} GB | "
                     f"{r['measured_bytes'] / GB:.2f} GB | {r['measured_bytes'] / r['planned_bytes']:.2f} | "
                     + (f"{default / GB:.2f} GB ({default / r['planned_bytes']:.2f}) |" if default else "not run |"))
    by_case: dict[str, dict[int, dict]] = {}
    for r in results:
        by_case.setdefault(r["case"], {})[r["pairs"]] = r
    for case, runs in by_case.items():
        if len(runs) >= 2:
            (a, ra), (b, rb) = sorted(runs.items())[:2]
            for what in ("planned_bytes", "measured_bytes"):
                per = (rb[what] - ra[what]) / (b - a)
                lines.append(f"\n{case} {what.split('_')[0]}: {ra[what] - a * per:,.0f} B fixed + {per:,.0f} B per "
                             "item of the batch")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--pairs", nargs="*", type=int, help="batch sizes (default: each case's)")
    parser.add_argument("--allocators", nargs="*", default=["live", "default"], choices=list(ALLOCATORS))
    parser.add_argument("--out", type=Path, help="a table (.md) and the rows (.json); rows of cases not run this "
                                                 "time are kept from the file's earlier run")
    parser.add_argument("--replan", action="store_true",
                        help="plan again every row of --out, keeping its measurements (a step's peak does not depend "
                             "on the plan): after a change to the memory model, in seconds")
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]))))
        return []
    if args.replan:
        if not (args.out and args.out.with_suffix(".json").exists()):
            parser.error("--replan reads the rows of --out's .json: name an earlier run's table with --out")
        results = [replan(row) for row in json.loads(args.out.with_suffix(".json").read_text())]
    else:
        results = run(args.cases, args.pairs, args.allocators)
        if args.out and args.out.with_suffix(".json").exists():
            ran = {(r["case"], r["pairs"]) for r in results}
            earlier = [r for r in json.loads(args.out.with_suffix(".json").read_text())
                       if (r["case"], r["pairs"]) not in ran and r["case"] in CASES]
            order = list(CASES)
            results = sorted(earlier + results, key=lambda r: (order.index(r["case"]), r["pairs"]))
    text = table(results)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
