"""MLX runner: the artifact opened by `mlx_lm.load`, exactly as a user would open it.

Where mlx has no GPU (its CPU backend, as on Linux), its products are the cost: the `mlx[cpu]` wheel multiplies by
4-bit weights one scalar at a time, summing in the activations' own type (mlx 0.32.4, backend/cpu/quantized.cpp
`_qmm_t`), at 0.2 GFLOP/s in bfloat16 and 0.05 in float16; its float16 and bfloat16 matmuls run at 3 to 5 GFLOP/s
in its own kernels, and its float32 ones through the reference BLAS it bundles at 4 to 5, unless torch's BLAS takes
them (siliconvert/mlx_blas.py: 54 to 186 GFLOP/s). There (engine "mlx-dequantized", the default) mlx-lm's model
keeps its own code and mlx its arithmetic: the quantized layers are swapped for float layers holding `mx.dequantize`
of the folder's own arrays in the artifact's compute type, and with torch's BLAS in every float layer multiplies in
float32 and rounds its result to the compute type once (`widen_float_layers`), which is how mlx's GPU kernels sum.
Where even that would take longer than MAX_CPU_SECONDS, or hold more than half the memory free (`held_bytes`),
`DequantizedMLXRunner` stands in: the folder's weights, read and dequantized as mlx-lm would compute with them, run
through the same layer-by-layer transformers forward as the reference, under a row that says so.

For a mixture of experts both record the experts each sparse layer chose while scoring (`expert_choices`):
mlx-lm's, as its MoE block feeds them to its SwitchGLU; the stand-in's, from transformers' routers run on the
folder's router weights.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache, partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from siliconvert import mlx_blas
from siliconvert.artifacts import cache_root
from siliconvert.errors import ArtifactError
from siliconvert.format import artifact_bytes
from siliconvert.validate.overlap import available_host_bytes
from siliconvert.validate.runners.base import Runner

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig

ENGINES = ("auto", "mlx", "mlx-dequantized", "torch")
FLOAT_TYPES = ("float32", "float16", "bfloat16")
# A default validation: 1024 scored tokens, and about 100 more for the KV-cache check.
TYPICAL_TOKENS = 1124
# `engine: auto` hands a run to DequantizedMLXRunner when mlx's CPU would take longer than this.
MAX_CPU_SECONDS = 600


def mlx_device_name() -> str:
    device = mx.default_device()
    if device.type == mx.cpu:
        return "CPU (mlx)"
    name = mx.device_info().get("device_name", "GPU")
    backend = "Metal" if mx.metal.is_available() else "CUDA"
    return f"{name} GPU ({backend})" if backend == "Metal" else f"{name} ({backend})"


def keep_cuda_kernels(architecture: str) -> Path:
    """Where mlx keeps the CUDA kernels it compiles, made to last: mlx compiles each kernel with NVRTC at its
    first use (about 75 s for a 7B model's on an H100) and keeps the cubin in MLX_PTX_CACHE_DIR, by default
    $TMPDIR/mlx/<version>/ptx, lost with /tmp and named by kernel and shape only, not by GPU. Under the
    siliconvert cache, one folder per mlx version and GPU architecture, they are compiled once per machine and
    reused by every later run. An MLX_PTX_CACHE_DIR already set is kept. mlx reads it at its first compile."""
    folder = cache_root() / "mlx-cuda-kernels" / mx.__version__ / re.sub(r"[^\w.-]", "_", architecture)
    return Path(os.environ.setdefault("MLX_PTX_CACHE_DIR", str(folder)))


def engine_option(options: dict) -> str:
    """The runner option `engine` ("auto" when absent), checked; unknown options are refused."""
    unknown = set(options) - {"engine"}
    if unknown:
        raise ArtifactError(f"unknown MLX runner option(s): {', '.join(sorted(unknown))}")
    engine = options.get("engine", "auto")
    if engine not in ENGINES:
        raise ArtifactError(f"unknown MLX engine {engine!r} ({', '.join(ENGINES)})")
    return engine


def choose_engine(path: Path, options: dict) -> str:
    """"mlx", "mlx-dequantized" or "torch": the option `engine`, or for "auto" what suits this model here.

    On a GPU mlx runs the folder as it is. On mlx's CPU a quantized folder runs dequantized (its quantized
    kernels are 15 to 80 times slower than its float ones, and sum in the activations' type), and any folder does
    where its float layers are widened (`widens`); torch stands in only where mlx's float matmuls would still take
    longer than MAX_CPU_SECONDS."""
    engine = engine_option(options)
    if engine != "auto":
        return engine
    if mx.default_device().type != mx.cpu:
        return "mlx"
    from mlx_lm.utils import load_config

    config = load_config(path)
    too_slow = estimated_cpu_seconds(config, folder_float_type(path, config)) > MAX_CPU_SECONDS
    too_big = held_bytes(path, config) > available_host_bytes() // 2
    if (too_slow or too_big) and stand_in_refusal(config) is None:
        return "torch"
    return "mlx-dequantized" if config.get("quantization") or widens() else "mlx"


def held_bytes(path: Path, config: dict) -> int:
    """What mlx-lm's model holds on mlx's CPU with the engine "mlx-dequantized": the folder's arrays, a quantized
    folder's weights dequantized to 16 bits beside them, and every weight in float32 too where widened. The stand-in
    reads one layer at a time instead."""
    size = artifact_bytes(path)
    quantization = config.get("quantization")
    bits = quantization.get("bits") if isinstance(quantization, dict) else None
    weights = size * 8 // bits if isinstance(bits, int) and bits > 0 else size // 2
    return size + (2 * weights if bits else 0) + (4 * weights if widens() else 0)


def stand_in_refusal(config: dict) -> str | None:
    """Why DequantizedMLXRunner cannot stand in for mlx-lm on this folder, or None where it can: a model file whose
    weights are not transformers' (norms with their offset folded in, names under a wrapper: mlx-lm's qwen3_5,
    qwen3_5_moe and qwen3_next; Mamba2's own names: granitemoehybrid) runs only as mlx-lm itself, however slow its CPU
    is."""
    from siliconvert.convert.mlx_arch import LAYOUTS

    layouts = [layout for layout in LAYOUTS.values() if layout.model_type == config.get("model_type")]
    if any(layout.folds_norm_offset for layout in layouts):
        return (f"mlx-lm's {config['model_type']} stores its norms as 1 + w and runs the gated delta rule: the torch "
                "stand-in reads weights as transformers' own and cannot run this folder")
    if any(layout.layers_apart for layout in layouts):
        return (f"mlx-lm's {config['model_type']} sizes its layers apart (global heads, kv-shared layers, per-layer "
                "inputs) from keys the torch stand-in does not rebuild into transformers' config: it cannot run this "
                "folder")
    if any(layout.experts is not None and layout.experts.stacks != "switch_mlp" for layout in layouts):
        return (f"mlx-lm's {config['model_type']} holds its experts' gate, up and down apart, with biases "
                "(transformers keeps them transposed, gate and up interleaved): the torch stand-in reads weights as "
                "transformers' own and cannot run this folder")
    if any("mamba2" in layout.mixers for layout in layouts):
        return (f"mlx-lm's {config['model_type']} runs Mamba2 with its own names (the router as router.layer, the "
                "shared MLP as mlp without experts): the torch stand-in reads weights as transformers' own and cannot "
                "run this folder")
    return None


def runs_own_model_file(path: Path) -> bool:
    """Whether the folder runs a model file of its own (config.json's `model_file`, which mlx_lm.load executes only
    with trust_remote_code=True): one siliconvert ships (`model_file: faithful`), byte for byte. Any other file is
    refused: validating a folder runs no code siliconvert did not write."""
    from mlx_lm.utils import load_config

    from siliconvert.convert.mlx_arch import model_file_path

    name = load_config(path).get("model_file")
    if name is None:
        return False
    ours = model_file_path(Path(str(name)).name)
    if str(name) != ours.name or not ours.is_file():
        raise ArtifactError(f"config.json's model_file {name!r} is not one siliconvert ships (convert/mlx_models/), "
                            "and running it would execute the folder's own code: refused", path)
    if not (path / ours.name).is_file() or (path / ours.name).read_bytes() != ours.read_bytes():
        raise ArtifactError(f"the folder's {ours.name} is not the one this siliconvert ships (another version's, or "
                            "edited), and running it would execute the folder's own code: refused; convert again",
                            path)
    return True


def folder_float_type(path: Path, config: dict) -> str:
    """The float type of an MLX folder's arrays ("float16", "bfloat16", "float32"): the most common one in its
    first shard's header (norms, scales and biases share it), else config.json's `dtype`, else float32."""
    import json

    names = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}
    shards = sorted(Path(path).glob("model*.safetensors"))
    if shards:
        with shards[0].open("rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        counted = [names[entry["dtype"]] for name, entry in header.items()
                   if name != "__metadata__" and entry["dtype"] in names]
        if counted:
            return max(set(counted), key=counted.count)
    dtype = config.get("dtype") or config.get("torch_dtype")
    return dtype if dtype in FLOAT_TYPES else "float32"


def widens() -> bool:
    """Whether float layers multiply in float32 here (`widen_float_layers`): on mlx's CPU, with torch's BLAS in."""
    return mx.default_device().type == mx.cpu and mlx_blas.blas == mlx_blas.TORCH_BLAS


@cache
def cpu_gflops(float_type: str, rows: int, columns: int) -> float:
    """How fast mlx's CPU multiplies here, in GFLOP/s, measured on the model's own shape: 64 tokens times a
    rows × columns weight in `float_type`, or in float32 where float layers are widened; the best of 3 runs after
    a warm-up (the cores may be shared)."""
    import time

    dtype = mx.float32 if widens() else getattr(mx, float_type)
    x, weight = mx.ones((64, rows), dtype=dtype), mx.ones((rows, columns), dtype=dtype)
    mx.eval(x @ weight)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        mx.eval(x @ weight)
        best = min(best, time.perf_counter() - start)
    return 2 * 64 * rows * columns / best / 1e9


def estimated_cpu_seconds(config: dict, float_type: str) -> float:
    """Roughly how long mlx's CPU backend takes over a default validation of the model in `config`, its weights
    (dequantized where quantized) multiplied in `float_type` (float32 where widened), at the speed `cpu_gflops`
    measures for its MLP's shape; attention's own products and the norms are left out."""
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    kv_heads = config.get("num_key_value_heads") or heads
    attention = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim  # q, o; k, v
    # a mixture of experts runs the chosen experts' MLPs and any shared expert (dense layers between sparse ones
    # are counted as sparse)
    experts_used = config.get("num_experts_per_tok", 1)
    feed_forward = (experts_used * (config.get("moe_intermediate_size") or config["intermediate_size"])
                    + config.get("shared_expert_intermediate_size", 0))
    per_layer = attention + 3 * hidden * feed_forward
    # the head is one vocab × hidden product per token, tied or not; the embedding is a lookup
    multiplied = config["num_hidden_layers"] * per_layer + config["vocab_size"] * hidden
    speed = cpu_gflops(float_type, hidden, min(feed_forward, 4 * hidden))
    return 2 * multiplied * TYPICAL_TOKENS / (speed * 1e9)


class MLXRunner(Runner):
    """options: `engine`: "mlx" (mlx-lm runs the artifact as it is), "mlx-dequantized" (mlx-lm runs it with its
    quantized layers swapped for float layers of the same weights: `dequantize_quantized_layers`, multiplying in
    float32 where `widens`: `widen_float_layers`), "torch" (a
    DequantizedMLXRunner opens instead), or "auto", the default (`choose_engine`)."""

    runtime = "mlx"

    def __new__(cls, path: Path, options: dict) -> MLXRunner:
        if cls is MLXRunner and choose_engine(Path(path), options) == "torch":
            return super().__new__(DequantizedMLXRunner)
        return super().__new__(cls)

    def __init__(self, path: Path, options: dict) -> None:
        from mlx_lm import load

        engine = choose_engine(Path(path), options)  # refuses unknown options
        if mx.default_device().type == mx.gpu and not mx.metal.is_available():  # CUDA: before any kernel runs
            info = mx.device_info()
            keep_cuda_kernels(str(info.get("architecture") or info.get("device_name", "gpu")))
        self.model, self.tokenizer = load(str(path), trust_remote_code=runs_own_model_file(Path(path)))
        self.device = mlx_device_name()
        if engine == "mlx-dequantized" and dequantize_quantized_layers(self.model):
            self.device += (f", weights dequantized by mlx to {mlx_compute_dtype(self.model)} (mlx's CPU has no fast "
                            "quantized kernels)")
        if mx.default_device().type == mx.cpu and widen_experts(self.model):
            self.device += ", experts in float32 (mlx's CPU gathers experts in float32 only)"
        if engine == "mlx-dequantized" and widens() and widen_float_layers(self.model):
            self.device += (f", float layers multiplied in float32 through {mlx_blas.blas} and rounded to "
                            f"{mlx_compute_dtype(self.model)} once, as mlx's GPU kernels sum")
        self.cache = None
        self.routers = ExpertRecorder(self.model)
        self.choices: np.ndarray | None = None

    def logits(self, tokens: np.ndarray) -> np.ndarray:
        return self._last(self.model(mx.array(tokens)[None]), all_positions=True)

    def logits_many(self, windows: np.ndarray) -> np.ndarray:
        windows = np.asarray(windows)
        with self.routers.recording():
            logits = super().logits_many(windows)
        self.choices = self.routers.choices(*windows.shape)
        return logits

    def expert_choices(self) -> np.ndarray | None:
        return self.choices

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def start(self, prompt: np.ndarray) -> np.ndarray:
        """mlx-lm's own cache for each layer, as generation makes it: a KVCache (or a rotating one) for attention,
        an ArraysCache holding the recurrent state of another mixer (a short convolution's last inputs)."""
        from mlx_lm.models.cache import make_prompt_cache

        self.cache = make_prompt_cache(self.model)
        return self._last(self.model(mx.array(prompt)[None], cache=self.cache))

    def step(self, token: int) -> np.ndarray:
        return self._last(self.model(mx.array([[token]]), cache=self.cache))

    @staticmethod
    def _last(out: mx.array, all_positions: bool = False) -> np.ndarray:
        out = out[0] if all_positions else out[0, -1]
        return np.array(out.astype(mx.float32))


def dequantize_quantized_layers(model: nn.Module) -> int:
    """Swap mlx-lm's quantized layers for their float counterparts (Linear, Embedding, SwitchLinear) holding
    `mx.dequantize` of the same arrays in the model's compute type; returns how many were swapped.

    The rest of the model is untouched, so mlx-lm's code runs and mlx does every product, as a float matmul
    that sums in float32 and rounds once, as mlx's GPU kernels do with the quantized weights. On the demo model's
    4-bit folder (bfloat16) its logits are mean KLD 3.7e-5 from the same model run in float32, where mlx's CPU
    quantized kernel, summing in bfloat16, is 2.1e-3 from it (and 2.1e-3 from this); the bfloat16 weights are
    exactly mx.dequantize's float32 ones there (tests/test_validate_runners_mlx.py)."""
    from mlx.utils import tree_unflatten
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

    dtype = getattr(mx, mlx_compute_dtype(model))
    swapped = []
    for path, module in model.named_modules():
        if not isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding, QuantizedSwitchLinear)):
            continue
        weight = mx.dequantize(module.weight, module.scales, module.get("biases"), group_size=module.group_size,
                               bits=module.bits, mode=module.mode, global_scale=module.get("global_scale"),
                               dtype=dtype)
        if isinstance(module, nn.QuantizedEmbedding):
            floats = nn.Embedding(*weight.shape)
        elif isinstance(module, QuantizedSwitchLinear):
            floats = SwitchLinear(weight.shape[2], weight.shape[1], weight.shape[0], bias="bias" in module)
        else:
            floats = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in module)
        floats.weight = weight
        if "bias" in module:
            floats.bias = module.bias
        swapped.append((path, floats))
    model.update_modules(tree_unflatten(swapped))
    left = [f"{path} ({type(module).__name__})" for path, module in model.named_modules() if "scales" in module]
    if left:
        raise ArtifactError(f"mlx-lm's model keeps quantized layers the engine mlx-dequantized cannot swap: {left[0]}")
    mx.eval(model.parameters())
    return len(swapped)


class WidenedExperts(nn.Module):
    """A stack of experts held in float32: mlx's CPU multiplies by gathered experts (GatherMM) in float32 only, so
    in float16 or bfloat16 a folder's unquantized experts cannot run there at all. The same weights, widened exactly;
    the activations are widened for the product and its result rounded back to their type, so the rest of the model
    keeps its compute type (as mlx's GPU kernels sum in float32 and round once)."""

    def __init__(self, experts: nn.Module) -> None:
        super().__init__()
        self.weight = experts.weight.astype(mx.float32)
        if "bias" in experts:
            self.bias = experts.bias.astype(mx.float32)

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        out = mx.gather_mm(x.astype(mx.float32), self.weight.swapaxes(-1, -2), rhs_indices=indices,
                           sorted_indices=sorted_indices)
        if "bias" in self:
            out = out + mx.expand_dims(self.bias[indices], -2)
        return out.astype(x.dtype)


class WidenedLinear(nn.Linear):
    """A float Linear that multiplies in float32 and rounds its result to the activations' type once: the function
    mlx's GPU kernels compute (float32 sums, bias added before the rounding, as `mx.addmm` does), run where mlx's
    float32 products are fast (torch's BLAS) and its 16-bit ones are not. `weight` keeps its type, for code that reads
    it (mlx-lm's compute type comes from its embedding's); the float32 copy beside it is exact."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(1, 1, bias="bias" in linear)
        self.weight = linear.weight
        self.widened = linear.weight.astype(mx.float32)
        if "bias" in linear:
            self.bias = linear.bias

    def __call__(self, x: mx.array) -> mx.array:
        if "bias" in self:
            return mx.addmm(self.bias.astype(mx.float32), x.astype(mx.float32), self.widened.T).astype(x.dtype)
        return (x.astype(mx.float32) @ self.widened.T).astype(x.dtype)


class WidenedEmbedding(nn.Embedding):
    """An embedding whose lookup is its own and whose product as a tied head (`as_linear`) is WidenedLinear's."""

    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__(1, 1)
        self.weight = embedding.weight
        self.widened = embedding.weight.astype(mx.float32)

    def as_linear(self, x: mx.array) -> mx.array:
        return (x.astype(mx.float32) @ self.widened.T).astype(x.dtype)


def widen_float_layers(model: nn.Module) -> int:
    """Hold mlx-lm's float Linear and Embedding layers that are not float32 as WidenedLinear / WidenedEmbedding;
    returns how many."""
    from mlx.utils import tree_unflatten

    widened = []
    for path, module in model.named_modules():
        if type(module) is nn.Linear and module.weight.dtype != mx.float32:
            widened.append((path, WidenedLinear(module)))
        elif type(module) is nn.Embedding and module.weight.dtype != mx.float32:
            widened.append((path, WidenedEmbedding(module)))
    model.update_modules(tree_unflatten(widened))
    mx.eval(model.parameters())
    return len(widened)


def widen_experts(model: nn.Module) -> bool:
    """Hold mlx-lm's unquantized stacked experts that are not float32 as WidenedExperts; whether there were any."""
    from mlx.utils import tree_unflatten
    from mlx_lm.models.switch_layers import SwitchLinear

    widened = [(path, WidenedExperts(module)) for path, module in model.named_modules()
               if isinstance(module, SwitchLinear) and module.weight.dtype != mx.float32]
    model.update_modules(tree_unflatten(widened))
    return bool(widened)


class ExpertRecorder:
    """The experts mlx-lm's sparse layers choose: the ids each MoE block feeds its SwitchGLU (the stacked experts),
    recorded by a wrapper around every SwitchGLU, in layer order, while `recording`."""

    def __init__(self, model: nn.Module) -> None:
        from mlx_lm.models.switch_layers import SwitchGLU

        switches = [(path, module) for path, module in model.named_modules() if isinstance(module, SwitchGLU)]
        switches.sort(key=lambda entry: _layer_index(entry[0]))
        self.calls: list[list[mx.array]] = [[] for _ in switches]
        self.active = False
        modules = dict(model.named_modules())
        for index, (path, switch) in enumerate(switches):
            owner_path, _, attribute = path.rpartition(".")
            setattr(modules[owner_path], attribute, RecordedSwitch(switch, partial(self.note, index)))

    def note(self, index: int, ids: mx.array) -> None:
        if self.active:
            self.calls[index].append(ids)

    @contextmanager
    def recording(self) -> Iterator[None]:
        for calls in self.calls:
            calls.clear()
        self.active = True
        try:
            yield
        finally:
            self.active = False

    def choices(self, windows: int, length: int) -> np.ndarray | None:
        """Expert ids [windows, length, sparse layers, k] of the windows run while recording; None: no experts."""
        if not self.calls:
            return None
        per_layer = [np.stack([np.array(ids).reshape(length, -1) for ids in calls]) for calls in self.calls]
        if any(len(layer) != windows for layer in per_layer):
            raise ArtifactError(f"mlx-lm's experts ran {len(per_layer[0])} times for {windows} windows")
        return np.stack(per_layer, axis=2).astype(np.int16)


class RecordedSwitch(nn.Module):
    """A SwitchGLU that notes the expert ids it is given, then runs as itself."""

    def __init__(self, switch: nn.Module, note: Callable[[mx.array], None]) -> None:
        super().__init__()
        self.switch = switch
        self.note = note

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        self.note(indices)
        return self.switch(x, indices)


def _layer_index(path: str) -> int:
    match = re.search(r"\blayers\.(\d+)\.", path)
    if match is None:
        raise ArtifactError(f"mlx-lm's experts at {path!r} are in no numbered layer")
    return int(match.group(1))


class DequantizedMLXRunner(MLXRunner):
    """The MLX folder's weights, as mlx-lm loads them and dequantized, run by transformers layer by
    layer (siliconvert/streamed.py) on the reference's device and in its precision.

    It checks what the folder ships: the weights and every hyper-parameter mlx-lm reads from its
    config.json (mlx-lm's reading wins where transformers' would differ). It does not check mlx's
    kernels, and it has no KV cache and no speed to report. The tokenizer is mlx-lm's, from the folder.
    """

    runtime = "mlx weights in torch (dequantized)"

    def __init__(self, path: Path, options: dict) -> None:
        import torch
        from mlx_lm.utils import load_model, load_tokenizer

        from siliconvert.validate.reference import reference_device

        engine_option(options)  # refuses unknown options
        self.path = Path(path)
        # lazy: nothing is read yet; mlx-lm's model gives names, quantization and hyper-parameters
        model, config = load_model(self.path, lazy=True, trust_remote_code=runs_own_model_file(self.path))
        if (refusal := stand_in_refusal(config)) is not None:
            raise ArtifactError(refusal, self.path)
        self.tokenizer = load_tokenizer(self.path, eos_token_ids=config.get("eos_token_id"))
        self.weights = MLXFolderWeights(self.path, model)
        self.config = transformers_config(config, model.args)
        self.torch_device, dtype_name, device_name = reference_device()
        self.dtype: torch.dtype = getattr(torch, dtype_name)
        why = ("forced by the runner option engine=torch" if options.get("engine") == "torch"
               else "mlx's CPU backend too slow at this size")
        self.device = (f"{device_name.split(' (')[0]} (emulated: {why}; {dtype_name} activations, "
                       f"where mlx computes in {mlx_compute_dtype(model)})")
        self.choices = None

    def logits(self, tokens: np.ndarray) -> np.ndarray:
        return self.logits_many(np.asarray(tokens)[None])[0]

    def logits_many(self, windows: np.ndarray) -> np.ndarray:
        from siliconvert.streamed import streamed_logits
        from siliconvert.validate.router import RouterRecorder

        windows = np.asarray(windows)
        sparse_layers = sorted(self.weights.experts)
        routers = RouterRecorder(sparse_layers, self.config.num_experts_per_tok) if sparse_layers else None
        logits = streamed_logits(self.config, self.weights, windows, device=self.torch_device, dtype=self.dtype,
                                 label="mlx weights in torch, layer by layer",
                                 prepare=routers.attach if routers is not None else None)
        self.choices = routers.choices(*windows.shape) if routers is not None else None
        return logits

    def unmeasured(self) -> dict[str, str]:
        did_not_run = "mlx did not run (the artifact's weights ran in transformers instead)"
        return {"kv_cache": f"{did_not_run}, so mlx-lm's KV cache was not exercised",
                "latency": f"{did_not_run}, so nothing here times the artifact or its memory"}

    def start(self, prompt: np.ndarray) -> np.ndarray:
        raise ArtifactError(self.unmeasured()["kv_cache"], self.path)

    def step(self, token: int) -> np.ndarray:
        raise ArtifactError(self.unmeasured()["kv_cache"], self.path)


def mlx_compute_dtype(model: Any) -> str:
    """The float type mlx-lm's forward computes in: what its embedding hands the first layer (a quantized
    embedding dequantizes into its scales' type, or bfloat16 where they are no float: mx.dequantize's rule)."""
    embed = model.model.embed_tokens
    dtype = embed.scales.dtype if hasattr(embed, "scales") else embed.weight.dtype
    if hasattr(embed, "scales") and not mx.issubdtype(dtype, mx.floating):
        dtype = mx.bfloat16
    return {mx.bfloat16: "bfloat16", mx.float16: "float16"}.get(dtype, "float32")


class MLXFolderWeights:
    """An MLX folder's parameters by transformers name, as float32 torch tensors on the CPU: the values
    mlx-lm computes with. A quantized weight goes through mx.dequantize with the group size, bits and
    mode mlx-lm gave its module, into float32 (mlx's quantized kernels form scale·q + bias in float32
    too). mlx-lm's names are transformers' names for the families here, but for a mixture of experts:
    transformers' router and expert stacks of a sparse layer are read from the module around mlx-lm's
    SwitchGLU (`experts`: layer → that module's path), its `gate` and its `switch_mlp` projections
    (gate_proj's rows, then up_proj's, per expert). A convolution's kernel is given back in torch's axis order. A
    model whose names mlx-lm changes on loading is refused."""

    def __init__(self, path: Path, model: Any) -> None:
        from mlx.utils import tree_flatten
        from mlx_lm.models.switch_layers import SwitchGLU

        self.shards = {name: shard for shard in sorted(path.glob("model*.safetensors")) for name in mx.load(str(shard))}
        self.modules = dict(model.named_modules())
        renamed = [name for name, _ in tree_flatten(model.parameters()) if name not in self.shards]
        if renamed:
            raise ArtifactError(f"mlx-lm renames tensors on loading this model ({', '.join(renamed[:3])}); "
                                "its weights cannot be read by name for the torch stand-in", path)
        self.experts = {_layer_index(module_path): module_path.rpartition(".")[0]
                        for module_path, module in self.modules.items() if isinstance(module, SwitchGLU)}

    def tensor(self, name: str) -> torch.Tensor:
        import torch

        value = self._experts_value(name)
        if value is None:
            value = self._value(name)
        tensor = torch.from_numpy(np.array(value))
        del value
        mx.clear_cache()  # mlx keeps freed buffers for reuse; here they would only add to the peak
        return tensor

    def _experts_value(self, name: str) -> mx.array | None:
        """A sparse layer's router or expert stack by transformers' name (EXPERT_TENSORS), or None."""
        from siliconvert.architectures.base import EXPERT_STACKS, EXPERT_TENSORS

        match = re.match(r"model\.layers\.(\d+)\.", name)
        if match is None or int(match.group(1)) not in self.experts:
            return None
        layer = int(match.group(1))
        module = self.experts[layer]
        roles = {template.format(layer=layer) + ("" if role in EXPERT_STACKS else ".weight"): role
                 for template, role in EXPERT_TENSORS.items()}
        role = roles.get(name)
        if role == "ffn_gate_inp":
            return self._value(f"{module}.gate.weight")
        if role == "ffn_gate_up_exps":
            return mx.concatenate([self._value(f"{module}.switch_mlp.gate_proj.weight"),
                                   self._value(f"{module}.switch_mlp.up_proj.weight")], axis=1)
        if role == "ffn_down_exps":
            return self._value(f"{module}.switch_mlp.down_proj.weight")
        return None

    def _value(self, name: str) -> mx.array:
        """One of the folder's arrays by mlx-lm's name, as mlx-lm computes with it, in float32."""
        module_path, _, kind = name.rpartition(".")
        module = self.modules.get(module_path)
        if kind == "weight" and hasattr(module, "scales"):  # a quantized module
            return mx.dequantize(self._read(name), self._read(f"{module_path}.scales"),
                                 self._read(f"{module_path}.biases") if module.mode == "affine" else None,
                                 group_size=module.group_size, bits=module.bits, mode=module.mode,
                                 dtype=mx.float32)
        if kind == "weight" and isinstance(module, nn.Conv1d):  # mlx's [out, kernel, in], torch's [out, in, kernel]
            return self._read(name).swapaxes(1, 2).astype(mx.float32)
        return self._read(name).astype(mx.float32)

    def _read(self, name: str) -> mx.array:
        # A fresh lazy load every time: an array kept from an earlier load would keep its data once read.
        if name not in self.shards:
            raise ArtifactError(f"no tensor {name!r} in the MLX folder's weights", next(iter(self.shards.values())))
        return mx.load(str(self.shards[name]))[name]


def transformers_config(config: dict, args: Any) -> PretrainedConfig:
    """transformers' config for the model mlx-lm builds from the folder's config.json.

    Every hyper-parameter mlx-lm's model arguments (`args`) hold overrides config.json's, since it is
    mlx-lm's run that is stood in for: its defaults for absent keys (rope θ, tied embeddings), its sliding
    layers (named per layer, or every layer but each `sliding_window_pattern`-th: Gemma 3) and their window,
    and the sliding layers' own θ (Gemma 3's `rope_local_base_freq`). mlx-lm's window is transformers'
    (a key at most window - 1 positions back). What transformers cannot run the mlx-lm way is refused.
    """
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    if getattr(args, "rope_traditional", False):
        raise ArtifactError("mlx-lm would rotate interleaved pairs (rope_traditional); transformers' model "
                            "cannot, so the torch stand-in refuses this artifact")
    values = {key: value for key, value in config.items()
              if key not in ("quantization", "quantization_config", "rope_theta", "rope_scaling", "rope_parameters",
                             "sliding_window_pattern", "rope_local_base_freq")}
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rms_norm_eps", "vocab_size", "max_position_embeddings",
                "tie_word_embeddings", "attention_bias", "mlp_bias", "num_experts", "num_local_experts",
                "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob", "decoder_sparse_step",
                "mlp_only_layers", "shared_expert_intermediate_size"):
        if getattr(args, key, None) is not None:
            values[key] = getattr(args, key)
    # the rope as mlx-lm reads it: θ and rope_scaling at the top level, or the whole of rope_parameters (ministral3:
    # Llama 4's attention temperature with it, which transformers reads from the same dict)
    scaling = dict(getattr(args, "rope_scaling", None) or getattr(args, "rope_parameters", None) or {})
    rope_type = scaling.pop("rope_type", scaling.pop("type", "default"))
    theta = scaling.pop("rope_theta", None)
    rope = {**scaling, "rope_type": rope_type, "rope_theta": float(getattr(args, "rope_theta", theta))}
    layer_types = mlx_layer_types(args)
    sliding = "sliding_attention" in layer_types
    # Where no layer slides, a window as long as the context: transformers' Gemma 2 builds a sliding mask
    # whatever the layer types say, and a window that reaches every position is full attention
    window = args.sliding_window if sliding else values["max_position_embeddings"]
    values |= {"sliding_window": window, "use_sliding_window": sliding, "rope_parameters": rope}
    if hasattr(args, "rope_local_base_freq"):  # Gemma 3: a rope per attention kind
        values["rope_parameters"] = {"full_attention": rope, "sliding_attention": {
            "rope_type": "default", "rope_theta": float(args.rope_local_base_freq)}}
    values["layer_types"] = layer_types  # always: a config class may default to sliding layers (Gemma 2)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its advice on config style (Mistral with layer_types) is for model authors
    try:
        return AutoConfig.for_model(values.pop("model_type"), **values)
    finally:
        hf_logging.set_verbosity(verbosity)


def mlx_layer_types(args: Any) -> list[str]:
    """Each layer's attention kind as mlx-lm's model runs it."""
    if hasattr(args, "sliding_window_pattern"):
        period = args.sliding_window_pattern
        return ["full_attention" if (i + 1) % period == 0 else "sliding_attention"
                for i in range(args.num_hidden_layers)]
    return getattr(args, "layer_types", None) or ["full_attention"] * args.num_hidden_layers
