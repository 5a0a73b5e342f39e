"""`lpo reward import-reference`: an LRM saved in the reference code's layout (unet/, text_encoder/,
text_encoder_2/, state_dict.pt) scores exactly as the reference's formula, computed here independently on the stock
diffusers UNet; a state file with anything but the projections and the logit scale is refused."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lpo.cli import app
from lpo.reward.lrm.model import LatentRewardModel

runner = CliRunner()
REFERENCE_TAPS = {"sd15": [2, 5, 8, 11], "sdxl": [2, 5, 8]}  # the reference's indices into down_block_res_samples
VFE = 7.5


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@torch.no_grad()
def reference_scores(checkpoint: Path, base: Path, family: str, latents: torch.Tensor, t: torch.Tensor,
                     prompts: list[str]) -> torch.Tensor:
    """The reference code's score (design/method.md 1.3-1.5), on the stock diffusers UNet with hooks: the UNet runs
    on [x_t with the prompt; x_t with ""], the down-block taps come from the conditional half, the mid block is
    guided u + 7.5 (c - u), features are spatial means, and the score is exp(logit_scale) * cos."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    n = len(prompts)
    unet = UNet2DConditionModel.from_pretrained(checkpoint, subfolder="unet").eval()
    state = torch.load(checkpoint / "state_dict.pt", weights_only=True)

    def ids(tokenizer_folder: str) -> torch.Tensor:
        tokenizer = CLIPTokenizer.from_pretrained(base, subfolder=tokenizer_folder)
        return tokenizer(prompts + [""] * n, padding="max_length", max_length=tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids

    kwargs = {}
    if family == "sd15":
        encoded = CLIPTextModel.from_pretrained(checkpoint, subfolder="text_encoder").eval()(ids("tokenizer"))
        context = encoded.last_hidden_state
        text = encoded.pooler_output[:n] @ state["text_projection"]["weight"].T
    else:
        first = CLIPTextModel.from_pretrained(checkpoint, subfolder="text_encoder").eval()(
            ids("tokenizer"), output_hidden_states=True)
        second = CLIPTextModelWithProjection.from_pretrained(checkpoint, subfolder="text_encoder_2").eval()(
            ids("tokenizer_2"), output_hidden_states=True)
        context = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        vae_config = AutoencoderKL.load_config(base, subfolder="vae")
        side = unet.config.sample_size * 2 ** (len(vae_config["block_out_channels"]) - 1)
        kwargs["added_cond_kwargs"] = {"text_embeds": second.text_embeds,
                                       "time_ids": torch.tensor([[side, side, 0, 0, side, side]] * 2 * n).float()}
        text = second.text_embeds[:n]
    captured: dict[str, list] = {"res": []}
    unet.conv_in.register_forward_hook(lambda m, i, o: captured["res"].append(o))
    for block in unet.down_blocks:
        block.register_forward_hook(lambda m, i, o: captured["res"].extend(o[1]))
    unet.mid_block.register_forward_hook(lambda m, i, o: captured.__setitem__("mid", o))
    unet(torch.cat([latents, latents]), torch.cat([t, t]), encoder_hidden_states=context, **kwargs)
    pooled = [captured["res"][i].mean(dim=(2, 3))[:n] for i in REFERENCE_TAPS[family]]
    mid = captured["mid"].mean(dim=(2, 3))
    pooled.append(mid[n:] + VFE * (mid[:n] - mid[n:]))
    visual = torch.cat(pooled, dim=-1) @ state["visual_projection"]["weight"].T
    cosine = torch.nn.functional.cosine_similarity(visual, text, dim=-1)
    return math.exp(float(state["logit_scale"])) * cosine


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_an_imported_reference_lrm_scores_as_the_reference_formula(family, tiny_models_dir, tmp_path,
                                                                   write_reference_lrm) -> None:
    base = tiny_models_dir / family
    checkpoint = tmp_path / "reference"
    write_reference_lrm(base, checkpoint, family)
    result = invoke("reward", "import-reference", checkpoint, "--base", base, "--out", tmp_path / "lrm")
    assert result.exit_code == 0, result.output
    model = LatentRewardModel.from_pretrained(tmp_path / "lrm")
    assert (model.config.multi_scale, model.config.vfe_scale, model.config.vfe_down) == (True, 7.5, False)
    assert model.config.taps == REFERENCE_TAPS[family]
    generator = torch.Generator().manual_seed(3)
    latents = torch.randn(3, *model.config.latent_shape, generator=generator)
    t = torch.tensor([1, 501, 951])
    prompts = ["a red circle", "a blue square on a green background", "a photo"]
    with torch.no_grad():
        ours = model.score(latents, t, prompts)
    expected = reference_scores(checkpoint, base, family, latents, t, prompts)
    assert torch.allclose(ours, expected, rtol=1e-4, atol=1e-4), (ours, expected)
    assert ours.std() > 0.01  # distinct scores, not a constant that matches by accident
    provenance = json.loads((tmp_path / "lrm" / "reference.json").read_text())
    assert provenance["text_encoders"] == {name: "checkpoint" for name in model.backbone.encoder_names}
    # it works where an LRM is accepted: scoring image files needs the VAE and schedule saved beside it
    image = tmp_path / "image.png"
    from PIL import Image

    Image.new("RGB", (64, 64), (200, 30, 30)).save(image)
    scored = invoke("reward", "score", "--lrm", tmp_path / "lrm", "--images", image, "--prompt", "a red circle",
                    "--device", "cpu")
    assert scored.exit_code == 0 and math.isfinite(json.loads(scored.stdout.splitlines()[-1])["score"])


def test_a_released_layout_on_the_hub_imports_from_its_subfolder(tiny_models_dir, tmp_path, fake_hub,
                                                                 write_reference_lrm) -> None:
    base = tiny_models_dir / "sd15"
    write_reference_lrm(base, tmp_path / "lrm_sd15", "sd15")
    fake_hub("peer/LRM", {"lrm_sd15": tmp_path / "lrm_sd15"})
    result = invoke("reward", "import-reference", "peer/LRM/lrm_sd15", "--base", base, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    local = invoke("reward", "import-reference", tmp_path / "lrm_sd15", "--base", base, "--out", tmp_path / "local")
    assert local.exit_code == 0
    hub_model, local_model = (LatentRewardModel.from_pretrained(tmp_path / name) for name in ("out", "local"))
    for (name, a), b in zip(hub_model.state_dict().items(), local_model.state_dict().values()):
        assert torch.equal(a, b), name


class Payload:
    """Stands for any pickled object: weights_only loading must refuse it."""


@pytest.mark.parametrize(("state", "needle"), [
    ({"visual_projection": {"weight": torch.zeros(2, 2)}, "logit_scale": 2.0, "text_projection":
      {"weight": torch.zeros(2, 2)}, "optimizer": {"step": torch.tensor(1)}}, "holds ['logit_scale', 'optimizer'"),
    ({"visual_projection": {"weight": torch.zeros(2, 2)}, "logit_scale": "2.0",
      "text_projection": {"weight": torch.zeros(2, 2)}}, "logit_scale must be a float"),
    ({"visual_projection": [1.0, 2.0], "logit_scale": 2.0, "text_projection": {"weight": torch.zeros(2, 2)}},
     "visual_projection must be a 2-D float weight"),
    ({"visual_projection": {"weight": torch.zeros(2, 2)}, "logit_scale": Payload(),
      "text_projection": {"weight": torch.zeros(2, 2)}}, "not a plain tensor checkpoint"),
    ({"visual_projection": {"weight": torch.zeros(3, 7)}, "logit_scale": 2.0,
      "text_projection": {"weight": torch.zeros(2, 2)}}, "visual_projection has shape (3, 7)"),
])
def test_a_state_file_with_anything_else_is_refused_with_exit_2(state, needle, tiny_models_dir, tmp_path,
                                                                write_reference_lrm) -> None:
    base = tiny_models_dir / "sd15"
    checkpoint = tmp_path / "reference"
    write_reference_lrm(base, checkpoint, "sd15")
    torch.save(state, checkpoint / "state_dict.pt")
    result = invoke("reward", "import-reference", checkpoint, "--base", base, "--out", tmp_path / "lrm")
    assert result.exit_code == 2 and needle in " ".join(result.output.split()), result.output
    assert not (tmp_path / "lrm" / "config.json").exists()


def test_import_refusals_before_any_model_is_built(tiny_models_dir, tmp_path, write_reference_lrm) -> None:
    checkpoint = tmp_path / "reference"
    write_reference_lrm(tiny_models_dir / "sd15", checkpoint, "sd15")
    cases = [((tmp_path / "nothing", "--base", tiny_models_dir / "sd15"), "has no unet/config.json"),
             ((checkpoint, "--base", tiny_models_dir / "sdxl"), "does not fit the SDXL pipeline"),
             ((checkpoint, "--base", tiny_models_dir / "sd3"), "released LRMs for SD1.x (sd15) and SDXL")]
    (tmp_path / "nothing").mkdir()
    for args, needle in cases:
        result = invoke("reward", "import-reference", *args, "--out", tmp_path / "out")
        assert result.exit_code == 2 and needle in " ".join(result.output.split()), (needle, result.output)


def test_accuracy_on_the_pickapic_splits_is_one_command(tiny_models_dir, tmp_path, write_reference_lrm) -> None:
    """`lpo reward eval --dataset`: each split is ingested and scored on its labelled pairs; the numbers are those
    of evaluating the ingested split as a manifest (same noise seeds), and a rerun reads no split again."""
    import polars as pl

    base = tiny_models_dir / "sd15"
    checkpoint = tmp_path / "reference"
    write_reference_lrm(base, checkpoint, "sd15")
    assert invoke("reward", "import-reference", checkpoint, "--base", base, "--out", tmp_path / "lrm").exit_code == 0
    sample = pl.read_parquet(Path(__file__).parents[3] / "manifests" / "sample" / "pickapic_sample.parquet")
    data = tmp_path / "pickapic"
    data.mkdir()
    sample.head(24).write_parquet(data / "validation_unique-00000-of-00001.parquet")
    sample.tail(20).with_columns(has_label=pl.Series([i % 4 != 0 for i in range(20)])).write_parquet(
        data / "test_unique-00000-of-00001.parquet")
    out = tmp_path / "eval"
    args = ("reward", "eval", "--lrm", tmp_path / "lrm", "--dataset", data, "--out", out, "--timesteps", "1,501",
            "--device", "cpu")
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "accuracy.json").read_text())
    assert list(report["sets"]) == ["validation_unique", "test_unique"]
    validation = report["sets"]["validation_unique"]  # the sample data holds a few undecodable images on purpose
    assert validation["pairs"] + validation["skipped_pairs_with_undecodable_images"] == 24
    assert report["sets"]["test_unique"]["pairs"] == 15  # unlabelled rows are not scored
    split = out / "pickapic" / "validation_unique" / "pairs.parquet"
    alone = invoke("reward", "eval", "--lrm", tmp_path / "lrm", "--manifest", split, "--out", tmp_path / "alone",
                   "--timesteps", "1,501", "--device", "cpu")
    assert alone.exit_code == 0
    assert json.loads((tmp_path / "alone" / "accuracy.json").read_text())["accuracy"] == \
        report["sets"]["validation_unique"]["accuracy"]
    before = split.stat().st_mtime_ns
    assert invoke(*args).exit_code == 0 and split.stat().st_mtime_ns == before
    both = invoke("reward", "eval", "--lrm", tmp_path / "lrm", "--dataset", data, "--manifest", split)
    assert both.exit_code == 2 and "not both" in both.output
