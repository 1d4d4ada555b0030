"""A run's output as the release tests need it: a fake report over fake artifact files of every format, with
the recipe and checkpoint that made them (tests/conftest.py's `build` fixture writes one)."""

from __future__ import annotations

from pathlib import Path

HUB_ID = "mistralai/Mistral-7B-Instruct-v0.3"
MODEL = "Mistral-7B-Instruct-v0.3"
RECIPE_TEXT = f"""source: {HUB_ID}
targets:
  - format: mlx
    bits: 4
  - format: gguf
    quants: [Q4_K_M, Q8_0, Q2_K]
  - format: coreml
    context: 2048
"""


class FakeCheckpoint:
    def __init__(self, path: Path):
        self.path, self.name, self.config = path, MODEL, {"architectures": ["MistralForCausalLM"]}

    def tokenizer_files(self) -> list[Path]:
        return [self.path / "tokenizer.json", self.path / "tokenizer_config.json"]


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def entry(fmt: str, quant: str, path: Path, failed: tuple[str, ...] = (), mean_kld: float = 0.01234) -> dict:
    failures = [{"metric": m, "value": 0.9, "limit": 0.05, "message": f"{fmt} {quant}: {m} 0.9 > 0.05"}
                for m in failed]
    return {
        "format": fmt, "quant": quant, "path": str(path), "size_bytes": 4_321_000_000,
        "runtime": {"mlx": "mlx", "gguf": "llama.cpp", "coreml": "mil-interpreter"}[fmt],
        "device": "CPU (emulated, not Core ML)" if fmt == "coreml" else "CPU, 16 threads",
        "tokenizer_match": True, "tokenizer_mismatch": None,
        "kv_cache": {"consistent": True, "checked_tokens": 17, "first_mismatch": 3, "mean_kld": 2e-4,
                     "same_top1": 0.94, "decode_kld": 0.0101, "no_cache_kld": 0.0102, "excess_kld": -1e-4,
                     "limit_kld": 0.0035},
        "metrics": {"mean_kld": mean_kld, "median_kld": 0.008, "p99_kld": 0.1875, "max_kld": 0.9,
                    "same_top1": 0.9312, "ppl_reference": 5.1, "ppl": 5.2, "ppl_ratio": 1.0213,
                    "rms_delta_p": 0.02, "positions": 1020},
        "latency": {"prefill_tps": 812.25, "decode_tps": 43.75, "ttft_ms": 150.0, "peak_rss_mb": 4500.0,
                    "prefill_tokens": 128, "decode_tokens": 32},
        "gates": {"passed": not failures, "failed": failures,
                  "limits": {"max_mean_kld": 0.05, "min_same_top1": 0.85, "max_ppl_ratio": 1.1}},
    }


def snapshot(folder: Path) -> dict[str, bytes]:
    return {f.relative_to(folder).as_posix(): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}
