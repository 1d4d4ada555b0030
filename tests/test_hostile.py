"""A catalogue of hostile and corrupt inputs, each through the real CLI entry point (`siliconvert.commands.cli.main`,
in-process; its exception handling is what a user meets): exit 2, exactly one `error:` line naming the file
and the problem, no traceback, and nothing under the output folder that looks finished. Every case breaks one
thing in a copy of a tiny checkpoint built once per session (one file, or the same weights in shards)."""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from hostile_cases import CASES


@pytest.fixture(scope="session")
def tiny(random_llama, tmp_path_factory) -> Path:
    """random_llama with a whitespace word tokenizer (so a corpus has as many tokens as words)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = tmp_path_factory.mktemp("hostile") / "tiny"
    shutil.copytree(random_llama, folder)
    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(96)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture(scope="session")
def tiny_sharded(tiny, tmp_path_factory) -> Path:
    """The same weights in shards of a few KB, with a model.safetensors.index.json."""
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("hostile-sharded") / "tiny-sharded"
    AutoModelForCausalLM.from_pretrained(tiny).save_pretrained(folder, max_shard_size="20KB")
    for file in tiny.glob("tokenizer*"):
        shutil.copy(file, folder)
    assert len(list(folder.glob("*.safetensors"))) > 1
    return folder


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str


def siliconvert(capsys, *args: str) -> Run:
    """`siliconvert ARGS` in this process, with a 30 s alarm: a case that would hang (a FIFO read) fails."""
    from siliconvert.commands.cli import main

    def hung(*_args):
        raise TimeoutError("the command hung")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(30)
    try:
        main(list(args))
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    captured = capsys.readouterr()
    return Run(code, captured.out, captured.err)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_catalogue(case, tiny, tiny_sharded, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SILICONVERT_QUIET", "1")
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_sharded if case.sharded else tiny, folder, symlinks=True)
    recipe = {"source": str(folder), "output": str(tmp_path / "out"), "targets": [{"format": "mlx"}],
              "validate": {"enabled": False}}
    recipe_file = tmp_path / "recipe.yaml"
    raw = case.damage(folder, recipe)
    if raw is not None:
        recipe_file.write_bytes(raw)
    elif not os.path.lexists(recipe_file):  # unless the case put a folder, FIFO or link there
        recipe_file.write_text(yaml.safe_dump(recipe))
    run = siliconvert(capsys, "recipe", str(recipe_file), *case.flags)
    assert_refused(run, case.where, case.message, tmp_path / "out")


def assert_refused(run: Run, where: str, message: str, out_dir: Path) -> None:
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert run.code == 2, run.stderr
    assert len(errors) == 1, run.stderr
    assert where in errors[0].split(": ")[1] and message in errors[0], errors[0]
    assert "Traceback" not in run.stderr and "internal error" not in run.stderr
    artifacts = out_dir / "artifacts"
    # hidden names are a killed or refused run's leftovers, swept by the next run; a visible one looks finished
    finished = [p for p in artifacts.iterdir() if not p.name.startswith(".")] if artifacts.exists() else []
    assert not finished and not (out_dir / "report.json").exists() and not (out_dir / "release").exists()


def test_catalogue_size_by_kind():
    """The issue asks for at least 100 cases; the closing note quotes this count by kind."""
    kinds = Counter(case.kind for case in CASES)
    print(dict(kinds))
    assert sum(kinds.values()) >= 100
    assert len({case.id for case in CASES}) == len(CASES)


def test_check_runs_the_same_checks_without_converting(tiny, tmp_path, capsys, monkeypatch):
    """`recipe --check` opens the real source and runs every pre-pass check, and writes nothing."""
    monkeypatch.chdir(tmp_path)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("w1 w2 w3")
    recipe = {"source": str(tiny), "output": str(tmp_path / "out"), "targets": [{"format": "mlx"}],
              "validate": {"corpus": str(corpus), "tokens": 64, "context": 16, "latency": False}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    run = siliconvert(capsys, "recipe", "--check", str(tmp_path / "recipe.yaml"))
    assert_refused(run, "corpus.txt", "the corpus has 3 tokens", tmp_path / "out")
    corpus.write_text(" ".join(f"w{i % 96}" for i in range(200)))
    run = siliconvert(capsys, "recipe", "--check", str(tmp_path / "recipe.yaml"))
    assert run.code == 0 and "recipe.yaml: ok (1 targets" in run.stdout, run.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("options", "message"), [
    (("--context", "4"), "context: Input should be greater than or equal to 8 (got 4)"),
    (("--tokens", "8"), "tokens: Input should be greater than or equal to 16 (got 8)"),
    (("--context", "512", "--tokens", "256"), "context (512) must not exceed tokens (256)"),
])
def test_validate_command_options_are_one_line(tiny, tmp_path, capsys, options, message):
    """`siliconvert validate`'s options are checked before anything is opened (they once ended in exit 3)."""
    run = siliconvert(capsys, "validate", str(tiny), "--source", str(llama), "--output", str(tmp_path / "out"),
                      *options)
    assert_refused(run, "command line", message, tmp_path / "out")


def test_model_type_stands_in_for_architectures(tiny, tmp_path, capsys, monkeypatch):
    """A config without `architectures` converts by its model_type, as transformers loads it, with a warning."""
    monkeypatch.setenv("SILICONVERT_QUIET", "1")
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny, folder)
    config = json.loads((folder / "config.json").read_text())
    del config["architectures"]
    (folder / "config.json").write_text(json.dumps(config))
    recipe = {"source": str(folder), "output": str(tmp_path / "out"), "targets": [{"format": "mlx"}],
              "validate": {"enabled": False}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    run = siliconvert(capsys, "recipe", str(tmp_path / "recipe.yaml"))
    assert run.code == 0, run.stderr
    assert "no 'architectures' field; read as LlamaForCausalLM from model_type 'llama'" in run.stderr
    (artifact,) = (tmp_path / "out" / "artifacts").glob("*4bit*")
    assert json.loads((artifact / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


# ---- memory: a config number may not cost more than the files ------------------------------------------

CHILD = """
import json, resource, sys
import siliconvert.commands.cli, siliconvert.commands.pipeline, siliconvert.corpus
from transformers import AutoTokenizer  # imported before the limit: the limit is for the command's own work

def status(key):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key + ":"))

limit = status("VmSize") * 1024 + (1 << 30)  # 1 GiB of address space beyond what the imports took
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
before, codes = status("VmHWM"), []
for recipe in sys.argv[1:]:
    try:
        siliconvert.commands.cli.main(["recipe", "--check", recipe])
        codes.append(0)
    except SystemExit as e:
        codes.append(e.code)
print(json.dumps({"codes": codes, "grew_kb": status("VmHWM") - before}))
"""


def test_a_huge_config_number_cannot_raise_peak_memory(tiny, tmp_path):
    """num_hidden_layers 10⁹ beside 2 layers once grew past 6.7 GB. Now hostile numbers are refused, and a child
    that checks them all peaks no higher than one that checks the good checkpoint. The children run under an
    address-space limit, so a regression is a MemoryError (exit 3), not a machine out of memory."""
    import subprocess
    import sys

    def recipe_for(changes: dict) -> str:
        folder = tmp_path / f"ckpt-{len(list(tmp_path.glob('ckpt-*')))}"
        shutil.copytree(tiny, folder)
        config = json.loads((folder / "config.json").read_text()) | changes
        (folder / "config.json").write_text(json.dumps(config))
        recipe = folder.with_suffix(".yaml")
        recipe.write_text(yaml.safe_dump({"source": str(folder), "output": str(tmp_path / "out"),
                                          "targets": [{"format": "mlx"}], "validate": {"enabled": False}}))
        return str(recipe)

    def check(*recipes: str) -> tuple[dict, str]:
        child = subprocess.run([sys.executable, "-c", CHILD, *recipes], capture_output=True, text=True,
                               timeout=300, env={**os.environ, "SILICONVERT_QUIET": "1"})
        assert child.stdout.strip(), f"the child died (exit {child.returncode}): {child.stderr[-2000:]}"
        return json.loads(child.stdout.strip().splitlines()[-1]), child.stderr

    baseline, stderr = check(recipe_for({}))
    assert baseline["codes"] == [0], stderr
    hostile = [({"num_hidden_layers": 10**9}, "the weights hold 2 layers"),
               ({"vocab_size": 10**9}, "larger than any tensor dimension"),
               ({"intermediate_size": 10**12}, "larger than any tensor dimension")]
    # the largest max_position_embeddings accepted is only a number: nothing is sized by it (exit 0)
    checked, stderr = check(*[recipe_for(changes) for changes, _ in hostile],
                            recipe_for({"max_position_embeddings": 1 << 28}))
    assert checked["codes"] == [2, 2, 2, 0], stderr
    assert all(message in stderr for _, message in hostile), stderr
    assert checked["grew_kb"] <= baseline["grew_kb"] + 16 * 1024, (checked, baseline)


# ---- a real full disk --------------------------------------------------------------------------------

def mounted_tmpfs(folder: Path, options: str):
    """A tmpfs mounted at `folder` for the test (the tests run as root); skipped where mounting is not allowed."""
    import subprocess

    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (test_bad_input's simulated full disk covers a full one)")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


@pytest.fixture
def small_tmpfs(tmp_path) -> Path:
    yield from mounted_tmpfs(tmp_path / "tmpfs", "size=2m")


@pytest.fixture
def read_only_tmpfs(tmp_path) -> Path:
    yield from mounted_tmpfs(tmp_path / "read-only", "ro,size=1m")


def test_read_only_output_is_refused_before_the_pass(tiny, read_only_tmpfs, tmp_path, capsys, monkeypatch):
    """Root may write anywhere but on a read-only file system: found by the pre-pass checks, not by a writer."""
    monkeypatch.setenv("SILICONVERT_QUIET", "1")
    recipe = {"source": str(tiny), "output": str(read_only_tmpfs / "out"), "targets": [{"format": "mlx"}],
              "validate": {"enabled": False}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    run = siliconvert(capsys, "recipe", "--check", str(tmp_path / "recipe.yaml"))
    assert_refused(run, "read-only/out", f"({read_only_tmpfs} is not writable)", read_only_tmpfs / "out")


def test_real_full_disk(tiny, small_tmpfs, tmp_path, capsys, monkeypatch):
    """The output on a tmpfs with 16 KiB left: the write fails with ENOSPC, one line, nothing finished."""
    monkeypatch.setenv("SILICONVERT_QUIET", "1")
    filler = small_tmpfs / "filler"
    with filler.open("wb") as f:
        f.write(bytes(os.statvfs(small_tmpfs).f_bavail * os.statvfs(small_tmpfs).f_frsize - (16 << 10)))
    recipe = {"source": str(tiny), "output": str(small_tmpfs / "out"), "targets": [{"format": "mlx", "bits": 16}],
              "validate": {"enabled": False}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    run = siliconvert(capsys, "recipe", str(tmp_path / "recipe.yaml"))
    assert_refused(run, "out", "no space left", small_tmpfs / "out")



# ---- damaged artifacts: `validate` and `inspect` check an artifact's structure before any runtime loads it ----

@pytest.fixture(scope="session")
def llama(small_model) -> Path:
    """A small Llama with a SentencePiece tokenizer every format can carry (hidden 192, vocabulary 512)."""
    return small_model("llama", "sentencepiece")


@pytest.fixture(scope="session")
def built_artifacts(llama, tmp_path_factory) -> dict[str, Path]:
    """One artifact of each format, converted once from `llama`."""
    from siliconvert.commands.cli import main

    folder = tmp_path_factory.mktemp("artifacts")
    recipe = {"source": str(llama), "output": str(folder / "out"), "validate": {"enabled": False},
              "targets": [{"format": "mlx"}, {"format": "gguf", "quants": ["Q8_0"]},
                          {"format": "coreml", "context": 64}]}
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    os.environ["SILICONVERT_QUIET"] = "1"
    try:
        main(["recipe", str(folder / "recipe.yaml")])
    except SystemExit as e:
        assert e.code == 0
    finally:
        del os.environ["SILICONVERT_QUIET"]
    found = {}
    for path in (folder / "out" / "artifacts").glob("[!.]*"):  # not .stamps
        kind = "gguf" if path.suffix == ".gguf" else "coreml" if "coreml" in path.name else "mlx"
        found[kind] = path
    assert set(found) == {"mlx", "gguf", "coreml"}, found
    return found


def _mlx_tensor(name: str, change):
    def damage(artifact: Path) -> None:
        import mlx.core as mx

        shard = next(artifact.glob("model*.safetensors"))
        tensors = mx.load(str(shard))
        tensors[name] = change(tensors[name])
        mx.save_safetensors(str(shard), tensors, metadata={"format": "mlx"})
    return damage


def _gguf_tensor_count(change: int):
    def damage(artifact: Path) -> None:
        raw = bytearray(artifact.read_bytes())
        count = int.from_bytes(raw[8:16], "little")
        raw[8:16] = (count + change).to_bytes(8, "little")
        artifact.write_bytes(bytes(raw))
    return damage


def _write(relative: str, text: bytes):
    return lambda artifact: (artifact / relative).write_bytes(text)


def _unlink(relative: str):
    return lambda artifact: (artifact / relative).unlink()


def _package(artifact: Path) -> Path:
    return next(artifact.glob("*.mlpackage"))


# (id, format, damage, a part of the file the line names, what it says)
ARTIFACT_CASES = [
    ("mlx-no-config", "mlx", _unlink("config.json"), "mlx", "config.json is missing"),
    ("mlx-config-not-json", "mlx", _write("config.json", b"{oops"), "config.json", "not valid JSON"),
    ("mlx-norm-wrong-shape", "mlx", _mlx_tensor("model.norm.weight", lambda t: t[:-1]), "model.safetensors",
     "tensor 'model.norm.weight' has shape [127], which does not fit config.json's hidden_size 128"),
    ("mlx-embedding-rows", "mlx", _mlx_tensor("model.embed_tokens.weight", lambda t: t[:-2]), "model.safetensors",
     "has 1022 rows, but config.json's vocab_size is 1024"),
    ("mlx-shard-truncated", "mlx",
     lambda a: (a / "model.safetensors").write_bytes((a / "model.safetensors").read_bytes()[:-64]),
     "model.safetensors", "damaged safetensors shard"),
    ("gguf-truncated", "gguf", lambda a: a.write_bytes(a.read_bytes()[:-100]), ".gguf", "damaged GGUF"),
    ("gguf-claims-more-tensors", "gguf", _gguf_tensor_count(+3), ".gguf", "damaged GGUF"),
    ("gguf-foreign", "gguf", lambda a: a.write_bytes(b"PK\x03\x04" + a.read_bytes()[4:]), ".gguf",
     "not a GGUF file"),
    ("coreml-manifest-not-json", "coreml", lambda a: (_package(a) / "Manifest.json").write_bytes(b"{oops"),
     "Manifest.json", "not valid JSON"),
    ("coreml-no-weight-bin", "coreml",
     lambda a: (_package(a) / "Data/com.apple.CoreML/weights/weight.bin").unlink(), ".mlpackage",
     "weight.bin is missing"),
    ("coreml-own-manifest-not-json", "coreml", _write("manifest.json", b"\xff\xfe"), "manifest.json",
     "not valid JSON"),
    ("mlx-no-tokenizer", "mlx", lambda a: [(a / n).unlink(missing_ok=True) for n in ("tokenizer.json",
                                                                                    "tokenizer.model")],
     "mlx", "no tokenizer (neither tokenizer.json nor tokenizer.model"),
    ("mlx-config-a-folder", "mlx", lambda a: ((a / "config.json").unlink(), (a / "config.json").mkdir()), "mlx",
     "config.json is missing"),
    ("gguf-empty", "gguf", lambda a: a.write_bytes(b""), ".gguf", "not a GGUF file"),
]


@pytest.mark.parametrize("command", ["inspect", "validate"])
@pytest.mark.parametrize(("case", "kind", "damage", "where", "message"), ARTIFACT_CASES,
                         ids=[case[0] for case in ARTIFACT_CASES])
def test_damaged_artifact(case, kind, damage, where, message, command, built_artifacts, llama, tmp_path,
                          capsys, monkeypatch):
    monkeypatch.setenv("SILICONVERT_QUIET", "1")
    monkeypatch.chdir(tmp_path)
    source = built_artifacts[kind]
    artifact = tmp_path / source.name
    (shutil.copytree if source.is_dir() else shutil.copy)(source, artifact)
    damage(artifact)
    args = [str(artifact)] if command == "inspect" else [str(artifact), "--source", str(llama), "--output",
                                                         str(tmp_path / "out")]
    run = siliconvert(capsys, command, *args)
    assert_refused(run, where, message, tmp_path / "out")


@pytest.mark.parametrize("kind", ["mlx", "gguf", "coreml"])
def test_whole_artifacts_pass_the_check(kind, built_artifacts, capsys):
    run = siliconvert(capsys, "inspect", str(built_artifacts[kind]))
    assert run.code == 0 and json.loads(run.stdout)["format"] == kind, run.stderr


@pytest.mark.parametrize(("targets", "fixed", "where", "message"), [
    ([{"format": "mlx"}], "Q4_K_M", "command line", "--fixed: Q4_K_M is not a fixed recipe of the sweep (3bit-g64"),
    ([{"format": "gguf", "quants": ["Q8_0"]}], "4bit-g64,Q4_K_M", "command line",
     "--fixed: 4bit-g64 is not a fixed recipe"),
])
def test_sweep_refuses_fixed_recipes_it_has_no_target_for(targets, fixed, where, message, tiny, tmp_path, capsys,
                                                         monkeypatch):
    """Another format's fixed recipe once drew an empty front and exited 0."""
    monkeypatch.setenv("SILICONVERT_QUIET", "1")
    recipe = {"source": str(tiny), "output": str(tmp_path / "out"), "targets": targets}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    run = siliconvert(capsys, "sweep", str(tmp_path / "recipe.yaml"), *(["--fixed", fixed] if fixed else []))
    assert_refused(run, where, message, tmp_path / "out")
    assert not (tmp_path / "out" / "sweep").exists()


def test_a_size_plan_over_rows_no_block_divides(small_model, tmp_path, capsys, monkeypatch):
    """intermediate_size 200 (not a multiple of 32): ffn_down's rows fit no quantized GGUF type (a fixed quant keeps
    it F16; a plan once ended in an IndexError, exit 3). The plan pads the MLP to 224 units, so down is planned with
    the rest, under the size asked."""
    import gguf

    monkeypatch.setenv("SILICONVERT_QUIET", "1")
    source = small_model("llama", "sentencepiece", intermediate_size=200)
    recipe = {"source": str(source), "output": str(tmp_path / "out"), "validate": {"enabled": False},
              "targets": [{"format": "gguf", "quants": ["auto"], "plan": {"size_mb": 0.6}}]}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    run = siliconvert(capsys, "recipe", str(tmp_path / "recipe.yaml"))
    assert run.code == 0, run.stderr
    (artifact,) = (tmp_path / "out" / "artifacts").glob("*.gguf")
    assert artifact.stat().st_size <= 0.6e6
    tensors = {t.name: t for t in gguf.GGUFReader(artifact).tensors}
    down = tensors["blk.0.ffn_down.weight"]
    assert [int(n) for n in down.shape] == [224, 128] and down.tensor_type.name not in ("F16", "BF16", "F32")


def _edit_json(name: str, **changes):
    """Set (or, with None, remove) top-level keys of a JSON file in the checkpoint."""
    def damage(folder: Path) -> None:
        file = folder / name
        parsed = json.loads(file.read_text()) if file.exists() else {}
        for key, value in changes.items():
            parsed.pop(key, None) if value is None else parsed.__setitem__(key, value)
        file.write_text(json.dumps(parsed))
    return damage


def _all(*damages):
    return lambda folder: [damage(folder) for damage in damages]


NO_EOS = _all(_edit_json("config.json", eos_token_id=None), _edit_json("generation_config.json", eos_token_id=None),
              _edit_json("tokenizer_config.json", eos_token=None))
# (id, damage, a part of the file the line names or None for a working --check, what it says)
GGUF_TOKEN_CASES = [
    ("no-eos-anywhere", NO_EOS, "config.json", "no end-of-text token within the model's vocabulary of 1024"),
    ("eos-only-past-the-vocabulary", _all(NO_EOS, _edit_json("config.json", eos_token_id=5000)), "config.json",
     "no end-of-text token"),
    ("eos-only-in-generation-config", _all(NO_EOS, _edit_json("generation_config.json", eos_token_id=[1021, 7])),
     None, ""),
    ("add-bos-without-bos", _all(_edit_json("config.json", bos_token_id=None),
                                 _edit_json("generation_config.json", bos_token_id=None),
                                 _edit_json("tokenizer_config.json", add_bos_token=True, bos_token=None)),
     "tokenizer_config.json", "add_bos_token is true, but no bos token within the vocabulary is named"),
    ("eos-string-outside-the-vocabulary", _edit_json("tokenizer_config.json", eos_token="<|eot|>"),
     "tokenizer_config.json", "eos_token '<|eot|>' is not in the vocabulary"),
]


@pytest.mark.parametrize(("case", "damage", "where", "message"), GGUF_TOKEN_CASES,
                         ids=[case[0] for case in GGUF_TOKEN_CASES])
def test_gguf_special_tokens(case, damage, where, message, family_model, tmp_path, capsys, monkeypatch):
    """A GGUF without an eos id ends text at llama.cpp's default token (11 for a byte-level BPE): refused by
    `--check`, as is add_bos_token with no bos; an eos only generation_config.json names is used."""
    monkeypatch.setenv("SILICONVERT_QUIET", "1")
    folder = tmp_path / "ckpt"
    shutil.copytree(family_model("qwen3"), folder)
    damage(folder)
    recipe = {"source": str(folder), "output": str(tmp_path / "out"), "validate": {"enabled": False},
              "targets": [{"format": "gguf", "quants": ["Q8_0"]}]}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    run = siliconvert(capsys, "recipe", str(tmp_path / "recipe.yaml"), "--check")
    if where is None:
        assert run.code == 0, run.stderr
    else:
        assert_refused(run, where, message, tmp_path / "out")


@pytest.mark.parametrize("kind", ["mlx", "gguf"])
def test_validate_refuses_an_artifact_of_another_model(kind, built_artifacts, tiny, tmp_path, capsys, monkeypatch):
    """The artifact of a 1024-token model against a 96-token source: one line before the reference runs (it
    ended in 'the mlx runtime crashed' and llama.cpp's 'invalid token' after the reference)."""
    monkeypatch.setenv("SILICONVERT_QUIET", "1")
    run = siliconvert(capsys, "validate", str(built_artifacts[kind]), "--source", str(tiny),
                      "--tokens", "64", "--context", "32", "--no-latency", "--output", str(tmp_path / "out"))
    assert_refused(run, built_artifacts[kind].name, "tokens, the source's 96",
                   tmp_path / "out")
    assert not (tmp_path / "out" / ".cache").exists()
