"""The bench's own helpers (bench/): measurement, page cache, disk floor, synthetic checkpoint, result shape.

Fast: the checkpoint here is a few hundred KB; nothing is converted.
"""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

import pytest

# bench/ is not installed with the package: import it from the checkout
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
measure = importlib.import_module("bench.measure")
synthetic = importlib.import_module("bench.synthetic")
run = importlib.import_module("bench.run")

TINY = synthetic.Shape(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                       vocab_size=256)


def test_one_process_peak_is_the_kernels_high_water_mark(tmp_path):
    measured = measure.run_measured([sys.executable, "-c", "bytearray(300 << 20)"], tmp_path / "log")
    assert measured.exit_code == 0
    # the allocation lives for milliseconds, too short to be sampled; wait4's ru_maxrss still has it
    assert 300 <= measured.max_process_rss_mb < 400
    assert measured.peak_rss_mb >= measured.max_process_rss_mb


def test_concurrent_processes_of_the_tree_add_up(tmp_path):
    grandchild = "import time; b = bytearray(200 << 20); time.sleep(0.6)"
    child = (f"import subprocess, sys; a = bytearray(200 << 20); "
             f"subprocess.run([sys.executable, '-c', {grandchild!r}]); sys.exit(3)")
    measured = measure.run_measured([sys.executable, "-c", child], tmp_path / "log")
    assert measured.exit_code == 3
    assert measured.max_process_rss_mb < 300  # each process alone
    assert measured.tree_rss_sampled_mb >= 400  # both at once
    assert measured.peak_rss_mb == measured.tree_rss_sampled_mb


def test_cpu_time_counts_descendants(tmp_path):
    spin = "import time; end = time.process_time() + 0.3\nwhile time.process_time() < end: pass"
    child = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {spin!r}])"
    measured = measure.run_measured([sys.executable, "-c", child], tmp_path / "log")
    assert measured.cpu_s >= 0.3


def test_page_cache_eviction(tmp_path):
    if run.mount_of(tmp_path).get("filesystem") in ("tmpfs", "ramfs", None):
        pytest.skip("files in memory cannot be evicted")
    data = tmp_path / "data.bin"
    data.write_bytes(b"x" * (8 << 20))
    data.read_bytes()
    assert measure.resident_fraction([data]) == 1.0
    assert measure.evict_from_page_cache([data])
    assert measure.resident_fraction([data]) < 0.1


def test_disk_floor_writes_and_removes(tmp_path):
    floor = tmp_path / "floor.bin"
    assert measure.sequential_write_seconds(floor, (3 << 20) + 5) > 0
    assert not floor.exists()


def test_shards_are_balanced_consecutive_and_complete():
    layout = synthetic.tensor_layout(synthetic.SIZES["7b"])
    plan = synthetic.shard_plan(layout, 4)
    assert [name for shard in plan for name, _ in shard] == [name for name, _ in layout]
    sizes = [sum(synthetic.tensor_bytes(dims) for _, dims in shard) for shard in plan]
    assert sum(sizes) == 14_483_464_192  # Mistral-7B in bf16
    assert max(sizes) - min(sizes) < 2 * max(synthetic.tensor_bytes(dims) for _, dims in layout)


def test_synthetic_checkpoint_reads_like_save_pretrained(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors import safe_open

    tokenizers = tmp_path / "tokenizer"
    tokenizers.mkdir()
    for file in synthetic.TOKENIZER_FILES:
        (tokenizers / file).write_text(file)
    folder = synthetic.build_checkpoint(tmp_path / "ckpt", TINY, tokenizers, "5.0.0", say=lambda _: None)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [f"model-0000{i}-of-00004.safetensors" for i in (1, 2, 3, 4)]
    expected = dict(synthetic.tensor_layout(TINY))
    seen = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(folder / shard, framework="pt") as tensors:
            for name in tensors.keys():  # noqa: SIM118 (safe_open is not a mapping)
                assert index["weight_map"][name] == shard
                seen[name] = tensors.get_tensor(name)
    assert {name: tuple(t.shape) for name, t in seen.items()} == expected
    assert all(t.dtype == torch.bfloat16 for t in seen.values())
    assert torch.equal(seen["model.norm.weight"], torch.ones(TINY.hidden_size, dtype=torch.bfloat16))
    weights = seen["model.layers.1.mlp.down_proj.weight"].float()
    assert abs(weights.std().item() - synthetic.INIT_STD) < 0.002
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["MistralForCausalLM"] and config["head_dim"] == 16
    assert (folder / "tokenizer.model").read_text() == "tokenizer.model"


def test_synthetic_moe_checkpoint_opens_as_mixtral(tmp_path, demo_model):
    """The MoE shape: Mixtral's hub layout (experts one by one), read by siliconvert as transformers' stacks."""
    from dataclasses import replace

    from siliconvert.checkpoint import Checkpoint

    # the tokenizer's ids all have rows; layers enough that no tensor outgrows a shard
    shape = replace(TINY, family="mixtral", experts=4, vocab_size=Checkpoint.open(demo_model).spec.vocab_size,
                    num_layers=6)
    folder = synthetic.build_checkpoint(tmp_path / "moe", shape, demo_model, "5.0.0", say=lambda _: None)
    checkpoint = Checkpoint.open(folder)
    assert checkpoint.spec.family == "mixtral" and checkpoint.spec.experts.count == 4
    info = checkpoint.tensor_infos["model.layers.0.mlp.experts.gate_up_proj"]
    assert info.shape == (4, 2 * TINY.intermediate_size, TINY.hidden_size) and len(info.parts) == 8


def test_synthetic_hybrid_is_lfm2_as_transformers_saves_it(tmp_path, demo_model):
    """The hybrid shape: config.json as save_pretrained writes an Lfm2Config, tensors named, shaped and ordered as
    Lfm2ForCausalLM's state_dict (the tied head left out), read by siliconvert as LFM2 with its layers' mixers."""
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    from siliconvert.checkpoint import Checkpoint

    vocab = Checkpoint.open(demo_model).spec.vocab_size
    # an MLP wide enough that the embeddings fit a quarter of the files (a tensor never spans two shards)
    shape = synthetic.Shape(hidden_size=64, intermediate_size=1024, num_layers=6, num_heads=4, num_kv_heads=2,
                            vocab_size=vocab, family="lfm2", attention_layers=(2, 5))
    hf_config = transformers.Lfm2Config(**{key: value for key, value in synthetic.config(shape, "x").items()
                                           if key != "transformers_version"})
    hf_config.save_pretrained(tmp_path / "transformers")
    saved = json.loads((tmp_path / "transformers" / "config.json").read_text())
    assert synthetic.config(shape, transformers.__version__) == saved
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config)
    state = [(name, tuple(t.shape)) for name, t in model.state_dict().items() if name != "lm_head.weight"]
    assert synthetic.tensor_layout(shape) == state

    folder = synthetic.build_checkpoint(tmp_path / "hybrid", shape, demo_model, "5.0.0", say=lambda _: None)
    spec = Checkpoint.open(folder).spec
    assert spec.family == "lfm2" and spec.mixer_layers("attention") == [2, 5]
    assert spec.mixer_layers("short_conv") == [0, 1, 3, 4] and spec.short_conv.kernel == synthetic.LFM2_CONV_KERNEL
    # what bench.hybrid_memory sets a conversion's peak beside: a convolution layer, all of it in float32
    sizes = importlib.import_module("bench.hybrid_memory").layer_sizes(folder)
    conv_layer = 64 * synthetic.LFM2_CONV_KERNEL + 3 * 64 * 64 + 64 * 64 + 3 * 64 * 1024 + 2 * 64
    assert sizes["largest_layer"]["mixer"] == "conv" and sizes["largest_layer"]["float32_bytes"] == 4 * conv_layer
    assert sizes["float32_bytes"] == 4 * sum(math.prod(dims) for _, dims in synthetic.tensor_layout(shape))


def test_synthetic_sizes_are_as_documented():
    """Each size's bytes (the README's table; existing sizes' files must not change without a generator bump)."""
    def size_bytes(size: str) -> int:
        return sum(synthetic.tensor_bytes(dims) for _, dims in synthetic.tensor_layout(synthetic.SIZES[size]))

    assert size_bytes("7b") == 14_483_464_192
    assert size_bytes("moe") == 8_735_461_376
    assert size_bytes("hybrid") == 5_001_181_184  # LFM2-2.6B's layers with a 32000-token vocabulary
    with pytest.raises(ValueError, match="only lfm2"):
        synthetic.Shape(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                        attention_layers=(1,))


def test_synthetic_weights_are_deterministic():
    table = synthetic.normal_bf16_table()

    def weights(name: str) -> bytes:
        return b"".join(bytes(block) for block in synthetic.tensor_blocks(name, (64, 64), table, seed=7))

    assert weights("w") == weights("w")
    assert weights("v") != weights("w")


def completed(wall: float, cpu: float, rss: float) -> dict:
    return {"wall_s": wall, "cpu_s": cpu, "peak_rss_mb": rss, "exit_code": 0, "completed": True}


def result(**overrides) -> dict:
    arguments = {
        "size": "small", "machine": {}, "tools": {}, "checkpoint": {}, "page_cache": "", "parts": ["a", "b", "c", "d"],
        "siliconvert": completed(17.0, 30.0, 1024.0),
        "anchors": {"mlx_lm.convert": completed(5.0, 8.0, 500.0), "convert_hf_to_gguf": completed(10.0, 9.0, 600.0),
                    "llama_model_quantize": completed(5.0, 10.0, 300.0)},
        "full": {**completed(100.0, 150.0, 2000.0),
                 "stages": {"convert.coreml": {"busy_s": 2.0, "active_s": 3.0, "bytes": 10},
                            "convert": {"wall_s": 50.0}}},
        "disk_floor_s": {"coreml": 2.0, "comparable": 1.0}, "disk_floor_bytes": {"coreml": 10, "comparable": 5},
    } | overrides
    return run.build_result(**arguments)


def test_result_shape_and_ratios():
    built = result()
    assert {"size", "machine", "comparable", "full", "disk_floor_s"} <= set(built)
    assert set(built["comparable"]) == {"siliconvert", "anchors"}
    assert built["ratios"] == {"wall_vs_anchors": 0.85, "cpu_vs_anchors": 1.111, "peak_rss_vs_2gib": 0.5,
                               "coreml_active_vs_disk_floor": 1.5, "coreml_busy_vs_disk_floor": 1.0,
                               "comparable_wall_vs_disk_floor": 17.0, "full_vs_pass": 2.0}
    table = run.format_table(built)
    assert "meets target" in table and "MISSES" not in table
    assert "convert.coreml (busy)" in table


def test_ratios_need_completed_runs():
    failed_anchor = run.not_run("no sdist")
    built = result(anchors={"mlx_lm.convert": completed(5.0, 8.0, 500.0), "convert_hf_to_gguf": failed_anchor},
                   full={**completed(1.0, 1.0, 1.0), "stages": None}, disk_floor_s=None, disk_floor_bytes=None)
    assert built["ratios"]["wall_vs_anchors"] is None
    assert built["ratios"]["coreml_busy_vs_disk_floor"] is None
    assert built["ratios"]["coreml_active_vs_disk_floor"] is None
    assert built["ratios"]["peak_rss_vs_2gib"] == 0.5
    assert built["ratios"]["full_vs_pass"] is None
    assert "no timings.json" in run.format_table(built)


def test_a_full_run_past_twice_its_pass_misses_the_target():
    built = result(full={**completed(100.1, 1.0, 1.0), "stages": {"convert": {"wall_s": 50.0}}})
    assert built["ratios"]["full_vs_pass"] == 2.002
    assert "(c) wall / its conversion pass" in run.format_table(built) and "MISSES" in run.format_table(built)
    # a calibration that computed the reference too is not counted as conversion
    shared = {"convert": {"wall_s": 60.0}, "calibrate": {"wall_s": 10.0, "with_reference": True}}
    assert result(full={**completed(100.0, 1.0, 1.0), "stages": shared})["ratios"]["full_vs_pass"] == 2.0


def test_gpus_are_nvidia_smis_lines(tmp_path, monkeypatch):
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'NVIDIA H100 80GB HBM3, 81559 MiB, 580.159.04'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert run.nvidia_gpus() == ["NVIDIA H100 80GB HBM3, 81559 MiB, 580.159.04"]
    monkeypatch.setenv("PATH", str(tmp_path / "none"))
    assert run.nvidia_gpus() == []


def test_hybrid_mlx_patch_copies_the_checkpoint_with_the_config_mlx_lm_reads(tmp_path):
    """bench.hybrid's patched copy for mlx_lm.convert: the weights linked, config.json patched (Granite 4.0-H's
    layer types spelled the older way, Δ's upper limit an infinity json reads back), the saved config untouched."""
    hybrid = importlib.import_module("bench.hybrid")
    source = tmp_path / "saved"
    source.mkdir()
    (source / "model.safetensors").write_bytes(b"weights")
    saved = {"model_type": "granitemoehybrid", "layer_types": ["linear_attention", "full_attention"],
             "time_step_limit": [0.0, {"__float__": "Infinity"}]}
    (source / "config.json").write_text(json.dumps(saved))
    name, patch = hybrid.MLX_CONFIG_PATCHES["granitemoehybrid"]
    copy = hybrid.patched_copy(source, tmp_path / "patched", patch)
    assert (copy / "model.safetensors").resolve() == source / "model.safetensors"
    config = json.loads((copy / "config.json").read_text())
    assert config["layer_types"] == ["mamba", "attention"] and config["time_step_limit"] == [0.0, math.inf]
    assert "layer_types" in name and json.loads((source / "config.json").read_text()) == saved
    _, lift_rope = hybrid.MLX_CONFIG_PATCHES["qwen3_next"]
    lifted = lift_rope({"rope_parameters": {"rope_theta": 1e7, "partial_rotary_factor": 0.25}})
    assert (lifted["rope_theta"], lifted["partial_rotary_factor"]) == (1e7, 0.25)


def test_hybrid_rows_set_quantized_artifacts_beside_their_anchors():
    """Q4_K_M and 4-bit rows carry their mean KLD over the anchor's (the patched mlx-lm anchor where the one on the
    checkpoint as saved failed); the table flags a ratio above the issue's 1.5×; Core ML's state comes from the
    manifest's state_bytes, the KV cache apart from the recurrent states."""
    hybrid = importlib.import_module("bench.hybrid")
    cell = {"mean_kld": 0.002, "same_top1": 0.95, "size_bytes": 1000, "passed": True, "recurrent_state_bytes": 10,
            "kv_cache_bytes": 20}
    row = {"siliconvert": {"gguf F16": dict(cell), "gguf Q4_K_M": dict(cell), "mlx 4bit-g64": dict(cell)},
           "anchors": {"llama_model_quantize Q4_K_M": cell | {"mean_kld": 0.001},
                       "mlx_lm.convert 4-bit g64": {"error": "ValueError: block_dim"},
                       "mlx_lm.convert 4-bit g64 (patched: block_dim = hidden_size)": cell | {"mean_kld": 0.004}}}
    hybrid.anchor_ratios(row)
    mine = row["siliconvert"]
    assert "anchor_ratio" not in mine["gguf F16"]
    assert mine["gguf Q4_K_M"]["anchor_ratio"] == pytest.approx(2.0)
    assert mine["mlx 4bit-g64"]["anchor_ratio"] == pytest.approx(0.5)
    table = hybrid.markdown({"lfm2": row}).splitlines()
    assert "| 2.00 (> 1.5) |" in table[3] and "| 0.50 |" in table[4]
    assert "ValueError: block_dim" in table[6]
    coreml = {"path": "/x.mlpackage", "state_bytes": {"kv_cache": 4096, "conv_state": 96, "recurrent_state": 512}}
    assert hybrid.artifact_state_bytes(coreml, 128) == {"path": "/x.mlpackage", "recurrent_state_bytes": 608,
                                                        "kv_cache_bytes": 4096}


def test_quants_table_sets_each_tool_beside_the_others_one_line_per_type():
    """bench.quants: one row per (checkpoint, format, type, tool); a table per format puts the tools of a type on one
    line, and a tool that made no artifact says why."""
    quants = importlib.import_module("bench.quants")
    figures = {"bytes": 1_234_567, "bits_per_weight": 4.25, "mean_kld": 0.0123, "same_top1": 0.9}
    rows = [{"checkpoint": "demo", "format": "gguf", "type": "IQ4_XS", "tool": "siliconvert", **figures},
            {"checkpoint": "demo", "format": "gguf", "type": "IQ4_XS", "tool": "llama-quantize", **figures},
            {"checkpoint": "demo", "format": "mlx", "type": "mxfp4", "tool": "siliconvert", **figures},
            {"checkpoint": "demo", "format": "mlx", "type": "mxfp4", "tool": "mlx_lm.convert", "error": "refused"}]
    gguf, mlx = ([line for line in table.splitlines() if line.startswith("|")]
                 for table in quants.markdown(rows).split("### ")[1:])
    assert len(gguf) == 3 and gguf[0].count("bits/w") == 2 and "llama-quantize bytes" in gguf[0]
    assert gguf[2] == "| demo | IQ4_XS | 1,234,567 | 4.25 | 0.01230 | 0.900 | 1,234,567 | 4.25 | 0.01230 | 0.900 |"
    assert len(mlx) == 3 and "mlx_lm.convert bytes" in mlx[0] and mlx[2].endswith("| – | – | – | refused |")


def test_sweeps_merge_only_on_one_model_and_corpus_and_keep_a_shared_row_once():
    sweep_all = importlib.import_module("bench.sweep_all")
    row = {"format": "gguf", "quant": "Q4_K_M", "size_bytes": 10, "mean_kld": 0.1}
    fixed = {"source": "m", "corpus": {"tokens": 512}, "rows": [row, {**row, "quant": "Q8_0", "size_bytes": 20}]}
    planned = {**fixed, "rows": [row, {**row, "quant": "auto-10B", "kind": "planned", "size_bytes": 9}]}
    front = sweep_all.merged([fixed, planned])
    assert [r["quant"] for r in front["rows"]] == ["auto-10B", "Q4_K_M", "Q8_0"]
    with pytest.raises(SystemExit, match="model or corpus"):
        sweep_all.merged([fixed, {**planned, "corpus": {"tokens": 1024}}])


def test_coreml_palettes_names_a_checkpoint_folder_by_its_own_name(tmp_path):
    from bench.coreml_palettes import label_of

    folder = tmp_path / "llama-sentencepiece-2-abc"
    folder.mkdir()
    assert label_of(str(folder)) == "llama-sentencepiece-2-abc"  # not the absolute path, in bench/work or a file name
    assert label_of("real") == "real"
