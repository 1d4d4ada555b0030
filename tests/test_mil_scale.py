"""The MIL interpreter at scale: chunk-major runs, one package's weights at a time, and exact greedy decoding
in rounds. Large models are simulated by lowering RESIDENT_WEIGHT_BYTES on small multi-chunk packages."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from siliconvert.checkpoint import Checkpoint
from siliconvert.convert.coreml import CoreMLWriter
from siliconvert.recipe import CoreMLTarget
from siliconvert.validate.runners import coreml
from siliconvert.validate.runners.coreml import CoreMLRunner
from siliconvert.validate.runners.mil import MILProgram
from siliconvert.validate.runners.mil.torch_ops import TorchEngine

pytestmark = pytest.mark.slow

CONTEXT = 128  # prefill blocks of 64


def build(source: Path, out_dir: Path, chunks: int) -> Path:
    checkpoint = Checkpoint.open(source)
    target = CoreMLTarget(format="coreml", context=CONTEXT, chunks=chunks)
    writer = CoreMLWriter(checkpoint, target, out_dir, "tiny")
    for info, array in checkpoint.tensors():
        writer.add(info, array)
    (artifact,) = writer.finish()
    return artifact.path


@pytest.fixture(scope="module")
def two_chunks(small_model, tmp_path_factory) -> Path:
    """A two-layer Llama as two packages (the checkpoint test_coreml.py uses, so the cache is shared)."""
    return build(small_model("llama", "sentencepiece", rope_theta=50000.0), tmp_path_factory.mktemp("two"), 2)


def chunk_by_chunk(path: Path, monkeypatch) -> CoreMLRunner:
    """The runner as it opens a model too large to hold: one package's weights at a time."""
    monkeypatch.setattr(coreml, "RESIDENT_WEIGHT_BYTES", 0)
    runner = CoreMLRunner(path, {})
    assert runner.chunk_by_chunk
    return runner


def window_by_window(path: Path, window: np.ndarray) -> np.ndarray:
    """Logits of one window the way a device app runs it: block after block, each through every package (on
    the runner's default engine, torch: the same arithmetic, so the same bits)."""
    manifest = json.loads((path / "manifest.json").read_text())
    programs = [MILProgram(path / entry["package"], "torch") for entry in manifest["chunks"]]
    states = [program.make_states("prefill") for program in programs]
    block = manifest["functions"]["prefill"]
    rows = []
    for start in range(0, len(window), block):
        x = np.zeros((1, block), np.int32)
        x[0, : len(window[start:start + block])] = window[start:start + block]
        for program, state, entry in zip(programs, states, manifest["chunks"], strict=True):
            first_input, position_input = entry["inputs"]
            inputs = {first_input: x, position_input: np.array([start], np.int32)}
            x = program.run("prefill", inputs, state)[entry["outputs"][0]]
        rows.append(np.asarray(x, np.float32)[0, : len(window[start:start + block])])
    return np.concatenate(rows)


def test_chunk_major_logits_are_the_window_by_window_logits(two_chunks, monkeypatch):
    windows = np.random.default_rng(0).integers(0, 1024, (3, 100))  # two blocks each, the last one padded
    expected = np.stack([window_by_window(two_chunks, window) for window in windows])
    resident = CoreMLRunner(two_chunks, {})
    assert not resident.chunk_by_chunk
    assert np.array_equal(resident.logits_many(windows), expected)
    assert np.array_equal(resident.logits(windows[1]), expected[1])
    for chunk in resident.chunks:  # what a package holds is known before it loads
        assert chunk.program.held_bytes == sum(w.nbytes for w in chunk.program._load().values())
    runner = chunk_by_chunk(two_chunks, monkeypatch)
    assert np.array_equal(runner.logits_many(windows), expected)
    assert all(chunk.program._weights is None for chunk in runner.chunks)  # released after each package
    assert set(runner.unmeasured()) == {"latency"}  # the cache check still runs, through `cached_logits`


def test_the_interpreter_is_not_timed(two_chunks):
    """Its speed is an emulator's: the latency a report gives for Core ML is Core ML's own, or none."""
    reason = CoreMLRunner(two_chunks, {}).unmeasured()["latency"]
    assert "emulates Core ML" in reason and "macOS" in reason


def test_a_gpu_holds_the_weights_that_half_its_free_memory_holds(two_chunks, monkeypatch):
    """On CUDA the budget is the GPU's (half of what is free, if more than RESIDENT_WEIGHT_BYTES), not the host's."""
    monkeypatch.setattr(coreml, "RESIDENT_WEIGHT_BYTES", 0)
    held = sum(CoreMLRunner(two_chunks, {}).chunks[i].program.held_bytes for i in range(2))
    monkeypatch.setattr(TorchEngine, "free_bytes", lambda self: 2 * held)
    assert not CoreMLRunner(two_chunks, {}).chunk_by_chunk
    monkeypatch.setattr(TorchEngine, "free_bytes", lambda self: 2 * held - 2)
    assert CoreMLRunner(two_chunks, {}).chunk_by_chunk
    assert CoreMLRunner(two_chunks, {"interpreter": "numpy"}).chunk_by_chunk  # the host's budget


def test_cached_logits_are_the_steps_through_the_cache(two_chunks, monkeypatch):
    rng = np.random.default_rng(2)
    prompt, continuation = rng.integers(0, 1024, 70), rng.integers(0, 1024, 12)
    resident = CoreMLRunner(two_chunks, {})
    stepped = np.stack([resident.start(prompt), *(resident.step(int(t)) for t in continuation)])
    assert np.array_equal(resident.cached_logits(prompt, continuation), stepped)
    assert np.array_equal(chunk_by_chunk(two_chunks, monkeypatch).cached_logits(prompt, continuation), stepped)
    # the cache check it allows in one pass: the no-cache pass over the same tokens picks the same tokens
    no_cache = resident.logits(np.concatenate([prompt, continuation]))[len(prompt) - 1:]
    assert np.array_equal(stepped.argmax(-1), no_cache.argmax(-1))


PEAK_RSS = """
import re, sys
from pathlib import Path
import numpy as np
from siliconvert.validate.runners import coreml
coreml.RESIDENT_WEIGHT_BYTES = int(sys.argv[2])
runner = coreml.CoreMLRunner(Path(sys.argv[1]), {})
np.save(sys.argv[3], runner.logits_many(np.random.default_rng(0).integers(0, 1024, (4, 128))))
peak = int(re.search(r"VmHWM:\\s*(\\d+) kB", Path("/proc/self/status").read_text())[1]) * 1024
held = [chunk.program.held_bytes for chunk in runner.chunks]
print(peak, sum(held), max(held))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc (Linux)")
def test_peak_memory_follows_one_package_not_the_model(small_model, tmp_path):
    # the checkpoint test_coreml.py's writer memory test builds (same settings: the cache is shared)
    source = small_model("llama", "sentencepiece", hidden_size=512, num_layers=6, num_heads=8, num_kv_heads=4,
                         intermediate_size=1536, train_steps=1)
    path = build(source, tmp_path, chunks=6)
    peak = {}
    for mode, budget in (("resident", 1 << 40), ("chunk_by_chunk", 0)):
        run = subprocess.run([sys.executable, "-c", PEAK_RSS, str(path), str(budget), str(tmp_path / mode)],
                             capture_output=True, text=True, check=True)
        peak[mode], held, largest = map(int, run.stdout.split()[-3:])
    print(f"peak RSS: {peak['resident'] / 2**20:.0f} MiB with every package held, "
          f"{peak['chunk_by_chunk'] / 2**20:.0f} MiB chunk by chunk; the packages hold "
          f"{held / 2**20:.0f} MiB of weights, the largest {largest / 2**20:.0f} MiB")
    assert np.array_equal(np.load(tmp_path / "resident.npy"), np.load(tmp_path / "chunk_by_chunk.npy"))
    # everything but the largest package is spared (a quarter of that as slack for allocator noise)
    assert peak["resident"] - peak["chunk_by_chunk"] > 0.75 * (held - largest), peak
