"""Release folders: what a user downloads, laid out the way each format's users and the Hub expect.

For every artifact that passed its gates, `<out_dir>/release/<repo name>/` holds the artifact's files, the
tokenizer files where the format needs them, a model card (README.md) carrying the validation table and
the recipe, the run's plot, and SHA256SUMS over everything else:

    <Model>-4bit/        MLX (mlx-lm layout)         <Model>-GGUF/     every passing <Model>-<QUANT>.gguf
    <Model>-CoreML/      Core ML packages + tokenizer files + a JSON that says how to drive them

Artifacts are hard-linked (copied across filesystems), never moved: the build stays whole. Each folder is
built under a temporary name and renamed when complete. The same report and files give byte-identical
folders: nothing here reads a clock, and every listing is sorted.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import threading
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import yaml

from siliconvert.artifacts import Release
from siliconvert.errors import ArtifactError, OutputError, RecipeError, short
from siliconvert.format import entry as format_entry
from siliconvert.progress import say
from siliconvert.validate.report import known_tokenizer_rules, plan_lines
from siliconvert.validate.router import describe_router
from siliconvert.validate.score import KV_CACHE_KLD_FACTOR, KV_CACHE_KLD_FLOOR

RELEASE_FOLDER = "release"
CARD = "README.md"
CHECKSUMS = "SHA256SUMS"
PLOT = "plot.png"
HASH_CHUNK_BYTES = 1 << 20
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
LICENSE_KEYS = ("license", "license_name", "license_link")  # "other" licenses name themselves in the last two


@dataclass(frozen=True)
class SourceFacts:
    base_model: str  # the hub id the checkpoint came from, else the model's name
    license: dict[str, str]  # LICENSE_KEYS found in the source's card or config
    family: str


def write_releases(report: dict, recipe_text: str, checkpoint, out_dir: Path, *, force: bool = False,
                   repo_prefix: str | None = None, digests: Digests | None = None) -> list[Path]:
    """Write a release folder for every artifact that passed its gates (all of them with `force`).

    `repo_prefix` ("org/Name") names the repos: org/Name-4bit, org/Name-GGUF, org/Name-CoreML; without it
    the folders take the checkpoint's name. `digests`: the run's, which may have hashed the artifacts while
    they were validated. Returns the folders written, in report order.
    """
    org, model = split_repo_prefix(repo_prefix, checkpoint.name)
    out_dir = Path(out_dir)
    root = out_dir / RELEASE_FOLDER
    facts = SourceFacts(base_model(report["source"], checkpoint), source_license(checkpoint),
                        report["source_info"]["family"])
    written = []
    owned = digests is None
    digests = digests or Digests()
    try:
        for release in plan_releases(report["artifacts"], model, org, force):
            for entry in release.left_out:
                say(f"not released: {_label(entry)} failed its gates ({_failure_messages(entry)})")
            for entry in release.forced:
                say(f"[bold red]released despite failed gates (force)[/]: {_label(entry)} "
                    f"({_failure_messages(entry)})")
            if release.shipped:
                written.append(build_release(release, report, recipe_text, checkpoint, facts, out_dir, digests))
            else:
                _remove_stale(root / release.name)
    finally:
        if owned:
            digests.close()
    return written


def split_repo_prefix(repo_prefix: str | None, model_name: str) -> tuple[str | None, str]:
    """("org", "Name") from "org/Name"; (None, the checkpoint's name) without a prefix."""
    if repo_prefix is None:
        return None, model_name
    if not HUB_ID.fullmatch(repo_prefix):
        raise RecipeError(f"release.repo_prefix must look like org/Name (got {repo_prefix!r})")
    org, name = repo_prefix.split("/")
    return org, name


def plan_releases(entries: list[dict], model: str, org: str | None, force: bool) -> list[Release]:
    """Group report entries into release folders; GGUF quants of one model share one folder."""
    groups: dict[str, list[dict]] = {}
    for entry in entries:
        groups.setdefault(release_name(entry, model), []).append(entry)
    return [
        Release(name, model, group[0]["format"], [e for e in group if e["gates"]["passed"] or force],
                [e for e in group if not (e["gates"]["passed"] or force)], f"{org}/{name}" if org else None)
        for name, group in groups.items()
    ]


def release_name(entry: dict, model: str) -> str:
    return format_entry(entry["format"]).release_name(model, entry["quant"])


def build_release(release: Release, report: dict, recipe_text: str, checkpoint, facts: SourceFacts,
                  out_dir: Path, digests: Digests) -> Path:
    """Fill a temporary folder, checksum it, then rename it over any older release of the same name."""
    root = out_dir / RELEASE_FOLDER
    final = root / release.name
    work = root / f".{release.name}.tmp-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    try:
        work.mkdir(parents=True)
        place_artifacts(release, work, checkpoint, recipe_text)
        if (out_dir / PLOT).is_file():
            link_or_copy(out_dir / PLOT, work / PLOT)
        write_new_file(work / CARD, model_card(release, report, recipe_text, facts, work))
        write_checksums(work, digests)
        _replace(work, final)
    except OSError as e:
        raise OutputError(f"cannot write the release folder ({e.strerror or e})", final) from None
    finally:
        shutil.rmtree(work, ignore_errors=True)  # after a success it is gone already: renamed to `final`
    return final


# ── the files of each format ──────────────────────────────────────────────────────────────────────────

def place_artifacts(release: Release, work: Path, checkpoint, recipe_text: str) -> None:
    """The artifacts' files as the format lays them out, the tokenizer files where it needs them, and what the
    format adds once they are in."""
    entry = format_entry(release.format)
    for source, name in entry.release_files(release):
        if not source.exists():
            raise ArtifactError("the artifact named in report.json is missing; run the recipe again", source)
        link_entry(source, work / name if name else work)
    if entry.ships_tokenizer:
        add_tokenizer_files(checkpoint, work)
    for name, text in entry.extra_files(release, work, recipe_text).items():
        write_new_file(work / name, text)


def add_tokenizer_files(checkpoint, folder: Path) -> None:
    """Tokenizer files from the source that the artifact lacks: an app bundles them with the weights."""
    for file in checkpoint.tokenizer_files():
        if not (folder / file.name).exists():
            link_or_copy(file, folder / file.name)


# ── the model card ────────────────────────────────────────────────────────────────────────────────────

def model_card(release: Release, report: dict, recipe_text: str, facts: SourceFacts, folder: Path) -> str:
    lines = ["---"]
    if release.forced:
        lines.append(f"# WARNING: released although it FAILED its validation gates ({_forced_summary(release)})")
    lines += [yaml.safe_dump(card_metadata(release, facts), sort_keys=True, allow_unicode=True).rstrip(), "---", ""]
    if release.forced:
        failures = "; ".join(_failure_messages(e) for e in release.forced)
        lines += [f"> **WARNING: this release FAILED its validation gates and was released with force.** "
                  f"Failed: {failures}. Do not use it where quality matters.", ""]
    lines += [f"# {release.name}", "", *summary(release, report, facts), "",
              "## How to run", "", *format_entry(release.format).usage(release, folder), "",
              "## Validation", "", *validation(release, report, has_plot=(folder / PLOT).is_file()), "",
              "## Recipe", "", "The siliconvert recipe that produced and validated these files:", "",
              *fenced(recipe_text, "yaml"), "",
              "## Files", "",
              f"`{CHECKSUMS}` holds the SHA-256 of every other file here; check a download with "
              f"`sha256sum -c {CHECKSUMS}`."]
    return "\n".join(lines) + "\n"


def card_metadata(release: Release, facts: SourceFacts) -> dict:
    quantized = any(e["quant"].lower() not in ("fp16", "f16", "bf16") for e in release.shipped)
    return {
        "base_model": facts.base_model,
        "base_model_relation": "quantized",
        "library_name": format_entry(release.format).library,
        "pipeline_tag": "text-generation",
        "tags": [*format_entry(release.format).tags, facts.family, *(["quantized"] if quantized else []),
                 "siliconvert"],
        **facts.license,
    }


def summary(release: Release, report: dict, facts: SourceFacts) -> list[str]:
    base = facts.base_model
    link = f"[{base}](https://huggingface.co/{base})" if HUB_ID.fullmatch(base) else f"`{base}`"
    license_line = (f"License: {facts.license['license']}, as the source model's." if facts.license
                    else "License: the source model states none here; check its terms before use.")
    return [f"{format_entry(release.format).summary(release)} of {link}, converted and validated with siliconvert "
            f"{report['siliconvert']}: every number below was measured on these exact files against the "
            f"source model run in transformers.", "", license_line]


def validation(release: Release, report: dict, has_plot: bool) -> list[str]:
    ref, corpus = report["reference"], report["corpus"]
    lines = [
        f"Reference: {ref['runtime']} on {ref['device']}, {ref['dtype']}. Corpus: {corpus['name']}, "
        f"{corpus['tokens']} tokens ({corpus['windows']} windows of {corpus['context']} tokens, "
        f"{corpus['positions']} scored positions). KLD is KL(reference ‖ artifact) per position, in nats.", "",
        "| file | size | mean KLD | p99 KLD | same top-1 | PPL ratio | prefill tok/s | decode tok/s "
        "| runtime | device | gates |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---|---|",
        *[_row(release, e) for e in release.shipped], "",
        f"Gates: {_limits(release.shipped[0]['gates']['limits'])}. They also require the artifact's tokenizer "
        "to give the source's token ids on the corpus, fixed and stress strings, every special token and the chat "
        "template (differences that follow a named rule of the runtime are listed below), and, wherever that "
        "check could run, decoding through its KV cache to stay with the no-cache pass: fed a window's tokens "
        "one at a time, the cache may move the next-token "
        f"distributions (mean KLD to the no-cache pass) by no more than {KV_CACHE_KLD_FACTOR:g} × what "
        f"quantization moved them at those positions, or {KV_CACHE_KLD_FLOOR:g} where that is more; a broken "
        "cache moves them far more.",
    ]
    known = known_tokenizer_rules(release.shipped)
    if known:
        lines += ["", "Tokenizer: where the runtime cannot express the source tokenizer's rule, these texts tokenize "
                  "differently from the source (all other text the check tried gives the source's ids):",
                  *[f"- {line}" for line in known]]
    if release.left_out:
        lines += ["", "Left out (failed their gates):",
                  *[f"- {f['message']}" for e in release.left_out for f in e["gates"]["failed"]]]
    for entry in release.shipped:
        if entry.get("compute"):
            lines.append(f"Compute of {_label(entry)}: {entry['compute']}.")
        if (floats := entry.get("float_type")) and not entry.get("plan"):  # a plan says its own
            lines.append(f"Float type of {_label(entry)}: {floats['reason']}.")
        for check, reason in (entry.get("not_measured") or {}).items():
            lines.append(f"Not measured for {_label(entry)}: {check.replace('_', ' ')} ({reason}).")
        if (router := entry.get("router_agreement")) and router["measured"]:  # a mixture of experts
            lines.append(f"Routers of {_label(entry)}: {describe_router(router)}, against the reference's choices.")
    if any("emulated" in e["device"] for e in release.shipped):
        lines += ["", "*Emulated* rows did not run on the format's own runtime on a device it targets (the "
                  "runtime column says what ran: siliconvert's MIL interpreter for Core ML, or the MLX weights "
                  "dequantized in torch where mlx has only a slow CPU backend): their scores check the shipped "
                  "weights; their speeds, where given, say nothing about an Apple device."]
    lines += plan_lines(release.shipped)
    if has_plot:
        lines += ["", f"![quality against size, every artifact of this run]({PLOT})"]
    return lines


def _row(release: Release, entry: dict) -> str:
    m, lat = entry["metrics"], entry["latency"] or {}
    name = format_entry(release.format).file_label(release, entry)
    gates = "pass" if entry["gates"]["passed"] else "FAIL: " + ", ".join(f["metric"] for f in entry["gates"]["failed"])
    return (f"| {name} | {_size(entry['size_bytes'])} | {m['mean_kld']:.5f} | {m['p99_kld']:.4f} "
            f"| {100 * m['same_top1']:.1f} % | {m['ppl_ratio']:.4f} | {_num(lat.get('prefill_tps'))} "
            f"| {_num(lat.get('decode_tps'))} | {entry['runtime']} | {entry['device']} | {gates} |")


def _limits(limits: dict) -> str:
    words = {"max_mean_kld": "mean KLD ≤ {}", "max_p99_kld": "p99 KLD ≤ {}", "min_same_top1": "same top-1 ≥ {}",
             "max_ppl_ratio": "PPL ratio ≤ {}", "max_rms_delta_p": "RMS Δp ≤ {}",
             "min_router_agreement": "same experts chosen ≥ {}"}
    return ", ".join(words[k].format(v) for k, v in sorted(limits.items()) if k in words) or "none set"


def fenced(text: str, language: str) -> list[str]:
    """A code fence longer than any run of backticks inside `text`, so the text cannot close it early."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return [f"{fence}{language}", text.rstrip("\n"), fence]


# ── source facts ──────────────────────────────────────────────────────────────────────────────────────

def base_model(source: str, checkpoint) -> str:
    """The hub id when the recipe's source was one (`org/name[@revision]`), else the model's name."""
    repo_id = source.partition("@")[0]
    local = Path(source).expanduser().resolve() == Path(checkpoint.path).resolve()
    return repo_id if HUB_ID.fullmatch(repo_id) and not local else checkpoint.name


def source_license(checkpoint) -> dict[str, str]:
    """license (and license_name/license_link for "other") from the source's model card, else config.json."""
    card = Path(checkpoint.path) / CARD
    meta = front_matter(card.read_text(encoding="utf-8", errors="replace")) if card.is_file() else {}
    if meta.get("license"):
        return {key: str(meta[key]) for key in LICENSE_KEYS if meta.get(key)}
    if checkpoint.config.get("license"):
        return {"license": str(checkpoint.config["license"])}
    return {}


def front_matter(text: str) -> dict:
    """The YAML block between the leading `---` lines of a model card; {} when there is none or it is broken."""
    lines = text.splitlines()
    if not lines or lines[0].strip() != "---":
        return {}
    end = next((i for i, line in enumerate(lines[1:], 1) if line.strip() == "---"), None)
    if end is None:
        return {}
    try:
        meta = yaml.safe_load("\n".join(lines[1:end]))
    except yaml.YAMLError:
        return {}
    return meta if isinstance(meta, dict) else {}


# ── files ─────────────────────────────────────────────────────────────────────────────────────────────

def link_or_copy(source: Path, dest: Path) -> None:
    """Hard-link (no space, no time for a multi-GB file), else copy. Writers replace files by rename,
    never in place, so a linked release keeps the bytes it was validated with."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.unlink(missing_ok=True)
    try:
        os.link(source.resolve(), dest)
    except OSError:
        shutil.copyfile(source, dest)


def write_new_file(path: Path, text: str) -> None:
    """Write `text` to a fresh file: one of the artifact's (a README.md, say) may sit at `path` as a hard
    link, and writing through it would change the artifact."""
    path.unlink(missing_ok=True)
    path.write_text(text, encoding="utf-8")


def link_tree(source: Path, dest: Path) -> None:
    """Mirror `source` under `dest`, hidden entries left out. Empty folders too: an .mlpackage's manifest
    names its weights folder, and Core ML refuses the package when that folder is missing."""
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if path.is_dir():
            (dest / relative).mkdir(parents=True, exist_ok=True)
        else:
            link_or_copy(path, dest / relative)


def link_entry(source: Path, dest: Path) -> None:
    if source.is_dir():
        link_tree(source, dest)
    else:
        link_or_copy(source, dest)


def release_files(folder: Path) -> list[str]:
    """Every file under `folder` as a sorted relative POSIX path."""
    return sorted(f.relative_to(folder).as_posix() for f in folder.rglob("*") if f.is_file())


def sha256_file(path: Path, stop: threading.Event | None = None) -> str:
    """The file's SHA-256; `stop` set: raises DigestStopped between chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            if stop is not None and stop.is_set():
                raise DigestStopped(path)
            digest.update(chunk)
    return digest.hexdigest()


class DigestStopped(Exception):
    """Hashing was stopped by Digests.close before the file was read through."""


class Digests:
    """SHA-256 digests of files, hashed by a pool of threads (hashlib lets go of the GIL over large buffers, so
    they run beside validation and beside each other) and kept by (device, inode, size, mtime). A release folder's
    files are hard links to the artifacts, which writers replace by rename, never in place: a digest taken while
    the artifact was validated still names the bytes the folder links. `ahead` starts hashing what releases will
    list; `of` answers in order, hashing what was not asked ahead; `close` stops what is left (a run that stops at
    its gates releases nothing, and should not wait for gigabytes of hashing to end)."""

    def __init__(self, workers: int | None = None) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1),
                                        thread_name_prefix="sha256")
        self._stop = threading.Event()
        self._futures: dict[tuple[int, int, int, int], Future[str]] = {}

    def ahead(self, paths: Iterable[Path]) -> None:
        """Start hashing every file at or under `paths`, hidden ones left out as release folders leave them."""
        for path in paths:
            files = sorted(f for f in path.rglob("*") if not any(
                part.startswith(".") for part in f.relative_to(path).parts)) if path.is_dir() else [path]
            for file in files:
                if file.is_file() and not file.is_symlink():
                    self._future(file)

    def of(self, files: list[Path]) -> list[str]:
        futures = [self._future(file) for file in files]
        return [future.result() for future in futures]

    def close(self) -> None:
        self._stop.set()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _future(self, file: Path) -> Future[str]:
        stat = file.stat()
        key = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
        if key not in self._futures:
            self._futures[key] = self._pool.submit(sha256_file, file, self._stop)
        return self._futures[key]


def write_checksums(folder: Path, digests: Digests) -> Path:
    """SHA256SUMS in `sha256sum -c` format, over every other file; written last so it covers them all."""
    names = [n for n in release_files(folder) if n != CHECKSUMS]
    if any("\n" in n or "\\" in n for n in names):
        raise OutputError("a file name holds a newline or backslash, which SHA256SUMS cannot list plainly", folder)
    lines = zip(digests.of([folder / name for name in names]), names, strict=True)
    write_new_file(folder / CHECKSUMS, "".join(f"{digest}  {name}\n" for digest, name in lines))
    return folder / CHECKSUMS


def verify_checksums(folder: Path) -> list[str]:
    """Check every file against SHA256SUMS: each file present listed once, nothing else listed, no link that could
    lead an upload outside the folder; the files, sorted. The list is read as bytes: a pushed folder may be hostile."""
    sums = folder / CHECKSUMS
    if not sums.is_file() or sums.is_symlink():
        raise ArtifactError(f"not a release folder (no {CHECKSUMS}); siliconvert writes them under release/", folder)
    for path in [folder, *folder.rglob("*")]:
        if path.is_symlink():  # rglob lists a link without following it: a link to a folder is refused here too
            raise ArtifactError(f"{path.relative_to(folder).as_posix() or '.'} is a symbolic link (to "
                                f"{short(os.readlink(path))}): a release folder holds its files, nothing that "
                                f"points elsewhere", folder)
        if not (path.is_file() or path.is_dir()):  # a FIFO would hang the upload, a device never end
            raise ArtifactError(f"{path.relative_to(folder).as_posix()} is not a regular file or folder", folder)
    listed = {}  # relative path → hex digest
    for number, line in enumerate(sums.read_bytes().splitlines(), 1):
        try:
            digest, separator, name = line.decode("utf-8").partition("  ")
        except UnicodeDecodeError:
            raise ArtifactError(f"line {number} is not UTF-8 text", sums) from None
        if not separator or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise ArtifactError(f"line {number} is not `<sha256>  <file>`", sums)
        if name in listed:
            raise ArtifactError(f"{short(name)} is listed twice (line {number})", sums)
        listed[name] = digest
    present = [n for n in release_files(folder) if n != CHECKSUMS]
    if sorted(listed) != present:
        changed = sorted(set(listed).symmetric_difference(present))
        raise ArtifactError(f"files differ from {CHECKSUMS} (added or missing: {', '.join(changed[:5])})", folder)
    for name in present:
        if sha256_file(folder / name) != listed[name]:
            raise ArtifactError(f"{name} does not match its checksum in {CHECKSUMS}", folder)
    return release_files(folder)


def _replace(work: Path, final: Path) -> None:
    """Move a complete folder to its final name; an older release is removed only once the new one is in."""
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        final.rename(old)
    work.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _remove_stale(folder: Path) -> None:
    # A release left from an earlier run whose artifact now fails must not stay around to be pushed.
    if folder.exists():
        shutil.rmtree(folder)
        say(f"removed the earlier release {folder}: nothing in it passes now")


def _label(entry: dict) -> str:
    return f"{entry['format']} {entry['quant']}"


def _failure_messages(entry: dict) -> str:
    return ", ".join(f["message"] for f in entry["gates"]["failed"])


def _forced_summary(release: Release) -> str:
    return "; ".join(f"{_label(e)}: {', '.join(f['metric'] for f in e['gates']['failed'])}" for e in release.forced)


def _size(size_bytes: int) -> str:
    return f"{size_bytes / 1e9:.2f} GB" if size_bytes >= 1e9 else f"{size_bytes / 1e6:.1f} MB"


def _num(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"
