"""The container images the pipeline's tasks run in, read from images.env (named nowhere else).

images.env lives next to this module, as package data of `components` (images/images.env links to it
for make), so an installed kftune (`pip install .`, as the images do) reads the same file as a checkout.

Both images ship kftune with its pinned dependencies and kfp (components use install_kfp_package=False),
run as a numeric non-root user and set KFTUNE_CACHE to CACHE_DIR, where the training task mounts its
cache volume. Stdlib only: this module is imported whenever a component is defined.

The project's two images are named in images.env without a build behind them; `make images` tags what
it builds with the commit and base (REPO:<commit>-<base>) and records those refs in build/images.env,
and `make push-images` pins them there by the registry's digest (REPO:TAG@sha256:...). With
KFTUNE_IMAGES=<that file> (set by `make run-containers`, `make test-containers` and for compiling a
pipeline to submit: `KFTUNE_IMAGES=build/images.env kftune pipeline compile ...`) the components run
exactly those images, so no node runs a stale image under a reused tag.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

IMAGES_ENV = Path(__file__).with_name("images.env")
_LINE = re.compile(r"([A-Z][A-Z0-9_]*)=(\S+)")


def read_images_env(path: Path = IMAGES_ENV) -> dict[str, str]:
    """KEY=VALUE lines, '#' comments and blank lines; anything else is an error (make must read the same)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise RuntimeError(f"{path} is missing or unreadable ({e.strerror}); it names the pipeline's images") from e
    values = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _LINE.fullmatch(line)
        if not match or any(c in match[2] for c in "\"'$#"):
            raise RuntimeError(f"{path}:{number}: expected KEY=VALUE with no quotes, spaces, '$' or '#', got {line!r}")
        values[match[1]] = match[2]
    return values


def _require(values: dict[str, str], key: str) -> str:
    if key not in values:
        raise RuntimeError(f"{IMAGES_ENV} has no {key}=...; it names the pipeline's images")
    return values[key]


BUILT_ENV = "KFTUNE_IMAGES"  # a build/images.env written by images/build.sh
BUILT_KEYS = ("CPU_IMAGE", "TRAINER_IMAGE")


def _values() -> dict[str, str]:
    values = read_images_env()
    built = os.environ.get(BUILT_ENV)
    if built:
        found = read_images_env(Path(built))
        if unknown := sorted(set(found) - set(BUILT_KEYS)):
            raise RuntimeError(f"{built} ({BUILT_ENV}) sets {', '.join(unknown)}; it may set only {BUILT_KEYS}")
        values.update(found)
    return values


_VALUES = _values()
# torch's CUDA build + bitsandbytes + kftune: the training task on GPU nodes.
TRAINER_IMAGE = _require(_VALUES, "TRAINER_IMAGE")
# The same Python packages on a slim CPU base: validation, evaluation, merging, registration.
CPU_IMAGE = _require(_VALUES, "CPU_IMAGE")
# Where the images' KFTUNE_CACHE points; the training task mounts its cache volume here.
CACHE_DIR = _require(_VALUES, "CACHE_DIR")
# The images' user; a task's securityContext (kfp.kubernetes.set_security_context) can name it.
IMAGE_UID = int(_require(_VALUES, "IMAGE_UID"))
