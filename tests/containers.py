"""Helpers of the container tests: which engine runs here, whether the images are built, one task run
as the pipeline's container runner runs it (pipelines/container_runner.py's settings)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from components.images import CPU_IMAGE, TRAINER_IMAGE

REPO = Path(__file__).resolve().parents[1]
BUILD_ENV = "KFTUNE_BUILD_IMAGES"  # =1: a container test builds missing images (`make images`, ~15 min cold)
OPT_IN_ENV = "KFTUNE_CONTAINER_TESTS"  # =1 (`make test-containers`): run them; ~2 min on 2 cores with the images built


def engine() -> str | None:
    """docker with a daemon that answers, else podman, else None."""
    for name in ("docker", "podman"):
        if shutil.which(name) and subprocess.run([name, "info"], capture_output=True, timeout=60).returncode == 0:
            return name
    return None


def require_images(*images: str) -> str:
    """The engine, once `images` (default: both) exist (built here when KFTUNE_BUILD_IMAGES=1); else the test
    skips, saying why."""
    if os.environ.get(OPT_IN_ENV) != "1" and os.environ.get(BUILD_ENV) != "1":
        pytest.skip(f"container tests are opt-in ({OPT_IN_ENV}=1, or `make test-containers`): ~2 min on 2 cores")
    name = engine()
    if not name:
        pytest.skip("no container engine (docker with a running daemon, or podman): the images cannot run here")
    missing = [
        i
        for i in images or (CPU_IMAGE, TRAINER_IMAGE)
        if subprocess.run([name, "image", "inspect", i], capture_output=True).returncode
    ]
    if missing and os.environ.get(BUILD_ENV) == "1":
        subprocess.run(["make", "images"], cwd=REPO, check=True)
    elif missing:
        pytest.skip(
            f"image(s) {', '.join(missing)} not built: `make images` first, or {BUILD_ENV}=1 to build them here"
        )
    return name


def image_config(name: str, image: str) -> dict:
    """The image's config (User, Env, WorkingDir) as the engine reports it."""
    import json

    done = subprocess.run([name, "image", "inspect", image], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)[0]["Config"]
