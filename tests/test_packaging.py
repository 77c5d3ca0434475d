"""The package works installed, not only cloned: the wheel carries the quickstart, the license and
the entry points, and the commands never write into the installed package."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from lokr_diffusion import __version__
from lokr_diffusion.cli import main
from lokr_diffusion.resources import PACKAGE_DIR, checkout_root, quickstart_config

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ("assets/toy/model", "assets/toy/concept", "assets/toy/prior", "train_configs/quickstart.toml")
# what a wheel build reads; the rest of the clone (tests, docs, benchmarks, outputs) stays behind
_NOT_COPIED = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                     ".hypothesis", "output", "outputs", "runs", "models", "docs", "bench", "tests",
                                     ".ci", "*.tmp", ".whl", ".devcheck")


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_CACHE_DIR": "1"}


def _repo_files(rel: str) -> set[str]:
    path = ROOT / rel
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    return {p.relative_to(ROOT).as_posix() for p in files}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """sdist from a copy of the source, then the wheel from that sdist (what `python -m build`
    does), so a file the sdist's MANIFEST.in forgets is missing from the wheel too."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=_NOT_COPIED)
    code = "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    subprocess.run([sys.executable, "-c", code, str(tmp / "sdist")], cwd=src, env=_env(), check=True,
                   capture_output=True)
    (sdist,) = (tmp / "sdist").glob("*.tar.gz")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp / "dist"), str(sdist)], cwd=tmp, env=_env(), check=True, capture_output=True)
    (whl,) = (tmp / "dist").glob("*.whl")
    return whl


@pytest.mark.slow
def test_wheel_carries_the_quickstart_license_and_entry_points(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    bundled = {n.removeprefix("lokr_diffusion/_bundled/") for n in names if n.startswith("lokr_diffusion/_bundled/")}
    expected = set().union(*(_repo_files(rel) for rel in BUNDLED))
    assert {f for f in expected if f.startswith("assets/toy/model/unet/")}  # the repository has the toy model
    assert bundled == expected
    info = f"lokr_diffusion-{__version__}.dist-info"
    assert {"lokr_diffusion/__main__.py", "lokr_diffusion/resources.py", f"{info}/licenses/LICENSE"} <= names
    with zipfile.ZipFile(wheel) as z:
        assert z.read(f"{info}/licenses/LICENSE") == (ROOT / "LICENSE").read_bytes()
        metadata = z.read(f"{info}/METADATA").decode()
        entry_points = z.read(f"{info}/entry_points.txt").decode()
    assert "License-Expression: Apache-2.0" in metadata and f"Version: {__version__}" in metadata
    assert "lokr-diffusion = lokr_diffusion.cli:main" in entry_points


@pytest.mark.slow
def test_installed_wheel_runs_from_another_folder(wheel, tmp_path):
    """Installed into a fresh venv (system packages for torch & co., the repository off the
    path): the command, `python -m`, and the quickstart config resolving into the bundle."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "-q", str(wheel)], env=_env(), check=True,
                   capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    script = venv / ("Scripts/lokr-diffusion.exe" if os.name == "nt" else "bin/lokr-diffusion")
    out = subprocess.run([str(script), "--version"], cwd=elsewhere, env=_env(), capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"lokr-diffusion {__version__}", out.stderr
    check = ("import runpy, sys, lokr_diffusion, lokr_diffusion.resources as r\n"
             "from lokr_diffusion.training.config import load_config\n"
             "from lokr_diffusion.data import dataset_configs_from_toml\n"
             "cfg = load_config(r.quickstart_config())\n"
             "dirs = [d.dir for d in dataset_configs_from_toml(cfg.data, base_dir=cfg.base_dir)]\n"
             "model = (cfg.base_dir / cfg.model.pretrained_model).resolve()\n"
             "print(lokr_diffusion.__file__, r.checkout_root(), model, *dirs, sep='\\n')\n"
             "sys.argv = ['python -m lokr_diffusion', '--version']\n"
             "runpy.run_module('lokr_diffusion', run_name='__main__')\n")  # what `python -m` does
    out = subprocess.run([str(python), "-c", check], cwd=elsewhere, env=_env(), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    init, root, model, *dirs, version = out.stdout.strip().splitlines()
    bundle = Path(init).parent / "_bundled"
    assert Path(init).resolve().is_relative_to(venv.resolve()) and root == "None"
    assert Path(model) == bundle / "assets/toy/model" and (Path(model) / "unet/config.json").is_file()
    assert [Path(d).resolve() for d in dirs] == [bundle / "assets/toy/concept", bundle / "assets/toy/prior"]
    assert version == f"lokr-diffusion {__version__}"
    assert list(elsewhere.iterdir()) == []


def test_clone_reads_the_repository_copies():
    assert checkout_root() == ROOT
    assert quickstart_config() == ROOT / "train_configs" / "quickstart.toml"
    from lokr_diffusion.toy import MODEL_DIR

    assert MODEL_DIR == ROOT / "assets" / "toy" / "model"


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"lokr-diffusion {__version__}"


@pytest.mark.parametrize("argv", [
    ["quickstart", "--output", "{pkg}/quickstart"],
    ["toy", "concept", "--out", "{pkg}/_bundled/assets/toy/concept"],
    ["toy", "pretrain", "--out", "{pkg}/toy_model"],
    ["toy", "compare", "--docs", "{pkg}/docs"],
], ids=["quickstart", "concept", "pretrain", "compare"])
def test_outputs_inside_the_package_are_refused(argv, capsys, tmp_path):
    before = sorted(p.name for p in PACKAGE_DIR.iterdir())
    code = main([a.format(pkg=PACKAGE_DIR) for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and "inside the lokr_diffusion package" in err and "Give a folder outside it" in err
    assert sorted(p.name for p in PACKAGE_DIR.iterdir()) == before


@pytest.mark.parametrize("name", ["plain", "with space", "it's \"quoted\"", "back\\slash", "1e5", "ünï"])
def test_quickstart_writes_where_it_is_told(name, tmp_path):
    """The quickstart's output folder reaches the trainer intact, whatever its name, and every
    other path of the config still resolves to the toy files."""
    from lokr_diffusion.cli import quickstart_argv
    from lokr_diffusion.training.config import load_config

    out = tmp_path / name / "quickstart"
    argv = quickstart_argv(quickstart_config(), out, ["train.max_steps=5"])
    config, sets = argv[1], argv[3::2]
    cfg = load_config(config, sets)
    assert cfg.output_dir == out and cfg.train.max_steps == 5
    assert (cfg.base_dir / cfg.model.pretrained_model).resolve() == ROOT / "assets" / "toy" / "model"


def test_resume_hint_of_the_installed_quickstart(tmp_path):
    """Stopped, the installed quickstart says how to resume it with the command that started it:
    there is no train.py in a wheel, and its outputs are not where the bundled config says."""
    from lokr_diffusion.resources import BUNDLE_DIR
    from lokr_diffusion.training.loop import _resume_command

    out = tmp_path / "output" / "quickstart"
    assert _resume_command(BUNDLE_DIR / "train_configs" / "quickstart.toml", out) == \
        f"lokr-diffusion quickstart --output {out} --set train.resume=latest"
    assert _resume_command(ROOT / "train_configs" / "quickstart.toml", out) == \
        f"accelerate launch train.py --config {ROOT / 'train_configs' / 'quickstart.toml'} --set train.resume=latest"
