"""Masked loss: the loss rule on fixed tensors, masks following the image through crop, resize and
flip, the latent cache, and the errors for missing or mis-sized masks."""
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from PIL import Image

from lokr_diffusion.data import DatasetConfig, build_dataset, make_loader
from lokr_diffusion.data.masks import mask_to_latent_size
from lokr_diffusion.errors import ConfigError, DatasetError
from lokr_diffusion.families.flux import pack_latents, unpack_latents
from lokr_diffusion.training.config import config_from_dict
from lokr_diffusion.training.loss import apply_loss_mask, diffusion_loss, flow_matching_loss
from lokr_diffusion.training.objective import NoisePrediction, RectifiedFlow

# -- the loss rule ---------------------------------------------------------------------------------


def _pixel_mask() -> torch.Tensor:
    """(2, 1, 32, 32): sample 0 trains its left half; sample 1 trains one 8x8 cell fully and
    a quarter of the cell beside it."""
    mask = torch.zeros(2, 1, 32, 32)
    mask[0, :, :, :16] = 1.0
    mask[1, :, 8:16, 8:16] = 1.0
    mask[1, :, 8:12, 16:20] = 1.0
    return mask


def test_masked_loss_is_the_mean_over_all_cells_of_the_area_weighted_error():
    g = torch.Generator().manual_seed(3)
    pred = torch.randn(2, 4, 4, 4, generator=g, requires_grad=True)
    target = torch.randn(2, 4, 4, 4, generator=g)
    timesteps = torch.tensor([10, 500])
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    mask = _pixel_mask()

    loss = diffusion_loss(pred, target, timesteps, scheduler, "epsilon", mask=mask)
    # restated by hand: the latent cell (i, j) covers pixels 8i..8i+7, 8j..8j+7 and weighs their mean
    cells = mask.reshape(2, 1, 4, 8, 4, 8).mean(dim=(3, 5))
    assert cells[1, 0, 1, 1] == 1.0 and cells[1, 0, 1, 2] == 0.25 and cells[1].sum() == 1.25
    expected = (((pred.detach() - target) ** 2) * cells).sum(dim=(1, 2, 3)) / (4 * 4 * 4)
    torch.testing.assert_close(loss, expected.mean())

    loss.backward()
    dead = (cells == 0).expand_as(pred)
    assert dead.any() and (~dead).any()
    assert torch.all(pred.grad[dead] == 0)
    assert torch.all(pred.grad[~dead] != 0)


def test_an_all_ones_mask_is_the_unmasked_loss_and_shapes_are_checked():
    pred, target = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    t = torch.tensor([1, 2])
    torch.testing.assert_close(diffusion_loss(pred, target, t, scheduler, "epsilon", mask=torch.ones(2, 1, 32, 32)),
                               diffusion_loss(pred, target, t, scheduler, "epsilon"))
    with pytest.raises(ValueError, match=r"\(batch, 1, height, width\)"):
        apply_loss_mask(torch.ones(2, 4, 4, 4), torch.ones(2, 3, 32, 32))


@pytest.mark.parametrize("objective", [
    NoisePrediction(DDPMScheduler(num_train_timesteps=1000), "epsilon", False),
    RectifiedFlow(sampling="uniform"),
])
def test_objectives_pass_the_mask_through(objective):
    latents = torch.randn(2, 4, 4, 4)

    def denoise(noisy, timesteps):
        return noisy * 0.5

    def loss(mask):
        torch.manual_seed(7)  # the same noise and timesteps each time
        return objective.loss(latents, denoise, mask=mask)

    assert loss(torch.zeros(2, 1, 32, 32)) == 0
    torch.testing.assert_close(loss(torch.ones(2, 1, 32, 32)), loss(None))
    assert 0 < loss(_pixel_mask()) < loss(None)


def test_flow_loss_with_packed_tokens_gives_masked_patches_no_gradient():
    """A Flux-style denoiser works on 2x2-packed tokens; the loss and its mask stay 4-D."""
    torch.manual_seed(0)
    latents = torch.randn(2, 4, 4, 4)
    weight = torch.ones(4, 16, requires_grad=True)  # one scale per packed token and channel

    def denoise(noisy, timesteps):
        return unpack_latents(pack_latents(noisy) * weight, 4, 4)

    mask = _pixel_mask()
    loss = flow_matching_loss(latents, denoise, 1.0, sampling="uniform", mask=mask)
    loss.backward()
    # token k covers latent rows 2(k // 2).., columns 2(k % 2)..; sample 1's cells (1,1), (1,2) fall
    # in tokens 0 and 1, sample 0's left half in tokens 0 and 2: token 3 is masked out in both
    assert torch.all(weight.grad[3] == 0)
    assert torch.all(weight.grad[:3].abs().sum(dim=1) > 0)


# -- masks in the dataset ---------------------------------------------------------------------------


def _pattern(w: int, h: int) -> np.ndarray:
    """A left/right-asymmetric 0-255 pattern, so crops and flips show."""
    x = np.arange(w)[None, :].repeat(h, 0)
    y = np.arange(h)[:, None].repeat(w, 1)
    return np.where((x < w // 3) | ((y // 8) % 2 == 0) & (x % 16 < 5), 255, 0).astype(np.uint8)


def _alpha_images(root: Path, sizes=((96, 64), (64, 80))) -> None:
    """RGBA images whose red channel is 255 and alpha the pattern: composited on black, the red
    channel of the pixels the model sees equals the alpha."""
    root.mkdir(parents=True, exist_ok=True)
    for i, (w, h) in enumerate(sizes):
        rgba = np.zeros((h, w, 4), dtype=np.uint8)
        rgba[..., 0] = 255
        rgba[..., 1] = 40 * i
        rgba[..., 3] = _pattern(w, h)
        Image.fromarray(rgba, "RGBA").save(root / f"img{i}.png")
        (root / f"img{i}.txt").write_text(f"image {i}")


def _mask_folder_images(root: Path, masks: Path, sizes=((96, 64), (64, 80))) -> None:
    """RGB images whose red channel is the pattern, and mask files holding the same pattern."""
    root.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    for i, (w, h) in enumerate(sizes):
        rgb = np.zeros((h, w, 3), dtype=np.uint8)
        rgb[..., 0] = _pattern(w, h)
        Image.fromarray(rgb).save(root / f"img{i}.jpg" if i else root / f"img{i}.png", quality=100)
        Image.fromarray(_pattern(w, h), "L").save(masks / f"img{i}.png")
        (root / f"img{i}.txt").write_text(f"image {i}")


def _masked_cfg(root: Path, **kw) -> DatasetConfig:
    kw = {"resolution": 64, "min_bucket_reso": 32, "max_bucket_reso": 128, "bucket_step": 32,
          "alpha_background": (0, 0, 0), **kw}
    return DatasetConfig(dir=root, **kw)


@pytest.mark.parametrize("source", ["alpha", "folder"])
def test_mask_follows_random_crop_resize_and_flip(tmp_path, source):
    if source == "alpha":
        _alpha_images(tmp_path / "d")
        cfg = _masked_cfg(tmp_path / "d", alpha_mask=True, random_crop=True, flip=True)
    else:
        _mask_folder_images(tmp_path / "d", tmp_path / "m")
        cfg = _masked_cfg(tmp_path / "d", conditioning_data_dir=tmp_path / "m", random_crop=True, flip=True)
    ds = build_dataset([cfg], batch_size=1, report=None, seed=5)
    assert ds.masked
    seen_flips, seen_crops = set(), set()
    for epoch in range(4):
        for index in range(len(ds)):
            item = ds[(epoch, index)]
            mask, red = item["mask"], (item["pixel_values"][0] + 1) / 2
            assert mask.shape == (1, *item["pixel_values"].shape[1:])
            # the same resize (LANCZOS), crop and flip: equal up to 8-bit rounding (and JPEG for one)
            tol = 0.02 if source == "alpha" else 0.2
            assert (mask[0] - red).abs().mean() < tol, (epoch, index, item["crop_top_left"], item["flipped"])
            assert mask.min() < 0.1 and mask.max() > 0.9
            seen_flips.add(item["flipped"])
            seen_crops.add((item["path"], item["crop_top_left"]))
    assert seen_flips == {True, False} and len(seen_crops) > 2


def test_batches_carry_masks_and_unmasked_datasets_train_everywhere(tmp_path):
    _alpha_images(tmp_path / "a")
    _alpha_images(tmp_path / "b")
    ds = build_dataset([_masked_cfg(tmp_path / "a", alpha_mask=True), _masked_cfg(tmp_path / "b", is_reg=True)],
                       batch_size=2, report=None, masked_loss=True)
    for batch in make_loader(ds):
        assert batch["mask"].shape == (batch["pixel_values"].shape[0], 1, *batch["pixel_values"].shape[2:])
        for mask, is_reg in zip(batch["mask"], batch["is_reg"]):
            assert bool(torch.all(mask == 1)) == bool(is_reg)
    assert "loss masks from the alpha channel" in ds.describe()
    assert "no loss masks (every pixel trains)" in ds.describe()


def test_without_masks_items_have_none(tmp_path):
    _alpha_images(tmp_path / "a")
    assert "mask" not in build_dataset([_masked_cfg(tmp_path / "a")], report=None)[0]


def _pool8(pixels):
    """A stand-in VAE encoder: 8x8 average pooling, so latents are exactly what pixels say."""
    return torch.nn.functional.avg_pool2d(pixels, 8)


def test_masks_survive_the_latent_cache(tmp_path):
    _mask_folder_images(tmp_path / "d", tmp_path / "m")
    cache = tmp_path / "cache"
    cfg = _masked_cfg(tmp_path / "d", conditioning_data_dir=tmp_path / "m", flip=True, cache_latents="disk",
                      cache_dir=cache)
    uncached = build_dataset([_masked_cfg(tmp_path / "d", conditioning_data_dir=tmp_path / "m", flip=True)],
                             report=None)
    first = build_dataset([cfg], report=None)
    assert first.cache_latents(_pool8, "pool8").encoded == 4  # two images, both flips
    second = build_dataset([cfg], report=None)
    assert second.cache_latents(_pool8, "pool8").hits == 4  # read back from disk: nothing encoded
    for epoch in range(3):
        for index in range(len(uncached)):
            plain, cached = uncached[(epoch, index)], second[(epoch, index)]
            assert plain["flipped"] == cached["flipped"]
            torch.testing.assert_close(cached["latents"], _pool8(plain["pixel_values"][None])[0])
            assert cached["mask"].shape == (1, *cached["latents"].shape[-2:])
            reduced = mask_to_latent_size(plain["mask"][None], cached["latents"].shape[-2:])[0]
            torch.testing.assert_close(cached["mask"], reduced)
    # editing a mask re-encodes that image's entries; switching masks off uses entries without them
    Image.fromarray(np.full((64, 96), 255, np.uint8), "L").save(tmp_path / "m" / "img0.png")
    third = build_dataset([cfg], report=None)
    assert third.cache_latents(_pool8, "pool8").encoded == 2
    assert torch.all(next(third[(0, i)]["mask"] for i in range(2) if third[(0, i)]["path"].endswith("img0.png")) == 1)
    unmasked = build_dataset([_masked_cfg(tmp_path / "d", cache_latents="disk", cache_dir=cache)], report=None)
    assert unmasked.cache_latents(_pool8, "pool8").encoded == 2  # flip off: one entry each, no mask
    assert "mask" not in unmasked[0]


def test_missing_and_mis_sized_masks_name_image_and_mask(tmp_path):
    _mask_folder_images(tmp_path / "d", tmp_path / "m")
    (tmp_path / "m" / "img1.png").unlink()
    with pytest.raises(DatasetError, match=r"image .*img1\.jpg has no mask: expected one of img1\.jpg, img1\.png"):
        build_dataset([_masked_cfg(tmp_path / "d", conditioning_data_dir=tmp_path / "m")], report=None)
    Image.fromarray(np.zeros((80, 32), np.uint8), "L").save(tmp_path / "m" / "img1.png")
    with pytest.raises(DatasetError, match=r"mask .*m/img1\.png is 32x80 but its image .*d/img1\.jpg is 64x80"):
        build_dataset([_masked_cfg(tmp_path / "d", conditioning_data_dir=tmp_path / "m")], report=None)
    (tmp_path / "m" / "img1.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match=r"mask .*img1\.png of image .*img1\.jpg: not an image"):
        build_dataset([_masked_cfg(tmp_path / "d", conditioning_data_dir=tmp_path / "m")], report=None)
    with pytest.raises(DatasetError, match=r"conditioning_data_dir .*nowhere is not a folder"):
        build_dataset([_masked_cfg(tmp_path / "d", conditioning_data_dir=tmp_path / "nowhere")], report=None)
    with pytest.raises(DatasetError, match="alpha_mask and conditioning_data_dir both"):
        _masked_cfg(tmp_path / "d", conditioning_data_dir=tmp_path / "m", alpha_mask=True)


def test_masked_loss_without_a_mask_source_is_refused(tmp_path):
    _alpha_images(tmp_path / "d")
    with pytest.raises(DatasetError, match="train.masked_loss is on but no dataset gives loss masks"):
        build_dataset([_masked_cfg(tmp_path / "d")], report=None, masked_loss=True)
    raw = {"model": {"pretrained_model": "x"}, "train": {"max_steps": 1, "masked_loss": True},
           "data": {"dir": str(tmp_path / "d")}}
    with pytest.raises(ConfigError, match="train.masked_loss: no dataset gives loss masks"):
        config_from_dict(raw)
    raw["data"]["alpha_mask"] = True
    assert config_from_dict(raw).train.masked_loss
