"""The catalogue test_hostile.py runs: each case breaks one thing in a copy of a tiny checkpoint (or in its
recipe) and says which file the one error line must name and what it must say.

A damage function gets the checkpoint copy and the recipe (a dict it may change) and returns raw recipe bytes
to write instead of the dict, or None. The recipe file is `recipe.yaml` beside the checkpoint folder.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Damage = Callable[[Path, dict], bytes | None]
SHARD = "model.safetensors"
INDEX = "model.safetensors.index.json"
NORM_A, NORM_B = "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight"
GATE = "model.layers.0.mlp.gate_proj.weight"


@dataclass(frozen=True)
class Case:
    id: str
    kind: str
    damage: Damage
    where: str  # a part of the file name the error line must start with
    message: str
    sharded: bool = False
    flags: tuple[str, ...] = ()


# ---- how to break things ---------------------------------------------------------------------------------

def _split(file: Path) -> tuple[dict, bytes]:
    raw = file.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + length]), raw[8 + length:]


def _join(file: Path, header: dict | bytes, data: bytes) -> None:
    encoded = header if isinstance(header, bytes) else json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)


def header(change: Callable[[dict], Any]) -> Damage:
    """Change the header's JSON; the data section stays (offsets are relative to it)."""
    def damage(folder: Path, _recipe: dict) -> None:
        parsed, data = _split(folder / SHARD)
        change(parsed)
        _join(folder / SHARD, parsed, data)
    return damage


def header_and_data(change: Callable[[dict, bytes], bytes]) -> Damage:
    def damage(folder: Path, _recipe: dict) -> None:
        parsed, data = _split(folder / SHARD)
        data = change(parsed, data)
        _join(folder / SHARD, parsed, data)
    return damage


def header_bytes(raw: bytes) -> Damage:
    def damage(folder: Path, _recipe: dict) -> None:
        _join(folder / SHARD, raw, _split(folder / SHARD)[1])
    return damage


def file_bytes(name: str, change: Callable[[bytes], bytes]) -> Damage:
    def damage(folder: Path, _recipe: dict) -> None:
        (folder / name).write_bytes(change((folder / name).read_bytes()))
    return damage


def entry(name: str, **fields: Any) -> Damage:
    return header(lambda h: h[name].update(fields))


def drop_field(name: str, field: str) -> Damage:
    return header(lambda h: h[name].pop(field))


def offsets(h: dict) -> list[str]:
    """Tensor names in data order."""
    return sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"])


def shift(names: Callable[[dict], list[str]], by: int) -> Callable[[dict], None]:
    def change(h: dict) -> None:
        for name in names(h):
            h[name]["data_offsets"] = [o + by for o in h[name]["data_offsets"]]
    return change


def hole_at_start(h: dict, data: bytes) -> bytes:
    shift(offsets, 64)(h)
    return bytes(64) + data


def hole_before_last(h: dict, data: bytes) -> bytes:
    last = offsets(h)[-1]
    begin = h[last]["data_offsets"][0]
    shift(lambda _: [last], 64)(h)
    return data[:begin] + bytes(64) + data[begin:]


def tensors(change: Callable[[dict], Any]) -> Damage:
    def damage(folder: Path, _recipe: dict) -> None:
        from safetensors.torch import load_file, save_file

        loaded = load_file(folder / SHARD)
        change(loaded)
        save_file(loaded, folder / SHARD, metadata={"format": "pt"})
    return damage


def config(**changes: Any) -> Damage:
    def damage(folder: Path, _recipe: dict) -> None:
        parsed = json.loads((folder / "config.json").read_text())
        for key, value in changes.items():
            if value is None:
                parsed.pop(key, None)
            else:
                parsed[key] = value
        (folder / "config.json").write_text(json.dumps(parsed))
    return damage


def fp8(name: str) -> Damage:
    """`name` stored as FP8 with its block scale beside it, as DeepSeek's and Qwen3's FP8 releases store weights."""
    def change(t: dict) -> None:
        import torch

        t[name] = t[name].float().to(torch.float8_e4m3fn)
        t[name + "_scale_inv"] = torch.ones(1, 1)
    return tensors(change)


def config_text(replace: str, by: str) -> Damage:
    """Edit config.json's text: for what json.dumps would not write (a key twice)."""
    return file_bytes("config.json", lambda raw: raw.replace(replace.encode(), by.encode(), 1))


def tokenizer_vocab(**ids: int) -> Damage:
    """Give tokenizer.json's vocabulary strings other ids."""
    def damage(folder: Path, _recipe: dict) -> None:
        parsed = json.loads((folder / "tokenizer.json").read_text())
        parsed["model"]["vocab"].update(ids)
        (folder / "tokenizer.json").write_text(json.dumps(parsed))
    return damage


def tokenizer_config(**fields: Any) -> Damage:
    def damage(folder: Path, _recipe: dict) -> None:
        (folder / "tokenizer_config.json").write_text(json.dumps(fields))
    return damage


def added_token(token: dict) -> Damage:
    """Add one entry to tokenizer.json's added_tokens."""
    def damage(folder: Path, _recipe: dict) -> None:
        parsed = json.loads((folder / "tokenizer.json").read_text())
        parsed["added_tokens"] = [*parsed.get("added_tokens", []), token]
        (folder / "tokenizer.json").write_text(json.dumps(parsed))
    return damage


def write(name: str, content: bytes) -> Damage:
    def damage(folder: Path, _recipe: dict) -> None:
        (folder / name).write_bytes(content)
    return damage


def copy(name: str, to: str) -> Damage:
    def damage(folder: Path, _recipe: dict) -> None:
        (folder / to).write_bytes((folder / name).read_bytes())
    return damage


class RunsCode:
    def __reduce__(self):
        return (print, ("this must never run",))


def pickle(content: Any) -> Damage:
    def damage(folder: Path, _recipe: dict) -> None:
        import torch

        torch.save(content, folder / "pytorch_model.bin")
    return damage


def remove(*names: str) -> Damage:
    def damage(folder: Path, _recipe: dict) -> None:
        for name in names:
            (folder / name).unlink()
    return damage


def replace(name: str | Callable[[Path], str], by: str) -> Damage:
    """Put a folder ("dir"), a FIFO ("fifo") or a symlink to `by` where a file was (or beside the recipe)."""
    def damage(folder: Path, _recipe: dict) -> None:
        target = folder / (name(folder) if callable(name) else name)
        target.unlink(missing_ok=True)
        if by == "dir":
            target.mkdir()
        elif by == "fifo":
            os.mkfifo(target)
        else:
            target.symlink_to(by)
    return damage


def first_shard(folder: Path) -> str:
    return sorted(p.name for p in folder.glob("model-*.safetensors"))[0]


def index(change: Callable[[dict, Path], Any]) -> Damage:
    def damage(folder: Path, _recipe: dict) -> None:
        parsed = json.loads((folder / INDEX).read_text())
        change(parsed, folder)
        (folder / INDEX).write_text(json.dumps(parsed))
    return damage


def put(tensor: str, shard: Any) -> Damage:
    return index(lambda i, _folder: i["weight_map"].update({tensor: shard}))


def move_norm(i: dict, folder: Path) -> None:
    here = i["weight_map"]["model.norm.weight"]
    i["weight_map"]["model.norm.weight"] = next(p.name for p in folder.glob("model-*.safetensors") if p.name != here)


def recipe(**changes: Any) -> Damage:
    def damage(_folder: Path, parsed: dict) -> None:
        parsed.update(changes)
    return damage


def recipe_text(text: str | bytes | Callable[[Path], str]) -> Damage:
    def damage(folder: Path, _recipe: dict) -> bytes:
        body = text(folder) if callable(text) else text
        return body if isinstance(body, bytes) else body.encode()
    return damage


def beside(name: str, by: str) -> Damage:
    """Put a folder, FIFO or dangling symlink beside the checkpoint (as the recipe or the corpus)."""
    return lambda folder, parsed: replace(name, by)(folder.parent, parsed)


def corpus(content: bytes | None, **settings: Any) -> Damage:
    """Validation on, with corpus.txt beside the checkpoint holding `content` (None: left as the test made it)."""
    def damage(folder: Path, parsed: dict) -> None:
        file = folder.parent / "corpus.txt"
        if content is not None:
            file.write_bytes(content)
        parsed["validate"] = {"corpus": str(file), "tokens": 32, "context": 16, "latency": False} | settings
    return damage


def both(*damages: Damage) -> Damage:
    def damage(folder: Path, parsed: dict) -> bytes | None:
        results = [d(folder, parsed) for d in damages]
        return next((r for r in results if r is not None), None)
    return damage


def output_under_file(folder: Path, parsed: dict) -> None:
    (folder.parent / "a-file").write_text("not a folder")
    parsed["output"] = str(folder.parent / "a-file" / "out")


def output_is_file(folder: Path, parsed: dict) -> None:
    (folder.parent / "a-file").write_text("not a folder")
    parsed["output"] = str(folder.parent / "a-file")


def laughs(folder: Path) -> str:
    """YAML aliases nine deep: a billion items if expanded (a message must not print them)."""
    levels = ["&a [" + ", ".join(["lol"] * 9) + "]"]
    levels += [f"&{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 9) + "]" for i in range(8)]
    return f"source: {folder}\ntargets: [{{format: mlx}}]\nname: [{', '.join(levels)}]\n"


def recipe_with(folder: Path, extra: str) -> str:
    return f"source: {folder}\noutput: {folder.parent / 'out'}\ntargets: [{{format: mlx}}]\n{extra}"


def nested(depth: int) -> Callable[[Path], str]:
    return lambda folder: recipe_with(folder, "name: " + "[" * depth + "]" * depth + "\n")


def _big_shape(h: dict) -> None:
    h[NORM_A]["shape"] = [1 << 62, 1 << 62]


def _metadata(value: Any) -> Damage:
    return header(lambda h: h.__setitem__("__metadata__", value))


S, X, C, T, W, R, V, OUT = ("safetensors header", "shard index", "config.json", "tokenizer", "weights", "recipe",
                            "validation corpus and context", "output")
HEADER = [
    Case("empty-file", S, write(SHARD, b""), SHARD, "no header"),
    Case("seven-bytes", S, write(SHARD, b"\x10\0\0\0\0\0\0"), SHARD, "no header"),
    Case("header-longer-than-file", S, file_bytes(SHARD, lambda r: struct.pack("<Q", len(r)) + r[8:]),
         SHARD, "header length"),
    Case("header-length-2^64", S, file_bytes(SHARD, lambda r: b"\xff" * 8 + r[8:]), SHARD, "header length"),
    Case("header-length-zero", S, header_bytes(b""), SHARD, "must start with '{'"),
    Case("file-of-zeros", S, write(SHARD, bytes(4096)), SHARD, "must start with '{'"),
    Case("header-leading-space", S, header_bytes(b' {"__metadata__": {}}'), SHARD, "must start with '{'"),
    Case("header-array", S, header_bytes(b"[1, 2]"), SHARD, "must start with '{'"),
    Case("header-not-utf8", S, header_bytes(b'{"\xff\xfe": 1}'), SHARD, "not UTF-8"),
    Case("header-not-json", S, header_bytes(b"{oops"), SHARD, "header is not valid JSON"),
    Case("header-nested-deep", S, header_bytes(b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"), SHARD,
         "nested too deeply"),
    Case("header-key-twice", S, header_bytes(b'{"w": {}, "w": {}}'), SHARD,
         "key 'w' appears twice in the safetensors header"),
    Case("entry-not-object", S, header(lambda h: h.__setitem__(NORM_A, 5)), SHARD, "is malformed"),
    Case("entry-no-dtype", S, drop_field(NORM_A, "dtype"), SHARD, "is malformed"),
    Case("entry-no-shape", S, drop_field(NORM_A, "shape"), SHARD, "is malformed"),
    Case("entry-no-offsets", S, drop_field(NORM_A, "data_offsets"), SHARD, "is malformed"),
    Case("dtype-unknown", S, entry(NORM_A, dtype="F8"), SHARD, "unknown dtype 'F8'"),
    Case("dtype-lowercase", S, entry(NORM_A, dtype="bf16"), SHARD, "unknown dtype 'bf16'"),
    Case("dtype-number", S, entry(NORM_A, dtype=16), SHARD, "unknown dtype 16"),
    Case("shape-string", S, entry(NORM_A, shape="32"), SHARD, "invalid shape '32'"),
    Case("shape-negative", S, entry(NORM_A, shape=[-32]), SHARD, "invalid shape [-32]"),
    Case("shape-float", S, entry(NORM_A, shape=[32.0]), SHARD, "invalid shape [32.0]"),
    Case("shape-bool", S, entry(NORM_A, shape=[True]), SHARD, "invalid shape [True]"),
    Case("shape-null", S, entry(NORM_A, shape=None), SHARD, "invalid shape None"),
    Case("shape-too-big", S, header(_big_shape), SHARD, "do not match its shape"),
    Case("offsets-three", S, entry(NORM_A, data_offsets=[0, 32, 64]), SHARD, "invalid data_offsets"),
    Case("offsets-strings", S, entry(NORM_A, data_offsets=["0", "64"]), SHARD, "invalid data_offsets"),
    Case("offsets-negative", S, entry(NORM_A, data_offsets=[-64, 0]), SHARD, "invalid data_offsets"),
    Case("offsets-reversed", S, header(lambda h: h[NORM_A]["data_offsets"].reverse()), SHARD,
         "do not match its shape"),
    Case("offsets-span-too-long", S, header(lambda h: h[offsets(h)[0]]["data_offsets"].__setitem__(1, 1 + h[
        offsets(h)[0]]["data_offsets"][1])), SHARD, "do not match its shape"),
    Case("shape-doubled", S, entry(NORM_A, shape=[64]), SHARD, "do not match its shape"),
    Case("offsets-past-the-end", S, header(shift(lambda h: [offsets(h)[-1]], 1 << 20)), SHARD, "truncated"),
    Case("overlap-same-bytes", S, header(lambda h: h[NORM_B].update(data_offsets=h[NORM_A]["data_offsets"])),
         SHARD, "overlaps tensor"),
    Case("overlap-partial", S, header(shift(lambda h: [offsets(h)[1]], -2)), SHARD, "overlaps tensor"),
    Case("hole-at-start", S, header_and_data(hole_at_start), SHARD, "bytes 0-64 of the data belong to no tensor"),
    Case("hole-before-last", S, header_and_data(hole_before_last), SHARD, "belong to no tensor (a hole"),
    Case("bytes-after-last", S, file_bytes(SHARD, lambda r: r + bytes(16)), SHARD, "16 bytes after the last tensor"),
    Case("truncated-data", S, file_bytes(SHARD, lambda r: r[:-64]), SHARD, "truncated"),
    Case("truncated-to-header", S, header_and_data(lambda _h, _d: b""), SHARD, "truncated"),
    Case("metadata-int-value", S, _metadata({"format": 1}), SHARD, "must map strings to strings; 'format' holds 1"),
    Case("metadata-nested", S, _metadata({"format": {"pt": "yes"}}), SHARD, "must map strings to strings"),
    Case("metadata-null-value", S, _metadata({"format": None}), SHARD, "must map strings to strings"),
    Case("metadata-list", S, _metadata(["pt"]), SHARD, "__metadata__ is not a JSON object"),
    Case("shard-is-a-folder", S, replace(SHARD, "dir"), SHARD, "not a regular file"),
    Case("shard-is-a-fifo", S, replace(SHARD, "fifo"), SHARD, "not a regular file"),
    Case("shard-links-to-a-device", S, replace(SHARD, "/dev/zero"), SHARD, "not a regular file"),
    Case("tensor-name-10k", S, tensors(lambda t: t.update({"x" * 10_000: t[NORM_A].clone()})), "ckpt",
         "unexpected tensor 'xxxxxxx"),
]

SHARDED = [
    Case("index-not-json", X, write(INDEX, b"{oops"), INDEX, "the file is not valid JSON"),
    Case("index-not-utf8", X, write(INDEX, b'{"weight_map": {"\xff": 1}}'), INDEX, "not UTF-8"),
    Case("index-array", X, write(INDEX, b"[]"), INDEX, "not a valid safetensors index"),
    Case("index-no-weight-map", X, index(lambda i, _f: i.pop("weight_map")), INDEX, "not a valid safetensors index"),
    Case("index-weight-map-list", X, index(lambda i, _f: i.update(weight_map=[])), INDEX, "not a valid"),
    Case("index-weight-map-empty", X, index(lambda i, _f: i.update(weight_map={})), INDEX, "not a valid"),
    Case("index-key-twice", X, write(INDEX, b'{"weight_map": {"a": "x", "a": "y"}}'), INDEX,
         "key 'a' appears twice in the file"),
    Case("index-is-a-folder", X, replace(INDEX, "dir"), INDEX, "not a regular file"),
    Case("index-is-a-fifo", X, replace(INDEX, "fifo"), INDEX, "not a regular file"),
    Case("shard-path-traversal", X, put("model.norm.weight", "../../../../etc/hostname"), INDEX,
         "shards must be plain file names"),
    Case("shard-absolute-path", X, put("model.norm.weight", "/etc/hostname"), INDEX, "plain file names"),
    Case("shard-in-subfolder", X, put("model.norm.weight", "sub/model.safetensors"), INDEX, "plain file names"),
    Case("shard-dot-dot", X, put("model.norm.weight", ".."), INDEX, "plain file names"),
    Case("shard-empty-name", X, put("model.norm.weight", ""), INDEX, "plain file names"),
    Case("shard-backslash", X, put("model.norm.weight", "..\\x.safetensors"), INDEX, "plain file names"),
    Case("shard-not-a-string", X, put("model.norm.weight", 7), INDEX, "plain file names"),
    Case("shard-missing", X, lambda f, r: remove(first_shard(f))(f, r), INDEX, "named in the index is missing"),
    Case("shard-a-folder", X, replace(first_shard, "dir"), INDEX, "is not a regular file"),
    Case("shard-a-fifo", X, replace(first_shard, "fifo"), INDEX, "is not a regular file"),
    Case("shard-links-to-dev-null", X, replace(first_shard, "/dev/null"), INDEX, "is not a regular file"),
    Case("index-lists-absent-tensor", X, index(lambda i, f: i["weight_map"].update(
        {"extra.weight": first_shard(f)})), INDEX, "the index puts tensor 'extra.weight' in"),
    Case("index-moves-a-tensor", X, index(move_norm), INDEX, "'model.norm.weight'"),
    Case("index-omits-a-tensor", X, index(lambda i, _f: i["weight_map"].pop("model.norm.weight")), INDEX,
         "which the index does not place there"),
    Case("shard-truncated", X, lambda f, r: file_bytes(first_shard(f), lambda b: b[:-10])(f, r), "model-0000",
         "truncated"),
]
SHARDED = [Case(c.id, c.kind, c.damage, c.where, c.message, sharded=True) for c in SHARDED]

CONFIG = [
    Case("config-missing", C, remove("config.json"), "ckpt", "config.json is missing"),
    Case("config-not-json", C, write("config.json", b"{oops"), C, "the file is not valid JSON"),
    Case("config-not-utf8", C, write("config.json", b'{"hidden_size": "\xff"}'), C, "not UTF-8"),
    Case("config-array", C, write("config.json", b"[]"), C, "not a JSON object"),
    Case("config-a-folder", C, replace("config.json", "dir"), C, "not a regular file"),
    Case("config-a-fifo", C, replace("config.json", "fifo"), C, "not a regular file"),
    Case("config-nested-deep", C, write("config.json", b'{"a": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"), C,
         "nested too deeply"),
    Case("config-key-twice", C, config_text("{", '{"hidden_size": 32, '), C,
         "key 'hidden_size' appears twice in the file"),
    Case("hidden-size-string", C, config(hidden_size="32"), C, "hidden_size must be an integer (got '32')"),
    Case("hidden-size-float", C, config(hidden_size=32.0), C, "hidden_size must be an integer (got 32.0)"),
    Case("hidden-size-bool", C, config(hidden_size=True), C, "hidden_size must be an integer (got True)"),
    Case("hidden-size-negative", C, config(hidden_size=-32), C, "hidden_size must be at least 1 (got -32)"),
    Case("hidden-size-zero", C, config(hidden_size=0), C, "hidden_size must be at least 1"),
    Case("hidden-size-huge", C, config(hidden_size=10**12), C, "larger than any tensor dimension"),
    Case("hidden-size-10^400", C, config(hidden_size=10**400), C, "larger than any tensor dimension"),
    Case("hidden-size-missing", C, config(hidden_size=None), C, "missing required field 'hidden_size'"),
    Case("layers-a-billion", C, config(num_hidden_layers=10**9), C, "num_hidden_layers is 1000000000, but the "
         "weights hold 2 layers"),
    Case("layers-one-too-many", C, config(num_hidden_layers=3), C, "the weights hold 2 layers"),
    Case("layers-one-too-few", C, config(num_hidden_layers=1), "ckpt", "unexpected tensor 'model.layers.1."),
    Case("layers-string", C, config(num_hidden_layers="2"), C, "num_hidden_layers must be an integer"),
    Case("layers-negative", C, config(num_hidden_layers=-1), C, "num_hidden_layers must be at least 1"),
    Case("layers-1e30", C, config(num_hidden_layers=1e30), C, "num_hidden_layers must be an integer"),
    Case("vocab-a-billion", C, config(vocab_size=10**9), C, "vocab_size is 1000000000, larger than any tensor"),
    Case("vocab-zero", C, config(vocab_size=0), C, "vocab_size must be at least 1"),
    Case("vocab-smaller", C, config(vocab_size=95), "model.safetensors", "config.json implies [95, 32]"),
    Case("intermediate-string", C, config(intermediate_size="64"), C, "intermediate_size must be an integer"),
    Case("intermediate-wrong", C, config(intermediate_size=48), "model.safetensors", "config.json implies"),
    Case("heads-zero", C, config(num_attention_heads=0), C, "num_attention_heads must be at least 1"),
    Case("heads-string", C, config(num_attention_heads="4"), C, "num_attention_heads must be an integer"),
    Case("heads-wrong", C, config(num_attention_heads=2), "model.safetensors", "config.json implies"),
    Case("kv-heads-not-divisor", C, config(num_key_value_heads=3), C, "not a multiple of num_key_value_heads"),
    Case("kv-heads-huge", C, config(num_key_value_heads=10**6), C, "larger than any tensor dimension"),
    Case("head-dim-zero", C, config(head_dim=0), C, "head_dim must be at least 1"),
    Case("head-dim-huge", C, config(head_dim=10**6), C, "head_dim is 1000000, larger than any tensor"),
    Case("heads-times-head-dim", C, config(head_dim=64), C, "num_attention_heads × head_dim is 256"),
    Case("positions-zero", C, config(max_position_embeddings=0), C, "max_position_embeddings must be between 1"),
    Case("positions-10^30", C, config(max_position_embeddings=10**30), C, "must be between 1 and 268435456"),
    Case("positions-string", C, config(max_position_embeddings="128"), C, "max_position_embeddings must be an int"),
    Case("sliding-window-negative", C, config(sliding_window=-5), C, "sliding_window must be between 0"),
    Case("sliding-window-float", C, config(sliding_window=1.5), C, "sliding_window must be an integer"),
    Case("eps-string", C, config(rms_norm_eps="1e-6"), C, "rms_norm_eps must be a positive finite number"),
    Case("eps-negative", C, config(rms_norm_eps=-1e-6), C, "rms_norm_eps must be a positive finite number"),
    Case("eps-nan", C, config(rms_norm_eps=float("nan")), C, "rms_norm_eps must be a positive finite number"),
    Case("rope-theta-infinite", C, config(rope_theta=None, rope_parameters={"rope_theta": float("inf"),
                                                                            "rope_type": "default"}), C,
         "rope_parameters.rope_theta must be a positive finite number (got inf)"),
    Case("rope-theta-zero", C, config(rope_theta=0), C, "rope_theta must be a positive finite number"),
    Case("rope-parameters-string", C, config(rope_parameters="big"), C, "rope_parameters must be a JSON object"),
    Case("rope-factor-string", C, config(rope_parameters={"rope_type": "linear", "factor": "2"}), C,
         "rope_parameters.factor must be a positive finite number"),
    Case("rope-type-unknown", C, config(rope_parameters={"rope_type": "fancy", "factor": 2.0}), C,
         "rope scaling type 'fancy' is not supported"),
    Case("rope-scaling-type-number", C, config(rope_scaling={"type": 5}), C, "rope_scaling.type must be a string"),
    Case("rope-original-positions", C, config(rope_parameters={"rope_type": "yarn", "factor": 2.0,
                                                               "original_max_position_embeddings": -1}), C,
         "rope_parameters.original_max_position_embeddings must be between 1"),
    Case("rope-linear-without-factor", C, config(rope_parameters={"rope_type": "linear", "rope_theta": 1e4}), C,
         "rope_parameters.factor is required for rope_type 'linear'"),
    Case("rope-llama3-without-low-freq", C, config(rope_scaling={"rope_type": "llama3", "factor": 8.0}), C,
         "rope_scaling.low_freq_factor is required for rope_type 'llama3'"),
    Case("rope-beta-string", C, config(rope_parameters={"rope_type": "yarn", "factor": 2.0, "beta_fast": "32"}), C,
         "rope_parameters.beta_fast must be a finite number"),
    Case("config-dtype-unknown", C, config(dtype="float8_e4m3"), C, "dtype 'float8_e4m3' names no torch dtype"),
    Case("torch-dtype-number", C, config(torch_dtype=16), C, "torch_dtype 16 names no torch dtype"),
    Case("layer-types-number", C, config(layer_types=5), C, "layer_types must be a list of strings"),
    Case("layer-types-too-few", C, config(layer_types=["full_attention"]), C,
         "layer_types lists 1 layers, num_hidden_layers is 2"),
    Case("hidden-act-gelu", C, config(hidden_act="gelu"), C, "hidden_act 'gelu' is not supported"),
    Case("hidden-act-number", C, config(hidden_act=5), C, "hidden_act must be a string"),
    Case("architectures-string", C, config(architectures="LlamaForCausalLM"), C, "architectures must be a list"),
    Case("architectures-unknown", C, config(architectures=["MambaForCausalLM"]), C,
         "unsupported architecture (MambaForCausalLM)"),
    Case("architectures-empty-model-type-unknown", C, config(architectures=[], model_type="mamba"), C,
         "no 'architectures' field, model_type 'mamba'"),
    Case("architectures-and-model-type-missing", C, config(architectures=None, model_type=None), C,
         "no 'architectures' field, model_type None"),
    Case("model-type-list", C, config(architectures=None, model_type=["llama"]), C, "model_type must be a string"),
    Case("tie-embeddings-string", C, config(tie_word_embeddings="yes"), C, "tie_word_embeddings must be true or"),
    Case("attention-bias-string", C, config(attention_bias="false"), C, "attention_bias must be true or false"),
    Case("bos-token-string", C, config(bos_token_id="1"), C, "bos_token_id must be a token id"),
    Case("eos-token-list-of-strings", C, config(eos_token_id=["2"]), C, "eos_token_id must be a token id"),
    *(Case(f"quantized-{method}", C, config(quantization_config={"quant_method": method, "bits": 4}), C,
           f"quantization_config.quant_method is '{method}': the weights are quantized, and siliconvert reads float")
      for method in ("gptq", "awq", "compressed-tensors", "bitsandbytes", "hqq")),
    Case("quantized-fp8-but-float", C, config(quantization_config={"quant_method": "fp8",
                                                                  "weight_block_size": [128, 128]}),
         C, "quantization_config says the weights are FP8, but no tensor is"),
    Case("quantized-fp8-static", C, config(quantization_config={"quant_method": "fp8", "activation_scheme": "static"}),
         C, "FP8 with static activation scales is not supported"),
    Case("quantized-mxfp4-but-float", C, config(quantization_config={"quant_method": "mxfp4"}), C,
         "quantization_config says the weights are MXFP4, but no tensor has _blocks and _scales"),
    Case("quantized-mlx", C, config(quantization={"group_size": 64, "bits": 4}), C,
         "quantization.quant_method is 'mlx'"),
    Case("quantized-language-model", C, config(text_config={"quantization_config": {"quant_method": "awq"}}), C,
         "text_config.quantization_config.quant_method is 'awq'"),
    Case("quantized-without-method", C, config(quantization_config={"bits": 4}), C, "without a quant_method"),
]

TOKENIZER = [
    Case("no-tokenizer", T, remove("tokenizer.json"), "ckpt", "no tokenizer"),
    Case("tokenizer-not-json", T, write("tokenizer.json", b"{oops"), "tokenizer.json", "not valid JSON"),
    Case("tokenizer-empty", T, write("tokenizer.json", b""), "tokenizer.json", "not valid JSON"),
    Case("tokenizer-not-utf8", T, write("tokenizer.json", b'{"\xff": 1}'), "tokenizer.json", "not UTF-8"),
    Case("tokenizer-array", T, write("tokenizer.json", b"[]"), "tokenizer.json", "not a JSON object"),
    Case("tokenizer-truncated", T, file_bytes("tokenizer.json", lambda r: r[: len(r) // 2]), "tokenizer.json",
         "not valid JSON"),
    Case("tokenizer-wrong-structure", T, write("tokenizer.json", b'{"model": 5}'), "ckpt",
         "the tokenizer files cannot be loaded"),
    Case("tokenizer-a-folder", T, replace("tokenizer.json", "dir"), "tokenizer.json", "not a regular file"),
    Case("tokenizer-a-fifo", T, replace("tokenizer.json", "fifo"), "tokenizer.json", "not a regular file"),
    Case("tokenizer-config-not-json", T, write("tokenizer_config.json", b"{oops"), "tokenizer_config.json",
         "not valid JSON"),
    Case("tokenizer-model-garbage", T, both(remove("tokenizer.json"), write("tokenizer.model", b"garbage")), "ckpt",
         "the tokenizer files cannot be loaded"),
    Case("tokenizer-two-strings-one-id", T, tokenizer_vocab(w1=2), "tokenizer.json",
         "id 2 is given to two strings, 'w1' and 'w2'"),
    Case("tokenizer-id-past-vocab", T, tokenizer_vocab(w95=500), "tokenizer.json",
         "token 'w95' has id 500, outside the model's vocabulary of 96"),
    Case("tokenizer-added-token-past-vocab", T, tokenizer_config(added_tokens_decoder={
        "200": {"content": "<extra>", "special": True}}), "tokenizer_config.json", "token '<extra>' has id 200"),
    Case("tokenizer-added-token-on-another-id", T, tokenizer_config(added_tokens_decoder={
        "5": {"content": "<extra>", "special": True}}), "tokenizer_config.json",
         "id 5 is given to two strings, 'w5' and '<extra>'"),
    Case("chat-template-syntax", T, tokenizer_config(chat_template="{% for m in messages %}{{ m.content }"),
         "tokenizer_config.json", "the chat template is not valid Jinja (line 1"),
    Case("chat-template-jinja-file-syntax", T, write("chat_template.jinja", b"{% if messages %}\nhello\n"),
         "chat_template.jinja", "the chat template is not valid Jinja"),
    Case("chat-template-not-a-string", T, tokenizer_config(chat_template=5), "tokenizer_config.json",
         "the chat template is not a string (int)"),
    Case("chat-template-named-syntax", T, tokenizer_config(chat_template=[{"name": "default", "template": "{{"}]),
         "tokenizer_config.json", "not valid Jinja"),
    # a template that parses but cannot render one user message is refused: every format ships it as it is
    Case("chat-template-raises", T, tokenizer_config(chat_template="{{ raise_exception('a system turn first') }}"),
         "tokenizer_config.json", "cannot render one user message (TemplateError: 'a system turn first')"),
    Case("chat-template-calls-undefined", T, tokenizer_config(chat_template="{{ format_messages(messages) }}"),
         "tokenizer_config.json", "cannot render one user message (UndefinedError"),
    Case("chat-template-indexes-a-string", T, tokenizer_config(chat_template="{{ messages[0].content.x.y }}"),
         "tokenizer_config.json", "cannot render one user message (UndefinedError"),
    Case("chat-template-sandbox-escape", T, tokenizer_config(
        chat_template="{{ messages.__class__.__mro__[1].__subclasses__() }}"), "tokenizer_config.json",
         "cannot render one user message"),
    Case("chat-template-jinja-file-raises", T, write("chat_template.jinja", b"{{ raise_exception('no') }}"),
         "chat_template.jinja", "cannot render one user message (TemplateError: 'no')"),
    Case("chat-template-json-syntax", T, write("chat_template.json", b'{"chat_template": "{% if %}"}'),
         "chat_template.json", "the chat template is not valid Jinja"),
    Case("chat-template-json-not-json", T, write("chat_template.json", b"{oops"), "chat_template.json",
         "not valid JSON"),
    Case("chat-template-json-a-list", T, write("chat_template.json", b'["{{ messages }}"]'), "chat_template.json",
         "not a JSON object"),
    Case("chat-template-json-number", T, write("chat_template.json", b'{"chat_template": 3.5}'),
         "chat_template.json", "the chat template is not a string (float)"),
    # special tokens the formats need
    Case("eos-token-not-in-vocab", T, tokenizer_config(eos_token="</s>"), "tokenizer_config.json",
         "eos_token '</s>' is not in the vocabulary (tokenizer.json)"),
    Case("bos-token-dict-not-in-vocab", T, tokenizer_config(bos_token={"content": "<s>", "special": True}),
         "tokenizer_config.json", "bos_token '<s>' is not in the vocabulary"),
    Case("eos-token-a-number", T, tokenizer_config(eos_token=2), "tokenizer_config.json",
         "eos_token 2 is not a token string"),
    Case("pad-token-a-list", T, tokenizer_config(pad_token=["w1"]), "tokenizer_config.json",
         "pad_token ['w1'] is not a token string"),
    Case("add-bos-token-a-string", T, tokenizer_config(add_bos_token="true"), "tokenizer_config.json",
         "add_bos_token must be true or false, not 'true'"),
    Case("add-eos-token-a-number", T, tokenizer_config(add_eos_token=1), "tokenizer_config.json",
         "add_eos_token must be true or false, not 1"),
    Case("added-token-special-a-string", T, tokenizer_config(added_tokens_decoder={
        "5": {"content": "w5", "special": "yes"}}), "tokenizer_config.json",
         "added_tokens_decoder['5'].special must be true or false, not 'yes'"),
    Case("added-token-lstrip-a-number", T, tokenizer_config(added_tokens_decoder={
        "5": {"content": "w5", "lstrip": 1}}), "tokenizer_config.json",
         "added_tokens_decoder['5'].lstrip must be true or false, not 1"),
    Case("added-token-json-rstrip-null", T, added_token({"id": 7, "content": "w7", "rstrip": None}),
         "tokenizer.json", "added token 'w7'.rstrip must be true or false, not None"),
    Case("added-token-json-id-string", T, added_token({"id": "7", "content": "w7"}), "tokenizer.json",
         "token 'w7' has id '7', outside the model's vocabulary"),
    Case("generation-config-not-json", T, write("generation_config.json", b"{oops"), "generation_config.json",
         "not valid JSON"),
    Case("generation-config-a-list", T, write("generation_config.json", b"[2]"), "generation_config.json",
         "not a JSON object"),
    Case("generation-config-eos-string", T, write("generation_config.json", b'{"eos_token_id": "2"}'),
         "generation_config.json", "eos_token_id '2' is not a token id"),
    Case("generation-config-eos-list-of-floats", T, write("generation_config.json", b'{"eos_token_id": [2.0]}'),
         "generation_config.json", "eos_token_id 2.0 is not a token id"),
    Case("generation-config-a-folder", T, replace("generation_config.json", "dir"), "generation_config.json",
         "not a regular file"),
]

WEIGHTS = [
    Case("nan-in-a-norm", W, tensors(lambda t: t[NORM_A].__setitem__(0, float("nan"))), SHARD, "NaN or Inf"),
    Case("inf-in-embeddings", W, tensors(lambda t: t["model.embed_tokens.weight"].__setitem__((0, 0),
                                                                                              float("inf"))),
         SHARD, "NaN or Inf"),
    Case("tensor-missing", W, tensors(lambda t: t.pop("model.norm.weight")), "ckpt", "missing tensor 'model.norm"),
    Case("tensor-unexpected", W, tensors(lambda t: t.update(extra=t[NORM_A].clone())), "ckpt",
         "unexpected tensor 'extra'"),
    Case("tensor-integer", W, tensors(lambda t: t.update({NORM_A: t[NORM_A].int()})), SHARD, "expected a float"),
    Case("tensor-fp8", W, fp8(GATE), SHARD,
         f"tensor '{GATE}' has dtype F8_E4M3: FP8-quantized weights, but config.json has no quantization_config"),
    Case("tensor-fp8-scale-only", W, tensors(lambda t: t.update({GATE + "_scale_inv": t[NORM_A][:1].float()})),
         SHARD, f"tensor '{GATE}_scale_inv' (F32 [1]) is part of a quantized weight"),
    Case("tensor-gptq-packed", W, tensors(lambda t: t.update({GATE.replace("weight", "qweight"): t.pop(GATE).int()})),
         SHARD, "tensor 'model.layers.0.mlp.gate_proj.qweight' (I32 [64, 32]) is part of a quantized weight"),
    Case("tensor-transposed", W, tensors(lambda t: t.update({GATE: t[GATE].T.contiguous()})), SHARD,
         "config.json implies [64, 32]"),
    Case("no-weights", W, remove(SHARD), "ckpt", "no weights"),
    Case("pickle-only", W, both(write("pytorch_model.bin", b"pickle"), remove(SHARD)), "ckpt", "--allow-pickle"),
    Case("tensor-in-two-files", W, copy(SHARD, "extra.safetensors"), SHARD, "appears in two shards"),
    Case("pickle-not-tensors", W, both(pickle({"a": {"b": 1}}), remove(SHARD)), "pytorch_model.bin",
         "the pickle holds 'a', which is not a named tensor", flags=("--allow-pickle",)),
    Case("pickle-runs-code", W, both(pickle(RunsCode()), remove(SHARD)), "pytorch_model.bin",
         "cannot load the pickle weights-only", flags=("--allow-pickle",)),
]

RECIPE = [
    Case("recipe-not-utf8", R, recipe_text(b"source: \xff\xfe\n"), "recipe.yaml", "not UTF-8 text"),
    Case("recipe-empty", R, recipe_text(""), "recipe.yaml", "a recipe is a YAML mapping"),
    Case("recipe-a-list", R, recipe_text("- a\n- b\n"), "recipe.yaml", "a recipe is a YAML mapping"),
    Case("recipe-syntax", R, recipe_text("source: x\ntargets: [\n"), "recipe.yaml", "YAML syntax error at line"),
    Case("recipe-a-folder", R, beside("recipe.yaml", "dir"), "recipe.yaml", "not a regular file"),
    Case("recipe-a-fifo", R, beside("recipe.yaml", "fifo"), "recipe.yaml", "not a regular file"),
    Case("recipe-dangling-link", R, beside("recipe.yaml", "/no/such/recipe.yaml"), "recipe.yaml",
         "cannot read recipe (No such file or directory)"),
    Case("recipe-too-large", R, recipe_text(lambda f: recipe_with(f, "#" * (2 << 20) + "\n")), "recipe.yaml",
         "a recipe is a short YAML file"),
    Case("recipe-nested-deep", R, recipe_text(nested(1000)), "recipe.yaml", "nested too deeply"),
    Case("recipe-billion-laughs", R, recipe_text(laughs), "recipe.yaml", "name: Input should be a valid string"),
    Case("unknown-key", R, recipe(colour="red"), "recipe.yaml", "unknown key 'colour'"),
    Case("source-empty", R, recipe(source=""), "recipe.yaml", "source: must not be empty"),
    Case("source-blank", R, recipe(source="   "), "recipe.yaml", "source: must not be empty"),
    Case("source-missing", R, recipe(source="/no/such/folder"), "/no/such/folder", "source not found"),
    Case("source-a-file", R, lambda f, r: r.update(source=str(f / "config.json")), "config.json",
         "source must be a checkpoint folder"),
    Case("source-not-a-hub-id", R, recipe(source="a/b/c"), "a/b/c", "source not found"),
    Case("output-empty", R, recipe(output=""), "recipe.yaml", "output: must not be empty"),
    Case("targets-empty", R, recipe(targets=[]), "recipe.yaml", "targets: List should have at least 1 item"),
    Case("bits-a-word", R, recipe(targets=[{"format": "mlx", "bits": "four"}]), "recipe.yaml", "targets.0.bits"),
    Case("format-unknown", R, recipe(targets=[{"format": "onnx"}]), "recipe.yaml", "unknown format 'onnx'"),
    Case("quant-unknown", R, recipe(targets=[{"format": "gguf", "quants": ["Q5_Z"]}]), "recipe.yaml",
         "targets.0.quants.0"),
    Case("context-over-tokens", R, recipe(validate={"tokens": 64, "context": 128}), "recipe.yaml",
         "validate.context must not exceed validate.tokens"),
    Case("context-too-small", R, recipe(validate={"context": 4}), "recipe.yaml", "validate.context"),
    Case("gate-negative", R, recipe(validate={"enabled": False, "gates": {"max_mean_kld": -1}}), "recipe.yaml",
         "validate.gates.max_mean_kld"),
    Case("gate-infinite", R, recipe(validate={"enabled": False, "gates": {"max_ppl_ratio": float("inf")}}),
         "recipe.yaml", "validate.gates.max_ppl_ratio: Input should be a finite number"),
    Case("gate-nan", R, recipe(validate={"enabled": False, "gates": {"min_same_top1": float("nan")}}),
         "recipe.yaml", "validate.gates.min_same_top1: Input should be a finite number"),
    Case("plan-size-infinite", R, recipe(targets=[{"format": "mlx", "bits": "auto",
                                                   "plan": {"size_mb": float("inf")}}]), "recipe.yaml",
         "targets.0.plan.size_mb: Input should be a finite number"),
    Case("plan-kld-floor-infinite", R, recipe(targets=[{"format": "gguf", "quants": ["auto"], "plan": {
        "max_mean_kld": 0.05, "kld_floor": float("inf")}}]), "recipe.yaml",
         "targets.0.plan.kld_floor: Input should be a finite number"),
    Case("plan-size-below-the-smallest", R, recipe(targets=[{"format": "mlx", "bits": "auto",
                                                             "plan": {"size_mb": 0.001}}]), "recipe.yaml",
         "targets.0.plan.size_mb is 0.001; a mlx plan of this model reaches about", flags=("--check",)),
    Case("plan-size-above-unquantized", R, recipe(targets=[{"format": "gguf", "quants": ["auto"],
                                                            "plan": {"size_mb": 5000}}]), "recipe.yaml",
         "targets.0.plan.size_mb is 5000; a gguf plan of this model reaches about", flags=("--check",)),
    Case("plan-bits-above-gguf", R, recipe(targets=[{"format": "gguf", "quants": ["auto"],
                                                     "plan": {"bits_per_weight": 12}}]), "recipe.yaml",
         "targets.0.plan.bits_per_weight is 12.0; a gguf plan chooses from 2.0625 to 8.5 bits per weight"),
    Case("plan-bits-below-mlx", R, recipe(targets=[{"format": "mlx", "bits": "auto",
                                                    "plan": {"bits_per_weight": 2.1}}]), "recipe.yaml",
         "a mlx plan chooses from 2.25 to 9 bits per weight"),
    Case("plan-bits-below-coreml", R, recipe(targets=[{"format": "coreml", "context": 64, "plan": {
        "bits_per_weight": 3}, "precision": ["auto"]}]), "recipe.yaml",
         "a coreml plan chooses from 4.0625 to 16 bits per weight"),
    Case("plan-bits-below-coreml-gptq", R, recipe(targets=[{"format": "coreml", "context": 64, "plan": {
        "bits_per_weight": 3}, "precision": ["auto"], "method": "gptq"}]), "recipe.yaml",
         "a coreml plan chooses from 3.0625 to 16 bits per weight"),  # GPTQ's plans take pal3 too
    Case("plan-kld-nan", R, recipe(targets=[{"format": "mlx", "bits": "auto",
                                             "plan": {"max_mean_kld": float("nan")}}]), "recipe.yaml",
         "targets.0.plan.max_mean_kld: Input should be a finite number"),
    Case("plan-kld-per-error-zero", R, recipe(targets=[{"format": "gguf", "quants": ["auto"], "plan": {
        "max_mean_kld": 0.05, "kld_per_error": 0}}]), "recipe.yaml",
         "targets.0.plan.kld_per_error: Input should be greater than 0"),
    Case("plan-kld-per-error-negative", R, recipe(targets=[{"format": "mlx", "bits": "auto", "plan": {
        "max_mean_kld": 0.05, "kld_per_error": -2.5}}]), "recipe.yaml",
         "targets.0.plan.kld_per_error: Input should be greater than 0"),
    Case("plan-kld-per-error-infinite", R, recipe(targets=[{"format": "mlx", "bits": "auto", "plan": {
        "max_mean_kld": 0.05, "kld_per_error": float("inf")}}]), "recipe.yaml",
         "targets.0.plan.kld_per_error: Input should be a finite number"),
    Case("plan-kld-floor-negative", R, recipe(targets=[{"format": "gguf", "quants": ["auto"], "plan": {
        "max_mean_kld": 0.05, "kld_floor": -1e-9}}]), "recipe.yaml",
         "targets.0.plan.kld_floor: Input should be greater than or equal to 0"),
    Case("plan-kld-zero", R, recipe(targets=[{"format": "mlx", "bits": "auto", "plan": {"max_mean_kld": 0}}]),
         "recipe.yaml", "targets.0.plan.max_mean_kld: Input should be greater than 0"),
    Case("plan-size-negative", R, recipe(targets=[{"format": "gguf", "quants": ["auto"], "plan": {"size_mb": -5}}]),
         "recipe.yaml", "targets.0.plan.size_mb: Input should be greater than 0"),
    Case("plan-size-huge", R, recipe(targets=[{"format": "mlx", "bits": "auto", "plan": {"size_mb": 1e300}}]),
         "recipe.yaml", "targets.0.plan.size_mb is 1e+300; a mlx plan of this model reaches about",
         flags=("--check",)),
    Case("plan-bits-17", R, recipe(targets=[{"format": "mlx", "bits": "auto", "plan": {"bits_per_weight": 17}}]),
         "recipe.yaml", "targets.0.plan.bits_per_weight: Input should be less than or equal to 16"),
    Case("plan-two-goals", R, recipe(targets=[{"format": "gguf", "quants": ["auto"], "plan": {
        "size_mb": 1, "bits_per_weight": 4}}]), "recipe.yaml",
         "a plan names exactly one of max_mean_kld, size_mb, bits_per_weight"),
    Case("plan-no-goal", R, recipe(targets=[{"format": "gguf", "quants": ["auto"], "plan": {}}]), "recipe.yaml",
         "a plan names exactly one of max_mean_kld, size_mb, bits_per_weight"),
    Case("auto-without-plan", R, recipe(targets=[{"format": "mlx", "bits": "auto"}]), "recipe.yaml",
         "auto needs a plan"),
    Case("mlx-dtype-float8", R, recipe(targets=[{"format": "mlx", "dtype": "float8"}]), "recipe.yaml",
         "targets.0.dtype"),
    Case("mlx-dtype-number", R, recipe(targets=[{"format": "mlx", "dtype": 16}]), "recipe.yaml",
         "targets.0.dtype"),
    Case("mlx-dtype-upper-case", R, recipe(targets=[{"format": "mlx", "dtype": "FLOAT16"}]), "recipe.yaml",
         "targets.0.dtype"),
    Case("push-without-repo", R, recipe(release={"push": True}), "recipe.yaml", "release.push needs"),
    Case("name-with-slash", R, recipe(name="../evil"), "recipe.yaml", "name: String should match pattern"),
    Case("coreml-context-under-validate", R, recipe(targets=[{"format": "coreml", "context": 32}],
                                                    validate={"tokens": 128, "context": 64, "latency": False}),
         "recipe.yaml", "targets.0.context (32) is shorter than validate.context (64)"),
    Case("coreml-context-under-latency", R, recipe(targets=[{"format": "coreml", "context": 64}],
                                                   validate={"tokens": 128, "context": 64}),
         "recipe.yaml", "shorter than validate.prefill_tokens + decode_tokens (160)"),
    Case("coreml-chunks-over-layers", R, recipe(targets=[{"format": "coreml", "context": 64, "chunks": 10**9}]),
         "recipe.yaml", "targets.0.chunks is 1000000000, more than the model's 2 layers"),
    Case("imatrix-missing", R, recipe(targets=[{"format": "gguf", "imatrix": "/no/such.txt"}]), "/no/such.txt",
         "cannot read the imatrix calibration text"),
]

VALIDATION = [
    Case("corpus-missing", V, corpus(None), "corpus.txt", "cannot read the validation corpus (No such file"),
    Case("corpus-empty", V, corpus(b""), "corpus.txt", "the validation corpus is empty"),
    Case("corpus-blank", V, corpus(b" \n\t\n"), "corpus.txt", "the validation corpus is empty"),
    Case("corpus-not-utf8", V, corpus(b"w1 w2 \xff\xfe"), "corpus.txt", "not UTF-8 text"),
    Case("corpus-too-short", V, corpus(b"w1 w2 w3"), "corpus.txt", "the corpus has 3 tokens; validate.tokens=32"),
    Case("corpus-a-folder", V, both(beside("corpus.txt", "dir"), corpus(None)), "corpus.txt", "not a regular file"),
    Case("corpus-a-fifo", V, both(beside("corpus.txt", "fifo"), corpus(None)), "corpus.txt", "not a regular file"),
    Case("validate-context-beyond-positions", V, recipe(validate={"tokens": 512, "context": 256}), "recipe.yaml",
         "validate.context is 256, beyond the model's max_position_embeddings 128"),
    Case("latency-beyond-positions", V, recipe(validate={"tokens": 64, "context": 64, "prefill_tokens": 120}),
         "recipe.yaml", "validate.prefill_tokens + decode_tokens is 152, beyond"),
    Case("coreml-context-beyond-positions", V, recipe(targets=[{"format": "coreml", "context": 512}]),
         "recipe.yaml", "targets.0.context is 512, beyond the model's max_position_embeddings 128"),
    Case("imatrix-a-device", V, recipe(targets=[{"format": "gguf", "imatrix": "/dev/zero"}]), "/dev/zero",
         "cannot read the imatrix calibration text (not a regular file)"),
    Case("corpus-a-device", V, corpus(None, corpus="/dev/zero"), "/dev/zero",
         "cannot read the validation corpus (not a regular file)"),
    Case("imatrix-a-folder", V, lambda f, r: r.update(targets=[{"format": "gguf", "imatrix": str(f)}]), "ckpt",
         "cannot read the imatrix calibration text"),
]

OUTPUT = [
    Case("output-under-a-file", OUT, output_under_file, "a-file/out", "cannot create the output folder"),
    Case("output-is-a-file", OUT, output_is_file, "a-file", "cannot create the output folder"),
]

# The same checks through `recipe --check`: it opens the real source and runs every check a run makes first.
CHECK_TOO = {"layers-a-billion", "hidden-size-string", "architectures-unknown", "shard-path-traversal",
             "overlap-same-bytes", "metadata-int-value", "tokenizer-wrong-structure", "corpus-missing",
             "corpus-too-short", "validate-context-beyond-positions", "coreml-context-beyond-positions",
             "imatrix-missing", "output-under-a-file", "quantized-gptq", "quantized-fp8-but-float"}
CHECKED = [Case(f"check-{c.id}", c.kind, c.damage, c.where, c.message, c.sharded, ("--check",))
           for c in (*HEADER, *SHARDED, *CONFIG, *TOKENIZER, *RECIPE, *VALIDATION, *OUTPUT) if c.id in CHECK_TOO]

CASES = [*HEADER, *SHARDED, *CONFIG, *TOKENIZER, *WEIGHTS, *RECIPE, *VALIDATION, *OUTPUT, *CHECKED]
