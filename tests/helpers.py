"""Small helpers the tests share."""
import time
from pathlib import Path

import numpy as np
from diffusers import UNet2DConditionModel
from PIL import Image
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


def assert_same_files(made: Path, committed: Path) -> None:
    """A generated folder equals the committed one: same names, same caption bytes, same pixels
    (compared decoded, so a PNG encoder change alone does not fail it)."""
    names = sorted(p.name for p in Path(committed).iterdir())
    assert sorted(p.name for p in Path(made).iterdir()) == names
    for name in names:
        ours, theirs = Path(made) / name, Path(committed) / name
        if name.endswith(".txt"):
            assert ours.read_bytes() == theirs.read_bytes(), name
        else:
            with Image.open(ours) as a, Image.open(theirs) as b:
                assert a.mode == b.mode == "RGB" and a.size == b.size, name
                assert np.array_equal(np.asarray(a), np.asarray(b)), name


def wait_for(predicate, proc, timeout: float = 240.0, poll: float = 0.002) -> bool:
    """Poll `predicate` until it holds (True) or the process `proc` ends first (False); a run
    that makes no progress for `timeout` seconds is a TimeoutError."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(poll)
    raise TimeoutError("the training process made no progress")
