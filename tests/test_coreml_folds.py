"""Checkpoint tensors → the graph's tensors: Qwen3-Next's grouped gated-delta projections permuted into the unfused
rows exactly as transformers orders them, the gated delta rule's own folds, and which linear layers' inputs the folds
scale."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from coreml_programs import spec_of

from siliconvert.architectures.base import GatedDelta
from siliconvert.convert.coreml.folds import graph_tensors, input_scale

DELTA = GatedDelta(key_heads=2, value_heads=6, key_head_dim=4, value_head_dim=3, conv_kernel=4, fused=True)


def test_grouped_qkvz_and_ba_become_the_unfused_rows_transformers_computes():
    """x through in_proj_qkvz / in_proj_ba then transformers' fix_query_key_value_ordering gives q, k, v, z, b, a;
    x through the folded delta_qkv, delta_gate, ssm_beta, ssm_alpha rows gives the same numbers."""
    from transformers import Qwen3NextConfig
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextGatedDeltaNet

    spec = dataclasses.replace(spec_of(), gated_delta=DELTA)
    config = Qwen3NextConfig(hidden_size=spec.hidden_size, linear_num_key_heads=2, linear_num_value_heads=6,
                             linear_key_head_dim=4, linear_value_head_dim=3, linear_conv_kernel_dim=4)
    module = Qwen3NextGatedDeltaNet(config, 0)
    x = torch.randn(1, 5, spec.hidden_size)
    with torch.no_grad():
        q, k, v, z, b, a = module.fix_query_key_value_ordering(module.in_proj_qkvz(x), module.in_proj_ba(x))
    folded = {}
    for role, weight in (("delta_qkvz", module.in_proj_qkvz.weight), ("ssm_ba", module.in_proj_ba.weight)):
        for (part, layer, kind), array in graph_tensors(spec, (role, 0, "weight"), weight.detach().numpy(), 1.0):
            assert (layer, kind) == (0, "weight")
            folded[part] = x[0].numpy() @ array.T
    expected_qkv = torch.cat([q.flatten(2), k.flatten(2), v.flatten(2)], -1)[0].numpy()
    np.testing.assert_allclose(folded["delta_qkv"], expected_qkv, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(folded["delta_gate"], z.flatten(2)[0].numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(folded["ssm_beta"], b[0].numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(folded["ssm_alpha"], a[0].numpy(), rtol=1e-5, atol=1e-6)


def test_the_decay_rate_the_conv_state_scale_and_the_gated_norm_without_offset():
    """A_log → −exp(A_log); the conv state's scale into in_proj_qkv and out of the kernel; ssm_norm keeps its weight
    where the model's other norms take 1 + w."""
    spec = dataclasses.replace(spec_of(), gated_delta=dataclasses.replace(DELTA, fused=False), norm_offset=1.0)
    a_log = np.array([0.0, np.log(2.0)], np.float32)
    ((_, rate),) = graph_tensors(spec, ("ssm_a", 0, "weight"), a_log, 1.0)
    np.testing.assert_allclose(rate, [-1.0, -2.0])
    ((_, qkv),) = graph_tensors(spec, ("delta_qkv", 0, "weight"), np.ones((2, 2), np.float16), 1.0, 0.25)
    ((_, kernel),) = graph_tensors(spec, ("ssm_conv1d", 0, "weight"), np.ones((2, 1, 4), np.float16), 1.0, 0.25)
    assert qkv.max() == 0.25 and kernel.max() == 4.0
    ((_, norm),) = graph_tensors(spec, ("ssm_norm", 0, "weight"), np.full(3, 0.5, np.float32), 1.0)
    ((_, attn_norm),) = graph_tensors(spec, ("attn_norm", 0, "weight"), np.full(3, 0.5, np.float32), 1.0)
    assert norm.tolist() == [0.5] * 3 and attn_norm.tolist() == [1.5] * 3


def test_the_inputs_a_fold_scales():
    """A W8A8 scale is made for the input the graph holds: Gemma 4's per-layer layers read the scaled stream, a short
    convolution's out_proj its output at the state scale; a norm's output (q, gate, the head) is as the source's."""
    assert input_scale("per_layer_inp_gate", 2.0**-4, 0.5) == input_scale("per_layer_proj", 2.0**-4, 0.5) == 2.0**-4
    assert input_scale("per_layer_model_proj", 2.0**-4, 1.0) == 2.0**-4
    assert input_scale("shortconv.out_proj", 2.0**-4, 0.5) == 0.5
    assert all(input_scale(role, 2.0**-4, 0.5) == 1.0 for role in ("attn_q", "attn_output", "ffn_down", "output"))
