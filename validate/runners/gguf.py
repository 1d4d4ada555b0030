"""A GGUF file opened on llama.cpp (through llama-cpp-python's C API), exactly as its users run it.

The runner speaks llama.cpp's C API directly: one model, one context, one batch. llama.cpp's log is
routed away from stderr; its warnings (say, a missing pre-tokenizer type) are kept in `warnings` so that
validation can insist there are none.

A mixture of experts shows which experts its routers chose through llama.cpp's eval callback: its graph
names each layer's chosen ids "ffn_moe_topk-{layer}", and while windows are scored the context is one
with a callback that copies them out (ggml_backend_tensor_get, so a GPU's tensors too). The callback runs
for every node of every decode, so the context that decodes token by token (the KV cache check, the
latency runs) has none.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import numpy as np

from siliconvert.errors import ArtifactError, RuntimeMissingError
from siliconvert.progress import track
from siliconvert.quantize.gguf import LlamaLog, cpu_threads
from siliconvert.validate.runners.base import Runner

DEFAULT_CONTEXT = 2048
GPU_BACKENDS = ("CUDA", "Metal", "Vulkan", "HIP", "SYCL")  # names llama_print_system_info() reports
CHOSEN_EXPERTS = b"ffn_moe_topk-"  # llama-graph.cpp's build_moe_ffn: cb(selected_experts, "ffn_moe_topk", il)
GGML_TYPE_I32 = 26


class GGMLTensor(ctypes.Structure):
    """struct ggml_tensor (ggml.h), up to its name: what the eval callback reads."""

    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4),
                ("nb", ctypes.c_size_t * 4), ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16),
                ("flags", ctypes.c_int32), ("src", ctypes.c_void_p * 10), ("view_src", ctypes.c_void_p),
                ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64)]


class LlamaCppRunner(Runner):
    runtime = "llama.cpp"

    def __init__(self, path: Path, options: dict) -> None:
        try:
            import llama_cpp
        except ImportError:
            raise RuntimeMissingError("llama-cpp-python is not installed (pip install llama-cpp-python)") from None
        self.api = api = llama_cpp.llama_cpp
        self.path = Path(path)
        self.ctx = None
        threads = int(options.get("threads") or cpu_threads())
        offload = bool(api.llama_supports_gpu_offload())
        api.llama_backend_init()
        with LlamaLog() as log:
            model_params = api.llama_model_default_params()
            model_params.n_gpu_layers = -1 if offload else 0
            if not offload:
                _read_into_memory(model_params, api)
            self.model = api.llama_model_load_from_file(str(self.path).encode(), model_params)
            if not self.model:
                raise ArtifactError(f"llama.cpp cannot load this file: {log.last_error or 'no reason given'}",
                                    self.path)
            # Past its training context a model is off its domain, and llama.cpp warns: stay within it.
            self.n_ctx = int(options.get("context") or min(DEFAULT_CONTEXT, api.llama_model_n_ctx_train(self.model)))
        self.threads = threads
        self._observe = api.ggml_backend_sched_eval_callback(self._observe_node)  # referenced while in use
        self._capture: dict[int, list[np.ndarray]] | None = None  # layer → chosen ids of each decode, while scoring
        self.warnings = log.warnings + self._new_context(observe=False)
        architecture = _metadata(api, self.model, "general.architecture")
        self.n_expert = int(_metadata(api, self.model, f"{architecture}.expert_count") or 0)
        self.n_layer = api.llama_model_n_layer(self.model)
        # the experts chosen in the windows of the last logits_many: [windows, length, layers, k], or why not
        self._choices: np.ndarray | None = None
        self._no_choices = "no windows scored yet"
        self.vocab = api.llama_model_get_vocab(self.model)
        self.n_vocab = api.llama_vocab_n_tokens(self.vocab)
        self.device = _device(api, offload, threads)
        self._pos = 0

    def logits(self, tokens: np.ndarray) -> np.ndarray:
        self._clear()
        return self._decode([int(t) for t in tokens], all_logits=True)

    def logits_many(self, windows: np.ndarray) -> np.ndarray:
        if not self.n_expert:
            return super().logits_many(windows)
        self._new_context(observe=True)  # only while scoring: the callback costs a Python call per graph node
        logits, choices = [], []
        try:
            for window in track(windows, f"logits ({self.runtime})", len(windows)):
                self._capture = {}
                logits.append(self.logits(window))
                choices.append(self._chosen(len(window)))
        finally:
            self._capture = None
            self._new_context(observe=False)
        self._choices = None if any(c is None for c in choices) else np.stack(choices)
        return np.stack(logits)

    def expert_choices(self) -> np.ndarray | None:
        return self._choices

    def unmeasured(self) -> dict[str, str]:
        return {"router": self._no_choices} if self.n_expert and self._choices is None else {}

    def tokenize(self, text: str) -> list[int]:
        return llama_tokenize(self.api, self.vocab, text, self.path)

    def start(self, prompt: np.ndarray) -> np.ndarray:
        self._clear()
        return self._decode([int(t) for t in prompt], all_logits=False)[-1]

    def step(self, token: int) -> np.ndarray:
        return self._decode([int(token)], all_logits=False)[-1]

    def close(self) -> None:
        if getattr(self, "ctx", None):
            with LlamaLog():  # llama.cpp reports its buffer sizes on the way out
                self.api.llama_free(self.ctx)
                self.api.llama_model_free(self.model)
            self.ctx = self.model = None

    # ---- llama.cpp calls -------------------------------------------------------------------------
    def _new_context(self, observe: bool) -> list[str]:
        """(Re)create the context, with the callback that copies out the chosen experts or without it; returns
        llama.cpp's warnings."""
        api = self.api
        if self.ctx:
            with LlamaLog():  # llama.cpp reports its buffer sizes on the way out
                api.llama_free(self.ctx)
        params = api.llama_context_default_params()
        params.n_ctx = params.n_batch = self.n_ctx  # one window, one decode call
        params.n_threads = params.n_threads_batch = self.threads
        if observe:
            params.cb_eval = self._observe
        with LlamaLog() as log:
            self.ctx = api.llama_init_from_model(self.model, params)
        if not self.ctx:
            api.llama_model_free(self.model)
            self.model = None
            raise ArtifactError(f"llama.cpp cannot create a context: {log.last_error}", self.path)
        self._pos = 0
        return log.warnings

    def _observe_node(self, tensor: int, ask: bool, _user_data: int) -> bool:
        """ggml's eval callback: asked (`ask`) whether a node's result is wanted, then given each wanted one
        once computed; False to a given one would stop the graph."""
        node = GGMLTensor.from_address(tensor)
        if self._capture is None or not node.name.startswith(CHOSEN_EXPERTS):
            return not ask
        if ask:
            return True
        if node.type != GGML_TYPE_I32:
            return True  # not ids: _chosen finds the layer missing and says so
        k, tokens = node.ne[0], node.ne[1]
        data = (ctypes.c_char * ((tokens - 1) * node.nb[1] + k * node.nb[0]))()
        _ggml_backend().ggml_backend_tensor_get(tensor, data, 0, len(data))
        ids = np.lib.stride_tricks.as_strided(np.frombuffer(data, dtype=np.int32), (tokens, k),
                                              (node.nb[1], node.nb[0]))
        layer = int(node.name[len(CHOSEN_EXPERTS):])
        self._capture.setdefault(layer, []).append(ids.astype(np.int16))
        return True

    def _chosen(self, length: int) -> np.ndarray | None:
        """The captured ids of one window as [length, layers, k], or None (and why) if a layer's are missing."""
        capture = self._capture or {}
        rows = {layer: sum(len(ids) for ids in parts) for layer, parts in capture.items()}
        if sorted(capture) != list(range(self.n_layer)) or set(rows.values()) != {length}:
            self._no_choices = (f"llama.cpp's graph showed the chosen experts (ffn_moe_topk) of layers "
                                f"{sorted(capture)} for {sorted(set(rows.values()))} tokens; expected every one "
                                f"of {self.n_layer} layers for {length}")
            return None
        return np.stack([np.concatenate(capture[layer]) for layer in range(self.n_layer)], axis=1)

    def _clear(self) -> None:
        self.api.llama_memory_clear(self.api.llama_get_memory(self.ctx), True)
        self._pos = 0

    def _decode(self, tokens: list[int], all_logits: bool) -> np.ndarray:
        """Feed tokens after the cached ones; logits of every position, or of the last only."""
        if self._pos + len(tokens) > self.n_ctx:
            raise ArtifactError(f"{self._pos + len(tokens)} tokens exceed the runner's context of {self.n_ctx} "
                                "(runner option 'context')", self.path)
        batch = self.api.llama_batch_init(len(tokens), 0, 1)
        try:
            for i, token in enumerate(tokens):
                batch.token[i], batch.pos[i] = token, self._pos + i
                batch.n_seq_id[i], batch.seq_id[i][0] = 1, 0
                batch.logits[i] = all_logits or i == len(tokens) - 1
            batch.n_tokens = len(tokens)
            # GPU backends log as they decode (CUDA: "CUDA Graph id … reused" at every step): kept off stderr
            with LlamaLog() as log:
                status = self.api.llama_decode(self.ctx, batch)
            if status != 0:
                reason = f": {'; '.join(log.errors)}" if log.errors else ""  # the first names the cause
                raise ArtifactError(f"llama_decode failed with status {status}{reason}", self.path)
        finally:
            self.api.llama_batch_free(batch)
        self._pos += len(tokens)
        rows = len(tokens) if all_logits else 1
        logits = np.ctypeslib.as_array(self.api.llama_get_logits(self.ctx), shape=(rows, self.n_vocab))
        return logits.copy()


def llama_tokenize(api, vocab, text: str, where: Path) -> list[int]:
    """llama.cpp's ids for `text`: no BOS added, and special tokens written in the text read as those tokens
    (parse_special), as transformers reads them and as a chat prompt needs."""
    data = text.encode("utf-8")
    size = len(data) + 16
    for _ in range(2):  # a negative count means "this many did not fit": retry once with room for them
        buffer = (api.llama_token * size)()
        count = api.llama_tokenize(vocab, data, len(data), buffer, size, False, True)
        if count >= 0:
            return list(buffer[:count])
        size = -count
    raise ArtifactError("llama.cpp could not tokenize the text", where)


def _metadata(api, model, key: str) -> str | None:
    """A GGUF key/value of the loaded model, as text; None where the file has no such key."""
    buffer = ctypes.create_string_buffer(256)
    length = api.llama_model_meta_val_str(model, key.encode(), buffer, len(buffer))
    return buffer.value.decode() if length >= 0 else None


@functools.cache
def _ggml_backend():
    from llama_cpp._ggml import libggml as lib  # ggml-base's symbols resolve through it

    lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    lib.ggml_backend_tensor_get.restype = None
    return lib


def _read_into_memory(model_params, api) -> None:
    """Load the file with read(), not mmap (CPU only: a GPU backend does not repack, and Metal uses the mapped
    file itself as its buffer). On CPU llama.cpp repacks most weights into its matrix kernels' layout, and the
    mapped pages it read to do so stay resident beside the repacked copy. Measured on a 4.4 GB 7B Q4_K_M:
    peak 7.8 GB mapped, 4.6 GB read in, for 10 to 13 s of loading instead of 6 to 7; the same tensors and
    kernels either way, so the logits are bit for bit the same."""
    # newer llama.cpp has one enum for mmap, mlock and direct I/O; older ones a use_mmap flag
    if any(name == "load_mode" for name, _ in type(model_params)._fields_):
        model_params.load_mode = api.LLAMA_LOAD_MODE_NONE
    else:
        model_params.use_mmap = False


def _device(api, offload: bool, threads: int) -> str:
    if not offload:
        return f"CPU (llama.cpp, {threads} threads)"
    info = api.llama_print_system_info().decode()
    backend = next((name for name in GPU_BACKENDS if name in info), "GPU")
    return f"GPU ({backend}, llama.cpp)"
