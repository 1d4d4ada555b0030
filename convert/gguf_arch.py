"""What llama.cpp's graph for each architecture computes, and how a ModelSpec's traits are written for it.

llama.cpp hard-codes part of each architecture in C++ (Gemma's √hidden embedding scale and attention scale,
SmolLM3's NoPE step of 4, Gemma 3's sliding pattern) and reads the rest from keys. For every trait the spec
has, `GGUFArch` does one of three things:
- writes it as the keys and tensors llama.cpp reads (soft-caps, windows and their per-layer pattern, the
  sliding layers' θ, Granite's multipliers, LongRoPE's factor tensors);
- folds an exact correction into the weights, where llama.cpp computes something else that a weight can
  absorb: norm weights are stored as (offset + w); an attention scale other than llama.cpp's lives in the
  q rows (or, after a q norm, in the q norm's weights: the norm would undo a scale on q);
- refuses, naming the trait, when neither is possible: never a file that computes another function.

Mixtures of experts: llama.cpp's `llama` (Mixtral), `qwen3moe`, `qwen2moe` and `olmoe` graphs route every
layer through `build_moe_ffn` with a softmax over all experts and the top `expert_used_count`; llama and
qwen3moe always renormalise the chosen weights, qwen2moe and olmoe never (none reads expert_weights_norm).
qwen2moe adds its shared expert (ffn_*_shexp) weighted by sigmoid(ffn_gate_inp_shexp · x). The expert stacks
are ffn_gate_exps / ffn_up_exps / ffn_down_exps ({n_embd, n_ff, n_expert} in ggml's order: the stacks as
transformers holds them) and the router ffn_gate_inp. What a graph cannot say (dense layers between sparse
ones, the other weight rule, a shared expert it lacks or needs) is refused.

llama.cpp's olmoe sizes q, k and v and their norms as the hidden state ({n_embd}): grouped k/v heads are
written repeated, one per q head, which is the attention GQA computes; the RMS over a k projection whose
heads each appear n times is the RMS over the original, so the norm over the whole projection is unchanged.

Hybrids: a layer's mixer (ModelSpec's Layer.mixer) is read here, in `_check_mixers`, and nowhere else. llama.cpp's
lfm2 graph tells its gated short-convolution layers from its attention layers by a per-layer head_count_kv of 0,
sizes their state by shortconv.l_cache (the kernel), and takes the kernel as [channels, kernel] (torch's Conv1d
[channels, 1, kernel] squeezed) in F32; it has no biases there. A mixer a layout's graph does not run is refused.

HF q/k rows are "rotate half"; archs with NORM rope in llama.cpp rotate adjacent pairs, so their q and k rows
are reordered per head (llama.cpp's LlamaModel.permute). NEOX archs take the rows as they are.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import gguf
import numpy as np

from siliconvert.architectures import ModelSpec
from siliconvert.architectures.base import MIXERS
from siliconvert.errors import CheckpointError

A = gguf.MODEL_ARCH


@dataclass(frozen=True)
class LlamaCppExperts:
    """How an architecture's graph in llama.cpp runs a mixture of experts (its `build_moe_ffn` call)."""

    normalize_topk: bool  # the chosen experts' weights renormalised to sum 1 (the `norm_w` argument)
    # the key llama.cpp sizes the expert stacks by: its own expert_feed_forward_length, or (llama) the dense
    # feed_forward_length, which then cannot size a dense MLP of another width
    expert_length_key: bool
    # a shared expert every token goes through, weighted by a sigmoid of its own gate (ffn_*_shexp,
    # ffn_gate_inp_shexp): the graph runs one in every layer when True, and has none when False
    shared_expert: bool = False


@dataclass(frozen=True)
class Layout:
    """A llama.cpp architecture as siliconvert writes for it."""

    arch: gguf.MODEL_ARCH
    permute_qk: bool  # NORM rope (adjacent pairs) in llama.cpp: q/k rows reordered from HF's rotate-half
    # Traits llama.cpp's graph computes whatever the file says (trait → value); the spec must agree
    fixed: dict[str, Any] = field(default_factory=dict)
    # Traits llama.cpp reads from keys or tensors of this arch
    keyed: frozenset[str] = frozenset()
    experts: LlamaCppExperts | None = None  # None: this arch has no mixture of experts
    # the graph sizes q, k and v as the hidden state (olmoe): grouped k/v heads are repeated, one per q head
    kv_heads_as_q: bool = False
    # the graph requires output.weight (no fallback to token_embd): a tied head is written as a copy of it
    output_required: bool = False
    # the sliding layers rotate with rope.freq_base_swa (gemma2/3); False: with the main rope.freq_base, which the
    # olmo2 graph passes to every layer (it loads the swa key and never uses it)
    swa_theta_keyed: bool = True
    # the mixers the graph runs (Layer.mixer); a layer of any other is refused, naming its mixer
    mixers: frozenset[str] = frozenset({"attention"})
    # roles this architecture writes under another GGUF base name (lfm2's final norm is token_embd_norm)
    renamed: dict[str, str] = field(default_factory=dict)


_PRE = {"norm_placement": "pre", "qk_norm": None, "activation": "silu", "final_softcap": None, "attn_softcap": None,
        "fused_qkv": False, "fused_gate_up": False}
_GEMMA = _PRE | {"norm_placement": "sandwich", "activation": "gelu_tanh"}
LAYOUTS: dict[str, Layout] = {
    "llama": Layout(A.LLAMA, permute_qk=True, fixed=_PRE),
    "mistral": Layout(A.LLAMA, permute_qk=True, fixed=_PRE),  # llama.cpp converts Mistral as llama
    "qwen2": Layout(A.QWEN2, permute_qk=False, fixed=_PRE),
    "qwen3": Layout(A.QWEN3, permute_qk=False, fixed=_PRE | {"qk_norm": "head"}),
    "gemma2": Layout(A.GEMMA2, permute_qk=False, fixed=_GEMMA,
                     keyed=frozenset({"attn_softcap", "final_softcap", "sliding_window"})),
    "gemma3": Layout(A.GEMMA3, permute_qk=False, fixed=_GEMMA | {"qk_norm": "head"},
                     keyed=frozenset({"final_softcap", "sliding_window"})),
    "olmo2": Layout(A.OLMO2, permute_qk=False, fixed=_PRE | {"norm_placement": "post", "qk_norm": "projection"},
                    keyed=frozenset({"sliding_window"}), output_required=True),
    # llama.cpp converts OLMo 3 as olmo2 with the window keys; its sliding layers rotate with the main θ
    "olmo3": Layout(A.OLMO2, permute_qk=False, fixed=_PRE | {"norm_placement": "post", "qk_norm": "projection"},
                    keyed=frozenset({"sliding_window"}), output_required=True, swa_theta_keyed=False),
    "granite": Layout(A.GRANITE, permute_qk=True, fixed=_PRE,
                      keyed=frozenset({"embedding_scale", "attention_scale", "residual_scale", "logits_scale"})),
    "phi3": Layout(A.PHI3, permute_qk=False, fixed=_PRE | {"fused_qkv": True, "fused_gate_up": True},
                   keyed=frozenset({"longrope"})),
    "smollm3": Layout(A.SMOLLM3, permute_qk=True, fixed=_PRE, keyed=frozenset({"nope_every_4th"})),
    # llama.cpp converts Mixtral as llama: experts in every layer once expert_count is set
    "mixtral": Layout(A.LLAMA, permute_qk=True, fixed=_PRE,
                      experts=LlamaCppExperts(normalize_topk=True, expert_length_key=False)),
    "qwen3_moe": Layout(A.QWEN3MOE, permute_qk=False, fixed=_PRE | {"qk_norm": "head"},
                        experts=LlamaCppExperts(normalize_topk=True, expert_length_key=True)),
    # qwen2moe and olmoe load no attn_output bias
    "qwen2_moe": Layout(A.QWEN2MOE, permute_qk=False, fixed=_PRE | {"attn_output_bias": False},
                        experts=LlamaCppExperts(normalize_topk=False, expert_length_key=True, shared_expert=True),
                        output_required=True),
    # olmoe sizes its experts by feed_forward_length (it reads no expert key)
    "olmoe": Layout(A.OLMOE, permute_qk=False, fixed=_PRE | {"qk_norm": "projection", "attn_output_bias": False},
                    experts=LlamaCppExperts(normalize_topk=False, expert_length_key=False), kv_heads_as_q=True,
                    output_required=True),
    # llama.cpp's lfm2 loads the final norm as token_embd_norm, and a missing output.weight as token_embd
    "lfm2": Layout(A.LFM2, permute_qk=False, fixed=_PRE | {"qk_norm": "head"},
                   mixers=frozenset({"attention", "short_conv"}), renamed={"output_norm": "token_embd_norm"}),
}
# Roles whose rows are the k/v heads' (a bias or a norm over the projection too): repeated for kv_heads_as_q
KV_ROLES = ("attn_k", "attn_v", "attn_k_norm")
# Roles whose GGUF tensor has another base name: llama.cpp's phi3 keeps gate and up fused in ffn_up
GGUF_ROLES = {"ffn_gate_up": "ffn_up"}
# Roles llama.cpp keeps as several tensors, split in equal parts along the rows (axis -2): transformers'
# stack of each expert's gate rows then up rows
SPLIT_ROLES = {"ffn_gate_up_exps": ("ffn_gate_exps", "ffn_up_exps")}
# Depthwise convolutions, held as torch's Conv1d [channels, 1, kernel]: llama.cpp's ssm_conv takes [channels, kernel]
CONV_ROLES = ("shortconv.conv",)
# Rope scalings llama.cpp can express, per kind (others are refused)
SCALINGS = ("linear", "yarn", "llama3", "longrope")


class GGUFArch:
    """One checkpoint's spec against one llama.cpp architecture: checks, keys, weight folds, extra tensors."""

    def __init__(self, spec: ModelSpec, where: Any):
        if spec.family not in LAYOUTS:
            raise CheckpointError(f"no GGUF layout for the {spec.family} family", where)
        self.spec, self.where, self.layout = spec, where, LAYOUTS[spec.family]
        self._check()
        # k/v heads as written: one per q head where the graph needs it (each source head repeated this often)
        self.head_count_kv = spec.num_heads if self.layout.kv_heads_as_q else spec.num_kv_heads
        self.kv_repeat = self.head_count_kv // spec.num_kv_heads
        # each layer's k/v heads as the file says them: 0 marks a layer of a mixer with a state of its own
        self.layer_head_count_kv = self._check_mixers()
        # a tied head the graph cannot take from token_embd: the embedding is written twice
        self.head_from_embedding = spec.tie_word_embeddings and self.layout.output_required
        # q·k × spec's scale where llama.cpp multiplies by its own: the ratio goes into q (or q's norm)
        keyed_scale = "attention_scale" in self.layout.keyed
        self.q_scale = 1.0 if keyed_scale else spec.attention_multiplier / self.llama_cpp_attention_scale()

    @property
    def arch(self) -> gguf.MODEL_ARCH:
        return self.layout.arch

    def refuse(self, trait: str, why: str) -> CheckpointError:
        return CheckpointError(f"GGUF ({gguf.MODEL_ARCH_NAMES[self.arch]}) cannot honour the trait {trait}: {why}",
                               self.where)

    # ---- checks ----------------------------------------------------------------------------------------
    def _check(self) -> None:
        spec, layout = self.spec, self.layout
        for trait, value in layout.fixed.items():
            if getattr(spec, trait) != value and trait not in layout.keyed:
                raise self.refuse(trait, f"llama.cpp computes {value!r}, the source {getattr(spec, trait)!r}")
        if layout.arch in (A.GEMMA2, A.GEMMA3):
            if not math.isclose(spec.embedding_scale, math.sqrt(spec.hidden_size), rel_tol=1e-6):
                raise self.refuse("embedding_scale", "llama.cpp multiplies Gemma embeddings by √hidden")
        else:
            for trait in ("embedding_scale", "residual_scale", "logits_scale"):
                if getattr(spec, trait) != 1.0 and trait not in layout.keyed:
                    raise self.refuse(trait, "this architecture has no such multiplier")
        for layer in spec.layers:
            rope = layer.rope
            if rope is None:
                continue
            if rope.kind not in SCALINGS and rope.kind != "default":
                raise self.refuse("rope_scaling", f"llama.cpp has no {rope.kind!r} rope scaling")
            if rope.kind == "longrope" and "longrope" not in layout.keyed:
                raise self.refuse("rope_scaling", "LongRoPE factors are read by llama.cpp's phi3 only")
            if layout.permute_qk and rope.dim != spec.head_dim:
                raise self.refuse("partial_rotary", "partial rotary with adjacent-pair rope")
        self._check_layers()
        self._check_experts()

    def _check_experts(self) -> None:
        experts, supported = self.spec.experts, self.layout.experts
        if experts is None:
            if supported is not None and self.arch != A.LLAMA:  # llama runs a dense MLP without expert_count
                raise self.refuse("experts", "llama.cpp runs a mixture of experts in every layer; the source has "
                                             "none")
            return
        if supported is None:
            raise self.refuse("experts", "this architecture has no mixture of experts in llama.cpp")
        if experts.normalize_topk != supported.normalize_topk:
            done = "always renormalises" if supported.normalize_topk else "never renormalises"
            raise self.refuse("normalize_topk", f"llama.cpp {done} the chosen experts' weights; the source "
                                                f"{'does' if experts.normalize_topk else 'does not'} "
                                                "(norm_topk_prob)")
        if bool(experts.shared_intermediate_size) != supported.shared_expert:
            has = "runs a shared expert in every layer" if supported.shared_expert else "has no shared expert"
            raise self.refuse("shared_expert", f"llama.cpp {has}; the source "
                                               f"{'has one' if experts.shared_intermediate_size else 'has none'}")
        if dense := self.spec.traits().get("dense_layers"):
            raise self.refuse("dense_layers", f"llama.cpp runs the experts in every layer; the source's layers "
                                              f"{dense} have a dense MLP")

    def _check_mixers(self) -> list[int]:
        """Refuse a mixer the graph does not run (or runs otherwise); each layer's head_count_kv, which is how
        llama.cpp's hybrid graphs tell their layers apart (0: recurrent)."""
        spec, layout = self.spec, self.layout
        for mixer in MIXERS:
            if (layers := spec.mixer_layers(mixer)) and mixer not in layout.mixers:
                raise self.refuse(mixer, f"llama.cpp's graph has no {mixer} layers; the source's layers {layers}")
        if spec.mixer_layers("short_conv"):
            if spec.short_conv.bias:
                raise self.refuse("short_conv", "llama.cpp's gated short convolution has no biases (conv_bias)")
            if spec.short_conv.kernel < 2:
                raise self.refuse("short_conv", f"llama.cpp needs a kernel of at least 2 taps; the source's has "
                                                f"{spec.short_conv.kernel}")
        return [self.head_count_kv if layer.mixer == "attention" else 0 for layer in spec.layers]

    def _check_layers(self) -> None:
        spec, layout = self.spec, self.layout
        nope = spec.traits().get("nope_layers", [])  # attention layers without rope (other mixers have none)
        llama_cpp_nope = [i for i in range(spec.num_layers) if (i + 1) % 4 == 0] if (
            "nope_every_4th" in layout.keyed) else []
        if nope != llama_cpp_nope:
            raise self.refuse("nope_layers", f"llama.cpp's NoPE layers are fixed ({llama_cpp_nope}); the source's "
                                             f"are {nope}")
        full = {repr(layer.rope) for layer in spec.layers if layer.window is None and layer.rope is not None}
        sliding = {repr(layer.rope) for layer in spec.layers if layer.window is not None and layer.rope is not None}
        if len(full) > 1 or len(sliding) > 1:
            raise self.refuse("per_layer_rope", "more than one rope per attention kind")
        windows = {layer.window for layer in spec.layers} - {None}
        if not windows:
            return
        if len(windows) > 1:
            raise self.refuse("sliding_window", f"llama.cpp has one window size; the source has {sorted(windows)}")
        if "sliding_window" not in layout.keyed:
            if sliding != full and sliding:
                raise self.refuse("per_layer_rope", "a rope of the sliding layers apart")
            if spec.sliding_window >= spec.max_position_embeddings:
                return  # a window as long as the context is full attention
            warnings.warn(f"{self.where}: llama.cpp runs full attention; its output differs from the source "
                          f"beyond the {spec.sliding_window}-token sliding window", stacklevel=3)
            return
        swa_rope = next(layer.rope for layer in spec.layers if layer.window is not None)
        if swa_rope is not None and (swa_rope.scaling is not None or swa_rope.dim != (self.spec.rope or swa_rope).dim):
            raise self.refuse("per_layer_rope", "llama.cpp's sliding layers take no rope scaling of their own")
        if swa_rope is not None and not layout.swa_theta_keyed and spec.rope is not None and (
                swa_rope.theta != spec.rope.theta):
            raise self.refuse("per_layer_rope", f"llama.cpp's sliding layers rotate with the main θ "
                                                f"({spec.rope.theta:g}); the source's with {swa_rope.theta:g}")

    # ---- what llama.cpp computes -----------------------------------------------------------------------
    def llama_cpp_attention_scale(self) -> float:
        """The q·k multiplier llama.cpp's graph uses for this arch (Gemma: gemma_pytorch's rule by size)."""
        spec = self.spec
        big_gemma = {A.GEMMA2: 46, A.GEMMA3: 62}.get(self.arch) == spec.num_layers
        if big_gemma:  # llama.cpp's 27B rule: n_embd / n_head, not head_dim
            return (spec.hidden_size // spec.num_heads) ** -0.5
        return spec.head_dim**-0.5

    # ---- keys -------------------------------------------------------------------------------------------
    def add_hyperparameters(self, writer: gguf.GGUFWriter) -> None:
        spec = self.spec
        rope = spec.rope
        writer.add_vocab_size(spec.vocab_size)
        writer.add_context_length(spec.max_position_embeddings)
        writer.add_embedding_length(spec.hidden_size)
        experts, supported = spec.experts, self.layout.experts
        sized_by_dense_key = experts is not None and supported is not None and not supported.expert_length_key
        writer.add_feed_forward_length(experts.intermediate_size if sized_by_dense_key else spec.intermediate_size)
        writer.add_block_count(spec.num_layers)
        writer.add_head_count(spec.num_heads)
        if len(set(self.layer_head_count_kv)) > 1:  # a hybrid: the per-layer list is its pattern of mixers
            writer.add_head_count_kv(self.layer_head_count_kv)
        else:
            writer.add_head_count_kv(self.head_count_kv)
        writer.add_key_length(spec.head_dim)
        writer.add_value_length(spec.head_dim)
        writer.add_rope_dimension_count(rope.dim if rope else spec.head_dim)
        writer.add_rope_freq_base(spec.rope_theta)
        writer.add_layer_norm_rms_eps(spec.rms_norm_eps)
        self._add_rope_scaling(writer)
        if spec.mixer_layers("short_conv"):
            writer.add_shortconv_l_cache(spec.short_conv.kernel)
        if experts is not None:
            writer.add_expert_count(experts.count)
            writer.add_expert_used_count(experts.used)
            if not sized_by_dense_key:
                writer.add_expert_feed_forward_length(experts.intermediate_size)
            if experts.shared_intermediate_size:
                writer.add_expert_shared_feed_forward_length(experts.shared_intermediate_size)
        keyed = self.layout.keyed
        if "embedding_scale" in keyed:
            writer.add_embedding_scale(spec.embedding_scale)
        if "residual_scale" in keyed:
            writer.add_residual_scale(spec.residual_scale)
        if "attention_scale" in keyed:
            writer.add_attention_scale(spec.attention_multiplier)
        if "logits_scale" in keyed:
            writer.add_logit_scale(1.0 / spec.logits_scale)  # llama.cpp divides by it, as Granite's config
        if "attn_softcap" in keyed and spec.attn_softcap:
            writer.add_attn_logit_softcapping(spec.attn_softcap)
        if "final_softcap" in keyed and spec.final_softcap:
            writer.add_final_logit_softcapping(spec.final_softcap)
        if "sliding_window" in keyed and spec.sliding_window:
            writer.add_sliding_window(spec.sliding_window)
            # the per-layer pattern as a list: llama.cpp's default patterns (2 for Gemma 2, 6 for Gemma 3)
            # are what the source says only for the published layer counts
            writer.add_sliding_window_pattern([layer.window is not None for layer in spec.layers])
            swa_rope = next((layer.rope for layer in spec.layers if layer.window is not None), None)
            if swa_rope is not None:
                writer.add_rope_freq_base_swa(swa_rope.theta)

    def _add_rope_scaling(self, writer: gguf.GGUFWriter) -> None:
        scaling = self.spec.rope_scaling or {}
        kind = scaling.get("rope_type")
        if kind == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(scaling["factor"])
        elif kind == "yarn":
            writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            writer.add_rope_scaling_factor(scaling["factor"])
            # transformers' default where the file leaves it out: the model's own context
            original = scaling.get("original_max_position_embeddings") or self.spec.max_position_embeddings
            writer.add_rope_scaling_orig_ctx_len(original)
            optional = {"attention_factor": writer.add_rope_scaling_yarn_attn_factor,
                        "beta_fast": writer.add_rope_scaling_yarn_beta_fast,
                        "beta_slow": writer.add_rope_scaling_yarn_beta_slow}
            for key, add in optional.items():
                if scaling.get(key) is not None:
                    add(scaling[key])
        elif kind == "longrope":
            original = scaling["original_max_position_embeddings"]
            writer.add_rope_scaling_orig_ctx_len(original)
            writer.add_rope_scaling_attn_factors(longrope_attention_factor(scaling))

    # ---- tensors -----------------------------------------------------------------------------------------
    def gguf_roles(self, role: str) -> tuple[str, ...]:
        """The GGUF base names a checkpoint role is written as: one, or the parts `split` cuts it into (a tied
        embedding also as the head, where the graph requires one)."""
        if role == "token_embd" and self.head_from_embedding:
            return ("token_embd", "output")
        return SPLIT_ROLES.get(role, ((self.layout.renamed | GGUF_ROLES).get(role, role),))

    def shapes(self, role: str, shape: tuple[int, ...]) -> list[tuple[int, ...]]:
        """The shapes of the tensors `gguf_roles` names for a checkpoint tensor of this role and shape."""
        if self.kv_repeat > 1 and role in KV_ROLES:
            return [(shape[0] * self.kv_repeat, *shape[1:])]
        if role in CONV_ROLES:
            return [(shape[0], shape[-1])]
        parts = len(self.gguf_roles(role))
        if role in SPLIT_ROLES:
            return [(*shape[:-2], shape[-2] // parts, shape[-1])] * parts
        return [shape] * parts

    def split(self, role: str, array: np.ndarray) -> list[np.ndarray]:
        """A tensor in llama.cpp's layout as the parts `gguf_roles` names (views, no copy)."""
        if role in SPLIT_ROLES:
            return np.split(array, len(SPLIT_ROLES[role]), axis=-2)
        return [array] * len(self.gguf_roles(role))

    def extra_tensors(self) -> dict[str, np.ndarray]:
        """Tensors llama.cpp reads that the checkpoint does not hold (rope factors), by GGUF base name."""
        spec = self.spec
        scaling = spec.rope_scaling or {}
        if scaling.get("rope_type") == "llama3":
            return {"rope_freqs": llama3_rope_factors(spec)}
        if scaling.get("rope_type") == "longrope":
            return {"rope_factors_long": np.asarray(scaling["long_factor"], dtype=np.float32),
                    "rope_factors_short": np.asarray(scaling["short_factor"], dtype=np.float32)}
        return {}

    def to_llama_cpp(self, role: str, kind: str, array: np.ndarray) -> np.ndarray:
        """A checkpoint tensor as llama.cpp's graph wants it: convolution kernels as [channels, kernel], norms with
        their offset folded in, the attention
        scale correction folded in, k/v heads repeated where the graph wants one per q head, q/k rows in
        llama.cpp's rope order."""
        spec = self.spec
        array = np.ascontiguousarray(array, dtype=np.float32)
        if self.kv_repeat > 1 and role in KV_ROLES:
            heads = array.reshape(spec.num_kv_heads, -1, *array.shape[1:])  # GQA's q head h reads kv head h // n
            [shape] = self.shapes(role, array.shape)
            array = np.repeat(heads, self.kv_repeat, axis=0).reshape(shape)
        if role in CONV_ROLES:
            [shape] = self.shapes(role, array.shape)
            array = array.reshape(shape)
        if role.endswith("_norm") and spec.norm_offset:
            array = array + np.float32(spec.norm_offset)
        if self.q_scale != 1.0 and role == ("attn_q_norm" if spec.qk_norm else "attn_q"):
            array = array * np.float32(self.q_scale)
        if self.layout.permute_qk and role == "attn_q":
            return rope_pairs_adjacent(array, spec.num_heads)
        if self.layout.permute_qk and role == "attn_k":
            return rope_pairs_adjacent(array, self.head_count_kv)
        return array


def rope_pairs_adjacent(rows: np.ndarray, heads: int) -> np.ndarray:
    """Reorder each head's rows (0..d/2-1, d/2..d-1) → (0, d/2, 1, d/2+1, ...): llama.cpp's LlamaModel.permute."""
    shape = rows.shape
    return rows.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def rope_pairs_split(rows: np.ndarray, heads: int) -> np.ndarray:
    """The inverse of `rope_pairs_adjacent`: llama.cpp's row order back to HF's."""
    shape = rows.shape
    return rows.reshape(heads, shape[0] // heads // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def longrope_attention_factor(scaling: dict[str, Any]) -> float:
    """cos/sin scale of LongRoPE: the file's attention_factor, else transformers' default from the factor."""
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor, original = float(scaling["factor"]), scaling["original_max_position_embeddings"]
    return math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1.0 else 1.0


def llama3_rope_factors(spec: ModelSpec) -> np.ndarray:
    """Llama 3.1's per-frequency rope divisors, which llama.cpp reads from a `rope_freqs` tensor."""
    scaling = spec.rope_scaling or {}
    factor, low, high = scaling["factor"], scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_context = scaling.get("original_max_position_embeddings", 8192)
    freqs = 1.0 / spec.rope_theta ** (np.arange(0, spec.head_dim, 2, dtype=np.float64) / spec.head_dim)
    wavelen = 2 * math.pi / freqs
    smooth = (old_context / wavelen - low) / (high - low)
    factors = np.where(wavelen < old_context / high, 1.0,
                       np.where(wavelen > old_context / low, factor, 1 / ((1 - smooth) / factor + smooth)))
    return factors.astype(np.float32)
