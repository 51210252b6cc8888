"""Optimized decoder graphs built by onnxruntime-genai's own model builder, checked against torch.

For the architectures the builder takes (Llama, Mistral, Qwen2/3, Phi, Gemma and kin), its graph is
what onnxruntime's LLM stack serves fastest: fused GroupQueryAttention over a shared KV-cache
buffer, fused rotary embedding and norms, and int4 weights (``MatMulNBits``). We do not rewrite
that: the adapter is merged into a temporary HF directory (streaming, ``converters.merge``), the
builder turns it into ``model.onnx`` + ``genai_config.json``, and our own check then runs the result
through onnxruntime-genai against the merged torch model in fp32: greedy agreement over a few
prompts and the largest relative logit error, with a bound per dtype (int4 quantizes every matrix,
so it gets its own). Both figures go into ``onnx_manifest.json``; over the bound nothing is written.
Architectures the builder does not take (GPT-2, encoders, classifiers) use ``export_onnx``.

With ``adapter_inputs`` the graph is the builder's optimized *base* with one LoRA branch per adapted
layer whose weights are graph inputs, each with its own rank axis and an empty (rank 0) default:
onnxruntime-genai's ``og.Adapters`` (and ``OnnxServer.set_adapter``) swap ``.onnx_adapter`` files
of any per-layer ranks per request. The builder only bakes a LoRA in (``adapter_path``), so we let it
build the branches from our uniform LoRA export and then turn their weights into inputs (int4
builds quantize the branch weights too; those nodes go back to float MatMuls, since an adapter's
weights come from the file at run time). The builder also unpacks q, k and v when it bakes a LoRA in;
``_pack_qkv`` packs them back into one projection, as its merged graph has them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from adalora_export.adapter import CompactAdapter
from adalora_export.errors import UserError
from adalora_export.formats.onnx_dir import (
    ADAPTER_FILE,
    DATA_FILE,
    GENAI_CONFIG,
    MANIFEST,
    MANIFEST_FORMAT,
    MANIFEST_VERSION,
    MODEL_FILE,
    OnnxKind,
    import_onnxruntime_genai,
)
from adalora_export.hf import CAUSAL_LM, check_model_dir, load_pretrained
from adalora_export.io import atomic_output_dir, check_output_path, write_json

from ..lora import export_lora
from ..merge import merge_into_base
from .adapter_file import write_adapter_file
from .export import check_tolerance, eos_token_ids

BUILDER_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "GemmaForCausalLM",
    "Gemma2ForCausalLM",
    "PhiForCausalLM",
    "Phi3ForCausalLM",
    "GraniteForCausalLM",
    "OlmoForCausalLM",
    "SmolLM3ForCausalLM",
)
OPTIMIZED_DTYPES = ("fp32", "fp16", "int4")
TARGETS = ("cpu", "cuda")
# Largest relative logit error (to the largest reference logit) against torch fp32: fp32 is the same
# arithmetic reordered; fp16 the builder's accuracy class; int4 rounds every weight to 16 levels per block.
OPTIMIZED_TOLERANCE = {"fp32": 1e-4, "fp16": 5e-3, "int4": 0.25}
PROMPT_LENGTHS = (5, 11, 17)
NEW_TOKENS = 8


def export_optimized(
    adapter: CompactAdapter,
    base_dir: str | os.PathLike,
    output: str | os.PathLike,
    *,
    dtype: str = "fp32",
    target: str = "cpu",
    tolerance: float | None = None,
    adapter_inputs: bool = False,
    overwrite: bool = False,
    allow_pickle: bool = False,
) -> dict:
    """Write base + ``adapter`` as onnxruntime-genai's optimized graph into ``output`` (merged, or with
    ``adapter_inputs`` the base with hot-swappable branches and the adapter as ``adapter.onnx_adapter``);
    returns the manifest."""
    if dtype not in OPTIMIZED_DTYPES:
        raise UserError(f"--dtype {dtype} is not built by the optimizer; choose one of {', '.join(OPTIMIZED_DTYPES)}")
    if target not in TARGETS:
        raise UserError(f"--target must be one of {', '.join(TARGETS)}, got {target!r}")
    check_tolerance(tolerance)
    import_onnxruntime_genai()  # before any work: it builds and checks the graph
    if dtype == "fp16" and target == "cpu":
        raise UserError("the builder makes fp16 graphs for --target cuda only; on the CPU use fp32 or int4")
    base_dir = Path(base_dir)
    config = check_model_dir(base_dir)
    architecture = (config.get("architectures") or ["?"])[0]
    if adapter.task_type not in (None, CAUSAL_LM) or architecture not in BUILDER_ARCHITECTURES:
        raise UserError(
            f"onnxruntime-genai's builder does not take {architecture} ({adapter.task_type or 'causal_lm'}); "
            "export it with --onnx --merge instead"
        )
    if adapter_inputs and adapter.extra_weights:
        names = ", ".join(sorted(adapter.extra_weights))
        raise UserError(f"the adapter trains {names} in full; the builder's graph cannot take them as inputs")
    output = check_output_path(output, overwrite)
    tolerance = OPTIMIZED_TOLERANCE[dtype] if tolerance is None else tolerance
    stages = tqdm(total=4, desc=f"ONNX export (optimized, {dtype})", unit="stage")
    # Named like an atomic output's temporary, so a later export of the same name clears it after a kill.
    scratch = tempfile.TemporaryDirectory(prefix=f".{output.name}.tmp-{os.getpid()}-", dir=output.absolute().parent)
    with stages, scratch as work:
        work = Path(work)
        stages.set_postfix_str("merging" if not adapter_inputs else "LoRA branches")
        if adapter_inputs:  # the base, with a branch on every adapted layer (the uniform layout has them all)
            source, lora = base_dir, export_lora(adapter, work / "lora", layout="uniform")
        else:
            source, lora = work / "merged", None
            merge_into_base(adapter, base_dir, source, allow_pickle=allow_pickle)
        stages.update()
        with atomic_output_dir(output, overwrite) as tmp:
            stages.set_postfix_str("onnxruntime-genai builder")
            _build(source, tmp, dtype, target, work / "cache", lora)
            stages.update()
            for name in ("config.json", "generation_config.json"):  # what the directory's readers expect
                if (source / name).is_file():
                    shutil.copyfile(source / name, tmp / name)
            branches = _branches_as_inputs(tmp, adapter) if adapter_inputs else {}
            if adapter_inputs:
                write_adapter_file(adapter, {"branches": branches, "dtype": dtype}, tmp / ADAPTER_FILE)
            reference = (
                adapter.apply_to(adapter.load_base(base_dir, allow_pickle=allow_pickle))
                if adapter_inputs
                else load_pretrained(source, CAUSAL_LM, dtype=torch.float32).eval()
            )
            stages.set_postfix_str("onnxruntime-genai check")
            stages.update()
            try:
                parity = check_optimized(tmp, reference, tolerance, tmp / ADAPTER_FILE if adapter_inputs else None)
            except RuntimeError as exc:  # onnxruntime-genai cannot run it here (no GPU for a cuda graph, say)
                raise UserError(f"onnxruntime-genai cannot run the built graph: {str(exc).splitlines()[0]}") from None
            manifest = {
                "format": MANIFEST_FORMAT,
                "version": MANIFEST_VERSION,
                "kind": OnnxKind.OPTIMIZED.value,
                "task": CAUSAL_LM,
                "model_type": config["model_type"],
                "dtype": dtype,
                "target": target,
                "exporter": "onnxruntime-genai model builder",
                "base_model_name_or_path": str(base_dir.absolute()),
                "rank_pattern": adapter.rank_pattern,
                "adapter_inputs": adapter_inputs,
                "branches": branches,
                "adapter_file": ADAPTER_FILE if adapter_inputs else None,
                "eos_token_ids": eos_token_ids(reference),
                "genai_config": GENAI_CONFIG,
                "parity": parity,
            }
            write_json(tmp / MANIFEST, manifest)
            stages.update()
    return manifest


def _build(source: Path, output: Path, dtype: str, target: str, cache: Path, lora: Path | None = None) -> None:
    """Run the builder on an HF directory (a child process: it loads the whole model itself)."""
    argv = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", source.name, "-i", str(source)]
    argv += ["-o", str(output), "-p", dtype, "-e", target, "-c", str(cache)]
    if lora is not None:
        argv += ["--extra_options", f"adapter_path={lora}"]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0 or not (output / MODEL_FILE).is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise UserError(f"onnxruntime-genai's builder failed on {source}: {tail[0]}")


_LORA_NODE = re.compile(r"^/(.+)/lora_([AB])/MatMul(?:_Q4)?$")


def _branches_as_inputs(directory: Path, adapter: CompactAdapter) -> dict[str, dict]:
    """Turn the builder's LoRA branch weights into graph inputs with empty defaults, one rank axis per
    layer; returns the manifest's ``branches`` (our module path -> down/up input names and sizes)."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(directory / MODEL_FILE))
    graph = model.graph
    elem = graph.output[0].type.tensor_type.elem_type  # logits: the graph's float type
    dtype = helper.tensor_dtype_to_np_dtype(elem)
    dims = {i.name: list(i.dims) for i in graph.initializer}
    found: dict[str, dict] = {}
    dropped: set[str] = set()
    outputs: set[str] = set()  # the branches' intermediate values, whose recorded shapes fix the old rank
    for index, node in enumerate(graph.node):
        match = _LORA_NODE.match(node.name)
        if not match:
            continue
        key, side = match.group(1).replace("/", "."), match.group(2)
        if node.op_type == "MatMulNBits":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            k, n = attrs["K"], attrs["N"]
        else:
            k, n = dims[node.input[1]]
        name = f"{key}.lora_{side}.MatMul.weight"
        dropped.update(node.input[1:])
        outputs.update(node.output)
        graph.node[index].CopyFrom(
            helper.make_node("MatMul", [node.input[0], name], list(node.output), name=node.name.removesuffix("_Q4"))
        )
        found.setdefault(key, {})[side] = (name, k, n)
    kept = [i for i in graph.initializer if i.name not in dropped]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    # Shapes recorded for the branch outputs name the built rank; onnxruntime would plan buffers by them.
    infos = [v for v in graph.value_info if v.name not in outputs]
    del graph.value_info[:]
    graph.value_info.extend(infos)
    ours = {path.replace(".self_attn.", ".attn."): path for path in adapter.modules}
    branches = {}
    for key, sides in sorted(found.items()):
        path = ours.get(key)
        if path is None or set(sides) != {"A", "B"}:
            raise UserError(f"the builder made a LoRA branch {key} that matches no module of the adapter")
        (down, in_features, _), (up, _, out_features) = sides["A"], sides["B"]
        axis = f"rank_{key}"
        graph.input.extend(
            [
                helper.make_tensor_value_info(down, elem, [in_features, axis]),
                helper.make_tensor_value_info(up, elem, [axis, out_features]),
            ]
        )
        graph.initializer.extend(
            [
                numpy_helper.from_array(np.zeros((in_features, 0), dtype), down),
                numpy_helper.from_array(np.zeros((0, out_features), dtype), up),
            ]
        )
        branches[path] = {"down": down, "up": up, "in": in_features, "out": out_features, "rank_axis": axis}
    missing = sorted(set(adapter.modules) - set(branches))
    if missing:
        raise UserError(f"the builder made no LoRA branch for adapter module {missing[0]}")
    _pack_qkv(graph)
    (directory / DATA_FILE).unlink(missing_ok=True)
    onnx.save(model, str(directory / MODEL_FILE), save_as_external_data=True, location=DATA_FILE)
    return branches


def _pack_qkv(graph) -> None:
    """Pack each layer's q, k and v projections back into one, as the builder's merged graph has them.

    Why: given an adapter the builder unpacks them (three MatMulNBits, each plus its branch's Add,
    feeding GroupQueryAttention separately); at batch 1 the time goes per node. Packed: one MatMul(NBits)
    over the three weights concatenated along N (the same quantized blocks, so the same numbers), the
    three branch outputs Concat'ed and added once, and GroupQueryAttention reading packed QKV. The
    branches themselves stay one per module, each with its own rank axis.
    """
    import onnx
    from onnx import helper, numpy_helper

    producers = {out: node for node in graph.node for out in node.output}
    inits = {t.name: t for t in graph.initializer}
    removed_nodes, removed_inits, additions = set(), set(), {}
    for attention in (n for n in graph.node if n.op_type == "GroupQueryAttention"):
        adds = [producers.get(name) for name in attention.input[:3]]
        if any(a is None or a.op_type != "Add" for a in adds):
            continue  # already packed, or not the builder's LoRA pattern
        bases = [producers.get(a.input[0]) for a in adds]
        if any(b is None or b.op_type not in ("MatMul", "MatMulNBits") for b in bases):
            continue
        if len({b.op_type for b in bases}) != 1 or len({b.input[0] for b in bases}) != 1:
            continue
        if any(w not in inits for b in bases for w in b.input[1:] if w):
            continue
        # Only tensors that lead with N concatenate along it: MatMul's W, MatMulNBits' B, scales and zero
        # points (its g_idx runs along K, so a graph with one is left alone), with the same attributes.
        if len({len(b.input) for b in bases}) != 1 or len(bases[0].input) > (2 if bases[0].op_type == "MatMul" else 4):
            continue
        if len({tuple((a.name, a.i) for a in b.attribute if a.name != "N") for b in bases}) != 1:
            continue
        prefix = bases[0].name.rsplit("/q_proj/", 1)[0]
        packed_out = f"{prefix}/qkv_proj/MatMul/output_0"
        delta, summed = f"{prefix}/qkv_proj/lora/Concat/output_0", f"{prefix}/qkv_proj/lora/Add/output_0"
        weights = []
        for index in range(1, len(bases[0].input)):  # B, scales (and zero points) of MatMulNBits; W of MatMul
            arrays = [numpy_helper.to_array(inits[b.input[index]]) for b in bases]
            axis = 1 if bases[0].op_type == "MatMul" else 0  # MatMul's W is K x N; MatMulNBits' tensors lead with N
            name = f"{prefix.lstrip('/').replace('/', '.')}.qkv_proj.{bases[0].input[index].rsplit('.', 1)[-1]}"
            weights.append(numpy_helper.from_array(np.concatenate(arrays, axis=axis), name))
        attrs = {a.name: helper.get_attribute_value(a) for a in bases[0].attribute}
        if bases[0].op_type == "MatMulNBits":
            attrs["N"] = sum(helper.get_attribute_value(next(a for a in b.attribute if a.name == "N")) for b in bases)
        suffix = "MatMul_Q4" if bases[0].op_type == "MatMulNBits" else "MatMul"
        nodes = [
            helper.make_node(
                bases[0].op_type,
                [bases[0].input[0]] + [w.name for w in weights],
                [packed_out],
                name=f"{prefix}/qkv_proj/{suffix}",
                domain=bases[0].domain,
                **attrs,
            ),
            helper.make_node(
                "Concat", [a.input[1] for a in adds], [delta], name=f"{prefix}/qkv_proj/lora/Concat", axis=-1
            ),
            helper.make_node("Add", [packed_out, delta], [summed], name=f"{prefix}/qkv_proj/lora/Add"),
        ]
        additions[attention.name] = nodes
        graph.initializer.extend(weights)
        removed_nodes.update(n.name for n in bases + adds)
        removed_inits.update(w for b in bases for w in b.input[1:] if w)
        attention.input[0], attention.input[1], attention.input[2] = summed, "", ""
    if not additions:
        return
    kept = []  # copies: the graph's own node messages go when the field is cleared
    for node in graph.node:
        if node.name in removed_nodes:
            continue
        kept.extend(additions.get(node.name, []) if node.op_type == "GroupQueryAttention" else [])
        kept.append(onnx.NodeProto())
        kept[-1].CopyFrom(node)
    del graph.node[:]
    graph.node.extend(kept)
    remaining = [t for t in graph.initializer if t.name not in removed_inits]
    del graph.initializer[:]
    graph.initializer.extend(remaining)


@torch.no_grad()
def check_optimized(graph_dir: Path, reference: torch.nn.Module, tolerance: float, adapter_file: Path | None) -> dict:
    """Run the built graph through onnxruntime-genai (with ``adapter_file`` active, if given) against
    ``reference``, the model it stands for, in torch fp32."""
    og = import_onnxruntime_genai()
    model = og.Model(str(graph_dir))
    adapters = None
    if adapter_file is not None:
        adapters = og.Adapters(model)
        adapters.load(str(adapter_file), "adapter")
    vocab = reference.config.get_text_config().vocab_size
    rng = np.random.default_rng(0)
    worst, agree, total = 0.0, 0, 0
    for length in PROMPT_LENGTHS:
        ids = rng.integers(0, vocab, length).tolist()
        want = reference(torch.tensor([ids])).logits[0].numpy()
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=length + NEW_TOKENS, min_length=length + NEW_TOKENS, do_sample=False)
        generator = og.Generator(model, params)
        if adapters is not None:
            generator.set_active_adapter(adapters, "adapter")
        generator.append_tokens(ids)
        got = np.asarray(generator.get_output("logits"), dtype=np.float32)[0, : want.shape[0]]
        worst = max(worst, float(np.abs(got - want).max() / np.abs(want).max()))
        while not generator.is_done():
            generator.generate_next_token()
        tokens = [int(t) for t in generator.get_sequence(0)[length:]]
        expected = _greedy(reference, ids, NEW_TOKENS)
        agree += sum(a == b for a, b in zip(tokens, expected))
        total += len(expected)
    del adapters, model  # frees the graph's weights before the caller renames the directory
    parity = {"max_relative_error": worst, "tolerance": tolerance, "greedy_agreement": agree / total}
    if worst > tolerance:
        raise UserError(
            f"onnxruntime-genai differs from torch by {worst:.3g} (relative) on the built graph, over the "
            f"tolerance {tolerance}; nothing written"
        )
    return parity


def _greedy(model: torch.nn.Module, ids: list[int], new: int) -> list[int]:
    """Plain argmax decoding in torch, no logits processors (``generate`` applies the generation
    config's, which onnxruntime-genai's search options do not mirror); EOS is suppressed as
    onnxruntime-genai's ``min_length`` does."""
    eos = set(eos_token_ids(model))
    sequence, out = list(ids), []
    for _ in range(new):
        logits = model(torch.tensor([sequence])).logits[0, -1]
        if eos:
            logits[list(eos)] = -float("inf")
        token = int(logits.argmax())
        sequence.append(token)
        out.append(token)
    return out
