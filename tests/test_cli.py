"""The command line as a shell: exit codes (0 ok, 1 a gate failed, 2 bad input, 3 internal), one-line errors,
and the commands that only print (inspect, doctor, --version)."""

from __future__ import annotations

import json

import pytest

from siliconvert import __version__
from siliconvert.artifacts import Artifact
from siliconvert.commands import inspect
from siliconvert.commands.cli import INTERNAL_ERROR, main
from siliconvert.errors import CheckpointError, GateFailed


def exit_code(*args: str) -> int:
    with pytest.raises(SystemExit) as exited:
        main(list(args))
    return exited.value.code


def test_version_and_help_exit_cleanly(capsys):
    main(["--version"])
    assert __version__ in capsys.readouterr().out
    main(["--help"])
    assert "recipe" in capsys.readouterr().out


def test_a_usage_error_exits_2(capsys):
    assert exit_code("inspect") == 2
    assert "Missing argument 'PATH'" in capsys.readouterr().err
    assert exit_code("no-such-command") == 2


@pytest.mark.parametrize(("error", "code"), [(CheckpointError("bad header", "model.safetensors"), 2),
                                             (GateFailed("release stopped: mlx 4bit: mean_kld 0.9 > 0.05"), 1)])
def test_our_errors_are_one_line_with_their_exit_code(monkeypatch, capsys, error, code):
    def fail(path):
        raise error

    monkeypatch.setattr(inspect, "describe", fail)
    assert exit_code("inspect", "x") == code
    captured = capsys.readouterr()
    assert captured.err == f"error: {error}\n" and captured.out == ""


def test_an_internal_error_says_so_and_debug_shows_the_traceback(monkeypatch, capsys):
    def fail(path):
        raise KeyError("spec")

    monkeypatch.setattr(inspect, "describe", fail)
    assert exit_code("inspect", "x") == INTERNAL_ERROR
    assert capsys.readouterr().err == "internal error: KeyError: 'spec' (run with --debug for the traceback)\n"
    with pytest.raises(KeyError):
        main(["--debug", "inspect", "x"])
    with pytest.raises(KeyError):  # the hint works as written: after the command too
        main(["inspect", "x", "--debug"])


def test_validate_without_a_release_says_gate_failed(monkeypatch, tmp_path, capsys):
    from siliconvert.commands import pipeline

    artifact = tmp_path / "model-Q4_K_M.gguf"
    artifact.write_bytes(b"")
    failed = {"artifacts": [{"gates": {"failed": [{"message": "gguf Q4_K_M: mean_kld 0.9 > 0.05"}]}}]}
    monkeypatch.setattr("siliconvert.format.detect_artifact", lambda path: Artifact("gguf", "Q4_K_M", path))
    monkeypatch.setattr(pipeline, "open_source", lambda source: None)
    monkeypatch.setattr(pipeline, "check_positions", lambda *args: None)
    monkeypatch.setattr(pipeline, "validate_artifacts", lambda *args: failed)
    assert exit_code("validate", str(artifact), "--source", "x", "--output", str(tmp_path / "out")) == 1
    assert capsys.readouterr().err == "error: gate failed: gguf Q4_K_M: mean_kld 0.9 > 0.05\n"


def test_inspect_prints_the_description_as_json(random_llama, capsys):
    main(["inspect", str(random_llama)])
    described = json.loads(capsys.readouterr().out)
    assert described["kind"] == "checkpoint" and described["name"] == random_llama.name


def test_doctor_lists_each_runtime(monkeypatch, capsys):
    monkeypatch.setattr(inspect, "runtimes", lambda: {"mlx": "not installed", "llama.cpp": "CPU only"})
    main(["doctor"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"siliconvert {__version__} · Python ")
    assert lines[2:] == [f"  {'mlx':<14} not installed", f"  {'llama.cpp':<14} CPU only"]
