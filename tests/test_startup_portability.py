"""The CLI and the trainer start on Python 3.10 (no ``tomllib``) and on Windows (no ``resource``).

Run in a fresh interpreter where both modules are made unimportable, as they are there; tomli
(the 3.10 dependency, in the dev extra) stands in for tomllib.
"""
import subprocess
import sys

PROBE = r"""
import sys
sys.modules["tomllib"] = None
sys.modules["resource"] = None
import lokr_diffusion.cli, lokr_diffusion.training.loop, lokr_diffusion.training.config
from lokr_diffusion.cli import main
from lokr_diffusion.training.config import config_from_dict
assert main(["inspect", "--help"]) == 0
"""


def test_cli_and_trainer_import_without_tomllib_and_resource(tmp_path):
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage" in done.stdout and "Traceback" not in done.stderr


def test_toml_is_read_without_tomllib(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[model]\npretrained_model = "x"\n[train]\nmax_steps = 3\n[[data.datasets]]\ndir = "d"\n')
    probe = ("import sys; sys.modules['tomllib'] = None\n"
             "from lokr_diffusion.schema import tomllib\n"
             "assert tomllib.__name__ == 'tomli', tomllib.__name__\n"
             f"print(tomllib.loads(open({str(cfg)!r}).read())['train']['max_steps'])\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "3"
