"""Release folders, on a fake report and fake artifact files: no conversion, no network."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from releases import HUB_ID, MODEL, RECIPE_TEXT, entry, snapshot

from siliconvert.commands.push import repo_for
from siliconvert.commands.release import front_matter, write_releases
from siliconvert.formats.coreml import MANIFEST as COREML_MANIFEST
from siliconvert.recipe import Recipe, load_recipe, parse_recipe

RECIPES = Path(__file__).parent.parent / "recipes"


def card_of(folder: Path) -> tuple[dict, str]:
    text = (folder / "README.md").read_text()
    return front_matter(text), text


def test_each_format_gets_its_hub_layout(build):
    report, checkpoint, out = build
    folders = write_releases(report, RECIPE_TEXT, checkpoint, out)
    release = out / "release"
    assert folders == [release / f"{MODEL}-4bit", release / f"{MODEL}-GGUF", release / f"{MODEL}-CoreML"]
    assert set(snapshot(folders[0])) == {"config.json", "model.safetensors", "model.safetensors.index.json",
                                         "tokenizer.json", "tokenizer_config.json", "plot.png", "README.md",
                                         "SHA256SUMS"}
    assert set(snapshot(folders[1])) == {f"{MODEL}-Q4_K_M.gguf", f"{MODEL}-Q8_0.gguf", "plot.png", "README.md",
                                         "SHA256SUMS"}
    assert set(snapshot(folders[2])) >= {"chunk_01.mlpackage/Data/com.apple.CoreML/weights/weight.bin",
                                         "manifest.json", "tokenizer.json", "tokenizer_config.json"}
    assert all(Path(a["path"]).exists() for a in report["artifacts"])  # linked or copied, never moved
    # Release files are hard links where possible: writing the card must not write through one.
    assert (out / "artifacts" / f"{MODEL}-mlx-4bit-g64" / "README.md").read_text() == "the artifact's own card"
    assert not [p for p in release.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_card_front_matter_and_validation_table(build):
    report, checkpoint, out = build
    mlx, gguf, coreml = write_releases(report, RECIPE_TEXT, checkpoint, out)
    meta, text = card_of(mlx)
    assert meta["base_model"] == HUB_ID and meta["base_model_relation"] == "quantized"
    assert meta["library_name"] == "mlx" and meta["pipeline_tag"] == "text-generation"
    assert meta["license"] == "apache-2.0" and "mlx" in meta["tags"]
    for number in ("0.01234", "0.1875", "93.1 %", "1.0213", "812.2", "43.8", "CPU, 16 threads",
                   "float32 (upcast)", "builtin, 1024 tokens", "mlx_lm.generate"):
        assert number in text, number
    assert RECIPE_TEXT.strip() in text and "![" in text
    assert "decoding through its KV cache to stay with the no-cache pass" in text
    assert "by no more than 0.25 × what quantization moved them at those positions, or 0.001 where" in text
    gguf_meta, gguf_text = card_of(gguf)
    assert gguf_meta["library_name"] == "gguf"
    assert "0.02468" in gguf_text and "0.00135" in gguf_text and "llama-cli -m" in gguf_text
    assert "Q2_K: mean_kld 0.9 > 0.05" in gguf_text  # left out, and the card says why
    coreml_meta, coreml_text = card_of(coreml)
    assert coreml_meta["library_name"] == "coreml" and "import CoreML" in coreml_text
    assert "2048 tokens" in coreml_text and "key_cache, value_cache" in coreml_text and "emulated" in coreml_text


def test_sha256sums_verify_with_coreutils(build):
    report, checkpoint, out = build
    for folder in write_releases(report, RECIPE_TEXT, checkpoint, out):
        listed = (folder / "SHA256SUMS").read_text().splitlines()
        assert len(listed) == len(snapshot(folder)) - 1
        result = subprocess.run(["sha256sum", "-c", "--strict", "SHA256SUMS"], cwd=folder, capture_output=True,
                                text=True)
        assert result.returncode == 0, result.stdout + result.stderr


def test_failed_artifact_gets_no_folder_unless_forced(build, capsys, monkeypatch):
    monkeypatch.delenv("SILICONVERT_QUIET", raising=False)  # the reason is a status line; CI runs quiet
    report, checkpoint, out = build
    write_releases(report, RECIPE_TEXT, checkpoint, out)
    assert not (out / "release" / f"{MODEL}-8bit").exists()
    assert "not released: mlx 8bit-g64 failed its gates (mlx 8bit-g64: mean_kld" in capsys.readouterr().err

    forced = write_releases(report, RECIPE_TEXT, checkpoint, out, force=True)
    assert out / "release" / f"{MODEL}-8bit" in forced
    meta, text = card_of(out / "release" / f"{MODEL}-8bit")
    lines = text.splitlines()
    assert lines[1].startswith("# WARNING") and "mean_kld, same_top1" in lines[1]
    body = text.split("\n---\n", 1)[1].lstrip()
    assert body.startswith("> **WARNING") and "mlx 8bit-g64: same_top1 0.9 > 0.05" in body.splitlines()[0]
    assert meta["base_model"] == HUB_ID  # the comment leaves the front matter valid
    assert f"{MODEL}-Q2_K.gguf" in snapshot(out / "release" / f"{MODEL}-GGUF")

    write_releases(report, RECIPE_TEXT, checkpoint, out)  # without force the stale release goes away
    assert not (out / "release" / f"{MODEL}-8bit").exists()
    assert f"{MODEL}-Q2_K.gguf" not in snapshot(out / "release" / f"{MODEL}-GGUF")


def test_same_inputs_give_byte_identical_folders(build):
    report, checkpoint, out = build
    first = {f.name: snapshot(f) for f in write_releases(report, RECIPE_TEXT, checkpoint, out)}
    second = {f.name: snapshot(f) for f in write_releases(report, RECIPE_TEXT, checkpoint, out)}
    assert first == second


def test_copies_when_hard_links_fail(build, monkeypatch):
    report, checkpoint, out = build
    linked = {f.name: snapshot(f) for f in write_releases(report, RECIPE_TEXT, checkpoint, out)}

    def cross_device(*args):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr("siliconvert.commands.release.os.link", cross_device)
    copied = write_releases(report, RECIPE_TEXT, checkpoint, out)
    assert {f.name: snapshot(f) for f in copied} == linked
    assert (copied[1] / f"{MODEL}-Q8_0.gguf").stat().st_nlink == 1


def test_repo_prefix_names_repos_and_files(build):
    report, checkpoint, out = build
    folders = write_releases(report, RECIPE_TEXT, checkpoint, out, repo_prefix="acme/Mistral-7B")
    assert [f.name for f in folders] == ["Mistral-7B-4bit", "Mistral-7B-GGUF", "Mistral-7B-CoreML"]
    assert "Mistral-7B-Q8_0.gguf" in snapshot(folders[1])
    assert "--model acme/Mistral-7B-4bit" in card_of(folders[0])[1]
    assert "llama-cli -hf acme/Mistral-7B-GGUF:Q4_K_M" in card_of(folders[1])[1]
    assert repo_for(folders[1], "acme/Mistral-7B") == "acme/Mistral-7B-GGUF"


def test_single_coreml_package_gets_a_manifest_from_its_spec(build):
    report, checkpoint, out = build
    package = tiny_stateful_package(out / "artifacts" / f"{MODEL}-fp16.mlpackage")
    report["artifacts"] = [entry("coreml", "fp16", package)]
    (folder,) = write_releases(report, RECIPE_TEXT, checkpoint, out)
    manifest = json.loads((folder / COREML_MANIFEST).read_text())
    assert manifest["context_length"] == 2048
    (described,) = manifest["packages"]
    assert described["package"] == f"{MODEL}-fp16.mlpackage"
    function = described["functions"]["main"]
    assert function["inputs"] == {"input_ids": {"shape": [1, 4], "dtype": "INT32"}}
    assert function["states"] == {"key_cache": {"shape": [1, 2, 8], "dtype": "FLOAT16"}}
    assert "tokenizer.json" in snapshot(folder)
    assert COREML_MANIFEST in card_of(folder)[1]


def tiny_stateful_package(path: Path) -> Path:
    import logging

    logging.getLogger("coremltools").setLevel(logging.ERROR)
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    @mb.program(input_specs=[mb.TensorSpec((1, 4), dtype=types.int32),
                             mb.StateTensorSpec((1, 2, 8), dtype=types.fp16)], opset_version=ct.target.iOS18)
    def program(input_ids, key_cache):
        cache = mb.read_state(input=key_cache)
        mb.coreml_update_state(state=key_cache, value=cache)
        return mb.add(x=mb.cast(x=input_ids, dtype="fp16"), y=mb.reduce_sum(x=cache), name="logits")

    model = ct.convert(program, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                       skip_model_load=True)
    model.save(str(path))
    return path


@pytest.mark.parametrize("name", ["mistral-7b", "llama-3.2-1b", "qwen2.5-0.5b"])
def test_hub_recipes_parse(name):
    path = RECIPES / f"{name}.yaml"
    data = yaml.safe_load(path.read_text())
    assert "/" in data["source"] and data["release"]["push"] is False
    if "release" not in Recipe.model_fields:  # the lead adds the `release` key; until then check the rest
        data.pop("release")
        recipe = parse_recipe(data, path)
    else:
        recipe = load_recipe(path)
        assert recipe.release.repo_prefix.endswith(data["source"].split("/")[1])
    assert {t.format for t in recipe.targets} == {"mlx", "gguf", "coreml"}
    coreml = next(t for t in recipe.targets if t.format == "coreml")
    assert coreml.context == 2048 and coreml.chunks == "auto"
    assert recipe.validate_.context <= coreml.context


def test_digests_hashed_ahead_follow_the_bytes_a_folder_links(tmp_path):
    """A digest taken ahead is reused through a hard link, and not for a file replaced by rename (the way writers
    replace files) since it was hashed."""
    import hashlib
    import os

    from siliconvert.commands.release import Digests

    artifact = tmp_path / "artifact"
    artifact.mkdir()
    (artifact / "weights.bin").write_bytes(b"a" * 3_000_000)
    (artifact / ".cache").write_bytes(b"not released")
    digests = Digests(workers=2)
    try:
        digests.ahead([artifact])
        assert len(digests._futures) == 1  # the hidden file is left out, as release folders leave it
        linked = tmp_path / "release-weights.bin"
        os.link(artifact / "weights.bin", linked)
        assert digests.of([linked]) == [hashlib.sha256(b"a" * 3_000_000).hexdigest()]
        assert len(digests._futures) == 1  # the link is the same file: hashed once
        fresh = tmp_path / "fresh.bin"
        fresh.write_bytes(b"b" * 3_000_001)
        os.replace(fresh, artifact / "weights.bin")
        assert digests.of([artifact / "weights.bin"]) == [hashlib.sha256(b"b" * 3_000_001).hexdigest()]
    finally:
        digests.close()


def test_a_stopped_digest_stops_between_chunks(tmp_path):
    import threading

    from siliconvert.commands.release import DigestStopped, sha256_file

    big = tmp_path / "big.bin"
    big.write_bytes(bytes(3 << 20))
    stop = threading.Event()
    stop.set()
    with pytest.raises(DigestStopped):
        sha256_file(big, stop)
