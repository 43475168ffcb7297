"""The container images the pipeline's tasks run in: named here and nowhere else.

Both ship kftune with its pinned dependencies and kfp (components use install_kfp_package=False),
and set KFTUNE_CACHE=/cache, where the training task mounts its cache volume.
"""

# CUDA base + torch + bitsandbytes + kftune: the training task on GPU nodes.
TRAINER_IMAGE = "ghcr.io/kftune/kftune-trainer:0.1.0"
# The same Python packages on a slim CPU base: validation, evaluation, merging, registration.
CPU_IMAGE = "ghcr.io/kftune/kftune-cpu:0.1.0"
# Where the images' KFTUNE_CACHE points; the training task mounts its cache volume here.
CACHE_DIR = "/cache"
