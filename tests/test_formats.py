"""A format is one entry (siliconvert/format.py, formats/): registering a toy format — its schema, writer, runner,
release layout and card — is all it takes for a recipe to build, validate, gate and release it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Literal

import numpy as np
import pytest

from siliconvert.artifacts import Artifact, Release, Writer
from siliconvert.checkpoint import TensorInfo
from siliconvert.format import Format, detect_artifact, entries, register, unregister
from siliconvert.recipe import GGUF_QUANTS, GGUFTarget, TargetSpec, parse_recipe
from siliconvert.validate.runners.base import Runner


class ToyTarget(TargetSpec):
    format: Literal["toy"]
    dtype: Literal["float32", "float16"] = "float32"


class ToyWriter(Writer):
    """The source's tensors in one safetensors file beside its config and tokenizer: what transformers loads."""

    def __init__(self, checkpoint, target: ToyTarget, out_dir: Path, model_name: str) -> None:
        self.checkpoint, self.target = checkpoint, target
        self.final = out_dir / f"{model_name}-toy-{target.dtype}"
        self.tensors: dict[str, np.ndarray] = {}

    def add(self, info: TensorInfo, array: np.ndarray) -> None:
        self.tensors[info.name] = array.astype(self.target.dtype)

    def finish(self) -> list[Artifact]:
        from safetensors.numpy import save_file

        work = self.final.with_name(f".{self.final.name}.partial")
        work.mkdir(parents=True)
        save_file(self.tensors, str(work / "model.safetensors"), metadata={"format": "pt"})
        (work / "config.json").write_text(json.dumps(self.checkpoint.config))
        for file in self.checkpoint.tokenizer_files():
            shutil.copy(file, work / file.name)
        (work / "toy.json").write_text(json.dumps({"dtype": self.target.dtype}))
        work.rename(self.final)
        return [Artifact("toy", self.target.dtype, self.final)]


class ToyRunner(Runner):
    """The toy folder in transformers (float32, CPU), its KV cache transformers' own."""

    runtime, device = "transformers", "CPU (toy)"

    def __init__(self, path: Path, options: dict) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.past = None

    def logits(self, tokens: np.ndarray) -> np.ndarray:
        with self.torch.inference_mode():
            return self.model(self.torch.as_tensor(tokens[None])).logits[0].numpy()

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def start(self, prompt: np.ndarray) -> np.ndarray:
        with self.torch.inference_mode():
            out = self.model(self.torch.as_tensor(prompt[None]), use_cache=True)
        self.past = out.past_key_values  # transformers' cache object
        return out.logits[0, -1].numpy()

    def step(self, token: int) -> np.ndarray:
        with self.torch.inference_mode():
            out = self.model(self.torch.tensor([[token]]), past_key_values=self.past, use_cache=True)
        self.past = out.past_key_values
        return out.logits[0, -1].numpy()

    def unmeasured(self) -> dict[str, str]:
        return {"latency": "a toy"}


class Toy(Format):
    name = "toy"
    target = ToyTarget
    runner = f"{__name__}:ToyRunner"
    library = "transformers"
    tags = ("safetensors",)
    looks_like = "a toy folder"

    def writer(self, checkpoint, target: ToyTarget, out_dir: Path, model_name: str, calibration) -> Writer:
        return ToyWriter(checkpoint, target, out_dir, model_name)

    def detect(self, path: Path) -> Artifact | None:
        marker = path / "toy.json"
        return Artifact(self.name, json.loads(marker.read_text())["dtype"], path) if marker.is_file() else None

    def release_name(self, model: str, quant: str) -> str:
        return f"{model}-toy-{quant}"

    def summary(self, release: Release) -> str:
        return f"A toy copy ({release.shipped[0]['quant']})"

    def usage(self, release: Release, folder: Path) -> list[str]:
        return ["```python", f'AutoModelForCausalLM.from_pretrained("{release.name}")', "```"]


@pytest.fixture
def toy():
    register(Toy())
    yield
    unregister("toy")


def test_a_registered_format_is_built_validated_gated_and_released(toy, demo_model: Path, tmp_path: Path) -> None:
    from siliconvert.commands.pipeline import run_recipe

    recipe = parse_recipe({"source": str(demo_model), "output": str(tmp_path / "out"),
                           "targets": [{"format": "toy"}],
                           "validate": {"tokens": 64, "context": 32, "latency": False,
                                        "gates": {"max_mean_kld": 1e-6, "min_same_top1": 0.99}}})
    outcome = run_recipe(recipe)
    (entry,) = outcome.report["artifacts"]
    assert (entry["format"], entry["quant"], entry["runtime"]) == ("toy", "float32", "transformers")
    assert entry["gates"]["passed"], entry["gates"]  # float32 copies of float32 weights: the reference's numbers
    assert entry["tokenizer_match"] and entry["kv_cache"]["consistent"]
    (release,) = outcome.releases
    assert release.name == f"{demo_model.name}-toy-float32"
    card = (release / "README.md").read_text()
    assert "A toy copy (float32)" in card and "library_name: transformers" in card and "safetensors" in card
    assert {"model.safetensors", "toy.json", "SHA256SUMS"} <= {p.name for p in release.iterdir()}
    assert detect_artifact(release).format == "toy"


def test_a_registered_format_is_a_recipe_value_and_its_keys_are_checked(toy) -> None:
    recipe = parse_recipe({"source": "x", "targets": [{"format": "toy", "dtype": "float16"}, {"format": "gguf"}]})
    assert [type(t) for t in recipe.targets] == [ToyTarget, GGUFTarget]
    from siliconvert.errors import RecipeError

    with pytest.raises(RecipeError, match=r"targets\.0\.dtype: .*'float32' or 'float16'"):
        parse_recipe({"source": "x", "targets": [{"format": "toy", "dtype": "int4"}]})
    unregister("toy")
    with pytest.raises(RecipeError, match="unknown format 'toy' \\(known: mlx, gguf, coreml\\)"):
        parse_recipe({"source": "x", "targets": [{"format": "toy"}]})


def test_the_gguf_types_a_recipe_accepts_are_the_one_list() -> None:
    from siliconvert.convert.gguf import DIRECT_TYPES
    from siliconvert.quantize.gguf import LLAMA_CPP_QUANTS

    assert set(GGUF_QUANTS) == set(LLAMA_CPP_QUANTS) | (set(DIRECT_TYPES) - {"F32"})
    for quant in GGUF_QUANTS:
        parse_recipe({"source": "x", "targets": [{"format": "gguf", "quants": [quant]}]})
    assert [fmt.name for fmt in entries()] == ["mlx", "gguf", "coreml"]


def _gguf_file(path: Path, file_type: int | None) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    if file_type is not None:
        writer.add_file_type(file_type)
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_foreign_gguf_is_named_by_its_file_type_not_its_file_name(tmp_path) -> None:
    from gguf import LlamaFileType

    named_wrong = _gguf_file(tmp_path / "model-Q4_K_M.gguf", LlamaFileType.MOSTLY_Q8_0)
    assert detect_artifact(named_wrong).quant == "Q8_0"
    assert detect_artifact(_gguf_file(tmp_path / "model.gguf", LlamaFileType.MOSTLY_Q4_K_M)).quant == "Q4_K_M"
    assert detect_artifact(_gguf_file(tmp_path / "model-q8.gguf", None)).quant == "F16"  # its matrices' type
