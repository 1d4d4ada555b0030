"""GGUF of a hybrid model: LFM2 (gated short convolutions around an attention layer) in llama.cpp's lfm2 layout.

The file says which layers are recurrent as llama.cpp reads it (a per-layer head_count_kv of 0), the quantized files
are llama_model_quantize's bytes, a recipe passes every gate, and the state check judges llama.cpp's recurrent
state: decoding through a conv state that does not advance, or advances one step late, fails it.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest
import yaml
from conftest import SILICONVERT, reference_logits_for
from families import FAMILY_CASES
from safetensors.torch import load_file
from test_gguf import assert_same_model, convert, fields, hf_ids, whole_file_quantization

from siliconvert.demo import small_checkpoint
from siliconvert.textdata import heldout_text
from siliconvert.validate.runners.gguf import LlamaCppRunner
from siliconvert.validate.score import cached_window_logits, kv_cache_check

pytestmark = pytest.mark.slow

# llama.h: LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY, a sequence's recurrent state alone (the KV cache left out)
PARTIAL_ONLY = 1
# Where a saved sequence state holds its recurrent cell's position: after the magic, the seq id and the cell count
# (llama_context::state_seq_get_data, llama_memory_recurrent::state_write_meta)
STATE_POS_OFFSET = 12


@pytest.fixture(scope="module")
def lfm2() -> Path:
    tokenizer, config = FAMILY_CASES["lfm2"]
    return small_checkpoint(None, "lfm2", tokenizer, config=config)


def test_lfm2_keys_and_tensors_are_llama_cpps(lfm2: Path, tmp_path: Path) -> None:
    """The mixer pattern as llama.cpp's lfm2 reads it (head_count_kv 0 on conv layers), shortconv.l_cache, the
    final norm as token_embd_norm, the tied head left to token_embd, the conv kernel as [channels, kernel] in F32."""
    [artifact] = convert(lfm2, tmp_path, ["F16"])
    meta = fields(artifact.path)
    assert meta["general.architecture"] == "lfm2"
    assert meta["lfm2.attention.head_count_kv"] == [0, 2, 0, 0]
    assert meta["lfm2.shortconv.l_cache"] == 3 and meta["lfm2.feed_forward_length"] == 288
    tensors = {t.name: t for t in gguf.GGUFReader(artifact.path).tensors}
    assert "token_embd_norm.weight" in tensors and "output.weight" not in tensors
    assert "blk.1.shortconv.in_proj.weight" not in tensors and "blk.0.attn_q.weight" not in tensors
    kernel = tensors["blk.0.shortconv.conv.weight"]
    assert kernel.tensor_type == gguf.GGMLQuantizationType.F32
    source = load_file(str(lfm2 / "model.safetensors"))["model.layers.0.conv.conv.weight"]  # [128, 1, 3]
    np.testing.assert_array_equal(np.asarray(kernel.data), source[:, 0, :].float().numpy())


def test_streamed_quants_are_llama_quantizes_bytes(lfm2: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """in_proj and out_proj are planned like any linear, the conv kernels and norms kept F32, MLP rows of 288 (no
    multiple of 256) take llama.cpp's fallbacks: what llama_model_quantize makes of the F16 file, byte for byte."""
    quants = ["Q4_K_M", "Q2_K"]
    streamed = {a.quant: a.path for a in convert(lfm2, tmp_path / "streamed", quants)}
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(streamed["Q4_K_M"]).tensors}
    assert types["blk.0.shortconv.conv.weight"] == types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert types["blk.0.shortconv.in_proj.weight"] not in (gguf.GGMLQuantizationType.F32,
                                                             gguf.GGMLQuantizationType.F16)
    whole_file_quantization(monkeypatch)
    whole = {a.quant: a.path for a in convert(lfm2, tmp_path / "whole", quants)}
    for quant in quants:
        assert_same_model(streamed[quant], whole[quant])


@pytest.fixture(scope="module")
def recipe_run(lfm2: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("lfm2-recipe")
    recipe = {"name": "lfm2", "source": str(lfm2), "output": str(out / "out"),
              "targets": [{"format": "gguf", "quants": ["F16", "Q4_K_M"]}],
              "validate": {"tokens": 512, "context": 128, "latency": False}}
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    result = subprocess.run([SILICONVERT, "recipe", str(out / "recipe.yaml")], capture_output=True, text=True,
                            env={**os.environ, "SILICONVERT_QUIET": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads((out / "out" / "report.json").read_text())


def test_a_recipe_on_lfm2_passes_every_gate(recipe_run: dict) -> None:
    """F16 + Q4_K_M of a hybrid in one recipe: llama.cpp computes transformers' function (F16 mean KLD < 0.001,
    measured 2e-8), decodes through its KV cache and conv states as well as without them, tokenizes as the source
    (the NFC known rule aside)."""
    artifacts = {a["quant"]: a for a in recipe_run["artifacts"]}
    assert sorted(artifacts) == ["F16", "Q4_K_M"]
    assert artifacts["F16"]["metrics"]["mean_kld"] < 0.001
    for quant, artifact in artifacts.items():
        assert artifact["gates"]["passed"], quant
        assert artifact["kv_cache"]["consistent"] is True, (quant, artifact["kv_cache"])
        assert not artifact["tokenizer"]["differences"], (quant, artifact["tokenizer"])


class BrokenConvState(LlamaCppRunner):
    """llama.cpp with its recurrent state broken as a runtime's could be, its KV cache untouched: "frozen" decodes
    every token from the conv state the prompt left (never advanced), "stale" from the state one step late.

    The conv layers' state is read and written alone (LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY); a restored state keeps
    the position it was saved at, which llama.cpp would refuse as a gap in the sequence, so the saved copy is given
    the position the sequence has reached."""

    def __init__(self, path: Path, options: dict, fault: str) -> None:
        super().__init__(path, options)
        self.fault = fault
        self._kept: ctypes.Array | None = None

    def start(self, prompt: np.ndarray) -> np.ndarray:
        logits = super().start(prompt)
        self._kept = self._conv_state()
        return logits

    def step(self, token: int) -> np.ndarray:
        if self.fault == "stale":
            current = self._conv_state()
            self._restore(self._kept)
            self._kept = current
        elif self.fault == "frozen":
            self._restore(self._kept)
        return super().step(token)

    def _conv_state(self) -> ctypes.Array:
        size = self.api.llama_state_seq_get_size_ext(self.ctx, 0, PARTIAL_ONLY)
        state = (ctypes.c_uint8 * size)()
        assert self.api.llama_state_seq_get_data_ext(self.ctx, state, size, 0, PARTIAL_ONLY) == size
        return state

    def _restore(self, state: ctypes.Array) -> None:
        np.frombuffer(state, dtype=np.int32, count=1, offset=STATE_POS_OFFSET)[0] = self._pos - 1
        assert self.api.llama_state_seq_set_data_ext(self.ctx, state, len(state), 0, PARTIAL_ONLY) == len(state)


@pytest.mark.parametrize("fault", ["none", "frozen", "stale"])
def test_the_state_check_fails_a_conv_state_that_does_not_advance(lfm2: Path, recipe_run: dict, fault: str) -> None:
    """The KV-cache check is a state check: on llama.cpp's own recurrent state it passes; with the conv layers'
    state not advanced, or one step stale (the attention layers' KV cache intact), it fails. Measured on this
    model's F16: frozen 48 ×, stale 74 × the limit."""
    [f16] = [a["path"] for a in recipe_run["artifacts"] if a["quant"] == "F16"]
    window = np.array(hf_ids(lfm2, heldout_text()[:5000])[:128])
    reference = reference_logits_for(lfm2, window[None])[0]
    runner = BrokenConvState(Path(f16), {"context": len(window)}, fault)
    try:
        no_cache = runner.logits(window)
        cached, prompt = cached_window_logits(runner, window)
    finally:
        runner.close()
    check = kv_cache_check(cached, prompt, no_cache, reference, window[1:])
    if fault == "none":
        assert check["consistent"] is True and check["excess_kld"] < check["limit_kld"] / 4, check
    else:
        assert check["consistent"] is False and check["excess_kld"] > 10 * check["limit_kld"], check
