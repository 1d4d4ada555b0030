"""End to end through the CLI on the built-in demo model: exit codes, report, gates."""

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import SILICONVERT

pytestmark = pytest.mark.slow

CLI = [SILICONVERT]


def run(*args, cwd=None):
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env={**__import__("os").environ, "SILICONVERT_QUIET": "1"})


def write_recipe(tmp_path: Path, source: Path, **extra) -> Path:
    recipe = {
        "name": "e2e",
        "source": str(source),
        "output": str(tmp_path / "out"),
        "targets": [{"format": "mlx", "bits": 4, "group_size": 64}],
        "validate": {"tokens": 512, "context": 128, "prefill_tokens": 32, "decode_tokens": 8},
        **extra,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def demo_run(demo_model, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("e2e")
    result = run("recipe", write_recipe(tmp_path, demo_model))
    return tmp_path, result


def test_recipe_passes_and_writes_the_report(demo_run):
    tmp_path, result = demo_run
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    report = json.loads((out / "report.json").read_text())
    assert report["schema"] == 1 and report["passed"] is True
    assert report["reference"]["dtype"].startswith("float32")
    (artifact,) = report["artifacts"]
    assert artifact["format"] == "mlx" and artifact["quant"] == "4bit-g64"
    assert artifact["runtime"] == "mlx"
    assert artifact["device"].startswith("CPU (mlx), weights dequantized by mlx to ")
    assert artifact["tokenizer_match"] is True and artifact["kv_cache"]["consistent"] is True
    metrics = artifact["metrics"]
    assert set(metrics) >= {"mean_kld", "median_kld", "p99_kld", "max_kld", "same_top1", "ppl_reference",
                            "ppl", "ppl_ratio", "rms_delta_p"}
    assert 0 < metrics["mean_kld"] < 0.05 and metrics["same_top1"] > 0.85
    assert set(artifact["latency"]) >= {"prefill_tps", "decode_tps", "ttft_ms", "peak_rss_mb"}
    assert artifact["latency"]["decode_tps"] > 0 and artifact["latency"]["peak_rss_mb"] > 0
    assert artifact["gates"] == {"passed": True, "failed": [], "limits": {
        "max_mean_kld": 0.05, "min_same_top1": 0.85, "max_ppl_ratio": 1.1}}
    assert (out / "report.md").read_text().count("| mlx 4bit-g64 |") == 1
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # no temporary files left behind
    assert not [p for p in out.rglob("*") if ".partial" in p.name or ".tmp-" in p.name]


def test_timings_say_where_the_time_went(demo_run):
    tmp_path, _ = demo_run
    timings = json.loads((tmp_path / "out" / "timings.json").read_text())
    assert timings["schema"] == 1
    stages = timings["stages"]
    # calibrate: the residual stream's range, from which the MLX target takes its float type
    assert set(stages) == {"calibrate", "convert", "convert.mlx", "reference", "validate.mlx 4bit-g64", "validate",
                           "release"}
    convert = stages["convert"]
    assert 0 < stages["convert.mlx"]["busy_s"] <= convert["wall_s"] and convert["cpu_s"] > 0
    assert convert["peak_rss_mb"] > 100 and stages["convert.mlx"]["bytes"] > 1 << 20
    assert stages["validate.mlx 4bit-g64"]["wall_s"] > 0 and stages["validate.mlx 4bit-g64"]["peak_rss_mb"] > 0
    # validation as a whole: the runs' overlap and the memory budget they shared
    assert stages["validate"]["wall_s"] >= stages["validate.mlx 4bit-g64"]["wall_s"]
    assert stages["validate"]["memory_budget_mb"] > 0 and stages["validate"]["most_at_once"] >= 1
    # the reference logits were made in the calibration's forward (each layer read once): validation loads them
    assert stages["calibrate"]["with_reference"] is True and stages["reference"]["cached"] is True
    reference = json.loads((tmp_path / "out" / "report.json").read_text())["reference"]
    assert "in the calibration's pass" in reference["method"] and reference["peak_rss_mb"] > 0


def test_mlx_artifact_opens_with_mlx_lm(demo_run):
    from mlx_lm import load

    tmp_path, _ = demo_run
    (folder,) = (tmp_path / "out" / "artifacts").glob("*-mlx-*")
    _, tokenizer = load(str(folder))
    assert tokenizer.encode("hello", add_special_tokens=False)


def test_two_mlx_targets_differing_only_in_dtype_are_both_written_and_validated(demo_model, tmp_path):
    recipe = write_recipe(tmp_path, demo_model, targets=[
        {"format": "mlx", "bits": 4, "dtype": "float16"}, {"format": "mlx", "bits": 4, "dtype": "bfloat16"}],
        validate={"tokens": 128, "context": 64, "latency": False})
    result = run("recipe", recipe)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [(a["quant"], a["float_type"]["dtype"]) for a in report["artifacts"]] == [
        ("4bit-g64-fp16", "float16"), ("4bit-g64-bf16", "bfloat16")]
    assert all(a["runtime"] == "mlx" and a["gates"]["passed"] for a in report["artifacts"])
    assert sorted(p.name.rpartition("-4bit-")[2] for p in (tmp_path / "out" / "release").iterdir()) == ["bf16", "fp16"]
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "- mlx 4bit-g64-bf16: bfloat16, as the recipe's dtype asks" in markdown


def test_a_failing_gate_exits_1_and_names_everything(demo_run, demo_model):
    tmp_path, _ = demo_run
    strict = tmp_path / "strict"
    strict.mkdir()
    recipe = write_recipe(strict, demo_model, validate={
        "tokens": 128, "context": 64, "latency": False, "gates": {"max_mean_kld": 1e-9}})
    result = run("recipe", recipe)
    assert result.returncode == 1, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert "mlx 4bit-g64" in line and "mean_kld" in line and "1e-09" in line
    report = json.loads((strict / "out" / "report.json").read_text())
    assert report["passed"] is False
    assert not list((strict / "out" / "release").glob("*"))  # a failed artifact is not released
    assert report["artifacts"][0]["gates"]["failed"][0]["metric"] == "mean_kld"


def test_validate_command_scores_an_existing_artifact(demo_run, demo_model):
    tmp_path, _ = demo_run
    (folder,) = (tmp_path / "out" / "artifacts").glob("*-mlx-*")
    result = run("validate", folder, "--source", demo_model, "--output", tmp_path / "v", "--tokens", 128,
                 "--context", 64, "--no-latency")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "v" / "report.json").read_text())
    assert report["artifacts"][0]["format"] == "mlx" and report["artifacts"][0]["quant"] == "4bit-g64"
    assert report["artifacts"][0]["latency"] is None  # --no-latency


def test_inspect_doctor_version_and_check(demo_run, demo_model):
    tmp_path, _ = demo_run
    described = json.loads(run("inspect", demo_model).stdout)
    assert described["kind"] == "checkpoint" and described["spec"]["family"] == "mistral"
    (folder,) = (tmp_path / "out" / "artifacts").glob("*-mlx-*")
    assert json.loads(run("inspect", folder).stdout)["format"] == "mlx"
    doctor = run("doctor")
    assert doctor.returncode == 0 and "mlx" in doctor.stdout and "llama.cpp" in doctor.stdout
    assert run("--version").stdout.strip().startswith("siliconvert")
    check = run("recipe", "--check", write_recipe(tmp_path, demo_model))
    assert check.returncode == 0 and "ok" in check.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["recipe", "missing.yaml"], "cannot read recipe"),
    (["inspect", "/nonexistent/folder"], "source not found"),
    (["validate", "."], "Missing option '--source'"),
])
def test_bad_input_is_one_line_and_exit_2(args, message):
    result = run(*args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_release_folder_verifies_and_push_dry_run_works_offline(demo_run):
    tmp_path, _ = demo_run
    (release,) = (tmp_path / "out" / "release").iterdir()
    assert release.name.endswith("-4bit")
    assert (release / "README.md").read_text().startswith("---\n")
    checked = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=release, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    pushed = run("push", release, "--repo", "someone/demo-4bit", "--dry-run")
    assert pushed.returncode == 0, pushed.stderr
    assert "config.json" in pushed.stdout and "would upload" in pushed.stdout


def test_an_fp8_source_converts_and_the_report_says_how_it_arrived(small_model, tmp_path):
    """An FP8 release (block scales beside each weight): dequantized in the stream, its F16 GGUF is the dequantized
    model exactly (the reference reads it the same way), and report.json / report.md say the source was FP8."""
    from test_checkpoint import fp8_source

    source = fp8_source(small_model(), tmp_path / "fp8", [64, 64])
    recipe = write_recipe(tmp_path, source, targets=[{"format": "gguf", "quants": ["F16"]}],
                          validate={"tokens": 256, "context": 128, "latency": False})
    result = run("recipe", recipe)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert "FP8 weights with 64×64 block scales" in report["source_info"]["quantization"]
    assert report["artifacts"][0]["metrics"]["mean_kld"] < 1e-4
    assert "arrived quantized: FP8 weights" in (tmp_path / "out" / "report.md").read_text()
