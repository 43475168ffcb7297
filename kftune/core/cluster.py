"""What every kftune pod on a cluster shares: the Secrets its credentials come from and how a GPU node is picked.

The pipeline's tasks (pipelines/finetune.py) and the nodes of a multi-node TrainJob (kftune.train.trainjob)
read these, so both get the same credentials and land on the same kind of node. The cluster manifests
(k8s/) create the Secrets.
"""

from __future__ import annotations

# Secret name -> {secret key: environment variable}
SECRETS: dict[str, dict[str, str]] = {
    "kftune-s3": {
        k: k for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")
    },
    "kftune-mlflow": {k: k for k in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")},
}
GPU_RESOURCE = "nvidia.com/gpu"
GPU_NODE_LABEL = ("nvidia.com/gpu.present", "true")  # set by NVIDIA's GPU feature discovery


def in_cluster() -> bool:
    """True inside a Kubernetes pod (the kubelet sets this for every container)."""
    import os

    return bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
