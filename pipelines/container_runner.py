"""`kftune pipeline run --runner container`: every task in its component's image, through kfp.local's DockerRunner.

Tasks run as the cluster's pods run them: the images' numeric user, a read-only root filesystem with
only /tmp (a tmpfs) and the cache folder (a volume, as the pod's emptyDir) writable, every capability
dropped, no new privileges. They share the host's network, so they reach the local stack (SeaweedFS
and MLflow on 127.0.0.1) at the endpoints subprocess tasks use, and get its endpoints and keys as
environment variables, as pods get them from Secrets. The Docker API is docker's (DOCKER_HOST or the
default socket) when it answers, else podman's, served by `podman system service` for the run only.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from components.images import CACHE_DIR, CPU_IMAGE, IMAGE_UID, TRAINER_IMAGE
from kftune.core.errors import KftuneError

TMP_SIZE = "4g"  # the tmpfs at /tmp: scratch files only, models and data go to the cache volume
SERVICE_START_S = 30.0  # how long `podman system service` may take to answer
# Set by the images to their writable paths and venv: a host's value (a host folder) would point a task
# at its read-only root, so these are not forwarded.
IMAGE_OWNED = (
    "PATH",
    "HOME",
    "TMPDIR",
    "VIRTUAL_ENV",
    "KFTUNE_CACHE",
    "HF_HOME",
    "XDG_CACHE_HOME",
    "MPLCONFIGDIR",
    "TRITON_CACHE_DIR",
)


def security_settings(env: Mapping[str, str], cache_volume: str) -> dict[str, Any]:
    """docker-py `containers.run` arguments for one task: the pod's securityContext, its volumes and env.

    Mirrors pipelines/finetune.py (runAsUser/Group = IMAGE_UID, runAsNonRoot) and the k8s manifests
    (readOnlyRootFilesystem, capabilities drop ALL, allowPrivilegeEscalation false, /tmp and the cache
    writable); tests/test_container_policy.py holds them to that.
    """
    from docker.types import Mount

    return {
        "user": f"{IMAGE_UID}:{IMAGE_UID}",
        "read_only": True,
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges"],
        "tmpfs": {"/tmp": f"rw,nosuid,nodev,size={TMP_SIZE},mode=1777"},
        "mounts": [Mount(target=CACHE_DIR, source=cache_volume, type="volume")],
        "network_mode": "host",
        "environment": {k: v for k, v in env.items() if k not in IMAGE_OWNED},
    }


def _answers(base_url: str | None) -> bool:
    import docker

    try:
        client = docker.DockerClient(base_url=base_url) if base_url else docker.from_env()
        with contextlib.closing(client):
            return bool(client.ping())
    except Exception:  # docker.errors.DockerException, or a refused/missing socket
        return False


@contextlib.contextmanager
def docker_api() -> Iterator[str | None]:
    """A Docker API for the run: DOCKER_HOST or docker's default socket when one answers (None: docker-py's
    default), else podman's, served from a private socket for the length of the block."""
    if _answers(None):
        yield os.environ.get("DOCKER_HOST")
        return
    podman = shutil.which("podman")
    if not podman:
        raise KftuneError(
            "--runner container needs a container engine: no Docker API answers "
            f"(DOCKER_HOST={os.environ.get('DOCKER_HOST', 'unset')}) and podman is not installed; "
            "install docker or podman, or run with the default --runner subprocess"
        )
    folder = Path(tempfile.mkdtemp(prefix="kftune-podman-"))
    url = f"unix://{folder}/podman.sock"
    service = subprocess.Popen(
        [podman, "system", "service", "--time=0", url], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + SERVICE_START_S
        while not _answers(url):
            if service.poll() is not None or time.monotonic() > deadline:
                raise KftuneError(
                    f"`podman system service` did not serve the Docker API at {url} within "
                    f"{SERVICE_START_S:.0f}s: {(service.stderr.read() if service.poll() is not None else '').strip()}"
                )
            time.sleep(0.2)
        yield url
    finally:
        service.terminate()
        try:
            service.wait(timeout=10)
        except subprocess.TimeoutExpired:
            service.kill()
            service.wait()
        shutil.rmtree(folder, ignore_errors=True)


def check_images(client: Any, images: tuple[str, ...] = (CPU_IMAGE, TRAINER_IMAGE)) -> None:
    """Every image the tasks name is here: kfp.local would otherwise try to pull it (unreachable, slowly)."""
    import docker

    missing = []
    for image in images:
        try:
            client.images.get(image)
        except docker.errors.ImageNotFound:
            missing.append(image)
    if missing:
        raise KftuneError(
            f"--runner container: image(s) {', '.join(missing)} not found by the container engine; "
            "build them with `make images` (or pull them), then run again"
        )


def run_container(client: Any, image: str, command: list[str], volumes: dict[str, Any], **run_args: Any) -> int:
    """kfp.local's `run_docker_container` with the task's true exit status.

    kfp's own starts the container with auto_remove=True and, when the container is gone before its
    `wait` (podman removes it as soon as it exits), takes the exit status to be 0: measured here, a
    task that exits 3 is reported as a success. This one keeps the container until its status is read,
    then removes it. The image must be present (`check_images`): nothing is pulled.
    """
    print(f"[container] {image} as {run_args.get('user')}, read-only root: {run_args.get('read_only')}", flush=True)
    container = client.containers.run(
        image=image, command=command, volumes=volumes, detach=True, stdout=True, stderr=True, **run_args
    )
    try:
        for line in container.logs(stream=True, follow=True):
            print(line.decode(errors="replace"), end="")
        return int(container.wait()["StatusCode"])
    finally:
        container.remove(force=True)


@contextlib.contextmanager
def _true_exit_status() -> Iterator[None]:
    """kfp.local's task handler calls its module's `run_docker_container` by name: `run_container` stands in
    for the block (the handler's own DockerRunner type is what kfp.local dispatches on, so it cannot be
    subclassed)."""
    from kfp.local import docker_task_handler

    saved = docker_task_handler.run_docker_container
    docker_task_handler.run_docker_container = run_container
    try:
        yield
    finally:
        docker_task_handler.run_docker_container = saved


@contextlib.contextmanager
def docker_runner(env: Mapping[str, str], run_root: Path) -> Iterator[Any]:
    """kfp.local's DockerRunner set up as a pod: the Docker API, the images checked, a cache volume for the run.

    The run folder, bind-mounted into every task at the same path by kfp.local, is made writable by the
    images' user (it is a fresh folder of this run's task records only).
    """
    import docker
    from kfp import local

    with docker_api() as base_url, _docker_host(base_url), _true_exit_status():
        client = docker.from_env()
        with contextlib.closing(client):
            check_images(client)
            volume = client.volumes.create(f"kftune-cache-{uuid.uuid4().hex[:12]}")
            try:
                run_root.chmod(0o777)
                yield local.DockerRunner(**security_settings(env, volume.name))
            finally:
                with contextlib.suppress(docker.errors.APIError):
                    volume.remove(force=True)


@contextlib.contextmanager
def _docker_host(base_url: str | None) -> Iterator[None]:
    """DOCKER_HOST for the block: kfp.local's task handler connects with docker.from_env()."""
    saved = os.environ.get("DOCKER_HOST")
    if base_url:
        os.environ["DOCKER_HOST"] = base_url
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("DOCKER_HOST", None)
        else:
            os.environ["DOCKER_HOST"] = saved
