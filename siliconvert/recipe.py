"""The recipe: one YAML file saying what to build from which checkpoint and how to judge it.

Validated with pydantic; unknown keys and wrong types are errors that name the key. Relative paths
are taken from the directory the command runs in.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from siliconvert.errors import RecipeError, short
from siliconvert.format import entries as format_entries

BUILTIN_DEMO = "builtin:demo"
MAX_RECIPE_BYTES = 1 << 20  # read whole, parsed by YAML: a bigger file is not a recipe


class Strict(BaseModel):
    # every float finite: YAML's .inf and .nan pass `gt=0` and would reach report.json as bare Infinity / NaN
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Gates(Strict):
    """Thresholds an artifact must meet to be released. A limit left out is not checked."""

    max_mean_kld: float | None = Field(None, ge=0)
    max_p99_kld: float | None = Field(None, ge=0)
    min_same_top1: float | None = Field(None, ge=0, le=1)
    max_ppl_ratio: float | None = Field(None, gt=0)
    max_rms_delta_p: float | None = Field(None, ge=0)
    # a mixture of experts: the least fraction of (token, sparse layer) pairs whose chosen experts are the reference's
    min_router_agreement: float | None = Field(None, ge=0, le=1)


class QuantPlan(Strict):
    """What a planned quantization aims at: exactly one of the quality (predicted mean KLD) or the size."""

    max_mean_kld: float | None = Field(None, gt=0)
    size_mb: float | None = Field(None, gt=0)  # the whole artifact, in 10⁶ bytes
    bits_per_weight: float | None = Field(None, ge=2, le=16)  # mean over the planned tensors' weights
    # predicted mean KLD per unit of summed relative output error (quantize/sensitivity.py); default: the
    # demo model's fit. The pipeline scales it by measured / predicted when a planned artifact misses its target.
    kld_per_error: float | None = Field(None, gt=0)
    # mean KLD the artifact has with no quantization error at all (its runtime's own rounding); default 0. The
    # re-plan loop fits it, with kld_per_error, to the tries it measured.
    kld_floor: float | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _one_goal(self) -> QuantPlan:
        if sum(v is not None for v in (self.max_mean_kld, self.size_mb, self.bits_per_weight)) != 1:
            raise ValueError("a plan names exactly one of max_mean_kld, size_mb, bits_per_weight")
        return self

    @property
    def label(self) -> str:
        """The plan in an artifact's name: auto-kld0.01, auto-3.4MB, auto-4.5bpw."""
        if self.max_mean_kld is not None:
            return f"auto-kld{self.max_mean_kld:g}"
        return f"auto-{self.size_mb:g}MB" if self.size_mb is not None else f"auto-{self.bits_per_weight:g}bpw"


def _plan_matches_auto(auto: bool, plan: QuantPlan | None, key: str) -> None:
    if auto and plan is None:
        raise ValueError(f"{key}: auto needs a plan ({{max_mean_kld: x}}, {{size_mb: n}} or {{bits_per_weight: b}})")
    if plan is not None and not auto:
        raise ValueError(f"plan is only read with {key}: auto")


class TargetSpec(Strict):
    """The keys every format's target shares; a format's entry (siliconvert/format.py) names its subclass."""

    format: str
    plan: QuantPlan | None = None  # what a planned quantization aims at, where the format plans
    gates: Gates | None = None  # overrides validate.gates for this target

    def positions(self) -> list[tuple[str, int]]:
        """(key, tokens) of each length the artifact is built to hold (checked against the model's positions)."""
        return []

    def check_settings(self, settings: Validate) -> list[str]:
        """Problems of this target with the recipe's validation settings (messages without the target's key)."""
        return []


# The model code an MLX folder runs: mlx-lm's own file for the family, or siliconvert's own (convert/mlx_models/)
MLXModelFile = Literal["mlx-lm", "faithful"]


class MLXTarget(TargetSpec):
    format: Literal["mlx"]
    # 16 = unquantized float16; auto = planned per module; mixed_*: mlx-lm's fixed mixed recipes
    # (mlx_lm.convert --quant-predicate: more bits for v_proj / down_proj in some layers and for lm_head)
    bits: Literal[2, 3, 4, 5, 6, 8, 16, "auto", "mixed_2_6", "mixed_3_4", "mixed_3_6", "mixed_4_6"] = 4
    group_size: Literal[32, 64, 128] = 64  # auto plans the group size per module too
    # the float type of what is not quantized, of scales and biases, and so of mlx's compute (mlx_lm.convert's
    # --dtype). Default: float16 for bits 16; otherwise float16 where the source is bfloat16 and its calibrated
    # residual stream fits float16 (same bytes, three more bits of mantissa), else the source's
    dtype: Literal["float16", "bfloat16", "float32"] | None = None
    # the model code the folder runs: mlx-lm's own model file for the family, or "faithful": siliconvert's, shipped in
    # the folder where mlx-lm's computes another function (Gemma 2's sliding window, Phi-3's LongRoPE, gpt-oss's
    # untruncated YaRN), which mlx_lm.load runs only with trust_remote_code=True
    model_file: MLXModelFile = "mlx-lm"
    # mx.quantize's mode: affine (bits and group_size as set), or a float format whose bits and group are fixed
    # (MLX_MODES); mlx_lm.convert's --q-mode
    mode: Literal["affine", "mxfp4", "nvfp4", "mxfp8"] = "affine"
    # how affine weights are rounded: rtn (to nearest, as mlx_lm.convert), clip (to nearest on each group's range
    # clipped where that lowers its error weighted by the calibration inputs: quantize/mlx.py clip_quantize; ~10× rtn)
    # or gptq (each row's rounding error carried to the columns not yet rounded, against the calibration inputs'
    # second moments: quantize/gptq.py; the most exact, and minutes)
    method: Literal["rtn", "clip", "gptq"] = "rtn"

    @model_validator(mode="after")
    def _auto_has_a_plan(self) -> MLXTarget:
        _plan_matches_auto(self.bits == "auto", self.plan, "bits")
        if self.bits == 16 and self.method != "rtn":
            raise ValueError(f"method {self.method} rounds quantized weights; bits 16 stores every weight in float")
        if self.mode != "affine":
            bits, group_size = MLX_MODES[self.mode]
            if not isinstance(self.bits, int) or self.bits == 16:
                raise ValueError(f"mode {self.mode} is a fixed width: bits {self.bits} is affine only")
            for key, fixed in (("bits", bits), ("group_size", group_size)):
                if key in self.model_fields_set and getattr(self, key) != fixed:
                    raise ValueError(f"mode {self.mode} has {key} {fixed}, not {getattr(self, key)}")
            if self.method != "rtn":
                raise ValueError(f"method {self.method} rounds affine weights; mode {self.mode} has only rtn")
        return self

    @property
    def bits_and_group(self) -> tuple[int | str, int]:
        """(bits, group size) the weights are stored at: the recipe's, or the mode's own."""
        return MLX_MODES[self.mode] if self.mode != "affine" else (self.bits, self.group_size)

    @property
    def quant(self) -> str:
        """The artifact's name in its folder's: every option that changes the bytes (bits, group size, plan, and
        a dtype the recipe sets) is in it, so no two targets write one folder."""
        if self.bits == 16:
            return MLX_FLOAT_NAMES[self.dtype or "float16"]
        dtype = f"-{MLX_FLOAT_NAMES[self.dtype]}" if self.dtype else ""
        method = f"-{self.method}" if self.method != "rtn" else ""
        if self.mode != "affine":
            return self.mode + dtype
        if self.plan is not None:
            return self.plan.label + method + dtype
        if isinstance(self.bits, str):
            return f"{self.bits}-g{self.group_size}{method}{dtype}"
        return f"{self.bits}bit-g{self.group_size}{method}{dtype}"


MLX_FLOAT_NAMES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
# mx.quantize's float modes: (bits, group size), each fixed; a shared 8-bit scale per group and no bias
MLX_MODES = {"mxfp4": (4, 32), "nvfp4": (4, 16), "mxfp8": (8, 32)}


# The GGUF file types a recipe may name, listed once: the recipe's accepted values and the GGUF writer's and
# quantizer's tables derive from it. For each: how its tensors' types are chosen ("direct": every 2-D weight
# takes the type the name says; "planner": llama.cpp's planner picks per tensor, as llama-quantize does) and
# what makes the tensors ("gguf-py": converted here; "llama.cpp": its quantization kernels).
GGUF_QUANTS = {
    "F16": ("direct", "gguf-py"), "BF16": ("direct", "gguf-py"), "Q8_0": ("direct", "llama.cpp"),
    "Q6_K": ("planner", "llama.cpp"), "Q5_K_M": ("planner", "llama.cpp"), "Q4_K_M": ("planner", "llama.cpp"),
    "Q4_K_S": ("planner", "llama.cpp"), "Q3_K_M": ("planner", "llama.cpp"), "Q2_K": ("planner", "llama.cpp"),
    "Q4_0": ("planner", "llama.cpp"),
    # i-quants (lattice codebooks; IQ4_NL and IQ4_XS a non-linear 4-bit grid), experts in MXFP4, ternary TQ1_0 / TQ2_0
    "IQ4_XS": ("planner", "llama.cpp"), "IQ4_NL": ("planner", "llama.cpp"), "IQ3_M": ("planner", "llama.cpp"),
    "IQ3_XXS": ("planner", "llama.cpp"), "IQ2_M": ("planner", "llama.cpp"), "IQ2_XXS": ("planner", "llama.cpp"),
    "MXFP4_MOE": ("planner", "llama.cpp"), "TQ1_0": ("planner", "llama.cpp"), "TQ2_0": ("planner", "llama.cpp"),
}
GGUFQuant = Literal[tuple(GGUF_QUANTS)]
# The quants whose main type llama.cpp refuses to make without an importance matrix (src/llama-quant.cpp,
# tensor_requires_imatrix: IQ3_XXS, IQ2_M's IQ2_S, IQ2_XXS; tests/test_gguf.py holds this to llama.cpp's refusals)
GGUF_QUANTS_NEEDING_IMATRIX = ("IQ3_XXS", "IQ2_M", "IQ2_XXS")


class GGUFTarget(TargetSpec):
    format: Literal["gguf"]
    quants: list[GGUFQuant | Literal["auto"]] = Field(["Q4_K_M"], min_length=1)  # auto: one planned file
    # calibration text ("builtin" or a path) for an importance matrix. Left out: builtin where a plan or a quant of
    # GGUF_QUANTS_NEEDING_IMATRIX needs one, else none; false: none, and such a target is refused
    imatrix: str | Literal[False] | None = None

    @model_validator(mode="after")
    def _auto_has_a_plan(self) -> GGUFTarget:
        _plan_matches_auto("auto" in self.quants, self.plan, "quants")
        if self.imatrix is False:
            needing = [q for q in self.quants if q in GGUF_QUANTS_NEEDING_IMATRIX] + (["auto"] if self.plan else [])
            if needing:
                verb = "needs" if len(needing) == 1 else "need"
                raise ValueError(f"imatrix: false, but {', '.join(needing)} {verb} an importance matrix (llama.cpp "
                                 "refuses these types without one; a plan weighs by it): leave imatrix out, or "
                                 "name a calibration text")
        repeated = sorted({quant for quant in self.quants if self.quants.count(quant) > 1})
        if repeated:  # one file a quant: a second would overwrite the first
            raise ValueError(f"quants lists {', '.join(repeated)} more than once")
        return self

    def file_quant(self, quant: str) -> str:
        """The name a quant's file and artifact carry: the plan's label for auto."""
        return self.plan.label if quant == "auto" else quant

    @property
    def imatrix_text(self) -> str | None:
        """The calibration text of the target's importance matrix, None for none: the recipe's, else builtin where
        a plan or a quant llama.cpp refuses without one asks for it."""
        if self.imatrix is not None:
            return self.imatrix or None
        needs = self.plan is not None or any(q in GGUF_QUANTS_NEEDING_IMATRIX for q in self.quants)
        return "builtin" if needs else None


# pal<bits>: palettized (a lookup table per 16 output channels), -lut8: its tables in int8 (quantize/coreml.py);
# int4-zp: int4 blocks with a zero point each; w8a8: int8 weights and int8 activations at the linear layers' inputs
# (the newer Neural Engines' int8 path)
CoreMLPrecision = Literal["fp16", "int8", "int4", "int4-zp", "w8a8", "pal2", "pal3", "pal4", "pal6", "pal8",
                          "pal2-lut8", "pal3-lut8", "pal4-lut8", "pal6-lut8", "auto"]


class CoreMLTarget(TargetSpec):
    format: Literal["coreml"]
    # fp16 is always built; int8/int4 and the palettes (coremltools.optimize) come as additional artifacts, and
    # auto as one whose precision is planned per weight (fp16, int8, int4 or a palette) from `plan`.
    precision: CoreMLPrecision | list[CoreMLPrecision] = "fp16"
    context: int = Field(512, ge=16)
    compute_units: Literal["all", "cpu_and_ne", "cpu_and_gpu", "cpu_only"] = "all"
    # Where Core ML cannot run (Linux), what runs the MIL interpreter: torch (CUDA if present) or numpy.
    interpreter: Literal["torch", "numpy"] = "torch"
    chunks: Literal["auto"] | Annotated[int, Field(ge=1)] = "auto"
    # how the compressed packages' weights are rounded: rtn (each to the nearest step of its block's fitted scale,
    # or entry of its group's table) or gptq (a column at a time against the calibration inputs' second moments,
    # each column's error carried to the columns not yet rounded: quantize/coreml.py gptq_rounded)
    method: Literal["rtn", "gptq"] = "rtn"

    @model_validator(mode="after")
    def _auto_has_a_plan(self) -> CoreMLTarget:
        _plan_matches_auto("auto" in self.asked, self.plan, "precision")
        if self.method != "rtn" and len(self.precisions) == 1:
            raise ValueError(f"method {self.method} rounds compressed weights: precision asks for fp16 only")
        return self

    @model_validator(mode="after")
    def _w8a8_runs_on_the_neural_engine(self) -> CoreMLTarget:
        # int8 activations pay off only in the Neural Engine's int8 × int8 products; on the CPU and GPU they are
        # quantized and dequantized around float products, which only slows the model (coremltools' docs)
        if "w8a8" in self.asked and self.compute_units in ("cpu_only", "cpu_and_gpu"):
            raise ValueError(f"precision w8a8 is for the Neural Engine, which compute_units: {self.compute_units} "
                             "leaves out (there int8 activations only cost time): use int8, or compute_units all or "
                             "cpu_and_ne")
        return self

    @property
    def asked(self) -> list[str]:
        return [self.precision] if isinstance(self.precision, str) else list(self.precision)

    @property
    def precisions(self) -> list[str]:
        """The packages built, fp16 first; a plan's is named by its label (auto-kld0.01 …)."""
        named = [self.plan.label if p == "auto" else p for p in self.asked if p != "fp16"]
        return ["fp16", *dict.fromkeys(named)]

    def variant(self, precision: str) -> str:
        """The artifact a precision's package is: its name, with the method where it is not rtn (int4-gptq)."""
        return precision if precision == "fp16" or self.method == "rtn" else f"{precision}-{self.method}"

    def positions(self) -> list[tuple[str, int]]:
        return [("context", self.context)]

    def check_settings(self, settings: Validate) -> list[str]:
        # a Core ML package holds `context` positions: the scored windows and the latency run go through it
        if not settings.enabled:
            return []
        if self.context < settings.context:
            return [f"context ({self.context}) is shorter than validate.context ({settings.context}), the windows "
                    "it is scored on"]
        latency = settings.prefill_tokens + settings.decode_tokens
        if settings.latency and self.context < latency:
            return [f"context ({self.context}) is shorter than validate.prefill_tokens + decode_tokens ({latency})"]
        return []


class Validate(Strict):
    enabled: bool = True
    corpus: str = "builtin"  # "builtin" (held-out pydoc text) or a path to a UTF-8 text file
    tokens: int = Field(1024, ge=16)
    context: int = Field(256, ge=8)
    gates: Gates = Gates(max_mean_kld=0.05, min_same_top1=0.85, max_ppl_ratio=1.10)
    latency: bool = True
    prefill_tokens: int = Field(128, ge=1)
    decode_tokens: int = Field(32, ge=1)
    # lenient: a tokenizer difference from a known rule of the artifact's runtime warns; strict: it fails too
    tokenizer: Literal["lenient", "strict"] = "lenient"
    # artifact runs (and the reference) at once, each in its own process: "auto" as many as the memory budget and
    # the cores allow (validate/overlap.py), 1 one after the other as before
    parallel: Literal["auto"] | Annotated[int, Field(ge=1)] = "auto"


class Release(Strict):
    """Release folders (model cards, checksums) for the artifacts that pass their gates; optional push."""

    repo_prefix: str | None = Field(None, pattern=r"^[\w.-]+/[\w.-]+$")  # org/Name → org/Name-4bit, -GGUF, ...
    push: bool = False

    @model_validator(mode="after")
    def _push_needs_a_repo(self) -> Release:
        if self.push and self.repo_prefix is None:
            raise ValueError("release.push needs release.repo_prefix (org/Name)")
        return self


class Recipe(Strict):
    # A name becomes file and folder names: no separators, no leading dot, so it cannot leave the output folder.
    name: str | None = Field(None, pattern=r"^\w[\w.-]*$")
    source: str
    output: Path | None = None
    # each a registered format's target (siliconvert/format.py): parse_recipe validates them by their `format`
    targets: list[TargetSpec] = Field(min_length=1)
    validate_: Validate = Field(Validate(), alias="validate")
    release: Release = Release()

    @field_validator("source", "output", mode="before")
    @classmethod
    def _not_empty(cls, value: object) -> object:
        if isinstance(value, str) and not value.strip():  # Path('') is the current folder
            raise ValueError("must not be empty ('' would be the current folder)")
        return value

    @model_validator(mode="after")
    def _context_fits(self) -> Recipe:
        settings = self.validate_
        if settings.context > settings.tokens:
            raise ValueError("validate.context must not exceed validate.tokens")
        for index, target in enumerate(self.targets):
            for problem in target.check_settings(settings):
                raise ValueError(f"targets.{index}.{problem}")
            earlier = next((i for i, other in enumerate(self.targets[:index]) if other == target), None)
            if earlier is not None:  # the same artifact twice: built twice into one name
                raise ValueError(f"targets.{index} repeats targets.{earlier}")
            # MLX targets that differ only in what their folder's name leaves out (model_file, gates) share a folder
            same_folder = next((i for i, other in enumerate(self.targets[:index]) if isinstance(target, MLXTarget)
                                and isinstance(other, MLXTarget) and other.quant == target.quant), None)
            if same_folder is not None:
                raise ValueError(f"targets.{index} writes the MLX folder of targets.{same_folder} ({target.quant})")
            # every Core ML target builds the fp16 package (its compressed ones are made from it) under one name
            other_coreml = next((i for i, other in enumerate(self.targets[:index]) if isinstance(target, CoreMLTarget)
                                 and isinstance(other, CoreMLTarget)), None)
            if other_coreml is not None:
                raise ValueError(f"targets.{index} writes the Core ML fp16 package of targets.{other_coreml}: list "
                                 f"every precision in one coreml target")
        return self

    def output_dir(self, recipe_path: Path | None = None) -> Path:
        return self.output or Path("build") / self.display_name(recipe_path)

    def display_name(self, recipe_path: Path | None = None) -> str:
        if self.name:
            return self.name
        return recipe_path.stem if recipe_path else Path(self.source.rstrip("/")).name


def load_recipe(path: Path) -> Recipe:
    """Read and validate a recipe file, turning every problem into one RecipeError line."""
    if path.exists() and not path.is_file():  # a folder; a FIFO or a device would hang the read
        raise RecipeError("cannot read recipe (not a regular file)", path)
    try:
        if path.stat().st_size > MAX_RECIPE_BYTES:
            raise RecipeError(f"a recipe is a short YAML file; this one has {path.stat().st_size} bytes", path)
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise RecipeError(f"cannot read recipe ({e.strerror})", path) from None
    except UnicodeDecodeError as e:
        raise RecipeError(f"not UTF-8 text (invalid byte at position {e.start})", path) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RecipeError(f"YAML syntax error{line}: {problem}", path) from None
    except RecursionError:
        raise RecipeError("YAML nested too deeply to be read", path) from None
    if not isinstance(data, dict):
        raise RecipeError("a recipe is a YAML mapping (source:, targets:, ...)", path)
    return parse_recipe(data, path)


def validate_settings(where: str = "command line", **values: object) -> Validate:
    """Validation settings given as options (`siliconvert validate`): a bad value is one RecipeError line."""
    try:
        settings = Validate.model_validate(values)
    except ValidationError as e:
        raise RecipeError(_first_problem(e), where) from None
    if settings.context > settings.tokens:
        raise RecipeError(f"context ({settings.context}) must not exceed tokens ({settings.tokens})", where)
    return settings


def parse_recipe(data: dict, where: Path | str = "recipe") -> Recipe:
    try:
        return recipe_model(tuple(entry.target for entry in format_entries())).model_validate(data)
    except ValidationError as e:
        raise RecipeError(_first_problem(e), where) from None


@functools.cache
def recipe_model(targets: tuple[type[TargetSpec], ...]) -> type[Recipe]:
    """The Recipe whose targets are these schemas, told apart by their `format` (the registered formats')."""
    if not targets:
        raise RecipeError("no format is registered: import siliconvert.formats first")
    union = Annotated[Union[targets], Field(discriminator="format")] if len(targets) > 1 else targets[0]  # noqa: UP007
    return create_model("Recipe", __base__=Recipe, targets=(list[union], Field(min_length=1)))


def _first_problem(error: ValidationError) -> str:
    problem = error.errors()[0]
    formats = [entry.name for entry in format_entries()]
    # Drop the union tag pydantic inserts for discriminated unions ("targets.0.mlx.bits" → "targets.0.bits").
    loc = [str(p) for p in problem["loc"] if p not in formats]
    key = ".".join(loc).replace("validate_", "validate") or "recipe"
    kind = problem["type"]
    if kind == "extra_forbidden":
        return f"unknown key {key!r}"
    if kind == "missing":
        return f"missing required key {key!r}"
    if kind == "union_tag_invalid":
        return f"{key}: unknown format {problem['ctx']['tag']!r} (known: {', '.join(formats)})"
    message = problem["msg"].removeprefix("Value error, ")
    return f"{key}: {message} (got {short(problem.get('input'))})" if key != "recipe" else message
