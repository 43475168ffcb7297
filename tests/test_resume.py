"""Surviving a kill: training killed with SIGKILL and restarted ends bit-identical to an uninterrupted run;
partial, altered and crafted checkpoints are skipped or refused.

The kill is real: `fine_tune_qwen.py` runs in a subprocess and gets SIGKILL at a random moment after a
random number of published checkpoints (helpers shared with scripts/resume_soak.py, which runs many
more trials). The restart runs in this process, on one thread like the subprocess, to save an
interpreter start per trial; tests/integration/test_resume_s3.py restarts through the CLI.
"""

from __future__ import annotations

import importlib.util
import random
import shutil
import sys
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from kftune.core.errors import KftuneError
from kftune.core.storage import MANIFEST
from kftune.train.checkpoints import Store, check_safe_to_load, run_key
from kftune.train.config import parse_args

from .conftest import REPO

_spec = importlib.util.spec_from_file_location("resume_soak", REPO / "scripts" / "resume_soak.py")
soak = sys.modules["resume_soak"] = importlib.util.module_from_spec(_spec)  # registered first: it holds a dataclass
_spec.loader.exec_module(soak)


@pytest.fixture
def one_thread():
    """The arithmetic of the killed subprocess (OMP_NUM_THREADS=1) in this process."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def train_here(argv: list[str], callbacks: list | None = None):
    from kftune.train.training import run

    return run(parse_args(argv), callbacks)


class CrashAtStep(TrainerCallback):
    """Fails the run at the end of a step, before that step's checkpoint is saved."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise RuntimeError(f"crash at step {self.step}")


@pytest.fixture(scope="module")
def references(tiny_model, small_data, tmp_path_factory):
    """Uninterrupted runs (no checkpoint_uri at all), one per method and precision, computed on first use."""
    cache: dict[str, dict] = {}

    def get(method: str, precision: str) -> dict:
        if (method, precision) not in cache:
            out = tmp_path_factory.mktemp("reference") / f"{method}-{precision}"
            before = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                train_here(soak.train_argv(method, tiny_model, small_data, out, precision=precision))
            finally:
                torch.set_num_threads(before)
            cache[method, precision] = soak.final_tensors(out)
        return cache[method, precision]

    return get


def damage_newest(store: Store, how: str) -> int:
    """Make the newest complete checkpoint partial (no manifest) or altered (a file changed); return its step."""
    step, location = store.listed()[0]
    folder = Path(location)
    if how == "no-manifest":
        (folder / MANIFEST).unlink()
    else:
        optimizer = folder / "optimizer.pt"
        data = bytearray(optimizer.read_bytes())
        data[len(data) // 2] ^= 0xFF
        optimizer.write_bytes(bytes(data))
    return step


# (method, precision, damage done to the newest checkpoint after the kill); kills land at seeded random moments.
# Both precisions on every machine: bf16 is what GPUs and CPUs with native bf16 train in (emulated elsewhere).
TRIALS = [
    ("lora", "bf16", None),
    ("full", "bf16", None),
    ("lora", "fp32", None),
    ("lora", "fp32", "no-manifest"),
    ("full", "bf16", "altered"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("trial", "method", "precision", "damage"), [(i, *t) for i, t in enumerate(TRIALS)])
def test_killed_training_restarts_and_ends_bit_identical(
    trial, method, precision, damage, tiny_model, small_data, references, tmp_path, one_thread
):
    rng = random.Random(7000 + trial)
    after = rng.randint(2 if damage else 1, soak.LAST_KILL)
    out, store_uri = tmp_path / "out", str(tmp_path / "checkpoints")
    argv = soak.train_argv(method, tiny_model, small_data, out, store_uri, precision)

    published = soak.kill_during_training(argv, after, rng.random())
    assert published == after and not out.exists()
    store = Store.for_run(parse_args(argv))
    complete = [step for step, _ in store.listed()]
    assert complete and complete[0] >= after  # the kill may land after the next publish
    expected = damage_newest(store, damage) - 1 if damage else complete[0]
    if damage:
        assert expected in complete  # an older complete checkpoint is kept to fall back on

    result = train_here(argv)

    assert result.metrics["resumed_from_step"] == expected
    assert result.metrics["global_steps"] == soak.MAX_STEPS
    reference = references(method, precision)
    assert soak.differing(reference, soak.final_tensors(out)) == []
    assert len(reference) > 10  # every LoRA matrix or every weight of the model, not one file of nothing
    assert not Path(store.root).exists(), "a finished run leaves no checkpoints behind"


def write_checkpoint(folder: Path, step: int) -> Path:
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(f'{{"global_step": {step}}}')
    torch.save({"state": {}, "param_groups": [{"lr": 0.1 * step}]}, folder / "optimizer.pt")
    return folder


def test_store_resumes_from_the_newest_complete_checkpoint_only(tmp_path):
    store = Store(str(tmp_path / "store" / "run"))
    for step in (1, 2, 3):
        store.publish(write_checkpoint(tmp_path / "saved" / f"checkpoint-{step}", step))
    assert [s for s, _ in store.listed()] == [3, 2, 1]

    store.prune(keep=2)
    assert [s for s, _ in store.listed()] == [3, 2]
    # an upload cut short: files, no manifest
    write_checkpoint(Path(store.root) / "checkpoint-5" / ("0" * 64), 5)
    # a manifest that does not vouch for its files
    (Path(store.listed()[0][1]) / "trainer_state.json").write_text('{"global_step": 33}')
    # and a manifest that does not hash to its folder's name
    forged = Path(store.root) / "checkpoint-4" / ("f" * 64)
    shutil.copytree(store.listed()[1][1], forged)

    assert store.latest(tmp_path / "downloads") == Path(store.listed()[-1][1])  # checkpoint-2
    assert [s for s, _ in store.listed()] == [4, 3, 2]  # damaged ones stay listed; only a verified one is used

    store.clear()
    assert not Path(store.root).exists()


def test_run_key_follows_settings_and_data_not_locations(tiny_model, small_data, tmp_path):
    base = ["--base_model", str(tiny_model), "--data_path", str(small_data), "--use_lora"]
    key = run_key(parse_args([*base, "--output_dir", "a", "--checkpoint_uri", "x"]))
    assert key == run_key(parse_args([*base, "--output_dir", "b", "--checkpoint_uri", "y"]))
    assert key != run_key(parse_args([*base, "--output_dir", "a", "--learning_rate", "0.001"]))
    copy = tmp_path / "same.jsonl"
    shutil.copy(small_data, copy)
    assert key == run_key(parse_args([*base[:3], str(copy), "--use_lora", "--output_dir", "a"]))
    copy.write_text(small_data.read_text(encoding="utf-8").replace("店", "铺", 1), encoding="utf-8")
    assert key != run_key(parse_args([*base[:3], str(copy), "--use_lora", "--output_dir", "a"]))


class WritesMarker:
    """A pickle payload: unpickling calls exec, which writes the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


@pytest.mark.slow
def test_crafted_pickle_in_a_checkpoint_is_refused_and_never_runs(tiny_model, small_data, tmp_path, one_thread):
    out, store_uri = tmp_path / "out", str(tmp_path / "checkpoints")
    argv = soak.train_argv("lora", tiny_model, small_data, out, store_uri)
    with pytest.raises(RuntimeError, match="crash"):
        train_here(argv, callbacks=[CrashAtStep(2)])  # leaves checkpoint-1 in the store
    store = Store.for_run(parse_args(argv))
    step, location = store.listed()[0]

    # an attacker who can write the store rewrites rng_state.pth and a matching manifest
    marker = tmp_path / "marker"
    crafted = tmp_path / "crafted" / f"checkpoint-{step}"
    shutil.copytree(location, crafted, ignore=shutil.ignore_patterns(MANIFEST))
    torch.save({"python": WritesMarker(marker)}, crafted / "rng_state.pth")
    for s, _ in store.listed():
        store.remove(s)
    store.publish(crafted)

    with pytest.raises(KftuneError, match=r"rng_state\.pth: refusing to resume"):
        train_here(argv)
    assert not marker.exists(), "the crafted pickle ran"
    assert not out.exists()

    # the payload is live, shown without running it: the pickle calls builtins.exec on the marker's path
    assert _pickle_calls(crafted / "rng_state.pth") >= {("builtins", "exec")}


def _pickle_calls(path):
    """(module, name) of every global the pickle inside a torch.save zip calls, read by pickletools."""
    import pickletools
    import zipfile

    with zipfile.ZipFile(path) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    strings, calls = [], set()
    for op, arg, _ in pickletools.genops(data):
        if isinstance(arg, str):
            strings.append(arg)
        if op.name == "STACK_GLOBAL":
            calls.add((strings[-2], strings[-1]))
        elif op.name == "GLOBAL":
            calls.add(tuple(arg.split(" ", 1)))
    return {("builtins" if module == "__builtin__" else module, name) for module, name in calls}  # protocol 2 names


def test_pickled_weights_in_a_checkpoint_are_refused(tmp_path):
    folder = write_checkpoint(tmp_path / "checkpoint-1", 1)
    check_safe_to_load(folder)  # plain tensors and values pass
    torch.save({"w": torch.zeros(2)}, folder / "pytorch_model.bin")
    with pytest.raises(KftuneError, match="pytorch_model.bin: the checkpoint's weights are a pickle"):
        check_safe_to_load(folder)


def test_model_and_adapter_weights_load_from_safetensors_only(tiny_model, tmp_path):
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file

    from kftune.models.infer import load_for_inference
    from kftune.models.loading import load_model, pick_runtime

    pickled = tmp_path / "pickled-model"
    shutil.copytree(tiny_model, pickled, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(load_file(tiny_model / "model.safetensors"), pickled / "pytorch_model.bin")
    with pytest.raises(KftuneError, match=r"no \.safetensors weights \(it holds pytorch_model\.bin\)"):
        load_model(str(pickled), pick_runtime("fp32"))

    adapter = tmp_path / "pickled-adapter"
    model = get_peft_model(
        load_model(str(tiny_model), pick_runtime("fp32")), LoraConfig(r=2, target_modules=["q_proj"])
    )
    model.save_pretrained(adapter, safe_serialization=False)
    assert (adapter / "adapter_model.bin").is_file() and not list(adapter.glob("*.safetensors"))
    with pytest.raises(KftuneError, match="--lora_model"):
        load_for_inference(str(tiny_model), str(adapter))


def test_model_code_in_a_model_folder_does_not_run_unless_trusted(tiny_model, tmp_path, monkeypatch):
    import json

    from kftune.models.loading import load_model, pick_runtime

    folder = tmp_path / "model-with-code"
    shutil.copytree(tiny_model, folder)
    marker = tmp_path / "code-ran"
    (folder / "custom_modeling.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import Qwen2ForCausalLM\n"
        # a subclass of its own: registering it for AutoModel must not mark transformers' Qwen2 class
        # as remote code for the rest of the session (save_pretrained would then copy code files)
        "class CustomModel(Qwen2ForCausalLM):\n    pass\n",
        encoding="utf-8",
    )
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "custom_modeling.CustomModel"}
    (folder / "config.json").write_text(json.dumps(config))

    load_model(str(folder), pick_runtime("fp32"))
    assert not marker.exists()

    # the control: trusting the folder runs its code (copied into a module cache of this test's own)
    from transformers import dynamic_module_utils

    monkeypatch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    try:
        load_model(str(folder), pick_runtime("fp32"), trust_remote_code=True)
    finally:
        for name in [n for n in sys.modules if n.startswith("transformers_modules")]:
            del sys.modules[name]
    assert marker.read_text() == "ran"
    from transformers import Qwen2ForCausalLM

    assert Qwen2ForCausalLM._auto_class is None
