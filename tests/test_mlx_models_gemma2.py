"""siliconvert's gemma2.py (`model_file: faithful`): mlx-lm's gemma2 with Gemma 2's sliding window, shipped in the
folder and run by mlx_lm.load(trust_remote_code=True). On the gemma2 case of tests/families.py (a 24-token window,
96-token windows scored) it computes transformers' function, where mlx-lm's own gemma2 on the very same folder
attends over the whole window (float16, mean KLD: 7e-7 against 0.038)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import build_mlx, reference_logits_for
from families import FAMILY_CASES
from test_mlx import held_out_windows

from siliconvert.convert.mlx_arch import model_file_path
from siliconvert.errors import CheckpointError
from siliconvert.validate.metrics import compare
from siliconvert.validate.runners.mlx import MLXRunner

pytestmark = pytest.mark.slow


def mean_kld(reference: np.ndarray, logits: np.ndarray, windows: np.ndarray) -> float:
    """Mean KLD of next-token predictions over every window's positions."""
    vocab = reference.shape[-1]
    scores, _ = compare(reference[:, :-1].reshape(-1, vocab), logits[:, :-1].reshape(-1, vocab),
                        windows[:, 1:].reshape(-1))
    return scores.mean_kld


def faithful_and_mlx_lms(source: Path, out: Path, engine: str = "auto", **target) -> tuple[float, float]:
    """Mean KLD against transformers' FP32 of the `model_file: faithful` folder, and of the same folder run by
    mlx-lm's own model file (config.json's model_file and the file taken out), both by the MLX runner."""
    windows = held_out_windows(source)
    reference = reference_logits_for(source, windows)
    folder = build_mlx(source, out / "faithful", model_file="faithful", **target).path
    own = out / "mlx-lm"
    shutil.copytree(folder, own)
    config = json.loads((own / "config.json").read_text())
    (own / config.pop("model_file")).unlink()
    (own / "config.json").write_text(json.dumps(config))
    return tuple(mean_kld(reference, MLXRunner(path, {"engine": engine}).logits_many(windows), windows)
                 for path in (folder, own))


@pytest.fixture(scope="module")
def gemma2(small_model):
    tokenizer, config = FAMILY_CASES["gemma2"]
    return small_model("gemma2", tokenizer, config=config)


def test_float16_slides_the_window_mlx_lms_gemma2_leaves_out(gemma2, tmp_path):
    faithful, mlx_lms = faithful_and_mlx_lms(gemma2, tmp_path, bits=16)
    assert faithful < 0.001
    assert mlx_lms > 0.01  # measured 0.038: mlx-lm's own file, same weights and config


def test_four_bit_passes_the_mlx_limit(gemma2, tmp_path):
    faithful, mlx_lms = faithful_and_mlx_lms(gemma2, tmp_path, bits=4, group_size=64)
    assert faithful <= 0.06  # measured 0.0022 (mlx-lm's file: 0.039)
    assert faithful < mlx_lms / 5


def test_torch_stand_in_reads_the_window_from_the_model_files_arguments(gemma2, tmp_path):
    faithful, _ = faithful_and_mlx_lms(gemma2, tmp_path, engine="torch", bits=16)
    assert faithful < 0.001


def test_decoding_past_the_window_keeps_only_the_window(gemma2, tmp_path):
    """mlx-lm's cache as generation makes it (make_cache: a rotating one of 24 for the sliding layers), prefilled past
    the window, then a token at a time: the no-cache pass's distributions."""
    runner = MLXRunner(build_mlx(gemma2, tmp_path, bits=16, model_file="faithful").path, {})
    window = held_out_windows(gemma2)[0]
    whole = runner.logits(window)
    decoded = np.stack([runner.start(window[:70])] + [runner.step(int(token)) for token in window[70:95]])
    scores, _ = compare(whole[69:95], decoded, window[70:96])
    assert scores.mean_kld < 1e-4


def test_the_folder_ships_the_model_file_byte_for_byte(gemma2, tmp_path):
    from mlx_lm import load

    folder = build_mlx(gemma2, tmp_path, bits=16, model_file="faithful").path
    assert json.loads((folder / "config.json").read_text())["model_file"] == "gemma2.py"
    assert (folder / "gemma2.py").read_bytes() == model_file_path("gemma2.py").read_bytes()
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        load(str(folder))


def test_without_the_opt_in_the_refusal_names_it(gemma2, tmp_path):
    with pytest.raises(CheckpointError, match=r"trait sliding_window: .*`model_file: faithful`"):
        build_mlx(gemma2, tmp_path, bits=4)


def test_a_recipe_validates_and_releases_the_folder_like_any_artifact(gemma2, tmp_path):
    """`siliconvert recipe` with the opt-in: every check passes (the KV cache among them, decoding past the window),
    and the release folder holds the model file and a card that says how to load it and why."""
    from conftest import run_recipe

    report = run_recipe(gemma2, tmp_path, "gemma2", targets=[{"format": "mlx", "bits": 16, "model_file": "faithful"}],
                        validate={"tokens": 256, "context": 128})
    (artifact,) = report["artifacts"]
    assert artifact["gates"]["passed"] and artifact["kv_cache"]["consistent"]
    assert artifact["metrics"]["mean_kld"] < 0.001
    (release,) = (tmp_path / "out" / "release").iterdir()
    assert (release / "gemma2.py").read_bytes() == model_file_path("gemma2.py").read_bytes()
    assert "trust_remote_code=True" in (release / "README.md").read_text()
