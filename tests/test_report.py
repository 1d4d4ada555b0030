"""report.md: what a report says, including the checks a runner could not make, with the reason."""

from __future__ import annotations

from siliconvert.validate.report import markdown


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
