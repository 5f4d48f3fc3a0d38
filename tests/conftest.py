"""Shared fixtures: tiny pipelines saved once per session, loaded through the public loader."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(int(os.environ.get("DIFFALIGN_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def sd_dir(tmp_path_factory):
    from tiny import build_sd

    tmp = tmp_path_factory.mktemp("tiny_sd")
    build_sd(tmp).save_pretrained(tmp / "pipe")
    return tmp / "pipe"


@pytest.fixture(scope="session")
def sdxl_dir(tmp_path_factory):
    from tiny import build_sdxl

    tmp = tmp_path_factory.mktemp("tiny_sdxl")
    build_sdxl(tmp).save_pretrained(tmp / "pipe")
    return tmp / "pipe"


@pytest.fixture(scope="session")
def sd3_dir(tmp_path_factory):
    from tiny import build_sd3

    tmp = tmp_path_factory.mktemp("tiny_sd3")
    build_sd3(tmp).save_pretrained(tmp / "pipe")
    return tmp / "pipe"


@pytest.fixture(scope="session")
def flux_dir(tmp_path_factory):
    """A tiny FLUX-dev-shaped pipeline (guidance embedding, T5 + CLIP, dynamic shifting), 16x16 images."""
    from tiny import save_flux

    return save_flux(tmp_path_factory.mktemp("tiny_flux"))
