"""Core ML: ML Programs built with coremltools' MIL builder, their weights streamed straight into place.

One layout for every model size, so apps and runners never branch on it:

    <out_dir>/<model_name>-fp16-coreml/
        manifest.json            which package holds which layers; inputs, outputs, states, context length
        chunk_01.mlpackage ...   consecutive layers each (the first also embeds tokens, the last holds the
                                 final norm and the LM head); every package has two functions sharing one
                                 copy of the weights: "decode" (1 token) and "prefill" (a block of tokens)
        tokenizer files          copied from the source, what a Swift app bundles

Every function takes `position` (int32 [1], where its first token goes in the sequence) and carries the KV
cache of its layers in two states, `key_cache` and `value_cache` (fp16 [layers, kv_heads, context,
head_dim]; layers of other sizes in a pair of their own, `key_cache_{kv_heads}x{head_dim}`: Gemma 4's global
layers); the causal mask and the RoPE angles are computed inside from `position`. A package with sparse layers
(a mixture of experts) also outputs `expert_ids` (int32 [1, tokens, its sparse layers, k]): the experts its
routers chose. It evaluates every expert for every token and weights each by the router (exact; E/k times the
chosen experts' compute, which the manifest's and the artifact's `compute` state). Gemma 4's first package
also outputs `per_layer_inputs` (fp16 [1, layers, size, tokens]), an input of every later package.

The same checkpoint gives the same bytes: op names count from zero in every function, the spec is serialized
deterministically, and the package's Manifest.json identifiers derive from the spec (coremltools draws random
UUIDs). Packages are built in hidden work folders, fsynced, and renamed into place by `finish`.

Where things are:
    writer.py    CoreMLWriter: the stream's entry point (tensors in, packages built as chunks complete), the
                 manifest, moving finished folders into place
    chunks.py    which layers each package holds, and the weight ids of the blobs in its weight.bin
    graph.py     the MIL program: how the model description (its traits) becomes ops (embeddings, norms,
                 attention, RoPE, masks, MLP, LM head), and the graph passes run on it
    folds.py     checkpoint tensors → the graph's: fused projections split, norm offset and branch scales folded
    weights.py   where the graph takes its weights from: streamed blobs, a finished package, compressed forms
    plan.py      a package planned per weight (precision: auto): costs measured on the fp16 packages, the plan
    package.py   MIL blob storage, the writer thread, the exporter around streamed blobs, package files
"""

from siliconvert.convert.coreml.writer import CoreMLWriter, calibration_needs

__all__ = ["CoreMLWriter", "calibration_needs"]
