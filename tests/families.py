"""Small checkpoints of every family, built from transformers' own config classes with their traits switched
on: a sliding window shorter than the test window, a non-default attention scalar, soft-caps, per-layer-type
rope, LongRoPE with partial rotary, NoPE layers, Granite's multipliers. Trained briefly (cached like the demo),
so their distributions are peaked as a real model's are and KLD figures mean something."""

from __future__ import annotations

# family (transformers model_type) → (tokenizer kind, config keys beyond demo.SMALL's sizes)
FAMILY_CASES: dict[str, tuple[str, dict]] = {
    "qwen3": ("bpe", {"head_dim": 48}),  # heads × head_dim (192) ≠ hidden (128)
    "gemma2": ("sentencepiece", {"tie_word_embeddings": True,  # llama.cpp's gemma2 has no separate head
        "head_dim": 32, "query_pre_attn_scalar": 24, "sliding_window": 24,
        "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention"], "num_hidden_layers": 3}),
    "gemma3_text": ("sentencepiece", {
        "head_dim": 32, "query_pre_attn_scalar": 40, "sliding_window": 24,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention"], "num_hidden_layers": 3,
        "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1_000_000.0},
                            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}}),
    "olmo2": ("bpe", {}),
    # transformers' default layer types (sliding, sliding, sliding, full) with a 24-token window; YaRN on the full
    # layer only, as OLMo-3-7B has it
    "olmo3": ("bpe", {"num_hidden_layers": 4, "sliding_window": 24, "rope_parameters": {
        "full_attention": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 512,
                           "rope_theta": 500_000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 500_000.0}}}),
    "granite": ("bpe", {"embedding_multiplier": 6.0, "attention_multiplier": 0.05, "residual_multiplier": 0.5,
                        "logits_scaling": 4.0}),
    "phi3": ("sentencepiece", {
        "max_position_embeddings": 1024, "original_max_position_embeddings": 256,
        "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                            "original_max_position_embeddings": 256,
                            "short_factor": [1.0 + 0.05 * i for i in range(8)],
                            "long_factor": [1.5 + 0.25 * i for i in range(8)]}}),
    "smollm3": ("bpe", {"num_hidden_layers": 4}),  # layer 3 has no rope (every 4th, as SmolLM3 and llama.cpp)
    # mixtures of experts: 4 experts, 2 per token (Qwen3-MoE renormalises the chosen two, as Qwen3-30B-A3B does)
    "qwen3_moe": ("bpe", {"head_dim": 32, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 128,
                          "norm_topk_prob": True}),
    "mixtral": ("sentencepiece", {"intermediate_size": 128, "num_local_experts": 4, "num_experts_per_tok": 2}),
    # a shared expert behind a sigmoid gate beside the routed ones, q/k/v biases, chosen weights not renormalised
    "qwen2_moe": ("bpe", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 128,
                          "shared_expert_intermediate_size": 192}),
    "olmoe": ("bpe", {"num_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 128}),  # q/k norms: projection
    # hybrids: LFM2's gated short convolutions around one attention layer, a tied head as LFM2 ships; the MLP's
    # width derived as transformers does (⅔ of 384, rounded up to 96: 288 rows, no multiple of 256)
    "lfm2": ("bpe", {"num_hidden_layers": 4, "layer_types": ["conv", "full_attention", "conv", "conv"],
                     "block_multiple_of": 96, "tie_word_embeddings": True}),
    # Qwen3.5: three gated-delta-rule layers (2 key heads, 4 value heads: q and k repeated) to one gated attention
    # layer; partial rotary (a quarter of head_dim 32); a conv of 4 taps; untied as the 2B+ sizes are
    "qwen3_5_text": ("bpe", {"num_hidden_layers": 4, "head_dim": 32, "linear_num_key_heads": 2,
                             "linear_num_value_heads": 4, "linear_key_head_dim": 32, "linear_value_head_dim": 24,
                             "linear_conv_kernel_dim": 4,
                             "layer_types": ["linear_attention"] * 3 + ["full_attention"],
                             "rope_parameters": {"rope_type": "default", "rope_theta": 10_000_000.0,
                                                 "partial_rotary_factor": 0.25, "mrope_section": [2, 1, 1],
                                                 "mrope_interleaved": True}}),
    # Qwen3.5-MoE: the same layers with 4 experts (2 per token, renormalised) and a shared expert in every MLP
    "qwen3_5_moe_text": ("bpe", {"num_hidden_layers": 4, "head_dim": 32, "linear_num_key_heads": 2,
                                 "linear_num_value_heads": 4, "linear_key_head_dim": 32, "linear_value_head_dim": 24,
                                 "layer_types": ["linear_attention"] * 3 + ["full_attention"],
                                 "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 96,
                                 "shared_expert_intermediate_size": 160,
                                 "rope_parameters": {"rope_type": "default", "rope_theta": 10_000_000.0,
                                                     "partial_rotary_factor": 0.25, "mrope_section": [2, 1, 1]}}),
    # Qwen3-Next: fused qkvz and ba projections; experts in layers 1 and 3 (decoder_sparse_step 2), a dense MLP in
    # the others; the chosen experts' weights not renormalised
    "qwen3_next": ("bpe", {"num_hidden_layers": 4, "head_dim": 32, "linear_num_key_heads": 2,
                           "linear_num_value_heads": 4, "linear_key_head_dim": 32, "linear_value_head_dim": 24,
                           "layer_types": ["linear_attention"] * 3 + ["full_attention"],
                           "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 96,
                           "shared_expert_intermediate_size": 160, "decoder_sparse_step": 2, "norm_topk_prob": False,
                           "rope_parameters": {"rope_type": "default", "rope_theta": 10_000_000.0,
                                               "partial_rotary_factor": 0.25}}),
    # Ministral 3: YaRN and Llama 4's attention temperature from position 64 on (windows of 96 and more reach it)
    "ministral3": ("sentencepiece", {"rope_parameters": {
        "rope_type": "yarn", "rope_theta": 1_000_000.0, "factor": 4.0, "original_max_position_embeddings": 64,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.1}}),
    # gpt-oss: attention sinks, sliding (24) and full layers alternating, YaRN with the correction range not
    # truncated (as gpt-oss-20b's config), q/k/v/o biases, 4 experts (2 per token) with biases, the clamped SwiGLU
    # and a router with a bias
    "gpt_oss": ("bpe", {"head_dim": 32, "num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 96,
                        "sliding_window": 24, "rope_parameters": {
                            "rope_type": "yarn", "rope_theta": 150_000.0, "factor": 16.0, "beta_fast": 32.0,
                            "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 64}}),
    # Granite 4.0-H: Mamba2 (8 heads of 32, one group, state 16) around one NoPE attention layer, μP multipliers,
    # 4 experts (2 per token) beside the shared MLP in every layer
    "granitemoehybrid": ("bpe", {"num_hidden_layers": 4, "layer_types": ["mamba", "attention", "mamba", "mamba"],
                                 "position_embedding_type": "nope", "mamba_n_heads": 8, "mamba_d_state": 16,
                                 "mamba_n_groups": 1, "mamba_d_conv": 4, "mamba_expand": 2,
                                 "num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 96,
                                 "shared_intermediate_size": 160, "embedding_multiplier": 6.0,
                                 "attention_multiplier": 0.05, "residual_multiplier": 0.5, "logits_scaling": 4.0}),
    # Gemma 4 as E2B is shaped: sliding layers (window 24) and global layers with wider heads (64) and proportional
    # rope, per-layer inputs, the last two layers kv-shared (reading layers 1 and 2) with double-wide MLPs, the final
    # soft-cap; and the global layers' keys as their values, one k/v head (k_eq_v, as the 26B and 31B have it)
    "gemma4_text": ("sentencepiece", {
        "num_hidden_layers": 5, "head_dim": 32, "global_head_dim": 64, "num_global_key_value_heads": 1,
        "attention_k_eq_v": True, "sliding_window": 24,
        "layer_types": ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention",
                        "full_attention"],
        "num_kv_shared_layers": 2, "use_double_wide_mlp": True, "hidden_size_per_layer_input": 16,
        "vocab_size_per_layer_input": 1024, "final_logit_softcapping": 30.0,
        "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                               "rope_theta": 1_000_000.0}}}),
}
# Gemma 4's expert block, as the 26B-A4B has it, on the gemma4_text case: 4 experts (2 per token) of width 64 beside
# every layer's dense MLP, each branch in norms of its own, a router over the RMS-normed residual with a learned scale
# per input and per expert
GEMMA4_EXPERTS = {"enable_moe_block": True, "num_experts": 4, "top_k_experts": 2, "moe_intermediate_size": 64}
# The gated delta cases in shapes llama.cpp's graphs run: value heads as wide as key heads (they size both by
# ssm.state_size), and for Qwen3-Next experts in every layer, renormalised (its qwen3next graph knows no other)
LLAMA_CPP_SHAPES = {"qwen3_5_text": {"linear_value_head_dim": 32}, "qwen3_5_moe_text": {"linear_value_head_dim": 32},
                    "qwen3_next": {"linear_value_head_dim": 32, "decoder_sparse_step": 1, "norm_topk_prob": True}}
# The cases with YaRN's correction range truncated, as llama.cpp and mlx-lm always compute it: GGUF writes the
# untruncated case with a warning naming the trait (tests/test_gguf_moe.py measures its cost), MLX refuses it but
# with `model_file: faithful` (tests/test_mlx_models_gpt_oss.py)
TRUNCATED_YARN = {"gpt_oss": {"rope_parameters": {**FAMILY_CASES["gpt_oss"][1]["rope_parameters"], "truncate": True}}}
# gpt-oss-20b's own rope (config.json), for the gpt_oss case at its head size (64): where YaRN's ramp really runs
GPT_OSS_20B_ROPE = {"head_dim": 64, "rope_parameters": {
    "rope_type": "yarn", "rope_theta": 150_000.0, "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
    "truncate": False, "original_max_position_embeddings": 4096}}


def gemma4_experts(out_dir):
    """The gemma4_text case with GEMMA4_EXPERTS' expert block (trained), its router's scales set well apart from 1
    (training leaves them within a few percent of it): the scale per input between 0.5 and 1.5, the experts' own
    0.5, 1, 1.5 and 2 in every layer. A writer that drops either computes another function, and shows it."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from siliconvert.demo import small_checkpoint

    tokenizer, config = FAMILY_CASES["gemma4_text"]
    if not out_dir.exists():
        shutil.copytree(small_checkpoint(None, "gemma4_text", tokenizer, config=config | GEMMA4_EXPERTS), out_dir)
        tensors = load_file(out_dir / "model.safetensors")
        for name, tensor in tensors.items():
            if name.endswith("router.scale"):
                spread = torch.linspace(0.5, 1.5, tensor.numel())[torch.randperm(tensor.numel(),
                                                                                 generator=torch.Generator().manual_seed(0))]
                tensors[name] = (tensor.float() * spread).to(tensor.dtype)
            elif name.endswith("router.per_expert_scale"):
                tensors[name] = torch.tensor([0.5, 1.0, 1.5, 2.0], dtype=tensor.dtype)
        save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    return out_dir


def gemma3_multimodal(out_dir):
    """A Gemma3ForConditionalGeneration checkpoint around the gemma3_text case's trained language model (random
    vision tower), saved by transformers as the hub's multimodal Gemma 3 checkpoints are."""
    import json

    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    from siliconvert.demo import small_checkpoint

    tokenizer, config = FAMILY_CASES["gemma3_text"]
    text = small_checkpoint(None, "gemma3_text", tokenizer, config=config)
    text_config = json.loads((text / "config.json").read_text())
    vision = {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 64, "patch_size": 16}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Gemma3ForConditionalGeneration(Gemma3Config(text_config=text_config, vision_config=vision,
                                                            mm_tokens_per_image=4,
                                                            tie_word_embeddings=text_config["tie_word_embeddings"]))
    return save_around_language_model(model, text, out_dir)


def qwen3_5_multimodal(out_dir, changes=None):
    """A Qwen3_5ForConditionalGeneration checkpoint around the qwen3_5_text case's trained language model (random
    vision tower, and a multi-token-prediction tensor as the hub's checkpoints carry), saved as the hub's are.
    `changes`: to the case's config (a language model of other shapes)."""
    import json
    import shutil

    import torch
    from safetensors.torch import load_file, save_file
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    from siliconvert.demo import small_checkpoint

    tokenizer, config = FAMILY_CASES["qwen3_5_text"]
    text = small_checkpoint(None, "qwen3_5_text", tokenizer, config=config | (changes or {}))
    text_config = json.loads((text / "config.json").read_text())
    vision = {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "patch_size": 16,
              "out_hidden_size": text_config["hidden_size"], "spatial_merge_size": 2, "num_position_embeddings": 16}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen3_5ForConditionalGeneration(Qwen3_5Config(text_config=text_config, vision_config=vision,
                                                              tie_word_embeddings=text_config["tie_word_embeddings"]))
    weights = load_file(text / "model.safetensors")
    model.model.language_model.load_state_dict(
        {name.removeprefix("model."): value for name, value in weights.items() if name.startswith("model.")})
    model.lm_head.weight.data.copy_(weights["lm_head.weight"])
    model.to(torch.bfloat16).save_pretrained(out_dir)
    saved = load_file(out_dir / "model.safetensors")
    saved["mtp.fc.weight"] = torch.zeros(text_config["hidden_size"], 2 * text_config["hidden_size"],
                                         dtype=torch.bfloat16)
    save_file(saved, out_dir / "model.safetensors", metadata={"format": "pt"})
    for file in text.iterdir():
        if file.name.startswith("tokenizer") or file.name == "special_tokens_map.json":
            shutil.copy(file, out_dir / file.name)
    return out_dir


def mistral3_multimodal(out_dir):
    """A Mistral3ForConditionalGeneration checkpoint around the ministral3 case's trained language model (random
    Pixtral tower and projector), saved by transformers as the hub's Ministral 3 checkpoints are."""
    import json

    import torch
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    from siliconvert.demo import small_checkpoint

    tokenizer, config = FAMILY_CASES["ministral3"]
    text = small_checkpoint(None, "ministral3", tokenizer, config=config)
    text_config = json.loads((text / "config.json").read_text())
    vision = {"model_type": "pixtral", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
              "num_attention_heads": 2, "image_size": 64, "patch_size": 16, "head_dim": 16}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Mistral3ForConditionalGeneration(Mistral3Config(text_config=text_config, vision_config=vision))
    return save_around_language_model(model, text, out_dir)


def gemma4_multimodal(out_dir):
    """A Gemma4ForConditionalGeneration checkpoint around the gemma4_text case's trained language model (random vision
    and audio towers), saved by transformers as the hub's Gemma 4 checkpoints are (E2B and E4B carry both)."""
    import json

    import torch
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration

    from siliconvert.demo import small_checkpoint

    tokenizer, config = FAMILY_CASES["gemma4_text"]
    text = small_checkpoint(None, "gemma4_text", tokenizer, config=config)
    # the multimodal forward writes the pad id over its media tokens, whatever the input holds: it needs one
    text_config = json.loads((text / "config.json").read_text()) | {"pad_token_id": 0}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "num_key_value_heads": 2, "head_dim": 16}
    audio = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "output_proj_dims": 32}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Gemma4ForConditionalGeneration(Gemma4Config(
            text_config=text_config, vision_config=vision, audio_config=audio,
            tie_word_embeddings=text_config["tie_word_embeddings"]))
    return save_around_language_model(model, text, out_dir)


def gpt_oss_mxfp4(out_dir):
    """The gpt_oss case's trained checkpoint with its experts in MXFP4, laid out as the hub's gpt-oss checkpoints are:
    `<stack>_blocks` [experts, rows, columns / 32, 16] (two E2M1 values a byte, the first in the low nibble) and
    `<stack>_scales` [experts, rows, columns / 32] (E8M0) for gate_up_proj and down_proj, rows the outputs (the
    transpose of transformers' parameter), each block's scale 2^(⌊log2 max|w|⌋ − 2) and its values rounded to the
    nearest E2M1; every other tensor bfloat16, and config.json's quantization_config saying mxfp4."""
    import json
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from siliconvert.demo import small_checkpoint

    tokenizer, config = FAMILY_CASES["gpt_oss"]
    source = small_checkpoint(None, "gpt_oss", tokenizer, config=config)
    out_dir.mkdir(parents=True, exist_ok=True)
    magnitudes = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    tensors = {}
    for name, value in load_file(source / "model.safetensors").items():
        if not name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            tensors[name] = value
            continue
        rows = value.float().transpose(1, 2)  # [experts, outputs, inputs]: blocks of 32 inputs
        blocks = rows.reshape(*rows.shape[:-1], -1, 32)
        largest = blocks.abs().amax(dim=-1, keepdim=True)
        exponent = torch.where(largest > 0, torch.floor(torch.log2(largest)) - 2, torch.zeros_like(largest))
        scaled = (blocks / torch.exp2(exponent)).clamp(-6.0, 6.0)
        index = (scaled.abs()[..., None] - magnitudes).abs().argmin(dim=-1)
        codes = (index | (scaled < 0).long() * 8).to(torch.uint8)
        tensors[f"{name}_blocks"] = (codes[..., 0::2] | (codes[..., 1::2] << 4)).contiguous()
        tensors[f"{name}_scales"] = (exponent[..., 0] + 127).to(torch.uint8).contiguous()
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    settings = json.loads((source / "config.json").read_text())
    settings["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (out_dir / "config.json").write_text(json.dumps(settings, indent=2))
    for file in source.iterdir():
        if file.name != "model.safetensors" and file.name != "config.json":
            shutil.copy(file, out_dir / file.name)
    return out_dir


def save_around_language_model(model, text, out_dir):
    """Save the multimodal `model` with the text checkpoint `text`'s trained weights as its language model (and
    head, where untied), in bfloat16 as the hub ships it, beside `text`'s tokenizer files."""
    import shutil

    import torch
    from safetensors.torch import load_file

    weights = load_file(text / "model.safetensors")
    model.model.language_model.load_state_dict(
        {name.removeprefix("model."): value for name, value in weights.items() if name.startswith("model.")})
    if "lm_head.weight" in weights:  # an untied head
        model.lm_head.weight.data.copy_(weights["lm_head.weight"])
    model.to(torch.bfloat16).save_pretrained(out_dir)
    for file in text.iterdir():
        if file.name.startswith("tokenizer") or file.name == "special_tokens_map.json":
            shutil.copy(file, out_dir / file.name)
    return out_dir
