"""report.json (versioned schema), report.md (tables) and plot.png, written atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from siliconvert.artifacts import write_text_atomically
from siliconvert.validate.gates import GateFailure
from siliconvert.validate.score import ArtifactScore, artifact_size

SCHEMA_VERSION = 1


def artifact_entry(result: ArtifactScore, failures: list[GateFailure], limits: dict) -> dict[str, Any]:
    artifact, run = result.artifact, result.run
    return {
        "format": artifact.format,
        "quant": artifact.quant,
        "path": str(artifact.path),
        "size_bytes": artifact_size(artifact.path),
        "runtime": run.runtime,
        "device": run.device,
        "tokenizer_match": result.tokenizer_match,
        "tokenizer_mismatch": result.tokenizer_mismatch,
        "kv_cache": run.kv_cache,
        "metrics": result.scores.as_dict(),
        "latency": run.latency.as_dict() if run.latency else None,
        "gates": {
            "passed": not failures,
            "failed": [f.__dict__ for f in failures],
            "limits": {k: v for k, v in limits.items() if v is not None},
        },
    }


def build_report(*, source: str, source_info: dict, reference: dict, corpus: dict,
                 artifacts: list[dict], version: str) -> dict[str, Any]:
    return {
        "schema": SCHEMA_VERSION,
        "siliconvert": version,
        "source": source,
        "source_info": source_info,
        "reference": reference,
        "corpus": corpus,
        "artifacts": artifacts,
        "passed": all(a["gates"]["passed"] for a in artifacts),
    }


def write_report(out_dir: Path, report: dict, klds: dict[str, np.ndarray]) -> None:
    write_text_atomically(out_dir / "report.json", json.dumps(report, indent=2) + "\n")
    has_plot = bool(report["artifacts"])
    if has_plot:
        plot(out_dir / "plot.png", report, klds)
    write_text_atomically(out_dir / "report.md", markdown(report, plot_name="plot.png" if has_plot else None))


def markdown(report: dict, plot_name: str | None) -> str:
    ref, corpus = report["reference"], report["corpus"]
    lines = [
        f"# siliconvert report: {report['source_info']['name']}",
        "",
        f"Source `{report['source']}` ({report['source_info']['architecture']}). "
        f"Reference: {ref['runtime']} on {ref['device']}, {ref['dtype']}. "
        f"Corpus: {corpus['name']}, {corpus['positions']} scored positions "
        f"({corpus['windows']} windows of {corpus['context']} tokens).",
        "",
        "| artifact | size | runtime | device | mean KLD | p99 KLD | same top-1 | PPL ratio "
        "| RMS Δp | prefill tok/s | decode tok/s | TTFT ms | peak MB | tokenizer | gates |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for a in report["artifacts"]:
        m, lat = a["metrics"], a["latency"] or {}
        lines.append(
            f"| {a['format']} {a['quant']} | {a['size_bytes'] / 1e6:.1f} MB | {a['runtime']} | {a['device']} "
            f"| {m['mean_kld']:.5f} | {m['p99_kld']:.4f} | {100 * m['same_top1']:.1f} % | {m['ppl_ratio']:.4f} "
            f"| {m['rms_delta_p']:.4f} | {_num(lat.get('prefill_tps'))} | {_num(lat.get('decode_tps'))} "
            f"| {_num(lat.get('ttft_ms'))} | {_num(lat.get('peak_rss_mb'))} "
            f"| {'match' if a['tokenizer_match'] else 'MISMATCH'} | {'pass' if a['gates']['passed'] else 'FAIL'} |"
        )
    failures = [f["message"] for a in report["artifacts"] for f in a["gates"]["failed"]]
    if failures:
        lines += ["", "## Failed gates", "", *[f"- {message}" for message in failures]]
    emulated = [a for a in report["artifacts"] if "emulated" in a["device"]]
    if emulated:
        lines += ["", "Rows marked *emulated* ran in siliconvert's MIL interpreter, not Core ML: their "
                  "scores check the shipped weights and program; their speeds say nothing about a Mac."]
    if plot_name:
        lines += ["", f"![quality against size]({plot_name})"]
    return "\n".join(lines) + "\n"


def plot(path: Path, report: dict, klds: dict[str, np.ndarray]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    artifacts = report["artifacts"]
    labels = [f"{a['format']} {a['quant']}" for a in artifacts]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for a, label in zip(artifacts, labels, strict=True):
        left.scatter(a["size_bytes"] / 1e6, max(a["metrics"]["mean_kld"], 1e-8), s=50,
                     marker="o" if a["gates"]["passed"] else "x", label=label)
    limits = [a["gates"]["limits"].get("max_mean_kld") for a in artifacts]
    if limits and limits[0] is not None:
        left.axhline(limits[0], color="red", linestyle="--", linewidth=1, label="gate: max mean KLD")
    left.set(xlabel="size (MB)", ylabel="mean KLD to reference", title="Quality against size")
    left.set_yscale("log")
    left.legend(fontsize=8)
    data = [np.maximum(klds[label], 1e-8) for label in labels]
    right.boxplot(data, tick_labels=labels, showfliers=True)
    right.set_yscale("log")
    right.set(ylabel="KLD per position", title="KLD distribution")
    right.tick_params(axis="x", labelrotation=20, labelsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fig.savefig(tmp, format="png", dpi=110, metadata={"Software": None})
    plt.close(fig)
    tmp.replace(path)


def _num(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"
