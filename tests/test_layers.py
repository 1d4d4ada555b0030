"""The floors of the house, as a contract over every import (module-level and inside functions alike).

    core      siliconvert/*.py, siliconvert/architectures/   recipe, checkpoint + streamed forward, calibration, ...
    quantize  quantize/                                      policies and kernels
    convert   convert/                                       one writer per format
    validate  validate/                                      reference, runners, metrics, gates, report
    formats   formats/                                       one entry per format: schema, writer, runner, release
    commands  siliconvert/commands/                          cli, pipeline, sweep, release, push, inspect

A module imports its own floor and those below it, never one above: no cycle between folders can form.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
# lowest first; a folder's floor is that of the longest prefix it matches
FLOORS = ("siliconvert", "quantize", "convert", "validate", "formats", "siliconvert/commands")


def floor_of(path: Path) -> int | None:
    """The floor of a repository path, or None outside the package (tests, bench)."""
    text = path.as_posix()
    matches = [i for i, folder in enumerate(FLOORS) if text == folder or text.startswith(folder + "/")]
    return max(matches, key=lambda i: len(FLOORS[i])) if matches else None


def module_path(module: str, package_dirs: dict[str, str]) -> Path | None:
    """Where an import name lives in the repository (through pyproject's package-dir), or None if not ours."""
    for package, folder in sorted(package_dirs.items(), key=lambda item: -len(item[0])):
        if module == package or module.startswith(package + "."):
            rest = [part for part in module[len(package):].split(".") if part]
            return Path(folder, *rest)
    return None


def imported_modules(tree: ast.AST, package: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a file, relative ones resolved against `package`."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            # `from pkg import module` imports a module where one exists by that name
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names] + [(node.lineno, base)]
    return found


def violations(root: Path) -> list[str]:
    """Every import in the package that reaches a floor above its own, as 'file:line imports module (a → b)'."""
    package_dirs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    by_folder = {folder: package for package, folder in package_dirs.items()}
    found = []
    for file in sorted(root.rglob("*.py")):
        relative = file.relative_to(root)
        source_floor = floor_of(relative.parent)
        if source_floor is None or any(part.startswith(".") for part in relative.parts):
            continue
        package = by_folder.get(relative.parent.as_posix(), relative.parent.as_posix().replace("/", "."))
        for line, module in imported_modules(ast.parse(file.read_text()), package):
            target = module_path(module, package_dirs)
            if target is None:
                continue
            target_floor = floor_of(target)
            if target_floor is not None and target_floor > source_floor:
                found.append(f"{relative}:{line} imports {module} ({FLOORS[source_floor]} → {FLOORS[target_floor]})")
    return sorted(set(found))


def test_no_module_imports_a_floor_above_its_own():
    assert violations(ROOT) == []


def test_the_contract_fails_on_an_import_that_breaks_it(tmp_path):
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    for folder in ("siliconvert/commands", "validate/runners", "convert"):
        (tmp_path / folder).mkdir(parents=True)
    # the core reaching up into a stage, even inside a function, and a writer reaching into validation
    (tmp_path / "siliconvert" / "checkpoint.py").write_text("def f():\n    from siliconvert.validate import score\n")
    (tmp_path / "convert" / "gguf.py").write_text("import siliconvert.validate.runners.gguf\n")
    (tmp_path / "validate" / "runners" / "gguf.py").write_text("from .. import score\nfrom siliconvert import recipe\n")
    (tmp_path / "siliconvert" / "commands" / "cli.py").write_text("from siliconvert.validate import score\n")
    assert violations(tmp_path) == [
        "convert/gguf.py:1 imports siliconvert.validate.runners.gguf (convert → validate)",
        "siliconvert/checkpoint.py:2 imports siliconvert.validate (siliconvert → validate)",
        "siliconvert/checkpoint.py:2 imports siliconvert.validate.score (siliconvert → validate)",
    ]


def format_tests(text: str, names: list[str]) -> list[int]:
    """Lines of `text` that compare something with a format's name (`fmt == "gguf"`, `"mlx" in formats`,
    `format in ("mlx", "gguf")`, `target.get("format") != "coreml"`)."""
    name = "|".join(map(re.escape, names))
    test = re.compile(rf"""(==|!=|\bin)\s*[(\[{{]?\s*["']({name})["']"""
                      rf"""|["']({name})["']\s*(==|!=|\bin\b|\bnot\s+in\b)""")
    return [n for n, line in enumerate(text.splitlines(), 1) if test.search(line)]


def test_the_format_check_finds_format_tests():
    names = ["mlx", "gguf", "coreml"]
    assert format_tests('if fmt == "gguf":\n    pass\nx = "gguf" in formats\nok = entry(fmt).name\n', names) == [1, 3]
    text = "if t.format in ('mlx', 'gguf'): ...\nif target.get('format') != 'coreml': ..."
    assert format_tests(text, names) == [1, 2]


def test_no_format_tests_outside_the_format_entries():
    """A format is one entry: the rest of the tree asks the entry instead of testing `format == "gguf"`. A format's
    own parts (convert/gguf.py, validate/runners/coreml.py, …: named by it) may name it, and its runtime."""
    import siliconvert.formats  # noqa: F401 - registers them
    from siliconvert.format import entries

    names = [fmt.name for fmt in entries()]
    found = []
    for file in sorted(ROOT.rglob("*.py")):
        relative = file.relative_to(ROOT)
        own = any(part.removesuffix(".py").split("_")[0] in names for part in relative.parts)
        if own or floor_of(relative.parent) in (None, FLOORS.index("formats")):
            continue
        found += [f"{relative}:{n}" for n in format_tests(file.read_text(), names)]
    assert found == []


# Modules tested under another name, each with the reason (a pattern over repository paths).
TESTED_ELSEWHERE = {
    "siliconvert/architectures/*.py": "a module per family: tests/test_families.py holds one case per family, "
                                      "tests/test_architectures.py the registry and ModelSpec (base.py)",
    "siliconvert/errors.py": "exception types: every refusal test checks the one it expects",
    "siliconvert/progress.py": "progress bars on stderr, quiet under SILICONVERT_QUIET: nothing to assert",
    "siliconvert/textdata.py": "the built-in texts: tests/test_demo.py trains and scores on them",
    "siliconvert/artifacts.py": "the Artifact, Writer and Release types: tests/test_formats.py's toy format",
    "siliconvert/format.py": "the format registry: tests/test_formats.py registers a toy format",
    # not split out yet: tested only through their callers' files
    "convert/coreml/weights.py": "through tests/test_coreml_graph.py and tests/test_coreml_package.py",
    "validate/runners/base.py": "the Runner interface: each runner's tests, and tests/test_score.py's scripted one",
}


def names_of_test_files(module: Path) -> list[str]:
    """The names a module's test file may have: tests/test_<module>.py, or tests/test_<folder>_<module>.py for any
    folder it is in (where the module's name alone is ambiguous: convert/coreml/graph.py → test_coreml_graph.py)."""
    return [f"test_{module.stem}.py"] + [f"test_{folder}_{module.stem}.py" for folder in module.parent.parts]


def modules_without_tests(root: Path) -> list[str]:
    """Every module of the package with no test file by that rule, save those TESTED_ELSEWHERE."""
    missing = []
    for file in sorted(root.rglob("*.py")):
        relative = file.relative_to(root)
        if (floor_of(relative.parent) is None or file.name.startswith("__")
                or any(part.startswith(".") for part in relative.parts)
                or any(relative.match(pattern) for pattern in TESTED_ELSEWHERE)):
            continue
        if not any((root / "tests" / name).exists() for name in names_of_test_files(relative)):
            missing.append(relative.as_posix())
    return missing


def test_every_module_has_a_test_file_named_after_it():
    assert modules_without_tests(ROOT) == []


def test_every_exception_to_the_test_file_rule_is_still_needed():
    """An entry of TESTED_ELSEWHERE whose module is gone, or now has its own test file, is removed."""
    for pattern in TESTED_ELSEWHERE:
        matched = [p.relative_to(ROOT) for p in ROOT.glob(pattern)]
        assert matched, f"{pattern} matches no module"
        has_own = [any((ROOT / "tests" / name).exists() for name in names_of_test_files(p)) for p in matched]
        assert not all(has_own), f"{pattern}: every module it matches has its own test file now"


def test_the_test_file_rule_fails_on_a_module_without_one(tmp_path):
    for folder in ("siliconvert/commands", "convert/coreml", "tests"):
        (tmp_path / folder).mkdir(parents=True)
    for module in ("siliconvert/__init__.py", "siliconvert/commands/cli.py", "siliconvert/commands/new.py",
                   "convert/coreml/graph.py", "convert/coreml/chunks.py", "siliconvert/errors.py"):
        (tmp_path / module).write_text("")
    for test in ("test_cli.py", "test_coreml_graph.py", "test_chunks.py"):
        (tmp_path / "tests" / test).write_text("")
    assert modules_without_tests(tmp_path) == ["siliconvert/commands/new.py"]
