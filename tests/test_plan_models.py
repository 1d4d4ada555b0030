"""Planned artifacts of the demo model: they open unchanged in llama.cpp and mlx_lm.load, hold the plan's types,
keep to a size goal, and the sensitivity estimate follows measured KLD."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest

from siliconvert.checkpoint import Checkpoint
from siliconvert.convert.gguf import GGUFWriter
from siliconvert.convert.mlx import MLXWriter
from siliconvert.quantize.sensitivity import KLD_PER_ERROR, error_of, gguf_kinds, mlx_kinds
from siliconvert.recipe import GGUFTarget, MLXTarget
from siliconvert.textdata import heldout_text
from siliconvert.validate.metrics import compare
from siliconvert.validate.runners.gguf import LlamaCppRunner

pytestmark = pytest.mark.slow

WINDOWS, LENGTH = 2, 128


def write(writer):
    for info, array in writer.checkpoint.tensors():
        writer.add(info, array)
    return writer.finish()


@pytest.fixture(scope="module")
def demo(demo_model):
    return Checkpoint.open(demo_model)


@pytest.fixture(scope="module")
def windows(demo_model):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(demo_model).encode(heldout_text(), add_special_tokens=False)
    return np.array([ids[i * LENGTH:(i + 1) * LENGTH] for i in range(WINDOWS)])


@pytest.fixture(scope="module")
def reference(demo_model, windows):
    from conftest import reference_logits_for

    return reference_logits_for(demo_model, windows)


def mean_kld(reference, logits, windows) -> float:
    vocab = reference.shape[-1]
    return compare(reference[:, :-1].reshape(-1, vocab), logits[:, :-1].reshape(-1, vocab),
                   windows[:, 1:].reshape(-1))[0].mean_kld


def gguf_logits(path, windows):
    runner = LlamaCppRunner(path, {})  # llama.cpp's own loader: the file opens unchanged or this fails
    try:
        # llama.cpp's one notice for any model with sliding-window layers: it keeps their whole cache
        notice = "llama_kv_cache_iswa: using full-size SWA cache"
        assert [warning for warning in runner.warnings if not warning.startswith(notice)] == [], path.name
        return np.stack([runner.logits(window) for window in windows])
    finally:
        runner.close()


def mlx_logits(path, windows):
    """mlx-lm's model on the folder, as the pipeline scores MLX on mlx's CPU: its quantized layers dequantized by
    mlx in the folder's float type (validate/runners/mlx.py: mlx's CPU quantized kernels are slow, above all in
    float16, and sum in the activations' type where Metal's sum in float32)."""
    from siliconvert.validate.runners.mlx import MLXRunner

    runner = MLXRunner(path, {"engine": "mlx-dequantized"})
    return np.stack([runner.logits(window) for window in windows])


@pytest.fixture(scope="module")
def gguf_build(demo, tmp_path_factory):
    """Q3_K_M, Q4_K_M, Q6_K with the builtin importance matrix, and a plan at Q4_K_M's size; the plan's costs."""
    out = tmp_path_factory.mktemp("gguf")
    fixed = write(GGUFWriter(demo, GGUFTarget(format="gguf", quants=["Q3_K_M", "Q4_K_M", "Q6_K"], imatrix="builtin"),
                             out, "demo"))
    size_mb = fixed[1].path.stat().st_size / 1e6
    writer = GGUFWriter(demo, GGUFTarget(format="gguf", quants=["auto"], plan={"size_mb": size_mb}), out, "demo")
    (planned,) = write(writer)
    return fixed, planned, writer.costs


@pytest.fixture(scope="module")
def mlx_build(demo, tmp_path_factory):
    """MLX 3, 4 and 6 bits at group 64, and a plan at 4 bits' size; the plan's costs."""
    out = tmp_path_factory.mktemp("mlx")
    fixed = [write(MLXWriter(demo, MLXTarget(format="mlx", bits=bits), out, "demo"))[0] for bits in (3, 4, 6)]
    size_mb = sum(f.stat().st_size for f in fixed[1].path.iterdir()) / 1e6
    writer = MLXWriter(demo, MLXTarget(format="mlx", bits="auto", plan={"size_mb": size_mb}), out, "demo")
    (planned,) = write(writer)
    return fixed, planned, writer.costs, size_mb


def test_planned_gguf_opens_in_llama_cpp_with_the_plans_types(gguf_build, windows, reference):
    fixed, planned, _ = gguf_build
    kinds = gguf_kinds(planned.path)
    assert {name: kinds[name] for name in planned.plan["tensors"]} == planned.plan["tensors"]
    assert len(set(planned.plan["tensors"].values())) > 1  # a mix, not one type
    assert planned.path.stat().st_size <= fixed[1].path.stat().st_size
    reader = gguf.GGUFReader(planned.path)
    assert reader.fields["general.file_type"].parts[-1][0] in {int(t) for t in gguf.LlamaFileType}
    ours = mean_kld(reference, gguf_logits(planned.path, windows), windows)
    assert ours < mean_kld(reference, gguf_logits(fixed[1].path, windows), windows)  # better at Q4_K_M's size


def test_planned_mlx_opens_in_mlx_lm_with_per_module_widths(mlx_build, windows, reference):
    fixed, planned, _, size_mb = mlx_build
    config = json.loads((planned.path / "config.json").read_text())
    widths = {(entry["bits"], entry["group_size"]) for key, entry in config["quantization"].items()
              if isinstance(entry, dict)}
    assert len(widths) > 1
    assert sum(f.stat().st_size for f in planned.path.iterdir()) <= size_mb * 1e6
    assert mlx_kinds(planned.path) == planned.plan["tensors"]
    # the demo source is bfloat16 and its stream fits float16: the plan stores and computes in float16
    assert planned.plan["float_type"] == "float16" and "peaks at" in planned.plan["float_type_reason"]
    ours = mean_kld(reference, mlx_logits(planned.path, windows), windows)
    assert ours < mean_kld(reference, mlx_logits(fixed[1].path, windows), windows)  # better at 4-bit's size


def test_the_estimate_follows_measured_kld(gguf_build, mlx_build, windows, reference):
    """The predicted mean KLD of the fixed recipes, from their types and the measured costs, ranks them as their
    measured KLD does, and for llama.cpp's lies within a factor of 3 of it. MLX's fixed recipes compute in the
    source's bfloat16, a floor the estimate leaves out (about 0.002 here): for MLX only the order is held."""
    gguf_fixed, _, gguf_costs = gguf_build
    mlx_fixed, _, mlx_costs, _ = mlx_build
    predicted = [KLD_PER_ERROR * error_of(gguf_costs, gguf_kinds(a.path)) for a in gguf_fixed]
    measured = [mean_kld(reference, gguf_logits(a.path, windows), windows) for a in gguf_fixed]
    assert np.argsort(predicted).tolist() == np.argsort(measured).tolist()
    ratios = np.array(measured) / np.array(predicted)
    assert np.all((ratios > 1 / 3) & (ratios < 3)), ratios
    predicted = [KLD_PER_ERROR * error_of(mlx_costs, mlx_kinds(a.path)) for a in mlx_fixed]
    measured = [mean_kld(reference, mlx_logits(a.path, windows), windows) for a in mlx_fixed]
    assert np.argsort(predicted).tolist() == np.argsort(measured).tolist()
