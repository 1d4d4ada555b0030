"""What a format is, and the table of the formats this run knows.

A format is one entry (`formats/<name>.py`): its recipe target (a `TargetSpec` schema), its writer and its
runner, what it needs calibrated, how its artifacts are recognised and described on disk, its place in a sweep, and
its release folder and model card. The entries register themselves when `siliconvert.formats` is imported (the
commands do); the rest of the tree asks `entry(name)` instead of testing `format == ...`, so a new format is a new
entry and nothing else. The core declares the interface and holds the table; it imports no entry.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from siliconvert.artifacts import Artifact, Release, Writer
    from siliconvert.calibration import Calibrations
    from siliconvert.checkpoint import Checkpoint
    from siliconvert.recipe import QuantPlan, TargetSpec


class Format(ABC):
    """One format's entry. Subclasses fill in the class attributes and the abstract methods; the rest have
    defaults a format without plans, sweeps or extra files keeps."""

    name: ClassVar[str]  # the recipe's `format:` value, and Artifact.format
    target: ClassVar[type[TargetSpec]]  # the recipe schema of its targets (format: Literal[name])
    runner: ClassVar[str]  # "module:Class" of its runner, imported only in the child process that runs it
    library: ClassVar[str]  # the Hub's library_name for its releases
    tags: ClassVar[tuple[str, ...]]  # the Hub tags its releases carry
    looks_like: ClassVar[str]  # what its artifacts are on disk, for "not a recognised artifact" ("a .gguf file")
    ships_tokenizer: ClassVar[bool] = True  # a release carries the source's tokenizer files beside the artifact

    # ---- conversion ----------------------------------------------------------------------------------
    @abstractmethod
    def writer(self, checkpoint: Checkpoint, target: TargetSpec, out_dir: Path, model_name: str,
               calibration: Calibrations) -> Writer:
        """The writer that consumes the checkpoint's stream for `target`, measuring on the run's `calibration`."""

    def calibration_needs(self, target: TargetSpec) -> dict[str, set[str]]:
        """What the writer will ask the calibration stage for: calibration text → parts (none by default)."""
        return {}

    def preflight(self, target: TargetSpec, checkpoint: Checkpoint, key: str, where: Path | str) -> None:  # noqa: B027
        """Checks that need no weights, before the first tensor is read (`key` names the target in messages)."""

    # the least and most bits per weight a plan can choose (its cheapest and its richest candidate, scales counted)
    plan_bits: ClassVar[tuple[float, float] | None] = None

    def check_plan(self, target: TargetSpec, checkpoint: Checkpoint, key: str, where: Path | str) -> None:
        """Refuse a plan goal no plan can meet, naming the range it can: bits per weight outside the candidates'; a
        size below every weight at the cheapest candidate (the rest at float16), or above the unquantized model and its
        tokenizer."""
        from siliconvert.errors import RecipeError

        plan, bits = target.plan, self.plan_range(target)
        if plan is None or bits is None:
            return
        least, most = bits
        if plan.bits_per_weight is not None and not least <= plan.bits_per_weight <= most:
            raise RecipeError(f"{key}.plan.bits_per_weight is {plan.bits_per_weight}; a {self.name} plan chooses "
                              f"from {least:g} to {most:g} bits per weight", where)
        if plan.size_mb is None:
            return
        infos = checkpoint.tensor_infos.values()
        params = [math.prod(info.shape) for info in infos]
        matrices = sum(p for p, info in zip(params, infos, strict=True) if len(info.shape) >= 2)
        smallest = (matrices * least / 8 + (sum(params) - matrices) * 2) / 1e6
        # the tokenizer counted only here: some formats carry it in the artifact, and the lower bound stays safe
        unquantized = (sum(params) * 2 + sum(f.stat().st_size for f in checkpoint.tokenizer_files())) / 1e6
        if not smallest <= plan.size_mb <= unquantized:
            raise RecipeError(f"{key}.plan.size_mb is {plan.size_mb:g}; a {self.name} plan of this model reaches "
                              f"about {smallest:.3g} MB (every weight at {least:g} bits) to {unquantized:.3g} MB "
                              f"(unquantized)", where)

    def plan_range(self, target: TargetSpec) -> tuple[float, float] | None:
        """The least and most bits per weight a plan of `target` can choose (`plan_bits`, unless its options widen
        the candidates)."""
        return self.plan_bits

    def replanned(self, target: TargetSpec, plan: QuantPlan) -> TargetSpec:
        """`target` building only its planned artifact, with `plan`: what the re-plan loop builds again."""
        return target.model_copy(update={"plan": plan})

    # ---- artifacts on disk ---------------------------------------------------------------------------
    @abstractmethod
    def detect(self, path: Path) -> Artifact | None:
        """The artifact at `path` if it is one of this format's (for `siliconvert validate` and `inspect`)."""

    def check(self, artifact: Artifact) -> None:  # noqa: B027
        """Structural checks of a detected artifact, before any runtime loads it: raise ArtifactError naming the
        file and the problem (a damaged artifact is bad input, not a runtime's crash)."""

    def describe(self, artifact: Artifact) -> dict[str, Any]:
        """What `siliconvert inspect` says of an artifact beyond its format and quant."""
        return {}

    def vocab_size(self, artifact: Artifact) -> int | None:
        """The tokens a checked artifact's embedding holds (None where the format cannot say): validate refuses an
        artifact whose count is not its source's, converted from another model."""
        return None

    def validation_memory(self, artifact: Artifact, gpu: bool) -> tuple[int, int]:
        """(host bytes, GPU bytes) the artifact's runner holds while it runs, its logits aside (`gpu`: a CUDA GPU is
        here, and the runtime takes it): what validation budgets its overlapping runs by (validate/overlap.py). An
        estimate, erring high: by default the artifact twice on the host (read, then converted), once on the GPU."""
        size = artifact_bytes(artifact.path)
        return 2 * size, size if gpu else 0

    # ---- sweep (size against KLD) --------------------------------------------------------------------
    fixed_quants: ClassVar[tuple[str, ...]] = ()  # the anchors' fixed recipes a sweep builds; none: not swept
    anchor: ClassVar[str | None] = None  # the usual choice: a sweep's plan also aims at its measured mean KLD
    # its targets share an artifact (Core ML's fp16 package, which each compressed one is made from): a run builds one
    # of them, so a sweep builds its second and later plans a run each
    one_target_a_run: ClassVar[bool] = False

    def sweep_fixed(self, targets: Sequence[TargetSpec], quants: Sequence[str]) -> list[TargetSpec]:
        """Targets building the fixed recipes `quants` (a subset of fixed_quants), beside the recipe's `targets`."""
        return []

    def sweep_planned(self, targets: Sequence[TargetSpec], plan: QuantPlan) -> TargetSpec:
        """A target planned at `plan`, beside the recipe's `targets` of this format."""
        raise NotImplementedError(f"{self.name} is not swept")

    def aims_at(self, quant: str) -> bool:
        """Whether a sweep plans an artifact at this fixed recipe's size."""
        return True

    def is_anchor(self, quant: str) -> bool:
        """Whether this fixed artifact is the format's anchor, whose measured mean KLD a sweep's plan also aims at."""
        return quant == self.anchor

    def sweep_unfit(self, checkpoint: Checkpoint, quant: str) -> str | None:
        """Why this model cannot take the fixed recipe `quant` (its file would hold none of the type it names: a sweep
        skips it and records this reason), or None where it can."""
        return None

    # ---- release folder and card ---------------------------------------------------------------------
    @abstractmethod
    def release_name(self, model: str, quant: str) -> str:
        """The release folder (and Hub repo) an artifact of `quant` goes to; equal names share a folder."""

    def release_files(self, release: Release) -> list[tuple[Path, str]]:
        """(artifact path, its name in the folder) for each shipped entry; '' places a folder's contents at the top."""
        return [(Path(entry["path"]), "" if Path(entry["path"]).is_dir() else Path(entry["path"]).name)
                for entry in release.shipped]

    def extra_files(self, release: Release, folder: Path, recipe_text: str) -> dict[str, str]:
        """Files the format adds to a filled release folder (name → text)."""
        return {}

    def file_label(self, release: Release, entry: dict) -> str:
        """An entry's name in the card's validation table."""
        return f"{entry['format']} {entry['quant']}"

    @abstractmethod
    def summary(self, release: Release) -> str:
        """The card's first words: what the files are ("GGUF files for llama.cpp (Q4_K_M)")."""

    @abstractmethod
    def usage(self, release: Release, folder: Path) -> list[str]:
        """The card's "How to run" lines (Markdown)."""


_ENTRIES: dict[str, Format] = {}


def register(entry: Format) -> Format:
    """Add a format's entry to the table (an entry registered again under its name replaces the old one)."""
    _ENTRIES[entry.name] = entry
    return entry


def unregister(name: str) -> None:
    _ENTRIES.pop(name, None)


def entry(name: str) -> Format:
    try:
        return _ENTRIES[name]
    except KeyError:
        raise KeyError(f"no format {name!r} is registered (known: {', '.join(_ENTRIES) or 'none'})") from None


def entries() -> list[Format]:
    """Every registered format, in registration order."""
    return list(_ENTRIES.values())


def artifact_bytes(path: Path) -> int:
    """The bytes of an artifact on disk: its file, or every file in its folder."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def detect_artifact(path: Path) -> Artifact:
    """Recognise an artifact on disk by its layout (the first format whose entry claims it), checked whole."""
    from siliconvert.errors import NotAnArtifact

    for candidate in entries():
        found = candidate.detect(path)
        if found is not None:
            candidate.check(found)
            return found
    shapes = [candidate.looks_like for candidate in entries()]
    listed = ", ".join(shapes[:-1]) + (", or " if len(shapes) > 1 else "") + shapes[-1] if shapes else "none known"
    raise NotAnArtifact(f"not a recognised artifact ({listed})", path)
