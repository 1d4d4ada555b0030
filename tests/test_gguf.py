"""GGUF: llama.cpp opens the files unchanged and computes the source's function, token for token.

Two small trained checkpoints, one per tokenizer kind: Llama + SentencePiece (q/k rows permuted for
llama.cpp's rope) and Qwen2 + byte-level BPE (q/k/v biases, tied head, NEOX rope, no permutation).
Hidden size 256 so that K-quants are real K-quants (llama.cpp falls back to legacy types for rows
shorter than 256), and trained long enough that attention matters: `test_kld_has_teeth` shows a wrong
rope layout fails the F16 threshold.
"""

from __future__ import annotations

import dataclasses
import json
import unicodedata
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import siliconvert.convert.gguf as convert_gguf
import siliconvert.convert.gguf_arch as gguf_arch
from siliconvert.calibration import Calibrations, calibration_text
from siliconvert.checkpoint import Checkpoint
from siliconvert.convert.gguf import GGUFWriter
from siliconvert.convert.gguf_arch import rope_pairs_split
from siliconvert.demo import small_checkpoint
from siliconvert.errors import ArtifactError
from siliconvert.quantize.gguf import LLAMA_CPP_QUANTS, quantize
from siliconvert.recipe import GGUF_QUANTS_NEEDING_IMATRIX, GGUFTarget
from siliconvert.textdata import heldout_text
from siliconvert.validate.metrics import compare
from siliconvert.validate.runners.gguf import LlamaCppRunner

pytestmark = pytest.mark.slow

TINY = {"vocab_size": 512, "hidden_size": 256, "intermediate_size": 512, "num_layers": 2, "num_heads": 4,
        "num_kv_heads": 2, "rope_theta": 25000.0, "train_steps": 60}  # θ unlike any default: a lost θ shows
CASES = {"llama-sentencepiece": ("llama", "sentencepiece", {}),
         "qwen2-bpe": ("qwen2", "bpe", {"tie_word_embeddings": True})}
QUANTS = ["F16", "Q8_0", "Q4_K_M"]
THRESHOLDS = {"F16": 0.01, "Q8_0": 0.01, "Q4_K_M": 0.08}  # mean KLD to the float32 reference
WINDOW, WINDOWS = 128, 4
SAMPLES = ["Hello world", " leading space", "  two leading spaces", "\tTab", "def f(x):\n    return x ** 2\n",
           "line one\nline two\n\n\nafter blank lines\r\nwindows",
           "naïve café — “quoted” ß Ωμέγα Привет 中文 こんにちは",
           "emoji 🙂👍🏽 🚀🦙 😶‍🌫️", "3.14159 + 2e10 == 0x1F 1,000,000 12345678", "tabs\tand  double  spaces  ",
           "I've we'll THEY'RE", "", " ", "\n"]


@pytest.fixture(scope="session", params=list(CASES))
def case(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="session")
def source(case: str) -> Path:
    family, tokenizer, extra = CASES[case]
    return small_checkpoint(None, family, tokenizer, **TINY, **extra)


@pytest.fixture(scope="session")
def artifacts(source: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {a.quant: a.path for a in convert(source, tmp_path_factory.mktemp("gguf"), QUANTS)}


@pytest.fixture(scope="session")
def reference(source: Path) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Held-out windows, their next tokens, and transformers' float32 logits on them."""
    ids = np.array(hf_ids(source, heldout_text()[:40_000]))
    windows = [ids[i * WINDOW:(i + 1) * WINDOW] for i in range(WINDOWS)]
    targets = np.concatenate([ids[i * WINDOW + 1:(i + 1) * WINDOW + 1] for i in range(WINDOWS)])
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    with torch.inference_mode():
        logits = np.concatenate([model(torch.as_tensor(w[None])).logits[0].numpy() for w in windows])
    return windows, targets, logits


def convert(source: Path, out_dir: Path, quants: list[str], **target: object):
    checkpoint = Checkpoint.open(source)
    writer = GGUFWriter(checkpoint, GGUFTarget(format="gguf", quants=quants, **target), out_dir, "model")
    for info, array in checkpoint.tensors():
        writer.add(info, array)
    return writer.finish()


def hf_ids(source: Path, text: str) -> list[int]:
    return AutoTokenizer.from_pretrained(source)(text, add_special_tokens=False)["input_ids"]


def scores(path: Path, reference):
    windows, targets, ref_logits = reference
    runner = LlamaCppRunner(path, {})
    try:
        return compare(ref_logits, np.concatenate([runner.logits(w) for w in windows]), targets)[0]
    finally:
        runner.close()


def fields(path: Path) -> dict[str, object]:
    return {name: field.contents() for name, field in gguf.GGUFReader(path).fields.items()}


# ---- metadata and vocabulary ---------------------------------------------------------------------


def test_metadata_comes_from_the_spec(source: Path, artifacts: dict[str, Path]) -> None:
    spec = Checkpoint.open(source).spec
    meta = fields(artifacts["F16"])
    arch = meta["general.architecture"]
    assert arch == {"llama": "llama", "qwen2": "qwen2"}[spec.family]
    expected = {"context_length": spec.max_position_embeddings, "embedding_length": spec.hidden_size,
                "feed_forward_length": spec.intermediate_size, "block_count": spec.num_layers,
                "attention.head_count": spec.num_heads, "attention.head_count_kv": spec.num_kv_heads,
                "rope.dimension_count": spec.head_dim, "vocab_size": spec.vocab_size}
    assert {key: meta[f"{arch}.{key}"] for key in expected} == expected
    assert meta[f"{arch}.rope.freq_base"] == pytest.approx(25000.0)
    assert meta[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(spec.rms_norm_eps)
    assert meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    names = {t.name for t in gguf.GGUFReader(artifacts["F16"]).tensors}
    assert ("output.weight" in names) is not spec.tie_word_embeddings  # a tied head is llama.cpp's token_embd
    assert ("blk.0.attn_q.bias" in names) is spec.qkv_bias


def test_vocabulary_matches_the_tokenizer(case: str, source: Path, artifacts: dict[str, Path]) -> None:
    meta = fields(artifacts["F16"])
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokens = meta["tokenizer.ggml.tokens"]
    assert tokens == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    types = meta["tokenizer.ggml.token_type"]
    for token_id in tokenizer.all_special_ids:
        assert types[token_id] in (gguf.TokenType.CONTROL, gguf.TokenType.UNKNOWN)
    with_specials = tokenizer("a")["input_ids"]
    assert meta["tokenizer.ggml.add_bos_token"] is (with_specials[0] == tokenizer.bos_token_id)
    assert meta["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    if case == "qwen2-bpe":
        assert meta["tokenizer.ggml.model"] == "gpt2"
        assert meta["tokenizer.ggml.pre"] == "qwen2"
        merges = json.loads((source / "tokenizer.json").read_text())["model"]["merges"]
        assert meta["tokenizer.ggml.merges"] == [" ".join(m) for m in merges]
    else:
        assert meta["tokenizer.ggml.model"] == "llama"
        assert meta["tokenizer.ggml.add_space_prefix"] is True
        assert meta["tokenizer.ggml.bos_token_id"] == tokenizer.bos_token_id


# ---- tensors -------------------------------------------------------------------------------------


@pytest.mark.parametrize("quant", ["F16", "Q8_0"])
def test_every_tensor_round_trips(source: Path, artifacts: dict[str, Path], quant: str) -> None:
    """Read back with gguf-py, undo llama.cpp's q/k row order, compare with the source tensor by tensor."""
    checkpoint = Checkpoint.open(source)
    spec = checkpoint.spec
    arch = gguf_arch.LAYOUTS[spec.family].arch
    name_map = gguf.get_tensor_name_map(arch, spec.num_layers)  # gguf-py's own HF → GGUF table
    stored = {t.name: t for t in gguf.GGUFReader(artifacts[quant]).tensors}
    seen = set()
    for info, array in checkpoint.tensors():  # a tied checkpoint streams no head (llama.cpp's is token_embd)
        gguf_name = name_map.get_name(info.name, try_suffixes=(".weight", ".bias"))
        tensor = stored[gguf_name]
        seen.add(gguf_name)
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(array.shape)
        if gguf_arch.LAYOUTS[spec.family].permute_qk and ".attn_q." in gguf_name:
            values = rope_pairs_split(values, spec.num_heads)
        if gguf_arch.LAYOUTS[spec.family].permute_qk and ".attn_k." in gguf_name:
            values = rope_pairs_split(values, spec.num_kv_heads)
        if array.ndim == 1:
            assert tensor.tensor_type == gguf.GGMLQuantizationType.F32
            np.testing.assert_array_equal(values, array)
        elif quant == "F16":  # bfloat16 values are exact in float16 within its range
            np.testing.assert_array_equal(values, array.astype(np.float16).astype(np.float32))
        else:  # Q8_0: within ~half a step of each block's scale (plus the scale's own float16 rounding)
            step = np.abs(array).reshape(-1, 32).max(axis=1, keepdims=True) / 127
            assert (np.abs(values - array).reshape(-1, 32) <= 0.6 * step + 1e-8).all(), gguf_name
    assert seen == set(stored)  # nothing extra in the file


def test_direct_q8_0_is_llama_cpps_q8_0(source: Path, artifacts: dict[str, Path], tmp_path: Path) -> None:
    """gguf-py's Q8_0 written in the stream is byte for byte what llama.cpp makes from a lossless BF16 file."""
    [bf16] = convert(source, tmp_path, ["BF16"])
    theirs = quantize(bf16.path, tmp_path / "llama-cpp-Q8_0.gguf", "Q8_0")
    ours = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(artifacts["Q8_0"]).tensors}
    for tensor in gguf.GGUFReader(theirs).tensors:
        np.testing.assert_array_equal(ours[tensor.name], np.asarray(tensor.data), err_msg=tensor.name)


def test_writes_are_byte_identical(source: Path, artifacts: dict[str, Path], tmp_path: Path) -> None:
    again = {a.quant: a.path for a in convert(source, tmp_path, QUANTS)}
    for quant in QUANTS:
        assert again[quant].read_bytes() == artifacts[quant].read_bytes(), quant
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"model-{q}.gguf" for q in sorted(QUANTS)]  # no leftovers


# ---- llama.cpp runs it ---------------------------------------------------------------------------


@pytest.mark.parametrize("quant", QUANTS)
def test_llama_cpp_computes_the_source_function(artifacts: dict[str, Path], reference, quant: str) -> None:
    result = scores(artifacts[quant], reference)
    assert result.mean_kld < THRESHOLDS[quant]
    if quant == "F16":
        assert result.same_top1 > 0.98


def test_kld_has_teeth(case: str, source: Path, reference, tmp_path: Path, monkeypatch) -> None:
    """The other rope layout (permuting Qwen2, not permuting Llama) must fail the F16 threshold."""
    family = CASES[case][0]
    layout = gguf_arch.LAYOUTS[family]
    monkeypatch.setitem(gguf_arch.LAYOUTS, family, dataclasses.replace(layout, permute_qk=not layout.permute_qk))
    [wrong] = convert(source, tmp_path, ["F16"])
    assert scores(wrong.path, reference).mean_kld > THRESHOLDS["F16"]


def test_llama_cpp_loads_without_warnings(artifacts: dict[str, Path]) -> None:
    for path in artifacts.values():
        runner = LlamaCppRunner(path, {})
        runner.close()
        assert runner.warnings == [], path.name


def test_a_failed_decode_says_why_and_keeps_stderr_quiet(artifacts: dict[str, Path], capfd) -> None:
    """llama.cpp logs as it decodes (on CUDA at every step); its words go into the error, not onto stderr."""
    runner = LlamaCppRunner(artifacts["F16"], {})
    capfd.readouterr()
    try:
        with pytest.raises(ArtifactError, match=r"llama_decode failed with status -?\d+: .*invalid token"):
            runner.logits(np.array([runner.n_vocab + 7]))
    finally:
        runner.close()
    assert capfd.readouterr().err == ""


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads Linux's list of mapped files")
def test_llama_cpp_reads_the_file_in_on_cpu(artifacts: dict[str, Path]) -> None:
    """Mapped, the file's pages would stay resident beside the CPU repack's copy of the weights."""
    runner = LlamaCppRunner(artifacts["Q4_K_M"], {})
    mapped = Path("/proc/self/maps").read_text()
    runner.close()
    assert runner.device.startswith("CPU") and str(artifacts["Q4_K_M"]) not in mapped


def test_kv_cache_follows_the_full_window(artifacts: dict[str, Path], reference) -> None:
    windows, _, _ = reference
    runner = LlamaCppRunner(artifacts["F16"], {})
    prompt = windows[0][:32]
    full = runner.logits(np.array([*prompt, *runner.greedy(prompt, 8)[:-1]]))
    np.testing.assert_allclose(runner.start(prompt), full[31], atol=1e-3)
    np.testing.assert_allclose(runner.step(int(np.argmax(full[31]))), full[32], atol=1e-3)
    runner.close()


@pytest.fixture(scope="module")
def demo_q4_k_m(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    [artifact] = convert(demo_model, tmp_path_factory.mktemp("demo-gguf"), ["Q4_K_M"])
    return artifact.path


def test_kv_cache_check_tells_llama_cpp_noise_from_a_broken_cache(demo_model: Path, demo_q4_k_m: Path) -> None:
    """On the trained demo model, llama.cpp's own cache passes with room to spare, and the same runner made to
    drop its cache, return stale logits or store a token twice fails, each by a clear margin."""
    from conftest import reference_logits_for
    from test_score import FaultyCache

    from siliconvert.artifacts import Artifact
    from siliconvert.corpus import source_tokenizer, token_windows
    from siliconvert.validate.score import RunOutput, cached_window_logits, score
    from siliconvert.validate.tokenizer import tokenizer_probes

    tokenizer = source_tokenizer(demo_model)
    windows = token_windows(tokenizer, "builtin", 512, 256)
    reference = reference_logits_for(demo_model, windows.tokens)
    artifact = Artifact("gguf", "Q4_K_M", demo_q4_k_m)
    runner = LlamaCppRunner(demo_q4_k_m, {})
    logits = runner.logits_many(windows.tokens)
    probes = tokenizer_probes(tokenizer, windows.probe_text, "gguf")
    probe_ids = [runner.tokenize(text) for text in probes.artifact_texts]
    checks = {}
    for fault in ("none", "dropped", "stale", "shifted"):
        cached, prompt = cached_window_logits(FaultyCache(runner, fault), windows.tokens[0])
        run = RunOutput(runner.runtime, runner.device, logits, probe_ids, cached, prompt, None, {}, 0.0)
        checks[fault] = score(artifact, run, reference, windows, probes).kv_cache
    runner.close()
    # measured: decoding as close to the reference as the no-cache pass, to within 1e-5 (limit about 1.3e-3)
    assert checks["none"]["consistent"] is True and abs(checks["none"]["excess_kld"]) < checks["none"]["limit_kld"] / 20
    # measured: about 2 nats worse for a dropped or stale cache, 0.0035 (2.9 × the limit) for one that stores a
    # token twice
    for fault in ("dropped", "stale", "shifted"):
        assert checks[fault]["consistent"] is False, fault
        assert checks[fault]["excess_kld"] > 2 * checks[fault]["limit_kld"], fault


# ---- tokenization --------------------------------------------------------------------------------


def test_tokenization_matches_transformers(source: Path, artifacts: dict[str, Path]) -> None:
    runner = LlamaCppRunner(artifacts["Q4_K_M"], {})
    for text in [heldout_text(), *SAMPLES]:
        assert runner.tokenize(text) == hf_ids(source, text), repr(text[:40])
    runner.close()


def test_known_differences_from_transformers(case: str, source: Path, artifacts: dict[str, Path]) -> None:
    """Where llama.cpp itself differs (not our metadata): documented here so a change shows."""
    runner = LlamaCppRunner(artifacts["F16"], {})
    # transformers finds special tokens in text even with add_special_tokens=False; so does the runner, which
    # asks llama.cpp to parse them (a chat prompt needs it)
    special = AutoTokenizer.from_pretrained(source).eos_token
    assert runner.tokenize(special) == hf_ids(source, special)
    if case == "qwen2-bpe":  # Qwen2's tokenizer NFC-normalizes first; llama.cpp's BPE does not normalize
        decomposed = "cafe\u0301"
        assert runner.tokenize(decomposed) != hf_ids(source, decomposed)
        assert runner.tokenize(unicodedata.normalize("NFC", decomposed)) == hf_ids(source, decomposed)
    runner.close()


# ---- refusals ------------------------------------------------------------------------------------


def test_out_of_order_tensors_are_refused(source: Path, tmp_path: Path) -> None:
    checkpoint = Checkpoint.open(source)
    writer = GGUFWriter(checkpoint, GGUFTarget(format="gguf", quants=["F16"]), tmp_path, "model")
    stream = checkpoint.tensors()
    next(stream)
    info, array = next(stream)
    with pytest.raises(ValueError, match="out of order"):
        writer.add(info, array)
    writer.abort()
    assert list(tmp_path.iterdir()) == []


# ---- importance matrix ---------------------------------------------------------------------------


def test_importance_matrix_reaches_the_quantizer(source: Path, artifacts: dict[str, Path], reference,
                                                 tmp_path: Path) -> None:
    [calibrated] = convert(source, tmp_path, ["Q4_K_M"], imatrix="builtin")
    assert calibrated.path.read_bytes() != artifacts["Q4_K_M"].read_bytes()
    assert scores(calibrated.path, reference).mean_kld < THRESHOLDS["Q4_K_M"]


def test_importance_matrix_is_the_whole_models(source: Path) -> None:
    """Calibrated one decoder layer at a time, the matrix is what the whole model, loaded at once, gives."""
    _, text = calibration_text("builtin")
    streamed = Calibrations(Checkpoint.open(source), None, tokens=1024, context=256).importance("builtin")
    ids = AutoTokenizer.from_pretrained(source)(text[:1024 * 16], add_special_tokens=False)["input_ids"][:1024]
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    inputs: dict[str, list[torch.Tensor]] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_pre_hook(
                lambda _m, args, name=name: inputs.setdefault(f"{name}.weight", []).append(args[0][0].double()))
    with torch.inference_mode():
        for start in range(0, 1024, 256):
            model(torch.tensor([ids[start:start + 256]]))
    whole = {name: (torch.cat(xs) ** 2).mean(0).float().numpy() for name, xs in inputs.items()}
    assert sorted(streamed) == sorted(whole) and "lm_head.weight" in streamed
    for name, values in whole.items():
        np.testing.assert_allclose(streamed[name], values, rtol=1e-5, atol=1e-12, err_msg=name)


# ---- streamed quantization is llama.cpp's whole-file quantization ---------------------------------


def whole_file_quantization(monkeypatch: pytest.MonkeyPatch) -> None:
    """Take the planner away, as on a llama.cpp without it: K-quants then come from llama_model_quantize
    run on a full-precision file."""
    monkeypatch.setattr(convert_gguf, "plan_types", lambda *args, **kwargs: None)


@pytest.mark.parametrize("imatrix", [None, "builtin"])
def test_streamed_k_quants_are_llama_quantizes_bytes(source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     imatrix: str | None) -> None:
    """Per-tensor types from llama.cpp's planner and rows from ggml_quantize_chunk give what
    llama_model_quantize writes: the same key/values in the same order, the same types and bytes per tensor.
    Only the order of the tensors differs: llama.cpp sorts them by name (output first), the stream writes
    them as they come."""
    quants = ["Q4_K_M", "Q6_K", "Q4_0", "Q2_K"]
    streamed = {a.quant: a.path for a in convert(source, tmp_path / "streamed", quants, imatrix=imatrix)}
    assert not list((tmp_path / "streamed").glob(".*"))  # no full-precision intermediate was written
    whole_file_quantization(monkeypatch)
    whole = {a.quant: a.path for a in convert(source, tmp_path / "whole", quants, imatrix=imatrix)}
    for quant in quants:
        assert_same_model(streamed[quant], whole[quant])


def test_streamed_quantization_follows_llama_cpps_fallbacks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows that are not a multiple of 256 cannot be K-quants: llama.cpp's planner picks its fallback types,
    exactly as the whole-file quantizer does."""
    odd = small_checkpoint(None, "llama", "sentencepiece", **(TINY | {"hidden_size": 192, "train_steps": 1}))
    streamed = convert(odd, tmp_path / "streamed", ["Q4_K_M"])[0].path
    types = {t.tensor_type for t in gguf.GGUFReader(streamed).tensors}
    assert gguf.GGMLQuantizationType.Q5_0 in types  # what llama.cpp gives a Q4_K tensor with 192-wide rows
    whole_file_quantization(monkeypatch)
    assert_same_model(streamed, convert(odd, tmp_path / "whole", ["Q4_K_M"])[0].path)


# ---- i-quants, MXFP4 and the ternary types --------------------------------------------------------

I_QUANTS = ["IQ4_XS", "IQ4_NL", "IQ3_M", "IQ3_XXS", "IQ2_M", "IQ2_XXS", "MXFP4_MOE", "TQ1_0", "TQ2_0"]


def test_streamed_i_quants_are_llama_quantizes_bytes(source: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The streamed i-quants, MXFP4_MOE and TQ types are llama_model_quantize's bytes too; those llama.cpp refuses
    without an importance matrix get one computed from the builtin text, the same in both."""
    streamed = {a.quant: a.path for a in convert(source, tmp_path / "streamed", I_QUANTS)}
    whole_file_quantization(monkeypatch)
    whole = {a.quant: a.path for a in convert(source, tmp_path / "whole", I_QUANTS)}
    for quant in I_QUANTS:
        assert_same_model(streamed[quant], whole[quant])


def test_streamed_plans_follow_llama_cpps_rules_with_an_importance_matrix(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """llama.cpp's per-tensor planner plans as if there were no importance matrix; with one, llama-quantize gives the
    first eighth of the layers' ffn_down Q4_1 in Q4_0 and keeps it at IQ4_XS in IQ4_XS (not Q5_K), and IQ3_XXS keeps
    attn_v and ffn_down. Eight layers, so that the first eighth is a layer."""
    deep = small_checkpoint(None, "llama", "sentencepiece", **(TINY | {"num_layers": 8, "train_steps": 2}))
    quants = ["Q4_0", "IQ4_XS", "IQ3_XXS"]
    streamed = {a.quant: a.path for a in convert(deep, tmp_path / "streamed", quants, imatrix="builtin")}
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(streamed["Q4_0"]).tensors}
    assert (types["blk.0.ffn_down.weight"], types["blk.1.ffn_down.weight"]) == (gguf.GGMLQuantizationType.Q4_1,
                                                                              gguf.GGMLQuantizationType.Q4_0)
    whole_file_quantization(monkeypatch)
    whole = {a.quant: a.path for a in convert(deep, tmp_path / "whole", quants, imatrix="builtin")}
    for quant in quants:
        assert_same_model(streamed[quant], whole[quant])


def test_i_quants_follow_llama_cpps_fallbacks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows of 160 (no 256-block) and 688 (no 32-block either) columns: llama.cpp's fallbacks (IQ4_NL, Q4_0, F16),
    streamed as the whole-file quantizer writes them; a plan at that width is written and opens in llama.cpp."""
    odd = small_checkpoint(None, "llama", "sentencepiece",
                           **(TINY | {"hidden_size": 160, "intermediate_size": 688, "train_steps": 1}))
    streamed = {a.quant: a.path for a in convert(odd, tmp_path / "streamed", I_QUANTS)}
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(streamed["IQ2_XXS"]).tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.IQ4_NL  # 160 wide
    assert types["blk.0.ffn_down.weight"] == gguf.GGMLQuantizationType.F16  # 688 wide
    [planned] = convert(odd, tmp_path / "planned", ["auto"], plan={"bits_per_weight": 3.0})
    LlamaCppRunner(planned.path, {}).close()
    whole_file_quantization(monkeypatch)
    whole = {a.quant: a.path for a in convert(odd, tmp_path / "whole", I_QUANTS)}
    for quant in I_QUANTS:
        assert_same_model(streamed[quant], whole[quant])


def test_llama_cpp_refuses_the_listed_quants_without_an_importance_matrix(artifacts: dict[str, Path],
                                                                         tmp_path: Path) -> None:
    """GGUF_QUANTS_NEEDING_IMATRIX (which a recipe computes a matrix for, or refuses with imatrix: false) is exactly
    what llama.cpp's own quantizer refuses without one."""
    refused = set()
    for quant in LLAMA_CPP_QUANTS:
        try:
            quantize(artifacts["F16"], tmp_path / f"{quant}.gguf", quant)
        except ArtifactError as e:
            assert "requires an imatrix" in str(e)
            refused.add(quant)
    assert refused == set(GGUF_QUANTS_NEEDING_IMATRIX)


def test_i_quants_open_in_llama_cpp_and_kld_falls_with_bits(source: Path, artifacts: dict[str, Path], reference,
                                                            tmp_path: Path) -> None:
    """Every new type opens in llama.cpp with the F16 file's tensors and shapes and computes finite logits; the
    i-quants' KLD falls as their bits rise."""
    made = {a.quant: a.path for a in convert(source, tmp_path, I_QUANTS)}
    shapes = {t.name: list(t.shape) for t in gguf.GGUFReader(artifacts["F16"]).tensors}
    klds = {}
    for quant, path in made.items():
        assert {t.name: list(t.shape) for t in gguf.GGUFReader(path).tensors} == shapes, quant
        klds[quant] = scores(path, reference).mean_kld
        assert np.isfinite(klds[quant]), quant
    ladder = ["IQ2_XXS", "IQ2_M", "IQ3_XXS", "IQ3_M", "IQ4_XS"]
    assert [klds[q] for q in ladder] == sorted((klds[q] for q in ladder), reverse=True), klds
    assert klds["IQ4_XS"] < THRESHOLDS["Q4_K_M"]


def assert_same_model(ours: Path, theirs: Path) -> None:
    assert list(fields(ours).items()) == list(fields(theirs).items())
    mine = {t.name: t for t in gguf.GGUFReader(ours).tensors}
    others = gguf.GGUFReader(theirs).tensors
    assert sorted(mine) == sorted(t.name for t in others)
    for tensor in others:
        assert mine[tensor.name].tensor_type == tensor.tensor_type, tensor.name
        assert np.asarray(mine[tensor.name].data).tobytes() == np.asarray(tensor.data).tobytes(), tensor.name
