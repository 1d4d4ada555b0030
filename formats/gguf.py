"""GGUF: single files llama.cpp, Ollama and LM Studio load; every quant of a model in one release folder."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QType

from siliconvert.artifacts import CARD_PROMPT, Artifact, Release, Writer
from siliconvert.calibration import Calibrations, calibration_text
from siliconvert.checkpoint import Checkpoint
from siliconvert.errors import ArtifactError, RecipeError, short
from siliconvert.format import Format, artifact_bytes
from siliconvert.recipe import GGUFTarget, QuantPlan


class GGUF(Format):
    name = "gguf"
    target = GGUFTarget
    runner = "siliconvert.validate.runners.gguf:LlamaCppRunner"
    library = "gguf"
    tags = ("gguf", "llama.cpp")
    looks_like = "a .gguf file"
    ships_tokenizer = False  # a GGUF carries its tokenizer inside
    # every quantized type a recipe may name, smallest first, on a sweep's front (plans aim at the K recipes' sizes)
    fixed_quants = ("TQ1_0", "IQ2_XXS", "TQ2_0", "Q2_K", "IQ2_M", "IQ3_XXS", "IQ3_M", "Q3_K_M", "IQ4_XS", "Q4_0",
                    "IQ4_NL", "Q4_K_S", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "MXFP4_MOE")
    anchor = "Q4_K_M"
    planned_at = ("Q3_K_M", "Q4_K_M", "Q5_K_M")  # the K recipes a sweep's plans aim at (sizes between them are theirs)
    plan_bits = (2.0625, 8.5)  # IQ2_XXS to Q8_0 (quantize/sensitivity.py's GGUF_CANDIDATES)

    def writer(self, checkpoint: Checkpoint, target: GGUFTarget, out_dir: Path, model_name: str,
               calibration: Calibrations) -> Writer:
        from siliconvert.convert.gguf import GGUFWriter

        return GGUFWriter(checkpoint, target, out_dir, model_name, calibration=calibration)

    def calibration_needs(self, target: GGUFTarget) -> dict[str, set[str]]:
        from siliconvert.convert.gguf import calibration_needs

        return calibration_needs(target)

    def preflight(self, target: GGUFTarget, checkpoint: Checkpoint, key: str, where: Path | str) -> None:
        from siliconvert.convert.gguf_vocab import check_special_tokens

        check_special_tokens(checkpoint)
        if not target.imatrix:  # none, or builtin where a quant needs one
            return
        text = Path(target.imatrix).expanduser()
        if target.imatrix != "builtin" and text.exists() and not text.is_file():  # /dev/zero never ends
            raise RecipeError("cannot read the imatrix calibration text (not a regular file)", text)
        calibration_text(target.imatrix)

    def replanned(self, target: GGUFTarget, plan: QuantPlan) -> GGUFTarget:
        return target.model_copy(update={"plan": plan, "quants": ["auto"]})  # not its fixed quants again

    def detect(self, path: Path) -> Artifact | None:
        if path.suffix != ".gguf" or not path.is_file():
            return None
        # A plan of ours is named <Model>-auto-<goal>.gguf: its file type names only its main type, the name its goal.
        model, _, goal = path.stem.rpartition("-")
        return Artifact(self.name, f"auto-{goal}" if model.endswith("-auto") else _file_quant(path), path)

    def check(self, artifact: Artifact) -> None:
        read_gguf(artifact.path)

    def vocab_size(self, artifact: Artifact) -> int | None:
        tokens = read_gguf(artifact.path).fields.get("tokenizer.ggml.tokens")
        return len(tokens.data) if tokens is not None else None

    def validation_memory(self, artifact: Artifact, gpu: bool) -> tuple[int, int]:
        # llama.cpp holds the whole file: read into host memory on the CPU (validate/runners/gguf.py), in the GPU's
        # with every layer offloaded (mapped on the host while it loads); its KV cache and buffers beside it, a
        # fifth more at most at the runner's context
        size = artifact_bytes(artifact.path)
        held = size + size // 5
        return (size // 4, held) if gpu else (held, 0)

    def describe(self, artifact: Artifact) -> dict[str, Any]:
        reader = read_gguf(artifact.path)
        return {"tensors": len(reader.tensors),
                "metadata": {name: _gguf_value(field) for name, field in reader.fields.items()
                             if not name.startswith("tokenizer.ggml.") or name.endswith(("model", "pre"))}}

    def sweep_fixed(self, targets: Sequence[GGUFTarget], quants: Sequence[str]) -> list[GGUFTarget]:
        # with the importance matrix a plan uses
        return [GGUFTarget(format=self.name, quants=list(quants), imatrix=_imatrix(targets))] if quants else []

    def sweep_planned(self, targets: Sequence[GGUFTarget], plan: QuantPlan) -> GGUFTarget:
        return GGUFTarget(format=self.name, quants=["auto"], imatrix=_imatrix(targets), plan=plan)

    def aims_at(self, quant: str) -> bool:
        return quant in self.planned_at  # the other types are plan candidates; their sizes sit between the K's

    def sweep_unfit(self, checkpoint: Checkpoint, quant: str) -> str | None:
        if quant == "MXFP4_MOE" and checkpoint.spec.experts is None:
            return "no expert stacks: MXFP4_MOE puts only experts in MXFP4 (a dense model's file is Q8_0 throughout)"
        if quant not in QType.__members__:  # a recipe of several types (Q4_K_M, IQ2_M …): llama.cpp's planner mixes
            return None
        block = GGML_QUANT_SIZES[QType[quant]][0]
        widths = sorted({info.shape[-1] for info in checkpoint.tensor_infos.values() if len(info.shape) > 1})
        if all(width % block for width in widths):  # llama.cpp's tensor_type_fallback gives every tensor another type
            return (f"no weight's rows fill {quant}'s blocks of {block} (rows of {', '.join(map(str, widths))}): "
                    "llama.cpp would write every tensor in a fallback type")
        return None

    def release_name(self, model: str, quant: str) -> str:
        return f"{model}-GGUF"

    def release_files(self, release: Release) -> list[tuple[Path, str]]:
        return [(Path(entry["path"]), self.file_label(release, entry)) for entry in release.shipped]

    def file_label(self, release: Release, entry: dict) -> str:
        return f"{release.model}-{entry['quant']}.gguf"

    def summary(self, release: Release) -> str:
        return f"GGUF files for llama.cpp ({', '.join(e['quant'] for e in release.shipped)})"

    def usage(self, release: Release, folder: Path) -> list[str]:
        first = release.shipped[0]
        from_hub = [f'llama-cli -hf {release.repo_id}:{first["quant"]} -p "{CARD_PROMPT}"'] if release.repo_id else []
        return ["With [llama.cpp](https://github.com/ggml-org/llama.cpp):", "", "```bash", *from_hub,
                f'llama-cli -m {self.file_label(release, first)} -p "{CARD_PROMPT}"', "```"]


def read_gguf(path: Path):
    """gguf-py's reader over `path`, its header, tensor infos and data extents checked against the file."""
    from gguf import GGUFReader

    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ArtifactError(f"not a GGUF file (it starts with {magic!r}, not b'GGUF')", path)
    try:
        reader = GGUFReader(str(path))
    except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError) as e:
        # gguf-py sizes each tensor's data by its header: a truncated file, or a header claiming more tensors
        # than the file holds, ends in a numpy reshape of too few bytes
        raise ArtifactError(f"damaged GGUF: its header and tensor infos do not fit the file's "
                            f"{path.stat().st_size:,} bytes (truncated?): {e}", path) from None
    size = path.stat().st_size
    for tensor in reader.tensors:
        if tensor.data_offset + tensor.n_bytes > size:
            raise ArtifactError(f"damaged GGUF: tensor {short(tensor.name)} ends at byte "
                                f"{tensor.data_offset + tensor.n_bytes:,}, past the file's {size:,}", path)
    return reader


def _imatrix(targets: Sequence[GGUFTarget]) -> str:
    return next((t.imatrix for t in targets if t.imatrix), "builtin")


def _file_quant(path: Path) -> str:
    """The quant a GGUF says it holds, not what its name claims: general.file_type as llama.cpp names it
    (MOSTLY_Q4_K_M → Q4_K_M); without one, the type most of its matrices have, as llama.cpp then guesses."""
    from gguf import LlamaFileType

    reader = read_gguf(path)  # the structure checked first: a damaged file is named as such
    field = reader.get_field("general.file_type")
    if field is not None and int(field.contents()) in LlamaFileType._value2member_map_:
        return LlamaFileType(int(field.contents())).name.removeprefix("ALL_").removeprefix("MOSTLY_")
    matrices = Counter(tensor.tensor_type.name for tensor in reader.tensors if len(tensor.shape) == 2)
    return matrices.most_common(1)[0][0] if matrices else "unknown"


def _gguf_value(field) -> Any:
    try:
        value = field.contents()
    except Exception:
        return None
    return value if not isinstance(value, list) or len(value) < 16 else f"[{len(value)} values]"
