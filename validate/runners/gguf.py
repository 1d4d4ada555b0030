"""A GGUF file opened on llama.cpp (through llama-cpp-python's C API), exactly as its users run it.

The runner speaks llama.cpp's C API directly: one model, one context, one batch. llama.cpp's log is
routed away from stderr; its warnings (say, a missing pre-tokenizer type) are kept in `warnings` so that
validation can insist there are none.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from siliconvert.errors import ArtifactError, RuntimeMissingError
from siliconvert.quantize.gguf import LlamaLog, cpu_threads
from siliconvert.validate.runners.base import Runner

DEFAULT_CONTEXT = 2048
GPU_BACKENDS = ("CUDA", "Metal", "Vulkan", "HIP", "SYCL")  # names llama_print_system_info() reports


class LlamaCppRunner(Runner):
    runtime = "llama.cpp"

    def __init__(self, path: Path, options: dict) -> None:
        try:
            import llama_cpp
        except ImportError:
            raise RuntimeMissingError("llama-cpp-python is not installed (pip install llama-cpp-python)") from None
        self.api = api = llama_cpp.llama_cpp
        self.path = Path(path)
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
            context_params = api.llama_context_default_params()
            context_params.n_ctx = context_params.n_batch = self.n_ctx  # one window, one decode call
            context_params.n_threads = context_params.n_threads_batch = threads
            self.ctx = api.llama_init_from_model(self.model, context_params)
            if not self.ctx:
                api.llama_model_free(self.model)
                raise ArtifactError(f"llama.cpp cannot create a context: {log.last_error}", self.path)
        self.warnings = log.warnings
        self.vocab = api.llama_model_get_vocab(self.model)
        self.n_vocab = api.llama_vocab_n_tokens(self.vocab)
        self.device = _device(api, offload, threads)
        self._pos = 0

    def logits(self, tokens: np.ndarray) -> np.ndarray:
        self._clear()
        return self._decode([int(t) for t in tokens], all_logits=True)

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
