"""Build hook: the wheel carries the quickstart's files as package data.

Everything about the package is in pyproject.toml; this file only adds them. The toy model,
its images and the quickstart config live in the repository (`assets/toy/`, `train_configs/`),
outside the package folder, where package data cannot reach. `build_py` copies them into the
built package as `lokr_diffusion/_bundled/<same relative path>`, so the config's relative paths
(`../assets/toy/model`) hold there too; lokr_diffusion.resources finds them at run time. An
editable install skips the copy: it reads the repository's own files.
"""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
BUNDLED = ("assets/toy/model", "assets/toy/concept", "assets/toy/prior", "train_configs/quickstart.toml")
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", ".DS_Store")


class BuildPyWithQuickstart(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = Path(self.build_lib) / "lokr_diffusion" / "_bundled"
        for rel in BUNDLED:
            src, dst = ROOT / rel, target / rel
            if not src.exists():
                raise FileNotFoundError(f"{src}: a quickstart file the wheel must carry is missing")
            if dst.exists():
                shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.is_dir():
                shutil.copytree(src, dst, ignore=IGNORED)
            else:
                shutil.copy2(src, dst)


setup(cmdclass={"build_py": BuildPyWithQuickstart})
