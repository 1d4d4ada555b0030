"""A catalogue of broken inputs, each through the real CLI: exit 2 (or 1 for a gate), one line naming
the problem, no traceback, and nothing left under the output folder. Then a run killed mid-way."""

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import SILICONVERT
from safetensors.torch import load_file, save_file

pytestmark = pytest.mark.slow


def cli(*args, timeout=600):
    env = {**os.environ, "SILICONVERT_QUIET": "1"}
    return subprocess.run([SILICONVERT, *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout)


@pytest.fixture(scope="module")
def good(small_model):
    return small_model("llama", "sentencepiece")


def recipe_for(tmp_path: Path, source, **changes) -> Path:
    recipe = {"source": str(source), "output": str(tmp_path / "out"),
              "targets": [{"format": "mlx"}, {"format": "gguf", "quants": ["Q8_0"]}],
              "validate": {"enabled": False}} | changes
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def broken_copy(good: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "ckpt"
    shutil.copytree(good, folder)
    return folder


def edit_config(folder: Path, **changes):
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))


def rewrite_tensors(folder: Path, change):
    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def rewrite_header(folder: Path, change):
    shard = folder / "model.safetensors"
    raw = shard.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    change(header)
    encoded = json.dumps(header, separators=(",", ":")).encode().ljust(length)  # same length: offsets hold
    shard.write_bytes(raw[:8] + encoded + raw[8 + length:])


def nan_in_norm(tensors):
    tensors["model.norm.weight"][0] = float("nan")


def first_weight(header):
    return next(k for k in header if k != "__metadata__")


# (id, how to break the checkpoint folder, what the message must say)
CHECKPOINT_CASES = [
    ("config-missing", lambda f: (f / "config.json").unlink(), "config.json is missing"),
    ("config-not-json", lambda f: (f / "config.json").write_text("{oops"), "not valid JSON"),
    ("config-field-missing", lambda f: edit_config(f, hidden_size=None), "missing required field 'hidden_size'"),
    ("unknown-architecture", lambda f: edit_config(f, architectures=["MambaForCausalLM"]),
     "unsupported architecture (MambaForCausalLM); supported:"),
    ("no-tokenizer", lambda f: [p.unlink() for p in f.glob("tokenizer*")], "no tokenizer"),
    ("no-weights", lambda f: (f / "model.safetensors").unlink(), "no weights"),
    ("pickle-only", lambda f: (f / "model.safetensors").rename(f / "pytorch_model.bin"), "--allow-pickle"),
    ("truncated", lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:-64]),
     "truncated"),
    ("header-length-absurd", lambda f: (f / "model.safetensors").write_bytes(
        struct.pack("<Q", 1 << 50) + (f / "model.safetensors").read_bytes()[8:]), "header length"),
    ("header-not-json", lambda f: (f / "model.safetensors").write_bytes(
        (f / "model.safetensors").read_bytes()[:9] + b"!" + (f / "model.safetensors").read_bytes()[10:]),
     "header is not valid JSON"),
    ("dtype-unknown", lambda f: rewrite_header(f, lambda h: h[first_weight(h)].update(dtype="F8")),
     "unknown dtype 'F8'"),
    ("tensor-missing", lambda f: rewrite_tensors(f, lambda t: t.pop("model.norm.weight")),
     "missing tensor 'model.norm.weight'"),
    ("tensor-unexpected", lambda f: rewrite_tensors(f, lambda t: t.update(extra=t["model.norm.weight"].clone())),
     "unexpected tensor 'extra'"),
    ("tensor-wrong-shape", lambda f: edit_config(f, intermediate_size=100), "config.json implies"),
    ("nan-weights", lambda f: rewrite_tensors(f, nan_in_norm), "NaN or Inf"),
]


@pytest.mark.parametrize(("case", "damage", "message"), CHECKPOINT_CASES, ids=[c[0] for c in CHECKPOINT_CASES])
def test_broken_checkpoint(good, tmp_path, case, damage, message):
    folder = broken_copy(good, tmp_path)
    damage(folder)
    result = cli("recipe", recipe_for(tmp_path, folder))
    assert_one_line_error(result, message, tmp_path / "out")


RECIPE_CASES = [
    ("yaml-syntax", "source: x\ntargets: [\n", "line"),
    ("unknown-key", "source: x\ntargets: [{format: mlx}]\ncolour: red\n", "unknown key 'colour'"),
    ("wrong-type", "source: x\ntargets: [{format: mlx, bits: four}]\n", "targets.0.bits"),
    ("unknown-format", "source: x\ntargets: [{format: onnx}]\n", "unknown format 'onnx'"),
    ("unknown-quant", "source: x\ntargets: [{format: gguf, quants: [Q5_Z]}]\n", "targets.0.quants.0"),
    ("imatrix-off", "source: x\ntargets: [{format: gguf, quants: [Q4_K_M, IQ2_XXS], imatrix: false}]\n",
     "imatrix: false, but IQ2_XXS needs an importance matrix"),
    ("source-missing", "source: /no/such/folder\ntargets: [{format: mlx}]\n", "source not found"),
    ("hub-id-offline", "source: nobody-here/no-model\ntargets: [{format: mlx}]\n", "Hugging Face Hub"),
]


@pytest.mark.parametrize(("case", "text", "message"), RECIPE_CASES, ids=[c[0] for c in RECIPE_CASES])
def test_broken_recipe(tmp_path, case, text, message):
    path = tmp_path / "recipe.yaml"
    path.write_text(text.replace("targets:", f"output: {tmp_path / 'out'}\ntargets:", 1))
    result = cli("recipe", path)
    assert_one_line_error(result, message, tmp_path / "out")


def test_output_folder_that_cannot_be_created(good, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = cli("recipe", recipe_for(tmp_path, good, output=str(blocker / "out")))
    assert_one_line_error(result, "cannot create the output folder", blocker / "out")


def test_full_disk_is_one_line_and_leaves_nothing(good, tmp_path, monkeypatch, capsys):
    """ENOSPC from a writer (simulated: a real full disk cannot be made safely here) aborts every writer."""
    import errno

    from siliconvert.commands import cli as cli_module
    from siliconvert.convert import mlx

    def full_disk(self, *_args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mlx.MLXWriter, "_open_shard", full_disk)
    monkeypatch.setattr(sys, "argv", ["siliconvert", "recipe", str(recipe_for(tmp_path, good))])
    with pytest.raises(SystemExit) as exit_info:
        cli_module.main()
    assert exit_info.value.code == 2
    assert "no space left" in capsys.readouterr().err
    assert not list((tmp_path / "out" / "artifacts").glob("*-*")), "no artifact may be left"


def assert_one_line_error(result, message, out_dir: Path):
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    artifacts = out_dir / "artifacts"
    assert not artifacts.exists() or not [p for p in artifacts.iterdir() if p.name != ".stamps"]


def test_killed_run_resumes_and_gives_the_same_bytes(good, tmp_path):
    """kill -9 at several moments; after each, nothing unfinished has a final name, and a re-run
    completes with the bytes of an uninterrupted run."""
    clean = tmp_path / "clean"
    clean.mkdir()
    assert cli("recipe", recipe_for(clean, good)).returncode == 0
    expected = checksums(clean / "out" / "artifacts")
    env = {**os.environ, "SILICONVERT_QUIET": "1"}
    for delay in (2.0, 3.5, 5.0, 6.5):
        killed = tmp_path / f"killed-{delay}"
        killed.mkdir()
        process = subprocess.Popen([SILICONVERT, "recipe", recipe_for(killed, good)],
                                   env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
        artifacts = killed / "out" / "artifacts"
        stamped = stamped_paths(artifacts)
        for entry in artifacts.iterdir() if artifacts.exists() else []:
            assert entry.name.startswith(".") or entry.name in stamped, f"{entry} has a final name but no stamp"
        assert cli("recipe", recipe_for(killed, good)).returncode == 0
        assert checksums(artifacts) == expected


def stamped_paths(artifacts: Path) -> set[str]:
    names = set()
    for stamp in (artifacts / ".stamps").glob("*.json"):
        names |= {Path(entry["path"]).parts[0] for entry in json.loads(stamp.read_text())}
    return names


def checksums(folder: Path) -> dict[str, str]:
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and ".stamps" not in p.parts}


def runner_children(pid: int) -> list[int]:
    """The process-pool workers `pid` started (a reference, calibration or artifact runner), from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue  # exited meanwhile
        if int(fields[1]) == pid and b"multiprocessing" in cmdline and b"resource_tracker" not in cmdline:
            found.append(int(stat.parent.name))
    return found


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_validation_ends_every_child(good, tmp_path, signum):
    """SIGTERM (or SIGINT sent to the command alone, not its group) while a runner child works: one line, exit
    128 + the signal, and no process of the run's group outlives it (the runner and the resource tracker once
    stayed, 356 MB, after the main process had gone)."""
    recipe = recipe_for(tmp_path, good, targets=[{"format": "mlx"}],
                        validate={"tokens": 256, "context": 64, "latency": False})
    process = subprocess.Popen([SILICONVERT, "recipe", str(recipe)], env={**os.environ, "SILICONVERT_QUIET": "1"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not runner_children(process.pid):
            assert process.poll() is None, f"the run ended (exit {process.returncode}) before a runner started"
            assert time.monotonic() < deadline, "no runner child started"
            time.sleep(0.1)
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=60)
        deadline = time.monotonic() + 10  # the resource tracker ends when the last holder of its pipe has gone
        while group_alive(process.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not group_alive(process.pid), "a child outlived the run"
    finally:
        if group_alive(process.pid):
            os.killpg(process.pid, signal.SIGKILL)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert process.returncode == 128 + signum, stderr
    assert len(lines) == 1 and lines[0].startswith(f"interrupted by {signal.Signals(signum).name}"), stderr
    artifacts = tmp_path / "out" / "artifacts"
    stamped = stamped_paths(artifacts)
    assert all(p.name.startswith(".") or p.name in stamped for p in artifacts.iterdir()) if artifacts.exists() else True
    assert not (tmp_path / "out" / "report.json").exists()
