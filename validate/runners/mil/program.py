"""A saved .mlpackage, loaded back from disk and run op by op, in numpy (the reference) or in torch.

The spec comes from `MLModel(path, skip_model_load=True)`; const values come from the package's own
weight.bin (values.py). Each function is compiled once into a list of steps; running it walks the list with
an environment of named values, storing every op result in its declared type (fp16 activations stay fp16),
and reads/writes the caller's states in place.

Compiling reads the spec and checks every blob record; the weights themselves (blob consts, and what load-time
ops make of them) are read when a function first runs, and `release_weights` drops them again, so that a
caller running a large model package by package holds one package's weights at a time.

An engine holds the values and runs the ops: NumpyEngine (ops.py, the reference) or torch_ops.TorchEngine (the
same semantics on CUDA or the CPU). Load-time ops run in numpy on either: once, on the bytes read from weight.bin;
their results join the weights in the engine.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from siliconvert.errors import ArtifactError
from siliconvert.validate.runners.mil.ops import OPS, Unsupported, wide
from siliconvert.validate.runners.mil.values import Blob, BlobFile, TensorType, immediate

# Ops evaluated when the weights load: their inputs are all consts (Core ML does the same when it compiles a
# model).
LOAD_TIME_OPS = ("constexpr_blockwise_shift_scale", "constexpr_lut_to_dense")
STATE_OPS = ("read_state", "write_state")
# Weights these op inputs read are held widened to float32 (exactly) from the time they load: the products
# run as float32 BLAS calls (numpy has no fp16 kernels), and widening a weight at every call would cost more
# than the product itself. Other weights (an embedding table, which `gather` only indexes) stay as stored.
BLAS_OPERANDS = {"conv": ("weight",), "matmul": ("x", "y")}


@dataclass(frozen=True)
class Step:
    op_type: str
    name: str  # the op's first output, to name it in errors
    inputs: dict[str, list[str]]  # MIL input → the names it binds (several for tuple inputs like concat's)
    outputs: list[tuple[str, TensorType]]


@dataclass(frozen=True)
class LoadTimeStep:
    """A load-time op, evaluated when the weights load, with the values its step's bindings name."""

    step: Step
    weights: dict[str, Hashable]  # bound name → weight key, for names bound to weights
    consts: dict[str, Any]  # bound name → value, for names bound to immediate consts


@dataclass(frozen=True)
class Function:
    steps: list[Step]
    inputs: dict[str, TensorType]
    states: dict[str, TensorType]
    outputs: list[str]
    consts: dict[str, Any]  # immediate consts, including values written inline in an op's inputs
    weights: dict[str, Hashable]  # names bound to weights → their key in the program's loaded weights


class NumpyEngine:
    """Values as numpy arrays, ops from ops.py: the reference the torch engine is tested against."""

    ops = OPS
    device_name = "CPU"

    def value(self, array: np.ndarray) -> np.ndarray:
        """A weight or an input, as this engine holds it."""
        return array

    def const(self, value):
        """An immediate const (fp16 already widened), as this engine's ops take it."""
        return value

    def widen(self, value: np.ndarray) -> np.ndarray:
        """A weight held for products: float32 (exactly), so that they run as float32 BLAS calls."""
        return wide(value)

    def zeros(self, declared: TensorType) -> np.ndarray:
        return np.zeros(declared.shape, declared.dtype)

    def store(self, result, declared: TensorType) -> np.ndarray:
        return store(result, declared)

    def output(self, value) -> np.ndarray:
        return value

    def running(self):
        return nullcontext()

    def free_bytes(self) -> int | None:
        """Memory free on a device of its own (None: the host's, which RESIDENT_WEIGHT_BYTES budgets)."""
        return None


def engine_named(name: str):
    """"numpy" or "torch" (on CUDA where torch sees a GPU, else on the CPU)."""
    if name == "numpy":
        return NumpyEngine()
    if name == "torch":
        from siliconvert.validate.runners.mil.torch_ops import TorchEngine

        return TorchEngine()
    raise ValueError(f"unknown MIL interpreter engine {name!r} (numpy or torch)")


class MILProgram:
    """One ML Program package: run any of its functions on numpy inputs and a dict of states (held by the
    engine: numpy arrays or torch tensors), returning numpy outputs."""

    def __init__(self, package: Path, engine: str = "numpy"):
        self.package = Path(package)
        self.engine = engine_named(engine)
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
        # Functions share weights: one key per blob (or per load-time op on the same inputs), loaded once.
        self._sources: dict[Hashable, Blob | LoadTimeStep] = {}
        self._widened: set[Hashable] = set()  # keys of weights held as float32
        self._weights: dict[Hashable, np.ndarray] | None = None  # loaded: key → value
        self.functions = {name: self._compile(name, function)
                          for name, function in spec.mlProgram.functions.items()}

    @property
    def held_bytes(self) -> int:
        """What the weights take while loaded (float32 where widened), known without loading them."""
        total = 0
        for key in self._used_weights():
            source = self._sources[key]
            declared = source.declared if isinstance(source, Blob) else source.step.outputs[0][1]
            itemsize = 4 if key in self._widened else declared.dtype.itemsize
            total += int(np.prod(declared.shape, dtype=np.int64)) * itemsize
        return total

    def make_states(self, function: str) -> dict[str, Any]:
        """Fresh (zeroed) states for one sequence, held by the engine."""
        return {name: self.engine.zeros(t) for name, t in self.functions[function].states.items()}

    def run(self, function: str, inputs: dict[str, np.ndarray], states: dict[str, Any]) -> dict[str, np.ndarray]:
        """Run a function; `states` is updated in place (write_state). Loads the weights if they are not."""
        fn = self.functions[function]
        weights = self._load()
        env: dict[str, Any] = dict(fn.consts)
        env.update((name, weights[key]) for name, key in fn.weights.items())
        for name, declared in fn.inputs.items():
            value = np.asarray(inputs[name])
            if value.shape != declared.shape:
                raise ValueError(f"input {name!r} has shape {value.shape}, {function} takes {declared.shape}")
            env[name] = self.engine.value(value.astype(declared.dtype))
        with self.engine.running():
            for step in fn.steps:
                if step.op_type == "read_state":
                    results = [states[step.inputs["input"][0]]]
                elif step.op_type == "write_state":
                    state = step.inputs["input"][0]
                    states[state] = self.engine.store(env[step.inputs["data"][0]], fn.states[state])
                    continue
                else:
                    results = self._call(step, env, self.engine.ops)
                for (name, declared), result in zip(step.outputs, results, strict=True):
                    env[name] = checked(self.engine.store(result, declared), declared,
                                        f"{self.package.name}:{function}:{step.name}")
        return {name: self.engine.output(env[name]) for name in fn.outputs}

    def release_weights(self) -> None:
        """Drop the loaded weights; the next run reads them again."""
        self._weights = None

    def _call(self, step: Step, env: dict[str, Any], ops: dict) -> list[Any]:
        args = {key: env[names[0]] if len(names) == 1 else [env[n] for n in names]
                for key, names in step.inputs.items()}
        try:
            result = ops[step.op_type](**args)
        except (Unsupported, TypeError, ValueError, IndexError) as e:  # a malformed op, named
            raise ArtifactError(f"op {step.op_type} ({step.name}): {e}", self.package) from None
        return list(result) if isinstance(result, tuple) else [result]

    # ---- weights ------------------------------------------------------------------------------
    def _load(self) -> dict[Hashable, np.ndarray]:
        if self._weights is None:
            # one weight at a time, widened as soon as it is read: the load holds no second copy of the package
            self._weights = {}
            for key in self._used_weights():
                value = self.engine.value(self._evaluate(key))
                self._weights[key] = self.engine.widen(value) if key in self._widened else value
        return self._weights

    def _used_weights(self) -> set[Hashable]:
        """Keys of the weights the functions' steps read (not those only load-time ops read)."""
        return {key for function in self.functions.values() for key in function.weights.values()}

    def _evaluate(self, key: Hashable) -> np.ndarray:
        """A weight's value in its declared type: read from weight.bin, or a load-time op on such values
        (read for it and dropped after)."""
        source = self._sources[key]
        if isinstance(source, Blob):
            return self.blobs.read(source)
        env = source.consts | {name: self._evaluate(k) for name, k in source.weights.items()}
        step, declared = source.step, source.step.outputs[0][1]
        return checked(store(self._call(step, env, OPS)[0], declared), declared, f"{self.package.name}:{step.name}")

    # ---- compiling ----------------------------------------------------------------------------
    def _compile(self, function_name: str, function) -> Function:
        where = f"{self.package.name}:{function_name}"
        inputs, states = {}, {}
        for value in function.inputs:
            kind = value.type.WhichOneof("type")
            (states if kind == "stateType" else inputs)[value.name] = TensorType(value.type, where)
        block = function.block_specializations[function.opset]
        consts: dict[str, Any] = {}
        weights: dict[str, Hashable] = {}
        keys: dict[str, Hashable] = {}  # immediate const name → what identifies its value across functions
        steps: list[Step] = []
        for operation in block.operations:
            outputs = [(o.name, TensorType(o.type, f"{where}:{o.name}")) for o in operation.outputs]
            name = outputs[0][0] if outputs else operation.type
            if operation.type == "const":
                self._const(name, operation.attributes["val"], outputs[0][1], where, consts, weights, keys)
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
                        self._const(inline, binding.value, TensorType(binding.value.type, where), where,
                                    consts, weights, keys)
                        bindings[key].append(inline)
            step = Step(operation.type, name, bindings, outputs)
            if operation.type in LOAD_TIME_OPS:
                used = [n for names in bindings.values() for n in names]
                identity = (operation.type, *sorted(
                    (k, weights[n] if n in weights else keys[n]) for k, (n,) in bindings.items()))
                self._sources.setdefault(identity, LoadTimeStep(
                    step, {n: weights[n] for n in used if n in weights}, {n: consts[n] for n in used if n in consts}))
                weights[name] = identity
                continue
            for operand in BLAS_OPERANDS.get(operation.type, ()):
                self._widened.update(weights[n] for n in bindings.get(operand, ()) if n in weights)
            steps.append(step)
        used = {n for step in steps for names in step.inputs.values() for n in names} | set(block.outputs)
        return Function(steps, inputs, states, list(block.outputs),
                        {n: self.engine.const(v) for n, v in consts.items() if n in used},
                        {n: k for n, k in weights.items() if n in used})

    def _const(self, name: str, value, declared: TensorType, where: str, consts: dict[str, Any],
               weights: dict[str, Hashable], keys: dict[str, Hashable]) -> None:
        """Bind a const: an immediate value into `consts` (fp16 widened to fp32 once: exact, and small), a blob
        into `weights` by its record's offset (its record checked now, its values read when weights load)."""
        if value.WhichOneof("value") == "immediateValue":
            result = immediate(value, declared, where)
            consts[name] = wide(result) if isinstance(result, np.ndarray) else result
            keys[name] = value.SerializeToString()
            return
        if self.blobs is None:
            raise ArtifactError("the package has weights in its spec but no weights/weight.bin", self.package)
        offset = int(value.blobFileValue.offset)
        self._sources.setdefault(offset, self.blobs.locate(offset, declared))
        weights[name] = offset


def store(result: np.ndarray, declared: TensorType) -> np.ndarray:
    """An op result in its declared type (float results round to fp16 here, once per op)."""
    with np.errstate(over="ignore"):  # values past ±65504 become ±inf in fp16, as on the device
        return np.asarray(result).astype(declared.dtype, copy=False)


def checked(value, declared: TensorType, where: str):
    """A stored result, refused unless it has the shape its op declares."""
    if tuple(value.shape) != declared.shape:
        raise ArtifactError(f"{where}: the interpreter computed shape {tuple(value.shape)}, "
                            f"the program declares {declared.shape}")
    return value
