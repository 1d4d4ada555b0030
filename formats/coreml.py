"""Core ML: a folder of ML Program packages (one per chunk of layers) and the manifest an app drives them by; one
release folder per precision."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

import yaml

from siliconvert.artifacts import Artifact, Release, Writer
from siliconvert.calibration import Calibrations
from siliconvert.checkpoint import Checkpoint
from siliconvert.errors import ArtifactError, RecipeError, short
from siliconvert.format import Format, artifact_bytes
from siliconvert.recipe import CoreMLTarget, QuantPlan

SILICONVERT_MANIFEST = "manifest.json"  # written by siliconvert.convert.coreml next to its chunks
MANIFEST = "coreml-manifest.json"  # written in a release folder when an artifact comes without one
# Core ML's package layout (coremltools writes it so, and convert/coreml/package.py after it): an ML Program's
# consts name their bytes by this URL, which resolves to this file inside the .mlpackage
WEIGHT_URL = b"@model_path/weights/weight.bin"
PACKAGE_WEIGHTS = "Data/com.apple.CoreML/weights/weight.bin"


class CoreML(Format):
    name = "coreml"
    target = CoreMLTarget
    runner = "siliconvert.validate.runners.coreml:CoreMLRunner"
    library = "coreml"
    tags = ("coreml",)
    looks_like = "a Core ML folder with manifest.json"
    plan_bits = (4.0625, 16.0)  # pal4 (4-bit indices, a float16 table per 16 rows of 256 or more) to float16
    gptq_plan_bits = (3.0625, 16.0)  # from pal3: a plan of GPTQ-rounded weights takes it (convert/coreml/plan.py)
    # every compressed precision, in one target beside the fp16 package it is made from (rounded by the recipe's
    # target's method, as its plans are)
    fixed_quants = ("int8", "int4", "int4-zp", "pal8", "pal6", "pal6-lut8", "pal4", "pal4-lut8", "pal3", "pal3-lut8",
                    "pal2", "pal2-lut8")
    planned_at = ("pal4", "int4", "pal6")  # the sizes a sweep's plans aim at: int4-class, and one above
    anchor = "int4"
    # every Core ML target builds the fp16 package: several in one run stopped in the planned writer (KeyError on an
    # op of the fp16 graph, the demo's sweep of 2026-12-07), and a recipe holds one
    one_target_a_run = True

    def writer(self, checkpoint: Checkpoint, target: CoreMLTarget, out_dir: Path, model_name: str,
               calibration: Calibrations) -> Writer:
        from siliconvert.convert.coreml import CoreMLWriter

        return CoreMLWriter(checkpoint, target, out_dir, model_name, calibration=calibration)

    def calibration_needs(self, target: CoreMLTarget) -> dict[str, set[str]]:
        from siliconvert.convert.coreml import calibration_needs

        return calibration_needs(target)

    def preflight(self, target: CoreMLTarget, checkpoint: Checkpoint, key: str, where: Path | str) -> None:
        if target.chunks != "auto" and target.chunks > checkpoint.spec.num_layers:
            raise RecipeError(f"{key}.chunks is {target.chunks}, more than the model's "
                              f"{checkpoint.spec.num_layers} layers", where)

    def plan_range(self, target: CoreMLTarget) -> tuple[float, float]:
        return self.gptq_plan_bits if target.method == "gptq" else self.plan_bits

    def replanned(self, target: CoreMLTarget, plan: QuantPlan) -> CoreMLTarget:
        # its fp16 package is built again too: the planned one is made from it
        return target.model_copy(update={"plan": plan, "precision": ["auto"]})

    def sweep_fixed(self, targets: Sequence[CoreMLTarget], quants: Sequence[str]) -> list[CoreMLTarget]:
        # the recipe's first Core ML target's packaging (context, chunks, interpreter), every precision asked in one
        return [targets[0].model_copy(update={"precision": list(quants), "plan": None})] if quants else []

    def sweep_planned(self, targets: Sequence[CoreMLTarget], plan: QuantPlan) -> CoreMLTarget:
        # the recipe's first Core ML target's packaging and method
        return self.replanned(targets[0], plan)

    def aims_at(self, quant: str) -> bool:
        return _precision(quant) in self.planned_at

    def is_anchor(self, quant: str) -> bool:
        return _precision(quant) == self.anchor

    def detect(self, path: Path) -> Artifact | None:
        manifest = path / SILICONVERT_MANIFEST
        if not manifest.is_file() or not any(path.glob("*.mlpackage")):
            return None
        precision = _json_object(manifest).get("precision", "fp16")
        return Artifact(self.name, precision if isinstance(precision, str) else "fp16", path)

    def check(self, artifact: Artifact) -> None:
        for package in sorted(artifact.path.glob("*.mlpackage")):
            check_package(package)

    def describe(self, artifact: Artifact) -> dict[str, Any]:
        return {"manifest": _json_object(artifact.path / SILICONVERT_MANIFEST)}

    def validation_memory(self, artifact: Artifact, gpu: bool) -> tuple[int, int]:
        # the MIL interpreter (validate/runners/coreml.py) holds every weight widened to float32; off the GPU, a
        # model beyond RESIDENT_WEIGHT_BYTES one package at a time. On the GPU the widened weights live there (erring
        # high: the whole model, as when half the GPU's free memory holds it), each package's file passing through
        # the host as it is read
        from siliconvert.validate.runners.coreml import RESIDENT_WEIGHT_BYTES

        packages = [artifact_bytes(package) for package in artifact.path.glob("*.mlpackage")] or [0]
        # int8 / pal4-lut8 → 8 / 4 bits a weight; a planned package ("auto") mixes them, counted at 4
        stored = re.match(r"(?:int|pal)(\d+)", artifact.quant)
        widen = 2 if artifact.quant == "fp16" else 32 // int(stored[1]) if stored else 8
        if gpu:
            return max(packages), widen * sum(packages)
        resident = widen * sum(packages) <= RESIDENT_WEIGHT_BYTES
        return widen * (sum(packages) if resident else max(packages)) + max(packages), 0

    def release_name(self, model: str, quant: str) -> str:
        return f"{model}-CoreML" if quant == "fp16" else f"{model}-CoreML-{quant}"

    def release_files(self, release: Release) -> list[tuple[Path, str]]:
        (entry,) = release.shipped
        source = Path(entry["path"])
        # a folder of chunk packages goes in whole; a single .mlpackage (itself a folder) or .mlmodel by its name
        return [(source, "" if source.is_dir() and source.suffix != ".mlpackage" else source.name)]

    def extra_files(self, release: Release, folder: Path, recipe_text: str) -> dict[str, str]:
        if siliconvert_manifest(folder) is not None:
            return {}
        manifest = describe_packages(folder, recipe_context(recipe_text))
        return {MANIFEST: json.dumps(manifest, indent=2, sort_keys=True) + "\n"}

    def summary(self, release: Release) -> str:
        entry = release.shipped[0]
        plan = entry.get("plan")
        planned = f", precision planned per weight at {plan['bits_per_weight']:.2f} bits" if plan else ""
        return f"Core ML ML Program ({entry['quant']}{planned}, stateful KV cache, iOS 18 / macOS 15)"

    def usage(self, release: Release, folder: Path) -> list[str]:
        interface = package_interface(folder)
        context = f"{interface.context} tokens" if interface.context else "see the manifest"
        chained = (f"Run the packages in this order, each one's output feeding the next, each with its own state: "
                   f"{', '.join(f'`{p}`' for p in interface.packages)}." if len(interface.packages) > 1 else "")
        function = ([f'config.functionName = "{interface.functions[0]}"  // functions: '
                     f'{", ".join(interface.functions)}'] if len(interface.functions) > 1 else [])
        package = interface.packages[0].rsplit(".", 1)
        return [
            f"`{interface.manifest}` lists every package with its inputs, outputs and KV-cache states "
            f"(context: {context}). {chained}".rstrip(), "",
            "```swift", "import CoreML", "",
            f'let url = Bundle.main.url(forResource: "{package[0]}", withExtension: "{package[1]}")!',
            "let config = MLModelConfiguration()", *function,
            "let model = try MLModel(contentsOf: try await MLModel.compileModel(at: url), configuration: config)",
            f"let state = model.makeState()  // holds {', '.join(interface.states) or 'no state'} between calls",
            f"// inputs: {', '.join(interface.inputs)}; each array takes the shape and type the model declares",
            "var features: [String: MLFeatureValue] = [:]",
            "for (name, input) in model.modelDescription.inputDescriptionsByName {",
            "    let constraint = input.multiArrayConstraint!",
            "    features[name] = MLFeatureValue(multiArray: try MLMultiArray(shape: constraint.shape, "
            "dataType: constraint.dataType))",
            "}",
            "// ... write the token ids and the position into the arrays ...",
            "let output = try await model.prediction(from: MLDictionaryFeatureProvider(dictionary: features), "
            "using: state)",
            "```",
        ]


def _precision(quant: str) -> str:
    """The precision a Core ML artifact's name holds, without its rounding method (int4-gptq → int4: the target's
    `variant`)."""
    for method in get_args(CoreMLTarget.model_fields["method"].annotation):
        quant = quant.removesuffix(f"-{method}")
    return quant


def check_package(package: Path) -> None:
    """An .mlpackage's Manifest.json, the files it lists, and the weight file its spec names, before Core ML
    (or coremltools) opens it."""
    manifest = _json_object(package / "Manifest.json")
    items = manifest.get("itemInfoEntries")
    root = items.get(manifest.get("rootModelIdentifier")) if isinstance(items, dict) else None
    if not isinstance(root, dict) or not isinstance(root.get("path"), str):
        raise ArtifactError("Manifest.json names no root model (rootModelIdentifier in itemInfoEntries)",
                            package / "Manifest.json")
    for item in items.values():
        listed = package / "Data" / str(item.get("path", "")) if isinstance(item, dict) else package
        if not listed.exists():
            raise ArtifactError(f"Manifest.json lists {short(item.get('path'))}, which is missing", package)
    spec = package / "Data" / root["path"]
    if not spec.is_file():
        raise ArtifactError(f"the model spec {root['path']} is not a file", package)
    weights = package / PACKAGE_WEIGHTS
    if WEIGHT_URL in spec.read_bytes() and not weights.is_file():
        raise ArtifactError(f"{PACKAGE_WEIGHTS} is missing (the model spec reads its weights from it)", package)


def _json_object(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ArtifactError("missing", path)
    try:
        parsed = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ArtifactError(f"not valid JSON ({short(str(e))})", path) from None
    if not isinstance(parsed, dict):
        raise ArtifactError("not a JSON object", path)
    return parsed


@dataclass(frozen=True)
class PackageInterface:
    manifest: str  # the JSON file an app reads to drive the packages
    packages: list[str]  # in the order an app runs them, each feeding the next
    functions: list[str]
    inputs: list[str]  # of the first package
    states: list[str]
    context: int | None


def package_interface(folder: Path) -> PackageInterface:
    theirs = siliconvert_manifest(folder)
    if theirs is not None:
        chunks = theirs["chunks"]
        return PackageInterface(SILICONVERT_MANIFEST, [c["package"] for c in chunks],
                                list(theirs.get("functions", {})), list(chunks[0]["inputs"]),
                                list(chunks[0].get("states", {})), theirs.get("context_length"))
    ours = json.loads((folder / MANIFEST).read_text())
    first = ours["packages"][0]["functions"]
    function = first[next(iter(first))]
    return PackageInterface(MANIFEST, [p["package"] for p in ours["packages"]], list(first),
                            list(function["inputs"]), list(function["states"]), ours["context_length"])


def siliconvert_manifest(folder: Path) -> dict | None:
    """siliconvert's own Core ML manifest, when present and in the shape this module reads."""
    path = folder / SILICONVERT_MANIFEST
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    chunks = manifest.get("chunks") if isinstance(manifest, dict) else None
    return manifest if isinstance(chunks, list) and chunks and "package" in chunks[0] else None


def describe_packages(folder: Path, context: int | None) -> dict:
    """Inputs, outputs and states of every package in `folder`, read from the packages' own specs."""
    packages = sorted(p for p in folder.iterdir() if p.suffix in (".mlpackage", ".mlmodel"))
    if not packages:
        raise ArtifactError("no .mlpackage or .mlmodel in the Core ML artifact", folder)
    import logging

    # On Linux coremltools warns at import that it cannot run models; reading a spec does not need to.
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    from coremltools.models.utils import load_spec

    return {
        "context_length": context,
        "packages": [{"package": p.name, "functions": _functions(load_spec(str(p)))} for p in packages],
    }


def _functions(spec) -> dict:
    description = spec.description
    # A multifunction package lists each function; a single-function one describes itself.
    named = [(f.name, f) for f in description.functions] or [("main", description)]
    return {name: {"inputs": _features(f.input), "outputs": _features(f.output), "states": _features(f.state)}
            for name, f in named}


def _features(features) -> dict:
    described = {}
    for feature in features:
        kind = feature.type.WhichOneof("Type")
        array = {"multiArrayType": feature.type.multiArrayType,
                 "stateType": feature.type.stateType.arrayType}.get(kind)
        described[feature.name] = (
            {"shape": list(array.shape), "dtype": array.ArrayDataType.Name(array.dataType)} if array is not None
            else {"type": kind}
        )
    return described


def recipe_context(recipe_text: str) -> int | None:
    """The context length the recipe built the Core ML target for (its default when the key is left out)."""
    try:
        recipe = yaml.safe_load(recipe_text)
    except yaml.YAMLError:
        return None
    targets = recipe.get("targets") if isinstance(recipe, dict) else None
    for target in targets if isinstance(targets, list) else []:
        if isinstance(target, dict) and target.get("format") == CoreML.name:
            return int(target.get("context", CoreMLTarget.model_fields["context"].default))
    return None
