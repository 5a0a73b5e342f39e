"""The prepared GPU check (bench/gpu_check.py): its real-size models, and a whole run on the tiny models; the memory
bench's replanning (bench/plan_memory.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("family, unet_millions, lrm_millions, resolution",
                         [("sd15", 859.5, 476.0, 512), ("sdxl", 2567.5, 2065.6, 1024)])
def test_the_check_builds_the_published_architectures(gpu_check, family: str, unet_millions: float,
                                                      lrm_millions: float, resolution: int) -> None:
    """On the meta device: no weights, the real shapes. The UNet sizes are the published models' (SD1.5 859.5M,
    SDXL 2567.5M parameters); the LRM is the truncated UNet (down + mid) and the text encoder(s)."""
    model = gpu_check.generator(family, None, "meta", torch.float32)
    assert model.resolution == resolution
    assert sum(p.numel() for p in model.unet.parameters()) / 1e6 == pytest.approx(unet_millions, abs=0.05)
    lrm = gpu_check.reward_model(model)
    truncated = sum(p.numel() for name, p in model.unet.named_parameters() if name.startswith(
        ("conv_in.", "time_embedding.", "add_embedding.", "down_blocks.", "mid_block.")))
    encoders = sum(p.numel() for name in lrm.backbone.text_encoders
                   for p in getattr(model.pipeline, name).parameters())
    heads = sum(p.numel() for name, p in lrm.named_parameters() if not name.startswith("backbone."))
    assert sum(p.numel() for p in lrm.parameters()) == truncated + encoders + heads
    assert sum(p.numel() for p in lrm.parameters()) / 1e6 == pytest.approx(lrm_millions, abs=0.05)


@pytest.mark.slow
def test_the_check_runs_on_the_tiny_models(gpu_check, tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    report = gpu_check.main(["--tiny", "--device", "cpu", "--repeats", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    for batch in ("1", "8", "32"):
        row = report["scoring"]["batches"][batch]
        assert min(row["lrm_s"], row["decode_s"], row["clip_s"]) > 0
        assert row["pixel_route_over_lrm"] == pytest.approx((row["decode_s"] + row["clip_s"]) / row["lrm_s"])
    for family, pairs in (("sd15", 4), ("sdxl", 1)):
        runs = report["lrm_training"][family]
        assert runs["plain"]["pairs"] == runs["checkpointed"]["pairs"] == pairs
        assert runs["plain"]["parameters_trained"] == runs["checkpointed"]["parameters_trained"] > 0
        assert not runs["plain"]["gradient_checkpointing"] and runs["checkpointed"]["gradient_checkpointing"]
        assert runs["plain"]["planned_gb"] > runs["checkpointed"]["planned_gb"] > 0  # the plan beside each step
        assert runs["plain"]["step_peak_gb"] is None  # measured on CUDA only
    lpo = report["lpo"]["round"]
    assert lpo["tuples"] == lpo["prompts"] * lpo["steps"] == 100  # every step kept, one tuple each
    parts = lpo["sampling_s"] + lpo["scoring_s"] + lpo["step_maths_s"] + lpo["training_s"]
    assert parts == pytest.approx(lpo["total_s"]) and min(lpo["sampling_s"], lpo["scoring_s"], lpo["training_s"]) > 0
    assert report["lpo"]["loss_step"]["step_s"] > 0
    assert report["lpo"]["loss_step"]["planned_gb"] > 0 and report["lpo"]["loss_step"]["step_peak_gb"] is None
    flow = report["flow"]  # on the tiny SD3.5-Medium-style pipeline
    assert set(flow["scoring"]) == {"1", "4"} and all(row["lrm_s"] > 0 for row in flow["scoring"].values())
    assert flow["lrm_training"]["checkpointed"]["parameters_trained"] > 0
    assert set(flow["loss_steps"]) == {"lpo", "grpo"} and all(v["step_s"] > 0 for v in flow["loss_steps"].values())
    # the flow steps' plans beside them too (the LRM's plain above its checkpointed one; LPO's and GRPO's alike)
    assert flow["lrm_training"]["plain"]["planned_gb"] > flow["lrm_training"]["checkpointed"]["planned_gb"] > 0
    assert flow["lrm_training"]["plain_2_pairs"]["planned_gb"] > flow["lrm_training"]["plain"]["planned_gb"]
    assert all(v["planned_gb"] > 0 and v["step_peak_gb"] is None for v in flow["loss_steps"].values())
    for objective in ("lpo", "grpo"):
        row = flow["round"][objective]
        assert row["items"] == row["prompts"] * (row["steps"] - 1)  # every step but the last (to sigma 0)
        parts = row["sampling_s"] + row["scoring_s"] + row["step_maths_s"] + row["training_s"]
        assert parts == pytest.approx(row["total_s"])


def test_the_curation_scale_bench_runs_small(tmp_path: Path) -> None:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_curation_scale.py"), "--pairs", "4000",
                          "--small", "2000", "--chunk-rows", "1000"], capture_output=True, text=True, check=True,
                         cwd=tmp_path)
    assert "4,000 pairs, 6,000 images" in out.stdout and "2,000 pairs, 3,000 images" in out.stdout
    assert "ingest  peak RSS" in out.stdout and "filter  peak RSS" in out.stdout


def test_the_check_builds_sd35_medium_at_512_px(gpu_check) -> None:
    """On the meta device: SD3.5-Medium's published transformer (2.24B parameters), its latents at 512 px, and an
    LRM that runs its first 18 of 24 joint blocks."""
    model = gpu_check.generator("sd3", None, "meta", torch.float32)
    assert model.resolution == 512 and model.latent_shape == (16, 64, 64)
    assert model.pipeline.text_encoder_3 is None  # the pipeline feeds T5's 256 tokens as zeros
    assert sum(p.numel() for p in model.transformer.parameters()) / 1e9 == pytest.approx(2.243, abs=0.0005)
    lrm = gpu_check.reward_model(model)
    assert lrm.backbone.depth == 18 and len(lrm.backbone.transformer.transformer_blocks) == 18


def test_the_compute_bench_plans_the_paper_recipe_beside_its_a100_hours(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("plan_compute", ROOT / "bench" / "plan_compute.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = module.main(["--only", "sd15", "--mfu", "0.5", "--out", str(tmp_path / "compute.md")])
    row = next(line for line in text.splitlines() if line.startswith("| SD1.5 |")).strip("|").split("|")
    lpo_hours, paper, ratio, agree = float(row[4].split()[0]), float(row[6]), float(row[7]), float(row[8])
    assert paper == 23.0 and ratio == pytest.approx(lpo_hours / paper, abs=0.01)
    assert agree == pytest.approx(0.5 * ratio, abs=0.01)  # the MFU at which plan and paper agree
    assert (tmp_path / "compute.md").read_text() == text


def test_the_memory_bench_plans_again_and_keeps_its_measurements(gpu_check, tmp_path: Path) -> None:
    """`plan_memory.py --replan`: every row of an earlier run planned by today's `--dry-run`, its measurement kept."""
    memory = gpu_check.plan_memory()
    out = tmp_path / "plan_memory.md"
    out.with_suffix(".json").write_text(json.dumps([{"case": "lrm-sd15", "pairs": 2, "measured_bytes": 9.0e9,
                                                     "planned_bytes": 1.0}]))
    rows = memory.main(["--replan", "--out", str(out)])
    planned = memory.plan_lrm(memory.CASES["lrm-sd15"], 2, tmp_path / "direct")["planned_bytes"]
    assert rows[0]["measured_bytes"] == 9.0e9 and rows[0]["planned_bytes"] == planned > 1e9
    assert json.loads(out.with_suffix(".json").read_text()) == rows
    assert f"| lrm-sd15 | 2 | {planned / 1e9:.2f} GB | 9.00 GB |" in out.read_text()
