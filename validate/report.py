"""report.json (versioned schema), report.md (tables) and plot.png, written atomically."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from siliconvert.artifacts import write_text_atomically
from siliconvert.validate.gates import GateFailure
from siliconvert.validate.router import describe_router
from siliconvert.validate.score import ArtifactScore, artifact_size, describe_kv_cache
from siliconvert.validate.tokenizer import describe

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
        # every probe text: identical, a known rule's difference (a warning unless strict), or a failure
        "tokenizer": result.tokenizer,
        "kv_cache": result.kv_cache,
        # a mixture of experts: how often the artifact's routers chose the reference's experts
        "router_agreement": result.router,
        # what the artifact computes beyond the model's own work, where its writer says (Core ML: every expert)
        "compute": artifact.runner_options.get("compute"),
        # bytes of state one sequence keeps, by state ("kv_cache" at the full context; recurrent states such as
        # "conv_state" whatever the length), where the writer says (Core ML)
        "state_bytes": artifact.runner_options.get("state_bytes"),
        "metrics": result.scores.as_dict(),
        "latency": run.latency.as_dict() if run.latency else None,
        # check ("kv_cache", "latency") → why the runner could not make it here
        "not_measured": run.unmeasured,
        # the child process's peak over the whole run; for an emulated runtime, the emulation's
        "run_peak_rss_mb": round(run.peak_rss_mb, 1),
        # a planned quantization: tensor → type, bits per weight, predicted mean KLD (quantize/plan.py)
        "plan": artifact.plan,
        # the float type of what is not quantized, and why, where the writer chose it: {"dtype", "reason"}
        "float_type": artifact.float_type,
        # where weights arrived quantized: kept exact in this artifact, or re-quantized (and as what)
        "source_quantization": artifact.source_quantization,
        "gates": {
            "passed": not failures,
            "failed": [f.__dict__ for f in failures],
            "limits": {k: v for k, v in limits.items() if v is not None},
        },
    }


def build_report(*, source: str, source_info: dict, reference: dict, corpus: dict,
                 artifacts: list[dict], version: str, validation: dict | None = None) -> dict[str, Any]:
    """`validation`: how the runs overlapped (validate/overlap.py: the most allowed and the most that went at once,
    the memory budgets they shared)."""
    report = {
        "schema": SCHEMA_VERSION,
        "siliconvert": version,
        "source": source,
        "source_info": source_info,
        "reference": reference,
        "corpus": corpus,
        "artifacts": artifacts,
        "passed": all(a["gates"]["passed"] for a in artifacts),
    }
    return report | ({"validation": validation} if validation is not None else {})


def finite(value: Any) -> Any:
    """`value` with every float that is not finite (a NaN or infinite score of a broken artifact) as None: JSON
    has no such numbers, and Python's `NaN` / `Infinity` in report.json break strict readers. The gates have
    already failed such a value, naming it."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite(item) for item in value]
    return value


def write_report(out_dir: Path, report: dict, klds: dict[str, np.ndarray]) -> None:
    write_text_atomically(out_dir / "report.json", json.dumps(finite(report), indent=2, allow_nan=False) + "\n")
    has_plot = bool(report["artifacts"])
    if has_plot:
        plot(out_dir / "plot.png", report, klds)
    write_text_atomically(out_dir / "report.md", markdown(report, plot_name="plot.png" if has_plot else None))


def markdown(report: dict, plot_name: str | None) -> str:
    ref, corpus = report["reference"], report["corpus"]
    lines = [
        f"# siliconvert report: {report['source_info']['name']}",
        "",
        f"Source `{report['source']}` ({report['source_info']['architecture']}{_traits(report['source_info'])})"
        f"{_arrived_quantized(report['source_info'])}. "
        f"Reference: {ref['runtime']} on {ref['device']}, {ref['dtype']}{_reference_run(ref)}. "
        f"Corpus: {corpus['name']}, {corpus['positions']} scored positions "
        f"({corpus['windows']} windows of {corpus['context']} tokens).",
        *_overlap(report.get("validation")),
        "",
        "| artifact | size | runtime | device | mean KLD | p99 KLD | same top-1 | PPL ratio "
        "| RMS Δp | prefill tok/s | decode tok/s | TTFT ms | peak MB | tokenizer | KV cache | gates |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|",
    ]
    notes: list[str] = []
    for a in report["artifacts"]:
        m, lat = a["metrics"], a["latency"] or {}
        not_measured = a.get("not_measured", {})
        speed = [_num(lat.get(key)) for key in ("prefill_tps", "decode_tps", "ttft_ms", "peak_rss_mb")]
        if "latency" in not_measured:
            speed = [_footnote(notes, a, "latency", not_measured["latency"])] * 4
        kv = a["kv_cache"]
        if kv["consistent"] is None:
            kv_cell = _footnote(notes, a, "KV cache", not_measured.get("kv_cache", "no reason given"))
        else:
            kv_cell = f"{'consistent' if kv['consistent'] else 'DRIFTS'}: {describe_kv_cache(kv)}"
        lines.append(
            f"| {a['format']} {a['quant']} | {a['size_bytes'] / 1e6:.1f} MB | {a['runtime']} | {a['device']} "
            f"| {m['mean_kld']:.5f} | {m['p99_kld']:.4f} | {100 * m['same_top1']:.1f} % | {m['ppl_ratio']:.4f} "
            f"| {m['rms_delta_p']:.4f} | {' | '.join(speed)} "
            f"| {_tokenizer_cell(a)} | {kv_cell} "
            f"| {'pass' if a['gates']['passed'] else 'FAIL'} |"
        )
    if notes:
        lines += ["", *notes]
    routed = [a for a in report["artifacts"] if a.get("router_agreement")]
    if routed:
        lines += ["", "## Router agreement (mixture of experts)", "",
                  "How often each artifact's routers chose the same experts as the reference's, over every scored "
                  "token and sparse layer.", ""]
        lines += [f"- {a['format']} {a['quant']}: " + (describe_router(a["router_agreement"])
                  if a["router_agreement"]["measured"] else f"not measured ({a['router_agreement']['reason']})")
                  for a in routed]
    lines += [f"- {a['format']} {a['quant']} compute: {a['compute']}" for a in routed if a.get("compute")]
    stateful = [a for a in report["artifacts"] if a.get("state_bytes")]
    if stateful:
        lines += ["", "## State per sequence", ""]
        lines += [f"- {a['format']} {a['quant']}: " + ", ".join(f"{name} {size:,} bytes"
                                                             for name, size in a["state_bytes"].items())
                  for a in stateful]
    known = known_tokenizer_rules(report["artifacts"])
    if known:
        lines += ["", "## Tokenizer differences from known rules", "",
                  "The artifact's runtime cannot express the source tokenizer's rule here; other text tokenizes "
                  "alike. A warning, not a failure, unless the recipe sets `validate.tokenizer: strict`.", ""]
        lines += [f"- {line}" for line in known]
    floats = [a for a in report["artifacts"] if a.get("float_type") and not a.get("plan")]  # a plan says its own
    if floats:
        lines += ["", "## Float types", "", "What is not quantized (and scales, biases, activations), and why.", ""]
        lines += [f"- {a['format']} {a['quant']}: {a['float_type']['reason']}" for a in floats]
    arrived = [a for a in report["artifacts"] if a.get("source_quantization")]
    if arrived:
        lines += ["", "## Weights that arrived quantized", "",
                  "Kept as they are where the format holds their type, else re-quantized: the cost of that is the "
                  "difference in KLD from an artifact that kept them.", ""]
        lines += [f"- {a['format']} {a['quant']}: {a['source_quantization']}" for a in arrived]
    lines += plan_lines(report["artifacts"])
    failures = [f["message"] for a in report["artifacts"] for f in a["gates"]["failed"]]
    if failures:
        lines += ["", "## Failed gates", "", *[f"- {message}" for message in failures]]
    emulated = [a for a in report["artifacts"] if "emulated" in a["device"]]
    if emulated:
        ran = "; ".join(f"{a['format']} {a['quant']}: {a['runtime']}" for a in emulated)
        lines += ["", f"Rows marked *emulated* did not run on the artifact's own runtime ({ran}). Their scores check "
                  "the shipped weights; their speeds, where shown, say nothing about a Mac. A gate marked pass "
                  "covers only the checks that were measured."]
    if plot_name:
        lines += ["", f"![quality against size]({plot_name})"]
    return "\n".join(lines) + "\n"


def plan_lines(artifacts: list[dict]) -> list[str]:
    """The "Quantization plans" section: per planned artifact, its prediction against the measurement, the
    types' shares, each try of the re-plan loop, and tensor → type (the report and the model card share it)."""
    planned = [a for a in artifacts if a.get("plan")]  # older reports have no plans
    if not planned:
        return []
    lines = ["", "## Quantization plans", "",
             "Types chosen per tensor from the imatrix-weighted quantization error (quantize/sensitivity.py), "
             "the fewest bytes for the quality asked or the least error for the size asked."]
    for a in planned:
        plan = a["plan"]
        shares = ", ".join(f"{kind} × {count}" for kind, count in plan["types"].items())
        lines += ["", f"**{a['format']} {a['quant']}**: {plan['bits_per_weight']:.2f} bits per weight, predicted "
                  f"mean KLD {plan['predicted_mean_kld']:.5f}, measured {a['metrics']['mean_kld']:.5f}"
                  f"{_measured_over_predicted(plan)}; {shares}."]
        if plan.get("float_type_reason"):
            lines.append(f"- float type: {plan['float_type_reason']}")
        if padded := plan.get("padded_ffn"):
            lines.append(f"- MLP padded from {padded['from']} to {padded['to']} units: {padded['why']}")
        lines += [f"- try {t['try']}: predicted {t['predicted_mean_kld']:.5f}, measured {t['measured_mean_kld']:.5f}"
                  f" at {t['bits_per_weight']:.2f} bits per weight{'' if t['met'] else ': missed'}"
                  f"{'; the smallest try that met was written again' if t.get('restored') else ''}"
                  for t in plan.get("tries", [])]
        lines += ["", "<details><summary>tensor → type</summary>", "", "| tensor | type |", "|---|---|",
                  *[f"| {name} | {kind} |" for name, kind in plan["tensors"].items()], "", "</details>"]
    return lines


def _arrived_quantized(source_info: dict) -> str:
    """How a source that arrived quantized was read (older reports lack the key)."""
    return f", arrived quantized: {source_info['quantization']}" if source_info.get("quantization") else ""


def _traits(source_info: dict) -> str:
    """The traits that depart from Llama's, as a reader meets them ("; traits: qk_norm head, ...")."""
    traits = source_info.get("traits") or {}
    return "; traits: " + ", ".join(f"{name} {value}" for name, value in traits.items()) if traits else ""


def known_tokenizer_rules(artifacts: list[dict]) -> list[str]:
    """One line per artifact and known rule, e.g. "gguf Q4_K_M: space-prefix (3 texts): inputs that begin …"."""
    lines = []
    for a in artifacts:
        for name, rule in (a.get("tokenizer") or {}).get("known", {}).items():  # older reports lack the check
            lines.append(f"{a['format']} {a['quant']}: **{name}** ({rule['probes']} texts): {rule['description']}; "
                         f"first: {rule['example']}")
    return lines


def _tokenizer_cell(artifact: dict) -> str:
    check = artifact.get("tokenizer")
    if check is None:  # a report written before the check had its details
        return "match" if artifact["tokenizer_match"] else "MISMATCH"
    if check["unexplained"]:
        return f"MISMATCH: {describe(check)}"
    return "match" if not check["known"] else f"known rules: {describe(check)}"


def _overlap(validation: dict | None) -> list[str]:
    """The report's line on how validation's runs overlapped (none in reports made before they did)."""
    if validation is None:
        return []
    gpu = validation.get("gpu_memory_budget_mb")
    within = f"{validation['memory_budget_mb']} MB of memory" + (f" and {gpu} MB of GPU memory" if gpu else "")
    return ["", f"Validation: up to {validation['parallel']} runs at once within {within} "
                f"({validation['most_at_once']} went at once); latency timed by one run at a time while no other "
                "worked."]


def _reference_run(ref: dict) -> str:
    """How the reference run went, for the report's first paragraph (older reports lack these keys)."""
    parts = [ref["method"]] if ref.get("method") else []
    if ref.get("without_kernels"):
        parts.append(f"transformers' own PyTorch path, without {' or '.join(ref['without_kernels'])}")
    if ref.get("peak_rss_mb") is not None:
        parts.append(f"peak memory {ref['peak_rss_mb']:.0f} MB")
    if ref.get("peak_gpu_mb") is not None:
        parts.append(f"peak GPU memory {ref['peak_gpu_mb']:.0f} MB")
    if ref.get("wall_s") is not None:
        parts.append(f"{ref['wall_s']:.1f} s")
    if ref.get("cached"):
        parts.append("logits cached from an earlier run")
    return f" ({'; '.join(parts)})" if parts else ""


def _footnote(notes: list[str], artifact: dict, check: str, reason: str) -> str:
    """A "not measured" cell whose numbered note (added to `notes`) gives the reason."""
    notes.append(f"[{len(notes) + 1}] {artifact['format']} {artifact['quant']}: {check} not measured: {reason}")
    return f"not measured [{len(notes)}]"


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
    # a broken artifact's positions that are not finite have no place on a log axis (the table says so)
    data = [np.maximum(klds[label][np.isfinite(klds[label])], 1e-8) for label in labels]
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


def _measured_over_predicted(plan: dict) -> str:
    """How far measurement was from prediction, where the report has it (older reports do not)."""
    ratio = plan.get("measured_over_predicted")
    return f" ({ratio:.2f}× the prediction)" if ratio is not None else ""
