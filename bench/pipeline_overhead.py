"""What the Kubeflow pipeline costs on top of its work: the local DAG (kfp.local) against the same steps in one process.

Starts a private local stack (SeaweedFS S3 + MLflow) in a temporary folder, stages the tiny demo
model and the sample data in S3, then runs the same five steps twice with the same settings:
(1) as the pipeline, through `pipelines.local.run` (one subprocess per task, KFP's executor,
artifact records), and (2) as plain calls of `kftune.steps` in this process. Prints each step's
wall time both ways and the pipeline's overhead as a ratio of the totals. The in-process run goes
second, so it has warm file caches and imports: the ratio is an upper bound of what KFP adds.

--containers (needs `make images` and docker or podman) also runs the pipeline with every task in its
image (`--runner container`) and measures the start-up cost of one task both ways: the median wall
time of starting Python and importing the step code, as a subprocess of this Python and as a
container of the CPU image under the runner's pod settings.

    python bench/pipeline_overhead.py [--max-steps 20] [--quick] [--containers]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

STEPS = ("validate-data", "train", "evaluate", "merge-adapter", "register-model")
# what every task starts with: Python, then the step code (kftune.steps imports torch lazily, kfp eagerly)
PROBES = {"python -c pass": "pass", "import kftune.steps": "import kftune.steps, kfp.dsl"}


def startup_seconds(repeats: int = 5) -> dict[str, dict[str, float]]:
    """Median wall seconds to start each probe: as a subprocess of this Python, and as a container of the CPU
    image with the container runner's settings (the Docker API already up, the image present)."""
    import docker

    from components.images import CPU_IMAGE
    from pipelines.container_runner import _docker_host, check_images, docker_api, security_settings

    def median(work) -> float:
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            work()
            times.append(time.perf_counter() - started)
        return statistics.median(times)

    out: dict[str, dict[str, float]] = {}
    with docker_api() as url, _docker_host(url), contextlib.closing(docker.from_env()) as client:
        check_images(client, (CPU_IMAGE,))
        volume = client.volumes.create(f"kftune-bench-{uuid.uuid4().hex[:8]}")
        try:
            settings = security_settings({}, volume.name)
            for label, code in PROBES.items():
                out[label] = {
                    "subprocess": median(lambda code=code: subprocess.run([sys.executable, "-c", code], check=True)),
                    "container": median(
                        lambda code=code: client.containers.run(
                            CPU_IMAGE, ["python", "-c", code], remove=True, **settings
                        )
                    ),
                }
        finally:
            volume.remove(force=True)
    return out


def in_process(arguments: dict, env: dict[str, str]) -> dict[str, float]:
    """The DAG's steps called directly, in its order, timed one by one."""
    from kftune import steps
    from pipelines.local import _environment

    settings = {k: arguments[k] for k in steps.TRAIN_PARAMS if k in arguments and k != "base_model"}
    seconds: dict[str, float] = {}

    def timed(name, work):
        started = time.perf_counter()
        result = work()
        seconds[name] = time.perf_counter() - started
        return result

    root = arguments["artifact_root"]
    with _environment(env):
        data = timed(
            "validate-data",
            lambda: steps.validate_data(
                arguments["data_uri"],
                root,
                base_model=arguments["base_model"],
                max_seq_length=arguments["max_seq_length"],
            ),
        )
        trained = timed(
            "train", lambda: steps.train(data, arguments["base_model"], arguments["method"], root, settings)
        )
        evaluation = timed(
            "evaluate",
            lambda: steps.evaluate(
                trained.uri,
                data.eval_uri,
                root,
                sample_tokens=arguments["sample_tokens"],
                samples=arguments.get("eval_samples", 8),
                validation_uri=data.uri,
            ),
        )
        merged = timed("merge-adapter", lambda: steps.merge(trained.uri, root))
        timed(
            "register-model",
            lambda: steps.register(
                arguments["registered_model_name"],
                arguments["experiment_name"],
                data,
                trained,
                evaluation,
                merged,
                artifact_root=root,
                metric=arguments.get("primary_metric", "eval_loss"),
                margin=arguments.get("promotion_margin", 0.01),
            ),
        )
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=20, help="training steps (default 20)")
    parser.add_argument("--quick", action="store_true", help="3 training steps, no sample answers: a smoke run")
    parser.add_argument(
        "--containers",
        action="store_true",
        help="also run every task in its image and time a task's start-up both ways (make images first)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for the JSON")
    args = parser.parse_args(argv)
    from kftune.core.storage import connect_s3
    from kftune.dev.stack import StackConfig, down, free_ports, up
    from pipelines.cli import SAMPLE_DATA, demo_model, stage
    from pipelines.local import run

    steps_n = 3 if args.quick else args.max_steps
    with tempfile.TemporaryDirectory(prefix="kftune-bench-pipeline-") as tmp:
        s3_port, mlflow_port = free_ports(2)
        saved = {k: os.environ.pop(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if k in os.environ}
        print("[bench] starting a private local stack ...", file=sys.stderr, flush=True)
        info = up(StackConfig(Path(tmp) / "stack", s3_port, mlflow_port))
        os.environ.update(saved)
        try:
            s3 = connect_s3(info.s3_endpoint, access_key=info.access_key, secret_key=info.secret_key)
            model = demo_model(Path(tmp) / "demo-model")
            base = {
                "method": "lora",
                "lora_r": 16,
                "lora_alpha": 32,
                "lora_dropout": 0.0,
                "learning_rate": 1e-3,
                "max_steps": steps_n,
                "per_device_train_batch_size": 4,
                "gradient_accumulation_steps": 1,
                "max_seq_length": 256,
                "seed": 42,
                "num_train_epochs": 1.0,
                "sample_tokens": 32,
                "eval_samples": 0 if args.quick else 4,
                "experiment_name": "bench",
                "data_uri": stage(str(SAMPLE_DATA), s3, f"s3://{info.bucket}/inputs/data"),
                "base_model": stage(str(model), s3, f"s3://{info.bucket}/inputs/models"),
            }
            pipeline_args = {
                **base,
                "registered_model_name": "bench-pipeline",
                "artifact_root": f"s3://{info.bucket}/pipeline",
            }
            print(f"[bench] the pipeline through kfp.local, LoRA, {steps_n} steps ...", file=sys.stderr, flush=True)
            started = time.perf_counter()
            summary = run(pipeline_args, info.env(), Path(tmp) / "runs")
            pipeline_total = time.perf_counter() - started
            direct_args = {
                **base,
                "registered_model_name": "bench-direct",
                "artifact_root": f"s3://{info.bucket}/direct",
            }
            print("[bench] the same steps in this process ...", file=sys.stderr, flush=True)
            started = time.perf_counter()
            direct = in_process(direct_args, info.env())
            direct_total = time.perf_counter() - started
            containers, containers_total, startup = {}, float("nan"), {}
            if args.containers:
                print("[bench] the pipeline with every task in its image ...", file=sys.stderr, flush=True)
                started = time.perf_counter()
                containers = run(
                    {**pipeline_args, "registered_model_name": "bench-containers"},
                    info.env(),
                    Path(tmp) / "runs",
                    runner="container",
                ).seconds
                containers_total = time.perf_counter() - started
                print("[bench] one task's start-up, subprocess vs container ...", file=sys.stderr, flush=True)
                startup = startup_seconds()
        finally:
            down(info.state_dir)
    pipeline = summary.seconds
    print(
        f"local pipeline (kfp.local, a subprocess per task) vs the same kftune.steps calls in one process; "
        f"LoRA r=16, {steps_n} steps, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, {time.strftime('%Y-%m-%d')}"
    )
    print(f"{'step':16s} {'pipeline s':>11s} {'in-process s':>13s} {'difference':>11s}")
    for step in STEPS:
        a, b = pipeline.get(step, float("nan")), direct.get(step, float("nan"))
        print(f"{step:16s} {a:11.1f} {b:13.1f} {a - b:+11.1f}")
    print(f"{'total (wall)':16s} {pipeline_total:11.1f} {direct_total:13.1f} {pipeline_total - direct_total:+11.1f}")
    ratio = pipeline_total / direct_total
    print(f"pipeline overhead: {ratio:.2f}x the in-process time ({pipeline_total - direct_total:+.1f} s)")
    if containers:
        print(f"\nthe same pipeline with every task in its image (--runner container, {len(containers)} tasks)")
        print(f"{'step':16s} {'subprocess s':>13s} {'container s':>12s} {'difference':>11s}")
        for step in STEPS:
            a, b = pipeline.get(step, float("nan")), containers.get(step, float("nan"))
            print(f"{step:16s} {a:13.1f} {b:12.1f} {b - a:+11.1f}")
        print(
            f"{'total (wall)':16s} {pipeline_total:13.1f} {containers_total:12.1f} {containers_total - pipeline_total:+11.1f}"
        )
        print("\none task's start-up, median of 5 (container: CPU image, read-only root, uid 10001, caps dropped)")
        print(f"{'probe':22s} {'subprocess s':>13s} {'container s':>12s} {'difference':>11s}")
        for label, times in startup.items():
            print(
                f"{label:22s} {times['subprocess']:13.2f} {times['container']:12.2f} "
                f"{times['container'] - times['subprocess']:+11.2f}"
            )
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "pipeline_overhead.json"
    path.write_text(
        json.dumps(
            {
                "date": time.strftime("%Y-%m-%d %H:%M"),
                "max_steps": steps_n,
                "pipeline": pipeline,
                "in_process": direct,
                "pipeline_total": pipeline_total,
                "in_process_total": direct_total,
                "ratio": ratio,
                "containers": containers,
                "containers_total": containers_total if containers else None,
                "task_startup": startup,
            },
            indent=2,
        )
        + "\n",
        encoding="utf-8",
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
