"""The installed project works inside the built images, run as the pipeline's container runner runs a
task (pipelines/container_runner.py: uid 10001, read-only root, only /tmp and the cache writable, every
capability dropped, no new privileges): a tiny model built, every training method (QLoRA 4- and 8-bit
included) on CPU in the trainer image, evaluate and merge in the CPU image. Registration in the CPU
image needs the MLflow server: tests/integration/test_container_run.py covers it. Marker `container`:
skipped, saying why, without an engine or the images."""

from __future__ import annotations

import contextlib
import uuid

import pytest

from components.images import CPU_IMAGE, TRAINER_IMAGE
from pipelines.container_runner import _docker_host, docker_api, security_settings

from .containers import require_images

pytestmark = pytest.mark.container
# a tiny model and data in /tmp: the only writable place besides the cache
SETUP = """set -eu
cd /tmp
kftune --help >/dev/null
python -c "import kftune, components.images as i; assert '/opt/venv/' in i.IMAGES_ENV.as_posix(), i.IMAGES_ENV"
kftune sample-data /tmp/data.jsonl --rows 24
kftune tiny-model /tmp/model --hidden-size 64 --intermediate-size 128 --vocab-size 512 --data /tmp/data.jsonl
"""
TRAIN = (
    "kftune train --base_model /tmp/model --data_path /tmp/data.jsonl --max_steps 1 --per_device_train_batch_size 2 "
    "--max_seq_length 256 --output_dir /tmp/{name} {flags}\n"
    'test -n "$(ls /tmp/{name})" && echo TRAINED {name}\n'
)
METHODS = {
    "full": "--use_lora false",
    "lora": "--use_lora true --lora_r 4 --lora_alpha 8",
    "qlora4": "--use_qlora true --quantization_bit 4 --lora_r 4 --lora_alpha 8",
    "qlora8": "--use_qlora true --quantization_bit 8 --lora_r 4 --lora_alpha 8",
}


def run_as_a_task(image: str, script: str) -> str:
    """`script` in `image` with the runner's settings; its output (a failure raises ContainerError with it)."""
    import docker

    require_images(image)
    with docker_api() as url, _docker_host(url), contextlib.closing(docker.from_env()) as client:
        volume = client.volumes.create(f"kftune-cache-test-{uuid.uuid4().hex[:8]}")
        try:
            settings = security_settings({}, volume.name)
            # detached, logs read before removal: `remove=True` let podman drop the last lines (seen here)
            container = client.containers.run(image, ["sh", "-c", script], detach=True, **settings)
            try:
                status = container.wait()["StatusCode"]
                out = container.logs(stdout=True, stderr=True).decode(errors="replace")
            finally:
                container.remove(force=True)
        finally:
            volume.remove(force=True)
    if status != 0:
        raise docker.errors.ContainerError(container, status, script, image, out)
    return out


def test_the_trainer_image_trains_every_method_on_cpu():
    script = (
        SETUP
        + "python -c \"import torch, bitsandbytes; assert torch.version.cuda; print('CUDA', torch.version.cuda)\"\n"
    )
    script += "touch /opt/venv/x 2>/dev/null && echo ROOT-WRITABLE || echo ROOT-READ-ONLY\n"
    script += "id -u\n" + "".join(TRAIN.format(name=m, flags=f) for m, f in METHODS.items())
    out = run_as_a_task(TRAINER_IMAGE, script)
    assert "ROOT-READ-ONLY" in out and "\n10001\n" in out and "CUDA 1" in out
    for method in METHODS:
        assert f"TRAINED {method}" in out, out[-3000:]


def test_the_cpu_image_evaluates_and_merges():
    script = (
        SETUP
        + TRAIN.format(name="lora", flags=METHODS["lora"])
        + """
python -c "import torch; assert torch.version.cuda is None"
head -n 8 /tmp/data.jsonl > /tmp/eval.jsonl
kftune evaluate --model /tmp/lora --base_model /tmp/model --eval_data /tmp/eval.jsonl --output_dir /tmp/eval --samples 1 --max_new_tokens 4
test -s /tmp/eval/report.html && echo EVALUATED
kftune merge --base_model /tmp/model --lora_model /tmp/lora --output_dir /tmp/merged
test -s /tmp/merged/config.json && echo MERGED
"""
    )
    out = run_as_a_task(CPU_IMAGE, script)
    assert "EVALUATED" in out and "MERGED" in out, out[-3000:]
