"""Where the quickstart's files are, in a clone and once installed, and where nothing may be written.

Why two places: the toy model, its images and the quickstart config live in the repository
(`assets/toy/`, `train_configs/quickstart.toml`), where the README, the tests and the commands
that rebuild them expect them. A wheel cannot reach the repository, so the build copies them into
the package as `lokr_diffusion/_bundled/` (see setup.py), in the same relative layout: the
config's `../assets/toy/model` then resolves in both. A clone (editable install or PYTHONPATH)
reads the repository's own copies, so a rebuilt toy model is used at once.

Outputs never go inside the package: an installed package's folder is site-packages, which a
reinstall replaces and which may be read-only; `refuse_package_path` says so before anything runs.
"""
from __future__ import annotations

from pathlib import Path

from .errors import ConfigError, OutputError

PACKAGE_DIR = Path(__file__).resolve().parent
BUNDLE_DIR = PACKAGE_DIR / "_bundled"

__all__ = ["BUNDLE_DIR", "PACKAGE_DIR", "checkout_root", "data_root", "quickstart_config", "refuse_package_path",
           "toy_assets"]


def checkout_root() -> Path | None:
    """The repository root when the package runs from a clone, else None (installed from a wheel)."""
    root = PACKAGE_DIR.parent
    if (root / "pyproject.toml").is_file() and (root / "train_configs").is_dir() and (root / "assets").is_dir():
        return root
    return None


def data_root() -> Path:
    """The folder holding `assets/toy/` and `train_configs/quickstart.toml`: the clone, else the bundle."""
    return checkout_root() or BUNDLE_DIR


def toy_assets() -> Path:
    return data_root() / "assets" / "toy"


def quickstart_config() -> Path:
    """The quickstart's TOML; a ConfigError when this installation lacks it (a wheel built
    without the bundle, a clone with the file deleted)."""
    path = data_root() / "train_configs" / "quickstart.toml"
    if not path.is_file():
        raise ConfigError(f"{path}: the quickstart config is missing; this installation has no bundled quickstart "
                          "files (reinstall lokr-diffusion from a wheel or a clone of the repository)")
    return path


def refuse_package_path(path: str | Path, what: str) -> Path:
    """`path` resolved; an OutputError naming `what` when it lies inside the lokr_diffusion package."""
    resolved = Path(path).expanduser().resolve()
    if resolved == PACKAGE_DIR or PACKAGE_DIR in resolved.parents:
        raise OutputError(f"{what} {path}: inside the lokr_diffusion package ({PACKAGE_DIR}); outputs are not written "
                          "there (a reinstall would replace them). Give a folder outside it, e.g. under the current "
                          "folder")
    return resolved
