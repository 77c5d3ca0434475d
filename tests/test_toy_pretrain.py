"""The pretraining script is deterministic and writes a pipeline the trainer can load."""
import hashlib
import json
from pathlib import Path

from lokr_diffusion.models import load_pipeline
from lokr_diffusion.toy import generator as gen
from lokr_diffusion.toy.pretrain import PretrainSettings, pretrain


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*.safetensors"))}


def test_short_pretrain_is_bit_for_bit_reproducible(tmp_path):
    settings = PretrainSettings(vae_steps=2, vae_batch=4, unet_steps=2, unet_batch=4, warmup_steps=1, log_every=1)
    scenes = gen.base_scenes()[::105]  # 8 scenes
    a = pretrain(tmp_path / "a", settings, log=lambda m: None, scenes=scenes)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "stale.txt").write_text("from an older model")
    b = pretrain(tmp_path / "b", settings, log=lambda m: None, scenes=scenes)
    assert _digest(a) == _digest(b) and len(_digest(a)) == 3
    assert not (b / "stale.txt").exists()  # the folder is replaced whole, not written into
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folder left
    scheduler = json.loads((a / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["rescale_betas_zero_snr"] and scheduler["timestep_spacing"] == "trailing"
    assert scheduler["prediction_type"] == "v_prediction"
    pipe = load_pipeline(str(a))
    assert pipe.vae.config.scaling_factor > 0
    image = pipe("a red circle on a blue background, center", num_inference_steps=2, height=64, width=64).images[0]
    assert image.size == (64, 64)
