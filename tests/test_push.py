"""Pushing a release folder: checked against its SHA256SUMS, offline on a dry run, one-line errors that never
show the token."""

from __future__ import annotations

import os

import pytest
from releases import MODEL, RECIPE_TEXT, snapshot

from siliconvert.commands.push import PushError, push, refusal, repo_for
from siliconvert.commands.release import write_releases
from siliconvert.errors import ArtifactError


@pytest.fixture
def no_network(monkeypatch):
    """Every huggingface_hub call that could reach the network or read the token fails the test."""
    import huggingface_hub

    def refuse(*args, **kwargs):
        raise AssertionError("touched the network or the token")

    for name in ("create_repo", "upload_folder", "whoami"):
        monkeypatch.setattr(huggingface_hub.HfApi, name, refuse)
    monkeypatch.setattr(huggingface_hub, "get_token", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_push_dry_run_lists_files_offline(build, no_network):
    report, checkpoint, out = build
    folder = write_releases(report, RECIPE_TEXT, checkpoint, out)[1]
    listing = push(folder, "acme/Mistral-GGUF", dry_run=True)
    size = (folder / f"{MODEL}-Q8_0.gguf").stat().st_size
    assert f"{MODEL}-Q8_0.gguf ({size:,} bytes)" in listing
    assert {line.split(" (")[0] for line in listing} == set(snapshot(folder))


def test_push_refuses_a_changed_folder_and_bad_repo_ids(build, no_network):
    report, checkpoint, out = build
    folder = write_releases(report, RECIPE_TEXT, checkpoint, out)[0]
    with pytest.raises(PushError, match="not a valid Hub repo id"):
        push(folder, "acme/bad name", dry_run=True)
    (folder / "config.json").write_text("{}")
    with pytest.raises(ArtifactError, match=r"config\.json does not match"):
        push(folder, "acme/Mistral-4bit", dry_run=True)
    with pytest.raises(ArtifactError, match="not a release folder"):
        push(out / "artifacts", "acme/Mistral-4bit", dry_run=True)


def test_push_errors_are_one_line(build, monkeypatch):
    import httpx2
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError

    report, checkpoint, out = build
    folder = write_releases(report, RECIPE_TEXT, checkpoint, out)[0]
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(PushError, match="not logged in"):
        push(folder, "acme/Mistral-4bit")

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_secret_never_shown")
    request = httpx2.Request("POST", "https://huggingface.co/api/repos/create")

    def offline(*args, **kwargs):
        raise httpx2.ConnectError("no route", request=request)

    def forbidden(*args, **kwargs):
        raise HfHubHTTPError("403 Forbidden", response=httpx2.Response(403, request=request))

    for failure, message in ((offline, "cannot reach the Hugging Face Hub"), (forbidden, "HTTP 403")):
        monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", failure)
        with pytest.raises(PushError, match=message) as raised:
            push(folder, "acme/Mistral-4bit")
        assert "\n" not in str(raised.value) and "hf_secret" not in str(raised.value)


def test_refusals_say_what_the_hub_meant():
    from types import SimpleNamespace

    def http_error(status: int, server_message: str | None = None):
        return SimpleNamespace(response=SimpleNamespace(status_code=status), server_message=server_message)

    assert "rejected the token (HTTP 401)" in refusal(http_error(401), "acme/x")
    assert refusal(http_error(403), "acme/x") == ("the Hub refused: this token cannot write to acme/x (HTTP 403; "
                                                  "a write token is needed)")
    assert refusal(http_error(409, "Repo is locked\nmore"), "acme/x") == \
        "the Hub refused the upload (HTTP 409): Repo is locked"


def test_a_release_folder_goes_to_the_prefixs_org_under_its_own_name(tmp_path):
    assert repo_for(tmp_path / "release" / "Mistral-7B-GGUF", "acme/Mistral-7B") == "acme/Mistral-7B-GGUF"


def _relisted(folder, *lines: bytes) -> None:
    """SHA256SUMS written again over what the folder holds now (links followed, as sha256sum does), plus `lines`."""
    from siliconvert.commands.release import CHECKSUMS, release_files, sha256_file

    names = [name for name in release_files(folder) if name != CHECKSUMS]
    (folder / CHECKSUMS).write_bytes(b"".join(f"{sha256_file(folder / n)}  {n}\n".encode() for n in names)
                                     + b"".join(lines))


def _link_to_a_secret(folder, tmp_path):
    (tmp_path / "id_ed25519").write_text("PRIVATE KEY")
    (folder / "id_ed25519").symlink_to(tmp_path / "id_ed25519")
    _relisted(folder)


def _link_to_a_folder(folder, tmp_path):
    (tmp_path / "ssh").mkdir()
    (tmp_path / "ssh" / "id_ed25519").write_text("PRIVATE KEY")
    (folder / "extra").symlink_to(tmp_path / "ssh", target_is_directory=True)
    _relisted(folder)


def _duplicate_entry(folder, _tmp_path):
    sums = folder / "SHA256SUMS"
    sums.write_bytes(sums.read_bytes() + sums.read_bytes().splitlines(keepends=True)[0])


def _not_utf8(folder, _tmp_path):
    _relisted(folder, b"\xff\xfe  config.json\n")


def _card_a_folder(folder, _tmp_path):
    (folder / "README.md").unlink()
    (folder / "README.md").mkdir()


def _not_a_checksum_line(folder, _tmp_path):
    _relisted(folder, b"hello world\n")


# (id, damage to a release folder, what the one error line says)
PUSH_CASES = [
    ("link-to-a-file-outside", _link_to_a_secret, "id_ed25519 is a symbolic link"),
    ("link-to-a-folder-outside", _link_to_a_folder, "extra is a symbolic link"),
    ("sums-duplicate-entry", _duplicate_entry, "is listed twice"),
    ("sums-not-utf8", _not_utf8, "SHA256SUMS: line 8 is not UTF-8 text"),
    ("sums-malformed-line", _not_a_checksum_line, "SHA256SUMS: line 8 is not `<sha256>  <file>`"),
    ("a-fifo-in-the-folder", lambda folder, _tmp: os.mkfifo(folder / "extra"), "extra is not a regular file or folder"),
    ("card-replaced-by-a-folder", _card_a_folder, "files differ from SHA256SUMS (added or missing: README.md)"),
]


@pytest.mark.parametrize(("case", "damage", "message"), PUSH_CASES, ids=[c[0] for c in PUSH_CASES])
def test_push_uploads_the_folder_and_nothing_else(case, damage, message, build, no_network, tmp_path, capsys):
    """Through the command: one line, exit 2, and nothing listed for upload."""
    from siliconvert.commands.cli import main

    report, checkpoint, out = build
    folder = write_releases(report, RECIPE_TEXT, checkpoint, out)[0]
    damage(folder, tmp_path)
    with pytest.raises(SystemExit) as exited:
        main(["push", str(folder), "--repo", "acme/Mistral-4bit", "--dry-run"])
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert exited.value.code == 2 and len(errors) == 1 and message in errors[0], captured.err
    assert captured.out == "" and "Traceback" not in captured.err
