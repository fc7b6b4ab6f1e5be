"""Shared fixtures: tiny teachers built once per session, and a quiet single-threaded torch so
parallel test processes on a 2-core machine don't fight over cores."""

from __future__ import annotations

import os

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import pytest
import torch

from rapm_testing.tiny_teacher import build_tiny_sd15, build_tiny_sdxl

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_sd15_dir(tmp_path_factory):
    return build_tiny_sd15(tmp_path_factory.mktemp("tiny-sd15"))


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl"))


@pytest.fixture(scope="session")
def tiny_sd15_vpred_dir(tmp_path_factory):
    return build_tiny_sd15(tmp_path_factory.mktemp("tiny-sd15-v"), prediction_type="v_prediction")
