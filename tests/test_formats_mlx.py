"""The MLX format entry's check of a folder's tensor shapes against its config.json, as mlx_lm.load would meet
them: a quantized weight's input width read with its module's own group size, and LFM2's tensor names checked."""

from pathlib import Path

import pytest

from siliconvert.errors import ArtifactError
from siliconvert.formats.mlx import _check_shape

K_PROJ = "model.layers.0.self_attn.k_proj"


def test_a_weight_under_its_own_group_size_fits_the_hidden_size(tmp_path: Path) -> None:
    """A plan's 2-bit g32 k_proj in a g64 folder: 4 scales a row are 128 inputs at g32 (256 read at g64)."""
    quantization = {"group_size": 64, "bits": 4, K_PROJ: {"group_size": 32, "bits": 2, "mode": "affine"}}
    shapes = {f"{K_PROJ}.scales": ([64, 4], tmp_path)}
    _check_shape(f"{K_PROJ}.weight", [64, 8], tmp_path, shapes, {"hidden_size": 128, "quantization": quantization})
    del quantization[K_PROJ]
    with pytest.raises(ArtifactError, match=r"does not fit config\.json's hidden_size 128"):
        _check_shape(f"{K_PROJ}.weight", [64, 8], tmp_path, shapes, {"hidden_size": 128, "quantization": quantization})


@pytest.mark.parametrize(("name", "shape"), [("model.layers.0.conv.in_proj.weight", [384, 127]),
                                             ("model.layers.0.conv.out_proj.weight", [127, 128]),
                                             ("model.embedding_norm.weight", [127])])
def test_lfm2_tensors_that_do_not_fit_the_hidden_size_are_named(name: str, shape: list[int], tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match=f"tensor '{name}' has shape"):
        _check_shape(name, shape, tmp_path, {}, {"hidden_size": 128})


def test_a_folder_with_its_own_model_file_says_loading_needs_trust_remote_code(tmp_path: Path) -> None:
    """The card's "How to run" for a `model_file: faithful` folder: why the folder has its own file, and the flag."""
    import json

    from siliconvert.artifacts import Artifact, Release
    from siliconvert.formats.mlx import MLX

    release = Release("m-4bit", "m", "mlx", [], [], None)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma2"}))
    assert "trust" not in "\n".join(MLX().usage(release, tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma2", "model_file": "gemma2.py"}))
    text = "\n".join(MLX().usage(release, tmp_path))
    assert 'load("path/to/m-4bit", trust_remote_code=True)' in text
    assert "mlx_lm.generate --model path/to/m-4bit --trust-remote-code" in text
    assert "mlx-lm's `gemma2` computes another function for this model (it has no sliding window" in text
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ArtifactError, match=r"names the model file 'gemma2\.py', which is missing"):
        MLX().check(Artifact("mlx", "4bit-g64", tmp_path))


def test_a_float_mode_and_gptq_are_named_in_the_card_and_a_mode_folder_is_detected(tmp_path: Path) -> None:
    import json

    from siliconvert.artifacts import Release
    from siliconvert.format import entry as format_entry

    entry = format_entry("mlx")

    def summary(quant: str) -> str:
        shipped = {"format": "mlx", "quant": quant, "plan": None, "float_type": {"dtype": "float16"}}
        return entry.summary(Release(f"demo-{quant}", "demo", "mlx", [shipped], [], None))

    assert summary("nvfp4") == "MLX nvfp4 weights (4-bit floats, an 8-bit scale per 16, float16 elsewhere)"
    assert summary("4bit-g64-gptq") == ("MLX 4-bit weights (group size 64, rounded by GPTQ against calibration "
                                        "inputs, float16 elsewhere)")
    assert entry.release_name("demo", "4bit-g64-gptq") == "demo-4bit-gptq"
    assert summary("4bit-g64-clip") == ("MLX 4-bit weights (group size 64, each group's range clipped against "
                                        "calibration inputs, float16 elsewhere)")
    (tmp_path / "config.json").write_text(json.dumps({"quantization": {"group_size": 32, "bits": 8,
                                                                       "mode": "mxfp8"}}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.MonkeyPatch.context() as patched:
        patched.setattr("siliconvert.formats.mlx._safetensors_format", lambda path: "mlx")
        assert entry.detect(tmp_path).quant == "mxfp8"
