"""Real weights: SmolLM2-135M-Instruct, rebuilt from the GGUF a registry package ships (siliconvert/realweights.py).

Here a GGUF recipe runs on it through the CLI, and llama.cpp's own quantizer's Q8_0 of it is validated: the real
model's gates, its byte-level tokenizer and its KV cache, judged as a release would judge them. The full recipe
with all three formats (the table of issue #24) is `make bench-real`: it takes about 7 minutes on 2 cores, most of
it the Core ML package in the MIL interpreter, too long for `make test`.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import SILICONVERT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def smollm2() -> Path:
    from siliconvert.realweights import real_checkpoint

    return real_checkpoint()


def run(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([SILICONVERT, *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "SILICONVERT_QUIET": "1"})


def test_the_rebuilt_checkpoint_is_the_real_model(smollm2):
    config = json.loads((smollm2 / "config.json").read_text())
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"], config["vocab_size"],
            config["tie_word_embeddings"], config["dtype"]) == ("llama", 30, 576, 49152, True, "bfloat16")
    assert "<|im_start|>" in (smollm2 / "chat_template.jinja").read_text()
    assert not list(smollm2.glob("*.gguf"))  # a Hugging Face checkpoint, not the package's file


def test_gguf_of_real_weights_passes_its_gates_and_llama_cpps_own_q8_0_its_cache_check(smollm2, tmp_path):
    """A recipe's F16 and Q8_0 under the default gates, then llama.cpp's own quantizer (llama_model_quantize) on
    that F16, validated as a foreign GGUF. Every one decodes through llama.cpp's KV cache as well as without it:
    the check that stopped this release (Q8_0) when it judged llama.cpp's one-token kernels instead of its cache."""
    from siliconvert.quantize.gguf import quantize

    recipe = {"name": "smollm2", "source": str(smollm2), "output": str(tmp_path / "out"),
              "targets": [{"format": "gguf", "quants": ["F16", "Q8_0"]}],
              "validate": {"tokens": 512, "context": 256, "latency": False}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    result = run("recipe", tmp_path / "recipe.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    for artifact in report["artifacts"]:
        assert artifact["gates"]["passed"] and artifact["tokenizer_match"], artifact["quant"]
        kv = artifact["kv_cache"]
        assert kv["consistent"] is True and kv["excess_kld"] <= kv["limit_kld"], artifact["quant"]
    ours = next(a for a in report["artifacts"] if a["quant"] == "Q8_0")
    assert ours["metrics"]["mean_kld"] < 0.01  # measured 0.0043 on 1020 positions

    (f16,) = (tmp_path / "out" / "artifacts").glob("*F16.gguf")
    q8 = quantize(f16, tmp_path / "llama-cpp-Q8_0.gguf", "Q8_0")
    result = run("validate", q8, "--source", smollm2, "--tokens", 256, "--no-latency",
                 "--output", tmp_path / "validate")
    assert result.returncode == 0, result.stdout + result.stderr
    (theirs,) = json.loads((tmp_path / "validate" / "report.json").read_text())["artifacts"]
    assert theirs["quant"] == "Q8_0" and theirs["kv_cache"]["consistent"] is True
