"""The wheels a bare CUDA machine lacks for bench/gpu.sh, downloaded here (where PyPI answers), to carry there.

The lent GPU machines reach no registry. Their python3 (3.12, x86-64) holds torch 2.11, transformers 5.17,
peft, accelerate, pandas, pyarrow, xxhash and pytest, but not trl, datasets or bitsandbytes. The wheels
travel with the working tree, 64 MiB in all with it: they are taken in the order below while they fit,
and whatever does not fit is named in `skipped.json` with the reason, which gpu.sh prints when it skips
the rows that need it (bitsandbytes: the QLoRA rows).

    python bench/gpu_wheelhouse.py [--out bench/.gpu-wheels] [--budget-mib 64]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / ".gpu-wheels"
# (pin, what needs it); the order is the priority when the budget runs out
WHEELS = [
    ("trl==1.16.0", "both tools train through trl"),
    ("datasets==5.2.0", "trl and kftune's data"),
    ("dill==0.4.1", "datasets"),
    ("multiprocess==0.70.19", "datasets"),
    ("transformers==5.24.0", "kftune pins 5.24; the machine has 5.17"),
    ("peft==0.21.2", "kftune pins 0.21.2"),
    ("bitsandbytes==0.50.2", "the QLoRA rows"),
]
TARGET = ["--python-version", "3.12", "--implementation", "cp", "--only-binary=:all:"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]


def platform_args() -> list[str]:
    return TARGET + [arg for p in PLATFORMS for arg in ("--platform", p)]


def tree_bytes() -> int:
    """What else travels: the tracked and untracked-not-ignored files of this checkout."""
    listed = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    return sum((ROOT / name.decode()).stat().st_size for name in listed if name and (ROOT / name.decode()).is_file())


def download(pin: str, folder: Path) -> Path:
    name = pin.split("==")[0].replace("-", "_").lower()
    have = [w for w in folder.glob("*.whl") if w.name.lower().startswith(f"{name}-{pin.split('==')[1]}-")]
    if have:
        return have[0]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", *platform_args(), "-d", str(folder), pin],
        check=True,
    )
    return next(w for w in folder.glob("*.whl") if w.name.lower().startswith(f"{name}-"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--budget-mib", type=float, default=64, help="what may travel, the working tree included")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    budget = int(args.budget_mib * 2**20) - tree_bytes()
    kept, skipped, used = [], {}, 0
    staging = ROOT / "bench" / ".peers" / "wheel-cache"  # downloads kept here, outside what travels
    staging.mkdir(parents=True, exist_ok=True)
    for pin, why in WHEELS:
        wheel = download(pin, staging)
        size = wheel.stat().st_size
        if used + size > budget:
            skipped[pin.split("==")[0]] = (
                f"{wheel.name} ({size / 2**20:.1f} MiB) does not fit beside the other wheels and the working tree "
                f"in the {args.budget_mib:.0f} MiB that travel to the GPU machine (needed for {why})"
            )
            continue
        used += size
        kept.append(wheel.name)
    for old in args.out.glob("*.whl"):
        if old.name not in kept:
            old.unlink()
    for name in kept:
        if not (args.out / name).exists():
            shutil.copy2(staging / name, args.out / name)
    (args.out / "skipped.json").write_text(json.dumps(skipped, indent=1) + "\n", encoding="utf-8")
    print(f"{'wheel':60s} {'MiB':>6s}")
    for name in kept:
        print(f"{name:60s} {(args.out / name).stat().st_size / 2**20:6.1f}")
    print(f"{len(kept)} wheels, {used / 2**20:.1f} MiB of the {budget / 2**20:.1f} MiB left beside the working tree")
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
