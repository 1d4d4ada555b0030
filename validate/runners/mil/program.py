"""A saved .mlpackage, loaded back from disk and run op by op in numpy.

The spec comes from `MLModel(path, skip_model_load=True)`; const values come from the package's own
weight.bin (values.py). Each function is compiled once into a list of steps; running it walks the list with
an environment of named values, storing every op result in its declared type (fp16 activations stay fp16),
and reads/writes the caller's states in place.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from siliconvert.errors import ArtifactError
from siliconvert.validate.runners.mil.ops import OPS, Unsupported, wide
from siliconvert.validate.runners.mil.values import BlobFile, TensorType, immediate

# Ops evaluated once at load: their inputs are all consts (Core ML does the same when it compiles a model).
LOAD_TIME_OPS = ("constexpr_blockwise_shift_scale",)
STATE_OPS = ("read_state", "write_state")


@dataclass(frozen=True)
class Step:
    op_type: str
    name: str  # the op's first output, to name it in errors
    inputs: dict[str, list[str]]  # MIL input → the names it binds (several for tuple inputs like concat's)
    outputs: list[tuple[str, TensorType]]


@dataclass(frozen=True)
class Function:
    steps: list[Step]
    inputs: dict[str, TensorType]
    states: dict[str, TensorType]
    outputs: list[str]
    consts: dict[str, Any]  # every const, including values written inline in an op's inputs


class MILProgram:
    """One ML Program package: run any of its functions on numpy inputs and a dict of states."""

    def __init__(self, package: Path):
        self.package = Path(package)
        logging.getLogger("coremltools").setLevel(logging.ERROR)  # it warns that it cannot predict here
        import coremltools as ct

        try:
            model = ct.models.MLModel(str(self.package), skip_model_load=True)
        except Exception as e:  # coremltools raises bare Exceptions for unreadable packages
            raise ArtifactError(f"not a loadable Core ML package ({e})", self.package) from None
        spec = model.get_spec()
        if spec.WhichOneof("Type") != "mlProgram":
            raise ArtifactError("not an ML Program (neural-network models are not supported)", self.package)
        weights = Path(model.weights_dir) / "weight.bin" if model.weights_dir else None
        self.blobs = BlobFile(weights) if weights and weights.is_file() else None
        # Functions share weights: values are loaded once per blob offset (or per load-time op on them).
        self._shared: dict[Any, np.ndarray] = {}
        self.functions = {name: self._compile(name, function)
                          for name, function in spec.mlProgram.functions.items()}

    def make_states(self, function: str) -> dict[str, np.ndarray]:
        """Fresh (zeroed) states for one sequence."""
        return {name: np.zeros(t.shape, t.dtype) for name, t in self.functions[function].states.items()}

    def run(self, function: str, inputs: dict[str, np.ndarray], states: dict[str, np.ndarray]
            ) -> dict[str, np.ndarray]:
        """Run a function; `states` is updated in place (write_state)."""
        fn = self.functions[function]
        env: dict[str, Any] = dict(fn.consts)
        for name, declared in fn.inputs.items():
            value = np.asarray(inputs[name])
            if value.shape != declared.shape:
                raise ValueError(f"input {name!r} has shape {value.shape}, {function} takes {declared.shape}")
            env[name] = value.astype(declared.dtype)
        for step in fn.steps:
            if step.op_type == "read_state":
                results = [states[step.inputs["input"][0]]]
            elif step.op_type == "write_state":
                state = step.inputs["input"][0]
                states[state] = env[step.inputs["data"][0]].astype(fn.states[state].dtype)
                continue
            else:
                results = self._call(step, env)
            for (name, declared), result in zip(step.outputs, results, strict=True):
                env[name] = store(result, declared, f"{self.package.name}:{function}:{step.name}")
        return {name: env[name] for name in fn.outputs}

    def _call(self, step: Step, env: dict[str, Any]) -> list[np.ndarray]:
        args = {key: env[names[0]] if len(names) == 1 else [env[n] for n in names]
                for key, names in step.inputs.items()}
        try:
            result = OPS[step.op_type](**args)
        except (Unsupported, TypeError, ValueError, IndexError) as e:  # a malformed op, named
            raise ArtifactError(f"op {step.op_type} ({step.name}): {e}", self.package) from None
        return list(result) if isinstance(result, tuple) else [result]

    # ---- loading ------------------------------------------------------------------------------
    def _compile(self, function_name: str, function) -> Function:
        where = f"{self.package.name}:{function_name}"
        inputs, states = {}, {}
        for value in function.inputs:
            kind = value.type.WhichOneof("type")
            (states if kind == "stateType" else inputs)[value.name] = TensorType(value.type, where)
        block = function.block_specializations[function.opset]
        consts: dict[str, Any] = {}
        keys: dict[str, Any] = {}  # const name → what identifies its value across functions
        steps: list[Step] = []
        for operation in block.operations:
            outputs = [(o.name, TensorType(o.type, f"{where}:{o.name}")) for o in operation.outputs]
            name = outputs[0][0] if outputs else operation.type
            if operation.type == "const":
                consts[name], keys[name] = self._const(operation.attributes["val"], outputs[0][1], where)
                continue
            if operation.type not in OPS and operation.type not in STATE_OPS:
                raise ArtifactError(f"op {operation.type!r} ({name}) is not implemented by the MIL interpreter",
                                    self.package)
            bindings: dict[str, list[str]] = {}
            for key, argument in operation.inputs.items():
                bindings[key] = []
                for i, binding in enumerate(argument.arguments):
                    if binding.WhichOneof("binding") == "name":
                        bindings[key].append(binding.name)
                    else:  # a value written inline: becomes a const of its own
                        inline = f"{name}/{key}/{i}"
                        consts[inline], keys[inline] = self._const(
                            binding.value, TensorType(binding.value.type, where), where)
                        bindings[key].append(inline)
            step = Step(operation.type, name, bindings, outputs)
            if operation.type in LOAD_TIME_OPS:
                shared = (operation.type, *sorted((k, keys[n]) for k, (n,) in bindings.items()))
                if shared not in self._shared:
                    value = store(self._call(step, consts)[0], outputs[0][1], f"{where}:{name}")
                    self._shared[shared] = wide(value)
                consts[name], keys[name] = self._shared[shared], shared
                continue
            steps.append(step)
        return Function(steps, inputs, states, list(block.outputs), consts)

    def _const(self, value, declared: TensorType, where: str) -> tuple[Any, Any]:
        """A const's value and its sharing key; fp16 is widened to fp32 once (exact, and it spares every
        op the conversion)."""
        if value.WhichOneof("value") == "immediateValue":
            result = immediate(value, declared, where)
            return (wide(result) if isinstance(result, np.ndarray) else result), value.SerializeToString()
        if self.blobs is None:
            raise ArtifactError("the package has weights in its spec but no weights/weight.bin", self.package)
        offset = int(value.blobFileValue.offset)
        if offset not in self._shared:
            self._shared[offset] = wide(self.blobs.read(offset, declared))
        return self._shared[offset], offset


def store(result: np.ndarray, declared: TensorType, where: str) -> np.ndarray:
    """An op result in its declared type and shape (float results round to fp16 here, once per op)."""
    result = np.asarray(result)
    if result.shape != declared.shape:
        raise ArtifactError(f"{where}: the interpreter computed shape {result.shape}, "
                            f"the program declares {declared.shape}")
    with np.errstate(over="ignore"):  # values past ±65504 become ±inf in fp16, as on the device
        return result.astype(declared.dtype)
