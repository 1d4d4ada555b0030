"""GGUF quantization by llama.cpp's own code, through the libraries llama-cpp-python ships.

Two ways, same bytes:
- Streamed (`TensorQuantizer`): per tensor, as the weights stream by. llama.cpp chooses each tensor's type
  with the planner `llama-quantize` itself runs (Q4_K_M keeps some attn_v / ffn_down at Q6_K, the head at
  Q6_K, ...), and `ggml_quantize_chunk` quantizes its rows on every core. No full-precision intermediate
  file is written and read back, and quantization overlaps the rest of the pass.
- Whole file (`quantize`): `llama_model_quantize` on a full-precision GGUF. The fallback where the
  planner's symbols are missing (it lives in llama.cpp's staging API, src/llama-ext.h, exported with C++
  linkage), and the oracle the tests hold the streamed path to, byte for byte.

Importance matrix. llama-cpp-python can hand llama.cpp an importance matrix but cannot compute one: the
`llama-imatrix` tool is not part of its API. siliconvert/calibration.py computes the same statistic from one
transformers forward of the source; the quantizers here take it as given.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, LlamaFileType
from gguf import GGMLQuantizationType as QType

from siliconvert.errors import ArtifactError, RecipeError, RuntimeMissingError
from siliconvert.recipe import GGUF_QUANTS

# Recipe type name → llama.cpp file type, for the types llama.cpp quantizes; it picks each tensor's type from it.
LLAMA_CPP_QUANTS = {name: LlamaFileType[f"MOSTLY_{name}"] for name, (_, maker) in GGUF_QUANTS.items()
                    if maker == "llama.cpp"}

# ggml_log_level values (ggml.h). llama-cpp-python's own logger still uses an older numbering (2 = warn).
LOG_WARN, LOG_ERROR, LOG_CONT = 3, 4, 5


def quantize(source: Path, dest: Path, quant: str, *, imatrix: dict[str, np.ndarray] | None = None,
             threads: int | None = None) -> Path:
    """Quantize the GGUF `source` to `quant` at `dest` (atomically: a temporary name, then a rename)."""
    llama_cpp = _llama_cpp()
    if quant not in LLAMA_CPP_QUANTS:
        raise RecipeError(f"llama.cpp quantization type {quant!r} is not one of {', '.join(LLAMA_CPP_QUANTS)}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = threads or cpu_threads()
    params.ftype = LLAMA_CPP_QUANTS[quant]
    if imatrix:
        # A NULL-terminated array of (name, values, count); the numpy arrays must outlive the call.
        arrays = {name: np.ascontiguousarray(values, dtype=np.float32) for name, values in sorted(imatrix.items())}
        entries = (llama_cpp.llama_model_imatrix_data * (len(arrays) + 1))()
        for entry, (name, values) in zip(entries, arrays.items(), strict=False):  # the last is NULL
            entry.name = name.encode()
            entry.data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entry.size = values.size
        params.imatrix = entries
    temp = dest.with_name(f".{dest.name}.partial")
    with LlamaLog() as log:
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(temp).encode(), ctypes.byref(params))
    if status != 0:
        temp.unlink(missing_ok=True)
        raise ArtifactError(f"llama.cpp could not quantize to {quant}: {log.last_error or 'no reason given'}",
                            source)
    os.replace(temp, dest)
    return dest


# ---- streamed: llama.cpp's planner and row quantizer, tensor by tensor ------------------------------

# llama.cpp's staging API (src/llama-ext.h) has C++ linkage: these mangled names are how it is exported.
PLANNER_SYMBOLS = {
    "model_from_metadata": "_Z31llama_quant_model_from_metadataPK22llama_quant_model_desc",
    "init": "_Z16llama_quant_initPK11llama_modelPK27llama_model_quantize_params",
    "free": "_Z16llama_quant_freeP19quantize_state_impl",
    "allows": "_Z38llama_quant_tensor_allows_quantizationPK19quantize_state_implPK11ggml_tensor",
    "compute_types": "_Z25llama_quant_compute_typesP19quantize_state_impl11llama_ftypePP11ggml_tensorP9ggml_typem",
}
ROWS_PER_TASK = 256  # rows of one quantization task: small enough to spread a tensor over every core


class _ModelDescription(ctypes.Structure):  # struct llama_quant_model_desc
    _fields_ = [("architecture", ctypes.c_char_p)] + [
        (name, ctypes.c_uint32)
        for name in ("n_embd", "n_ff", "n_layer", "n_head", "n_head_kv", "n_expert", "n_embd_head_k", "n_embd_head_v")
    ]


class _GGMLInitParams(ctypes.Structure):  # struct ggml_init_params
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


def _planner():
    """The planner's functions from libllama, or None where this llama.cpp does not export them."""
    llama_cpp = _llama_cpp()
    lib = llama_cpp.llama_cpp._lib
    try:
        found = {key: getattr(lib, symbol) for key, symbol in PLANNER_SYMBOLS.items()}
    except AttributeError:
        return None
    found["model_from_metadata"].argtypes = [ctypes.POINTER(_ModelDescription)]
    found["model_from_metadata"].restype = ctypes.c_void_p
    found["init"].argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    found["init"].restype = ctypes.c_void_p
    found["free"].argtypes = [ctypes.c_void_p]
    found["free"].restype = None
    found["allows"].argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    found["allows"].restype = ctypes.c_bool
    found["compute_types"].argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_void_p),
                                       ctypes.POINTER(ctypes.c_int), ctypes.c_size_t]
    found["compute_types"].restype = None
    return found


def _ggml():
    from llama_cpp._ggml import libggml as lib  # ggml-base's symbols resolve through it

    lib.ggml_init.argtypes, lib.ggml_init.restype = [_GGMLInitParams], ctypes.c_void_p
    lib.ggml_free.argtypes, lib.ggml_free.restype = [ctypes.c_void_p], None
    lib.ggml_tensor_overhead.argtypes, lib.ggml_tensor_overhead.restype = [], ctypes.c_size_t
    lib.ggml_new_tensor.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_int64)]
    lib.ggml_new_tensor.restype = ctypes.c_void_p
    lib.ggml_set_name.argtypes, lib.ggml_set_name.restype = [ctypes.c_void_p, ctypes.c_char_p], ctypes.c_void_p
    lib.ggml_quantize_init.argtypes, lib.ggml_quantize_init.restype = [ctypes.c_int], None
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes, lib.ggml_row_size.restype = [ctypes.c_int, ctypes.c_int64], ctypes.c_size_t
    return lib


def plan_types(architecture: str, spec, tensors: Sequence[tuple[str, tuple[int, ...]]], quant: str, *,
               has_imatrix: bool = False, head_count_kv: int | None = None) -> list[QType | None] | None:
    """The type llama-quantize gives each (GGUF name, numpy shape) for `quant`; None for a tensor it leaves
    as it is. None altogether where this llama.cpp lacks the planner (then use `quantize` on a file).
    `head_count_kv`: the file's, where it writes k/v heads other than the spec's (repeated for llama.cpp; 0 for a
    hybrid whose layer 0 is recurrent, as llama.cpp's quantizer reads layer 0's)."""
    planner = _planner()
    if planner is None:
        return None
    llama_cpp, ggml = _llama_cpp(), _ggml()
    # the expert count changes llama.cpp's choices (an 8-expert model keeps attn_k and attn_v at Q8_0)
    experts = spec.experts.count if spec.experts is not None else 0
    description = _ModelDescription(architecture.encode(), spec.hidden_size, spec.intermediate_size,
                                    spec.num_layers, spec.num_heads,
                                    spec.num_kv_heads if head_count_kv is None else head_count_kv, experts,
                                    spec.head_dim, spec.head_dim)
    model = planner["model_from_metadata"](ctypes.byref(description))
    if not model:
        return None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_CPP_QUANTS[quant]
    if has_imatrix:  # the planner only asks whether there is one: an empty, NULL-terminated list says yes
        params.imatrix = (llama_cpp.llama_model_imatrix_data * 1)()
    state = planner["init"](model, ctypes.byref(params))
    context = ggml.ggml_init(_GGMLInitParams(ggml.ggml_tensor_overhead() * (len(tensors) + 1), None, True))
    try:
        handles = []
        for name, shape in tensors:
            ne = (ctypes.c_int64 * len(shape))(*reversed(shape))  # ggml lists dimensions innermost first
            handle = ggml.ggml_new_tensor(context, int(QType.F32), len(shape), ne)
            ggml.ggml_set_name(handle, name.encode())
            handles.append(handle)
        allowed = [planner["allows"](state, h) for h in handles]
        chosen = [h for h, ok in zip(handles, allowed, strict=True) if ok]
        types = (ctypes.c_int * len(chosen))()
        if chosen:
            with LlamaLog():  # its per-tensor fallback notes ("ncols not divisible by 256"): the file records the types
                planner["compute_types"](state, int(LLAMA_CPP_QUANTS[quant]),
                                         (ctypes.c_void_p * len(chosen))(*chosen), types, len(chosen))
        picked = [QType(t) for t in types]
        if has_imatrix:
            names = [name for (name, _), ok in zip(tensors, allowed, strict=True) if ok]
            widths = [shape[-1] for (_, shape), ok in zip(tensors, allowed, strict=True) if ok]
            picked = _with_imatrix(quant, names, widths, picked, spec.num_layers, experts)
        chosen_types = iter(picked)
        return [next(chosen_types) if ok else None for ok in allowed]
    finally:
        ggml.ggml_free(context)
        planner["free"](state)
        llama_cpp.llama_model_free(model)


def _with_imatrix(quant: str, names: Sequence[str], widths: Sequence[int], planned: list[QType], layers: int,
                  experts: int) -> list[QType]:
    """The planner's types as llama-quantize picks them with an importance matrix. llama_quant_compute_types plans
    as if there were none (it resets has_imatrix), and four rules of llama.cpp's llama_tensor_get_type_impl
    (src/llama-quant.cpp) differ with one: IQ3_XXS keeps attn_v at IQ3_XXS (not IQ3_S) and ffn_down at IQ3_XXS (not
    Q3_K / Q4_K); IQ4_NL and IQ4_XS keep the first eighth of the layers' ffn_down at their type (not Q5_K); Q4_0
    gives that eighth Q4_1. The rule's type then falls back as llama.cpp's tensor_type_fallback does for rows it
    does not divide."""
    ffn_down_seen = 0  # llama.cpp's i_ffn_down: the layer of a dense model's ffn_down, counted in plan order
    types = list(planned)
    for index, (name, width) in enumerate(zip(names, widths, strict=True)):
        if "attn_v.weight" in name or "attn_qkv" in name or "attn_kv_b" in name:  # llama.cpp's attn_v categories
            if quant == "IQ3_XXS" and planned[index] == QType.IQ3_S:
                types[index] = _fallback(QType.IQ3_XXS, width)
        elif "ffn_down" in name:
            layer = int(name.split(".")[1]) if experts > 1 else ffn_down_seen  # as llama.cpp's layer_info
            ffn_down_seen += 1
            first_eighth = layer < layers // 8
            if quant == "IQ3_XXS":
                types[index] = _fallback(QType.IQ3_XXS, width)
            elif quant in ("IQ4_NL", "IQ4_XS") and first_eighth:
                types[index] = _fallback(QType[quant], width)
            elif quant == "Q4_0" and first_eighth:
                types[index] = _fallback(QType.Q4_1, width)
    return types


def _fallback(qtype: QType, width: int) -> QType:
    """llama.cpp's tensor_type_fallback for the types `_with_imatrix` gives: a 256-block i-quant a row does not fill
    becomes IQ4_NL, and a 32-block type it does not fill F16."""
    if width % GGML_QUANT_SIZES[qtype][0] and GGML_QUANT_SIZES[qtype][0] == 256:
        qtype = QType.IQ4_NL
    return qtype if width % GGML_QUANT_SIZES[qtype][0] == 0 else QType.F16


class TensorQuantizer:
    """Quantizes float32 matrices, or stacks of them (a mixture's experts), with ggml's own code on a pool of
    threads, a block of rows per task.

    ctypes releases the GIL for the call, so the tasks run on every core while the caller goes on. The
    pool's threads run at a lower priority: the stream that feeds them (reading, the other formats) comes
    first and quantization takes the cores it leaves.
    """

    def __init__(self, threads: int | None = None):
        self.ggml = _ggml()
        self.pool = ThreadPoolExecutor(threads or cpu_threads(), thread_name_prefix="ggml-quantize",
                                       initializer=_lower_priority)
        self._initialized: set[int] = set()
        self._lock = threading.Lock()

    def submit(self, array: np.ndarray, qtype: QType, imatrix: np.ndarray | None = None) -> QuantizedTensor:
        """Start quantizing `array`: float32 rows × n_per_row, or experts × rows × n_per_row, each matrix
        C-contiguous (a stack may be a view that skips rows between experts, as gate and up of one stack are).
        `imatrix` holds n_per_row values per matrix, as llama.cpp's importance matrix has one per expert.
        `array` and `imatrix` must not change until the result has been taken."""
        matrices = array.reshape(1, *array.shape) if array.ndim == 2 else array
        experts, rows, n_per_row = matrices.shape
        if matrices.dtype != np.float32 or matrices.strides[1:] != (4 * n_per_row, 4):
            raise ValueError(f"cannot quantize a {matrices.dtype} array of strides {matrices.strides}: each "
                             "matrix must be C-contiguous float32")
        with self._lock:
            if qtype not in self._initialized:  # builds lookup tables some types need; not thread safe
                self.ggml.ggml_quantize_init(int(qtype))
                self._initialized.add(qtype)
        out = np.empty((experts, rows, self.ggml.ggml_row_size(int(qtype), n_per_row)), dtype=np.uint8)
        weights = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32).reshape(experts,
                                                                                                       n_per_row)
        tasks = [self.pool.submit(self._rows, matrices[expert], out[expert], qtype, start,
                                  min(ROWS_PER_TASK, rows - start), None if weights is None else weights[expert])
                 for expert in range(experts) for start in range(0, rows, ROWS_PER_TASK)]
        return QuantizedTensor(out.reshape(experts * rows, -1), tasks)

    def _rows(self, array: np.ndarray, out: np.ndarray, qtype: QType, start: int, rows: int,
              imatrix: np.ndarray | None) -> None:
        n_per_row = array.shape[1]
        # ggml offsets both pointers itself from `start` (an element index of the first row)
        written = self.ggml.ggml_quantize_chunk(int(qtype), array.ctypes.data, out.ctypes.data, start * n_per_row,
                                                rows, n_per_row, None if imatrix is None else imatrix.ctypes.data)
        if written != rows * out.shape[1]:
            raise ArtifactError(f"ggml quantized {written} bytes for {rows} rows of {qtype.name}, "
                                f"expected {rows * out.shape[1]}")

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class QuantizedTensor:
    """A tensor being quantized: `result()` waits for its rows and returns the bytes, uint8 [rows, row bytes]."""

    def __init__(self, out: np.ndarray, tasks: list[Future]):
        self.out, self.tasks = out, tasks

    def done(self) -> bool:
        return all(task.done() for task in self.tasks)

    def result(self) -> np.ndarray:
        for task in self.tasks:
            task.result()  # re-raises a task's error here
        return self.out


def _lower_priority() -> None:
    if hasattr(os, "setpriority"):
        with contextlib.suppress(OSError):  # not permitted here: the threads then compete as equals
            # the lowest priority: the stream (reading, the other formats' casts and writes) takes a core
            # whenever it can run, and quantization every cycle it leaves; no core idles, since the stream
            # sleeps once its tensors in flight reach the limit. At nice 5 the quantizer threads still took
            # about half of the stream's core (the Core ML stage ran 1.9× slower beside them).
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)  # Linux: a thread id works here


class LlamaLog:
    """Collects llama.cpp's log while active, instead of llama-cpp-python's print to stderr."""

    def __enter__(self) -> LlamaLog:
        import llama_cpp

        self.lines: list[tuple[int, str]] = []
        self._callback = llama_cpp.llama_log_callback(self._record)  # kept referenced while installed
        llama_cpp.llama_log_set(self._callback, ctypes.c_void_p(0))
        return self

    def __exit__(self, *_exc: object) -> None:
        import llama_cpp
        from llama_cpp._logger import llama_log_callback

        llama_cpp.llama_log_set(llama_log_callback, ctypes.c_void_p(0))

    def _record(self, level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
        message = text.decode("utf-8", errors="replace")
        if level == LOG_CONT and self.lines:
            self.lines[-1] = (self.lines[-1][0], self.lines[-1][1] + message)
        else:
            self.lines.append((level, message))

    @property
    def warnings(self) -> list[str]:
        """Warning and error lines, in order."""
        return [text.strip() for level, text in self.lines if level in (LOG_WARN, LOG_ERROR) and text.strip()]

    @property
    def errors(self) -> list[str]:
        """Error lines, in order."""
        return [text.strip() for level, text in self.lines if level == LOG_ERROR and text.strip()]

    @property
    def last_error(self) -> str | None:
        return self.errors[-1] if self.errors else None


def cpu_threads() -> int:
    """Cores this process may use (sched_getaffinity where the OS has it, as Linux does; else all)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise RuntimeMissingError("llama-cpp-python is not installed (pip install llama-cpp-python)") from None
    return llama_cpp
