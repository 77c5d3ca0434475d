"""Small helpers the tests share."""
from pathlib import Path

from diffusers import UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection


def load_components(path: Path):
    """(unet, [text encoders]) of a tiny pipeline folder, in fp32 on CPU."""
    path = Path(path)
    unet = UNet2DConditionModel.from_pretrained(path / "unet")
    tes = [CLIPTextModel.from_pretrained(path / "text_encoder")]
    if (path / "text_encoder_2").exists():
        tes.append(CLIPTextModelWithProjection.from_pretrained(path / "text_encoder_2"))
    for m in [unet, *tes]:
        m.requires_grad_(False).eval()
    return unet, tes
