"""A plain, non-editable `pip install .` works as the images use it: the installed package needs nothing
from the source tree (images.env is package data), so `kftune pipeline compile` and the component
imports work from a fresh venv and a folder outside the checkout.

The fresh venv gets this venv's dependencies through a .pth line (a path entry, whose own .pth files,
the editable install's among them, are not run) and the project from a copy of what the image build
copies, so only kftune's own install is new: the whole test takes about 6 s."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "kftune", "components", "pipelines")  # the images' build context


def test_a_non_editable_install_compiles_and_imports_without_the_source_tree(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy)(REPO / name, src / name)
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            str(src),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    shutil.rmtree(src)  # nothing may be read from the sources any more

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    probe = (
        "import components, components.train, pipelines.finetune, kftune\n"
        "from components.images import CPU_IMAGE, IMAGES_ENV\n"
        "assert all('site-packages' in m.__file__ for m in (components, pipelines.finetune, kftune)), components.__file__\n"
        "print(IMAGES_ENV, CPU_IMAGE)"
    )
    done = subprocess.run([python, "-c", probe], cwd=work, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert str(Path(site, "components", "images.env")) in done.stdout

    out = work / "x.yaml"
    done = subprocess.run(
        [env_dir / "bin" / "kftune", "pipeline", "compile", "-o", str(out)],
        cwd=work,
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ghcr.io/kftune/kftune-trainer" in out.read_text()
