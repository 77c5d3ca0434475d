"""Shared test setup: one thread (2-core CI), offline hub, deterministic seeds."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


# Tiny random pipelines with the real module names (lokr_diffusion.models), built once per
# session: every test that needs a base model loads one of these folders.
def _build_tiny(tmp_path_factory, family):
    from lokr_diffusion.families import get_family

    return get_family(family).build_tiny(tmp_path_factory.mktemp(f"tiny_{family}"), seed=0)


@pytest.fixture(scope="session")
def tiny_sd15_path(tmp_path_factory):
    """Folder of a tiny SD1.5-structured StableDiffusionPipeline (epsilon, PNDM)."""
    return _build_tiny(tmp_path_factory, "sd15")


@pytest.fixture(scope="session")
def tiny_sd2_path(tmp_path_factory):
    """Folder of a tiny SD2.1-v-structured StableDiffusionPipeline (v_prediction, DDIM)."""
    return _build_tiny(tmp_path_factory, "sd2")


@pytest.fixture(scope="session")
def tiny_sdxl_path(tmp_path_factory):
    """Folder of a tiny SDXL-base-structured StableDiffusionXLPipeline (epsilon, Euler)."""
    return _build_tiny(tmp_path_factory, "sdxl")


@pytest.fixture(scope="session")
def tiny_pipeline_paths(tiny_sd15_path, tiny_sd2_path, tiny_sdxl_path):
    """Family name ("sd15", "sd2", "sdxl") -> tiny pipeline folder."""
    return {"sd15": tiny_sd15_path, "sd2": tiny_sd2_path, "sdxl": tiny_sdxl_path}


@pytest.fixture(scope="session")
def tiny_flux_path(tmp_path_factory):
    """Folder of a tiny FLUX.1-dev-structured FluxPipeline (CLIP-L + T5, flow matching)."""
    return _build_tiny(tmp_path_factory, "flux")


@pytest.fixture(scope="session")
def tiny_sd3_path(tmp_path_factory):
    """Folder of a tiny SD3.5-Large-structured StableDiffusion3Pipeline (CLIP-L + CLIP-G + T5, flow)."""
    return _build_tiny(tmp_path_factory, "sd35-large")


@pytest.fixture(scope="session")
def tiny_sd3_medium_path(tmp_path_factory):
    """Folder of a tiny SD3.5-Medium-structured StableDiffusion3Pipeline (attn2 in its first block)."""
    return _build_tiny(tmp_path_factory, "sd35-medium")
