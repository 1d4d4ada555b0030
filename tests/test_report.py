"""report.md: what a report says, including the checks a runner could not make, with the reason."""

from __future__ import annotations

from siliconvert.validate.report import markdown, write_report


def test_report_says_not_measured_with_the_reason():
    report = {
        "source": "x", "source_info": {"name": "x", "architecture": "MistralForCausalLM"},
        "reference": {"runtime": "transformers", "device": "CPU", "dtype": "float32", "method": "streamed",
                      "peak_rss_mb": 900.0, "wall_s": 12.5, "cached": False},
        "corpus": {"name": "builtin", "positions": 1020, "windows": 4, "context": 256},
        "artifacts": [{
            "format": "mlx", "quant": "4bit-g64", "size_bytes": 4e9, "runtime": "mlx weights in torch (dequantized)",
            "device": "CPU (emulated: mlx's CPU backend too slow at this size)", "tokenizer_match": True,
            "kv_cache": {"consistent": None, "checked_tokens": 0, "first_mismatch": None},
            "not_measured": {"kv_cache": "mlx did not run", "latency": "mlx did not run either"},
            "metrics": {"mean_kld": 0.01, "p99_kld": 0.1, "same_top1": 0.9, "ppl_ratio": 1.01, "rms_delta_p": 0.01},
            "latency": None, "gates": {"passed": True, "failed": [], "limits": {}},
        }],
    }
    text = markdown(report, plot_name=None)
    row = next(line for line in text.splitlines() if line.startswith("| mlx 4bit-g64"))
    assert row.count("not measured [1]") == 4 and "not measured [2]" in row and "consistent" not in row
    assert "[1] mlx 4bit-g64: latency not measured: mlx did not run either" in text
    assert "[2] mlx 4bit-g64: KV cache not measured: mlx did not run" in text
    assert "peak memory 900 MB; 12.5 s" in text


def test_report_json_holds_no_number_json_cannot(tmp_path):
    """NaN and infinite scores (a broken artifact's, which the gates fail) are written as null: report.json stays
    JSON that strict readers accept, and report.md and the plot are still written."""
    import json

    import numpy as np
    from releases import entry

    broken = entry("gguf", "Q4_K_M", tmp_path / "x.gguf", failed=("mean_kld",), mean_kld=float("nan"))
    broken["metrics"]["ppl_ratio"] = float("inf")
    report = {"schema": 1, "source": "x", "source_info": {"name": "x", "architecture": "LlamaForCausalLM"},
              "reference": {"runtime": "transformers", "device": "CPU", "dtype": "float32"},
              "corpus": {"name": "builtin", "positions": 1020, "windows": 4, "context": 256}, "artifacts": [broken]}
    write_report(tmp_path, report, {"gguf Q4_K_M": np.array([0.01, np.nan, np.inf])})
    text = (tmp_path / "report.json").read_text()
    strict = json.loads(text, parse_constant=lambda name: (_ for _ in ()).throw(ValueError(name)))
    assert strict["artifacts"][0]["metrics"]["mean_kld"] is None
    assert strict["artifacts"][0]["metrics"]["ppl_ratio"] is None
    assert (tmp_path / "report.md").is_file() and (tmp_path / "plot.png").is_file()


def test_the_emulation_note_names_only_the_rows_that_were_emulated(tmp_path):
    from releases import entry

    rows = [entry("coreml", "fp16", tmp_path / "x.mlpackage"), entry("mlx", "4bit-g64", tmp_path / "mlx")]
    report = {"source": "x", "source_info": {"name": "x", "architecture": "LlamaForCausalLM"},
              "reference": {"runtime": "transformers", "device": "CPU", "dtype": "float32"},
              "corpus": {"name": "builtin", "positions": 1020, "windows": 4, "context": 256}, "artifacts": rows}
    text = markdown(report, plot_name=None)
    assert "Rows marked *emulated* did not run on the artifact's own runtime (coreml fp16: mil-interpreter)." in text
    assert "transformers." not in text.split("Rows marked")[1]  # mlx ran in mlx: not said to be emulated


def test_the_reference_run_says_which_kernels_it_went_without():
    from siliconvert.validate.report import _reference_run

    described = _reference_run({"method": "streamed", "without_kernels": ["causal-conv1d", "flash-linear-attention"]})
    assert "PyTorch path, without causal-conv1d or flash-linear-attention" in described
    assert "PyTorch" not in _reference_run({"method": "streamed", "without_kernels": []})


def test_report_says_how_validation_overlapped_and_within_which_budget(tmp_path):
    from releases import entry

    from siliconvert.validate.report import build_report

    validation = {"parallel": 4, "memory_budget_mb": 100000, "gpu_memory_budget_mb": 60000, "most_at_once": 3}
    report = build_report(source="x", source_info={"name": "x", "architecture": "LlamaForCausalLM"},
                          reference={"runtime": "transformers", "device": "CPU", "dtype": "float32"},
                          corpus={"name": "builtin", "positions": 1020, "windows": 4, "context": 256},
                          artifacts=[entry("mlx", "4bit-g64", tmp_path / "mlx")], version="0", validation=validation)
    assert report["validation"] == validation
    text = markdown(report, plot_name=None)
    assert ("Validation: up to 4 runs at once within 100000 MB of memory and 60000 MB of GPU memory (3 went at "
            "once); latency timed by one run at a time while no other worked.") in text
    del report["validation"]  # a report from before validation overlapped says nothing of it
    assert "Validation:" not in markdown(report, plot_name=None)
