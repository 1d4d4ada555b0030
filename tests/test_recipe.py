"""The recipe loader: every problem is one line naming the key (and the line for YAML errors)."""

from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from siliconvert.errors import RecipeError
from siliconvert.recipe import load_recipe, parse_recipe

MINIMAL = {"source": "some/model", "targets": [{"format": "mlx"}]}


def test_defaults():
    recipe = parse_recipe(MINIMAL)
    target = recipe.targets[0]
    assert (target.bits, target.group_size, target.quant) == (4, 64, "4bit-g64")
    assert recipe.validate_.corpus == "builtin" and recipe.validate_.tokens == 1024
    assert recipe.validate_.gates.max_mean_kld == 0.05
    assert recipe.output_dir(Path("recipes/x.yaml")) == Path("build/x")


def test_all_formats_parse():
    recipe = parse_recipe({**MINIMAL, "targets": [
        {"format": "mlx", "bits": 8}, {"format": "gguf", "quants": ["F16", "Q4_K_M"]},
        {"format": "coreml", "precision": ["int4", "w8a8"], "chunks": 2, "compute_units": "cpu_and_ne"}]})
    assert [t.format for t in recipe.targets] == ["mlx", "gguf", "coreml"]
    assert recipe.targets[2].precisions == ["fp16", "int4", "w8a8"]


def test_a_coreml_method_names_its_compressed_artifacts():
    target = parse_recipe({**MINIMAL, "targets": [{"format": "coreml", "precision": ["int4", "pal3"],
                                                   "method": "gptq"}]}).targets[0]
    assert target.precisions == ["fp16", "int4", "pal3"]  # what each package is compressed at
    assert [target.variant(p) for p in target.precisions] == ["fp16", "int4-gptq", "pal3-gptq"]  # what it is called
    assert parse_recipe({**MINIMAL, "targets": [{"format": "coreml", "precision": "int4"}]}).targets[0].variant(
        "int4") == "int4"


@pytest.mark.parametrize(("data", "message"), [
    ({"targets": [{"format": "mlx"}]}, "missing required key 'source'"),
    ({**MINIMAL, "colour": "red"}, "unknown key 'colour'"),
    ({**MINIMAL, "targets": [{"format": "mlx", "bitz": 4}]}, "unknown key 'targets.0.bitz'"),
    ({**MINIMAL, "targets": [{"format": "onnx"}]}, "unknown format 'onnx'"),
    ({**MINIMAL, "targets": [{"format": "mlx", "bits": 7}]}, "targets.0.bits"),
    ({**MINIMAL, "targets": [{"format": "gguf", "quants": ["Q9_K"]}]}, "targets.0.quants.0"),
    ({**MINIMAL, "targets": [{"format": "mlx", "model_file": "mine.py"}]}, "targets.0.model_file"),
    ({**MINIMAL, "targets": [{"format": "mlx"}, {"format": "mlx", "model_file": "faithful"}]},
     r"targets.1 writes the MLX folder of targets.0 \(4bit-g64\)"),
    ({**MINIMAL, "targets": [{"format": "coreml", "precision": ["pal5"]}]}, "targets.0.precision"),
    ({**MINIMAL, "targets": [{"format": "coreml"}, {"format": "coreml", "precision": "int4", "context": 256}]},
     "targets.1 writes the Core ML fp16 package of targets.0: list every precision in one coreml target"),
    ({**MINIMAL, "targets": [{"format": "coreml", "method": "gptq"}]},
     "targets.0: .*method gptq rounds compressed weights: precision asks for fp16 only"),
    ({**MINIMAL, "targets": [{"format": "coreml", "precision": ["int4"], "method": "awq"}]}, "targets.0.method"),
    ({**MINIMAL, "validate": {"tokens": "many"}}, "validate.tokens"),
    ({**MINIMAL, "validate": {"gates": {"min_same_top1": 2}}}, "validate.gates.min_same_top1"),
    ({**MINIMAL, "validate": {"tokens": 64, "context": 128}}, "context must not exceed"),
    ({**MINIMAL, "targets": []}, "targets"),
    ({**MINIMAL, "name": "../../etc"}, "name"),
    ({**MINIMAL, "targets": [{"format": "gguf", "quants": ["Q8_0", "Q4_K_M", "Q8_0"]}]},
     "targets.0: quants lists Q8_0 more than once"),
    ({**MINIMAL, "targets": [{"format": "mlx", "bits": 4}, {"format": "gguf"}, {"format": "mlx", "bits": 4}]},
     "targets.2 repeats targets.0"),
    ({**MINIMAL, "targets": [{"format": "gguf", "quants": ["IQ3_XXS", "IQ4_XS", "IQ2_M"], "imatrix": False}]},
     "targets.0: imatrix: false, but IQ3_XXS, IQ2_M need an importance matrix"),
    ({**MINIMAL, "targets": [{"format": "gguf", "quants": ["auto"], "plan": {"size_mb": 1}, "imatrix": False}]},
     "imatrix: false, but auto needs an importance matrix"),
    ({**MINIMAL, "targets": [{"format": "gguf", "imatrix": True}]}, "targets.0.imatrix"),
    ({**MINIMAL, "targets": [{"format": "coreml", "precision": ["int8", "w8a8"], "compute_units": "cpu_and_gpu"}]},
     "targets.0: precision w8a8 is for the Neural Engine, which compute_units: cpu_and_gpu leaves out"),
])
def test_problems_name_the_key(data, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe(data)


@pytest.mark.parametrize(("target", "text"), [
    ({"quants": ["Q4_K_M"]}, None),  # llama.cpp makes it without one: none unless asked
    ({"quants": ["Q4_K_M", "IQ2_XXS"]}, "builtin"),  # llama.cpp refuses IQ2_XXS without one: computed
    ({"quants": ["IQ4_XS"], "imatrix": False}, None),
    ({"quants": ["IQ2_M"], "imatrix": "notes.txt"}, "notes.txt"),
    ({"quants": ["auto"], "plan": {"size_mb": 1}}, "builtin"),
])
def test_gguf_importance_matrix_text(target, text):
    [parsed] = parse_recipe({**MINIMAL, "targets": [{"format": "gguf", **target}]}).targets
    assert parsed.imatrix_text == text


def test_yaml_syntax_error_gives_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("source: x\ntargets:\n  - format: mlx\n   bits: [4\n")
    with pytest.raises(RecipeError, match=r"line \d+") as e:
        load_recipe(path)
    assert "bad.yaml" in str(e.value) and "\n" not in str(e.value)


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(RecipeError, match="cannot read"):
        load_recipe(tmp_path / "absent.yaml")
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(RecipeError, match="mapping"):
        load_recipe(path)


def test_shipped_recipes_parse():
    for path in sorted(Path(__file__).parent.parent.glob("recipes/*.yaml")):
        load_recipe(path)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=6),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                  max_size=4), max_leaves=12))
def test_any_yaml_document_loads_or_fails_with_a_recipe_error(tmp_path, document):
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(document))
    try:
        load_recipe(path)
    except RecipeError as e:
        assert "\n" not in str(e)


def test_recipe_key_validate_tokenizer() -> None:
    from siliconvert.errors import RecipeError
    from siliconvert.recipe import parse_recipe

    base = {"source": "x", "targets": [{"format": "gguf"}]}
    assert parse_recipe(base).validate_.tokenizer == "lenient"
    assert parse_recipe(base | {"validate": {"tokenizer": "strict"}}).validate_.tokenizer == "strict"
    with pytest.raises(RecipeError, match=r"validate\.tokenizer"):
        parse_recipe(base | {"validate": {"tokenizer": "exact"}})
