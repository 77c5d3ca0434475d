"""The shipped toy model loads, draws what it is asked, and the quickstart fine-tune runs end to end."""
import json
import signal
from pathlib import Path

import pytest

from lokr_diffusion.families import family_of_pipeline
from lokr_diffusion.models import load_pipeline
from lokr_diffusion.toy import MODEL_DIR
from lokr_diffusion.toy import evaluate as ev
from lokr_diffusion.toy import scorer

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "train_configs" / "quickstart.toml"


@pytest.fixture(scope="module")
def toy_pipe():
    pipe = load_pipeline(str(MODEL_DIR))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_toy_model_is_a_small_sd1_pipeline(toy_pipe):
    size = sum(f.stat().st_size for f in MODEL_DIR.rglob("*") if f.is_file())
    assert size <= 10 * 2**20
    assert family_of_pipeline(toy_pipe).name == "sd1"
    assert toy_pipe.vae_scale_factor == 4 and toy_pipe.unet.config.sample_size == 16
    record = json.loads((MODEL_DIR / "toy_pretrain.json").read_text())
    assert record["images"] == 840


def test_toy_model_draws_the_prompt(toy_pipe):
    """Eight fixed prompts and seeds: the base model must get most shapes, colours and places right."""
    scenes = ev.plain_prompts(8)
    images = ev.generate(toy_pipe, [s.caption for s in scenes], list(range(8)))
    assert all(im.size == (64, 64) for im in images)
    fid = ev.fidelity(scorer.read_images(images), scenes)
    assert min(fid["shape"], fid["colour"], fid["background"], fid["position"]) >= 0.75, fid


def test_quickstart_fine_tune_runs_end_to_end(toy_pipe, tmp_path, capsys):
    """Three steps of the real quickstart config, then the score command on two samples.
    The toy model's zero-terminal-SNR schedule is taken from its scheduler config, not the TOML."""
    from lokr_diffusion.cli import main as cli_main
    from lokr_diffusion.training.config import load_config
    from lokr_diffusion.training.loop import train

    cfg = load_config(QUICKSTART, [f"output.dir={tmp_path / 'out'}", "train.max_steps=3", "sample.prompts=[]",
                                   "logging.tensorboard=false", "output.save_every_steps=100"])
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        adapter = train(cfg, QUICKSTART)
    finally:  # the trainer installs its own stop handlers; give pytest back its own
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert adapter.is_file() and adapter.name == "quickstart_lokr.safetensors"
    assert (adapter.parent / "quickstart_lokr_emb.safetensors").is_file()
    log = capsys.readouterr().out
    assert "prediction v_prediction, zero terminal SNR," in log and "trigger embedding 'sks'" in log
    code = cli_main(["toy", "score", "--adapter", str(adapter), "-n", "2", "--grids", str(tmp_path / "grids"),
                     "--json", str(tmp_path / "scores.json")])
    assert "trigger embedding:" in capsys.readouterr().out
    assert code in (0, 1)  # 3 steps teach nothing; the command must still run and report
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert set(scores["passed"]) == {"concept_with_trigger", "concept_without_trigger", "preservation"}
    assert (tmp_path / "grids" / "before_after_trigger.png").is_file()
