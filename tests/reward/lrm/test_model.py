"""The latent reward model: truncated forward, taps, VFE, score formula, save/load, and its loss."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lpo.core.errors import InputError
from lpo.reward.backbones.unet import default_taps, res_channels
from lpo.reward.lrm.loss import bradley_terry_loss, pair_labels, pair_weights, pairwise_correct
from lpo.reward.lrm.model import LatentRewardModel

SD15_UNET = {"block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
             "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]}
SDXL_UNET = {"block_out_channels": [320, 640, 1280], "layers_per_block": 2,
             "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]}


def test_taps_and_channels_match_the_paper_on_real_layouts() -> None:
    assert default_taps(SD15_UNET) == [2, 5, 8, 11]
    assert default_taps(SDXL_UNET) == [2, 5, 8]
    sd15, sdxl = res_channels(SD15_UNET), res_channels(SDXL_UNET)
    assert sum(sd15[i] for i in [2, 5, 8, 11]) + 1280 == 4800
    assert sum(sdxl[i] for i in [2, 5, 8]) + 1280 == 3520
    assert len(sd15) == 12 and len(sdxl) == 9


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def lrm(request, tiny_models_dir: Path) -> LatentRewardModel:
    torch.manual_seed(0)
    return LatentRewardModel.from_base(str(tiny_models_dir / request.param), text_projection_init=None).eval()


def _inputs(model: LatentRewardModel, n: int = 3):
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(n, *model.config.latent_shape, generator=generator)
    return latents, torch.tensor([1, 501, 951][:n]), ["a red circle", "a blue square on green", ""][:n]


def test_truncated_forward_equals_the_stock_unet(lrm: LatentRewardModel, tiny_models_dir: Path) -> None:
    from diffusers import UNet2DConditionModel

    stock = UNet2DConditionModel.from_pretrained(str(tiny_models_dir / lrm.config.family), subfolder="unet").eval()
    backbone = lrm.backbone
    assert len(backbone.unet.up_blocks) == 0 and backbone.unet.conv_out is None  # neither run nor stored
    latents, steps, prompts = _inputs(lrm)
    captured: dict[str, object] = {"down": []}
    hooks = [block.register_forward_hook(lambda m, i, o: captured["down"].extend(o[1])) for block in stock.down_blocks]
    hooks.append(stock.mid_block.register_forward_hook(lambda m, i, o: captured.__setitem__("mid", o)))
    hooks.append(stock.conv_in.register_forward_hook(lambda m, i, o: captured.__setitem__("conv_in", o)))
    with torch.no_grad():
        text = lrm.encode_text(prompts)
        added = backbone._added_cond(text)
        stock(latents, steps, encoder_hidden_states=text["context"],
              **({"added_cond_kwargs": added} if added else {}))
        res, mid = backbone.unet_features(latents, steps, text)
    for hook in hooks:
        hook.remove()
    expected = [captured["conv_in"], *captured["down"]]
    assert len(res) == len(expected) == len(res_channels(lrm.config.components["unet"]))
    for ours, theirs in zip(res, expected):
        torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(mid, captured["mid"])
    assert lrm.config.taps == ([2, 5, 8, 11] if lrm.config.family == "sd15" else [2, 5, 8])


def test_score_is_scaled_cosine_with_vfe_on_the_mid_feature(lrm: LatentRewardModel) -> None:
    latents, steps, prompts = _inputs(lrm)
    g = lrm.config.vfe_scale
    assert g == 7.5
    with torch.no_grad():
        text, empty = lrm.encode_text(prompts), lrm.encode_text([""] * len(prompts))
        res_c, mid_c = lrm.backbone.unet_features(latents, steps, text)
        res_u, mid_u = lrm.backbone.unet_features(latents, steps, empty)
        pooled = [res_c[i].mean(dim=(2, 3)) for i in lrm.config.taps]  # down taps: conditional branch only
        m_c, m_u = mid_c.mean(dim=(2, 3)), mid_u.mean(dim=(2, 3))
        pooled.append(m_u + g * (m_c - m_u))
        visual = torch.cat(pooled, dim=-1) @ lrm.visual_projection.weight.T
        cosine = torch.nn.functional.cosine_similarity(visual, text["text"], dim=-1)
        expected = math.exp(lrm.logit_scale.item()) * cosine
        got = lrm.score(latents, steps, prompts)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert lrm.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    # the same latent at another timestep is a different input: the model is noise-aware
    with torch.no_grad():
        other = lrm.score(latents, torch.tensor([951, 1, 501]), prompts)
    assert not torch.allclose(got, other)


def test_save_and_load_give_identical_scores(lrm: LatentRewardModel, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    latents, steps, prompts = _inputs(lrm)
    lrm.save_pretrained(tmp_path / "lrm")
    keys = load_file(tmp_path / "lrm" / "diffusion_pytorch_model.safetensors").keys()
    assert any(k.startswith("backbone.unet.down_blocks") for k in keys)
    assert not any(k.startswith("backbone.unet.up_blocks") or k.startswith("backbone.unet.conv_out") for k in keys)
    loaded = LatentRewardModel.from_pretrained(tmp_path / "lrm")
    with torch.no_grad():
        torch.testing.assert_close(loaded.score(latents, steps, prompts), lrm.score(latents, steps, prompts))
    public = lambda config: json.dumps({k: v for k, v in config.items() if not k.startswith("_")},  # noqa: E731
                                       sort_keys=True, default=str)
    assert public(loaded.config) == public(lrm.config)
    assert json.loads((tmp_path / "lrm" / "config.json").read_text())["_class_name"] == "LatentRewardModel"


def test_single_scale_and_no_vfe_variants(tiny_models_dir: Path) -> None:
    model = LatentRewardModel.from_base(str(tiny_models_dir / "sd15"), multi_scale=False, vfe_scale=1.0,
                                        text_projection_init=None)
    assert model.visual_projection.in_features == model.config.components["unet"]["block_out_channels"][-1]
    latents, steps, prompts = _inputs(model, 2)
    with torch.no_grad():
        text = model.encode_text(prompts)
        _, mid = model.backbone.unet_features(latents, steps, text)
        visual = model.visual_projection(mid.mean(dim=(2, 3)))
        expected = model.logit_scale.exp() * torch.nn.functional.cosine_similarity(visual, text["text"], dim=-1)
        torch.testing.assert_close(model.score(latents, steps, prompts), expected, rtol=1e-5, atol=1e-5)


def test_text_projection_initialised_from_a_clip_model(tiny_models_dir: Path, tmp_path: Path) -> None:
    from transformers import CLIPConfig, CLIPModel

    base = LatentRewardModel.from_base(str(tiny_models_dir / "sd15"), text_projection_init=None)
    hidden = base.backbone.text_encoder.config.hidden_size
    clip = CLIPModel(CLIPConfig(text_config={"hidden_size": hidden, "num_hidden_layers": 1, "num_attention_heads": 2,
                                             "intermediate_size": 16},
                                vision_config={"hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
                                               "intermediate_size": 16, "image_size": 16, "patch_size": 8},
                                projection_dim=base.config.projection_dim))
    clip.save_pretrained(tmp_path / "clip")
    model = LatentRewardModel.from_base(str(tiny_models_dir / "sd15"), text_projection_init=str(tmp_path / "clip"))
    torch.testing.assert_close(model.text_projection.weight, clip.text_projection.weight)


def test_unsupported_or_missing_bases_are_input_errors(tmp_path: Path) -> None:
    (tmp_path / "pixart" / "transformer").mkdir(parents=True)
    (tmp_path / "pixart" / "transformer" / "config.json").write_text('{"_class_name": "PixArtTransformer2DModel"}')
    with pytest.raises(InputError, match="PixArtTransformer2DModel belongs to none of the supported families"):
        LatentRewardModel.from_base(str(tmp_path / "pixart"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="unet/config.json"):
        LatentRewardModel.from_base(str(tmp_path / "empty"))
    with pytest.raises(InputError, match="not a latent reward model directory"):
        LatentRewardModel.from_pretrained(tmp_path / "empty")


# ---------------------------------------------------------------------------------------------------------------
# loss


def test_bradley_terry_loss_on_a_hand_made_batch() -> None:
    s0 = torch.tensor([2.0, 0.0, 1.0, 3.0])
    s1 = torch.tensor([1.0, 1.0, 1.0, 0.0])
    winner = torch.tensor([0, 0, -1, 1])  # -1: no winner (here: a tie)
    tie = torch.tensor([False, False, True, False])
    labels = pair_labels(winner, tie)
    assert labels.tolist() == [[1, 0], [1, 0], [0.5, 0.5], [0, 1]]
    weights = pair_weights(torch.tensor([2, 2, 1, 0]))  # 1/n, and 1 where the count is missing
    assert weights.tolist() == [0.5, 0.5, 1.0, 1.0]

    def nll(a: float, b: float) -> float:  # -log(e^a / (e^a + e^b))
        return math.log(1 + math.exp(b - a))

    per_pair = [nll(2, 1), nll(0, 1), 0.5 * nll(1, 1) + 0.5 * nll(1, 1) + math.log(0.5), nll(0, 3)]
    assert per_pair[2] == pytest.approx(0.0)  # an equal-scored tie is at the loss's minimum
    expected = sum(w * p for w, p in zip([0.5, 0.5, 1, 1], per_pair)) / 3.0
    got = bradley_terry_loss(s0, s1, labels, weights)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # with a global weight total (multi-process), the local sum is divided by it instead
    assert bradley_terry_loss(s0, s1, labels, weights, 6.0).item() == pytest.approx(expected * 3 / 6, rel=1e-6)


def test_tie_loss_is_zero_only_at_equal_scores_and_gradient_points_the_right_way() -> None:
    labels = pair_labels(torch.tensor([-1, 0]), torch.tensor([True, False]))
    s0 = torch.tensor([0.7, 0.2], requires_grad=True)
    s1 = torch.tensor([0.7, 0.4], requires_grad=True)
    loss = bradley_terry_loss(s0, s1, labels, torch.ones(2))
    loss.backward()
    assert s0.grad[1] < 0 < s1.grad[1]  # raising the winner's score lowers the loss
    assert s0.grad[0].item() == pytest.approx(0.0, abs=1e-7)  # a tie at equal scores pulls neither way
    tie_only = bradley_terry_loss(torch.tensor([1.5]), torch.tensor([0.5]), labels[:1], torch.ones(1))
    assert tie_only.item() > 0


def test_pairwise_correct_counts_ties_as_half() -> None:
    labels = pair_labels(torch.tensor([0, 1, -1, 0]), torch.tensor([False, False, True, False]))
    correct = pairwise_correct(torch.tensor([2.0, 2.0, 5.0, 1.0]), torch.tensor([1.0, 1.0, 0.0, 1.0]), labels)
    assert correct.tolist() == [1.0, 0.0, 0.5, 0.0]  # an exact score tie on a decided pair earns nothing


def test_random_init_keeps_the_architecture_with_fresh_weights(tiny_models_dir: Path) -> None:
    from diffusers import UNet2DConditionModel

    base = str(tiny_models_dir / "sd15")
    torch.manual_seed(0)
    trained = LatentRewardModel.from_base(base, text_projection_init=None)
    torch.manual_seed(0)
    fresh = LatentRewardModel.from_base(base, text_projection_init=None, pretrained=False)
    shapes = {k: v.shape for k, v in trained.state_dict().items()}
    assert shapes == {k: v.shape for k, v in fresh.state_dict().items()}
    saved = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    assert torch.equal(trained.backbone.unet.conv_in.weight, saved.conv_in.weight)
    assert not torch.equal(fresh.backbone.unet.conv_in.weight, saved.conv_in.weight)
    assert not torch.equal(fresh.backbone.text_encoder.get_input_embeddings().weight,
                           trained.backbone.text_encoder.get_input_embeddings().weight)
    latents, t, prompts = _inputs(fresh)
    assert torch.isfinite(fresh.score(latents, t, prompts)).all()


def test_each_prompt_is_encoded_once_and_the_empty_prompt_once_while_frozen(lrm: LatentRewardModel,
                                                                            monkeypatch) -> None:
    latents, steps, _ = _inputs(lrm, 2)
    prompts = ["a red circle", "a red circle"]
    lrm.eval()  # drops what earlier tests cached
    assert lrm.config.vfe_scale != 1.0  # VFE on: the empty prompt is needed
    calls: list[list[str]] = []
    real = lrm.encode_text
    monkeypatch.setattr(lrm, "encode_text", lambda p: calls.append(list(p)) or real(p))
    with torch.no_grad():
        deduplicated = lrm.score(latents, steps, prompts)
        each = lrm.score(latents, steps, prompts, text=real(prompts))
        lrm.score(latents, steps, prompts)
    torch.testing.assert_close(deduplicated, each)
    assert calls[0] == ["a red circle"] and calls.count([""]) == 1  # frozen: the empty prompt once
    lrm.train()
    calls.clear()
    lrm.score(latents, steps, prompts)
    lrm.score(latents, steps, prompts)
    assert calls.count([""]) == 2  # training: the text encoder learns, so afresh every call
    lrm.eval()
