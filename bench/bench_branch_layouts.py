"""Per-node cost of a LoRA branch in onnxruntime (CPU), and the layouts that could replace it.

One command, all layouts side by side, best of 200 runs each taken in turn, one onnxruntime thread:

- merged: one MatMul with W + D U per layer (the floor);
- branch: MatMul(x, W) + MatMul(MatMul(x, D), U), what a rank-compact graph has per adapted layer;
- shared_down: one MatMul(x, [D_1 | D_2 | ...]) and a Split for the layers that read the same input;
- concat: MatMul(Concat(x, x D), [W; U]) per layer (no Add);
- shared_concat: one x [D_1 | ...] and one Concat, then MatMul with [W; U zero-padded to all ranks].

Every layout is checked against the branch's outputs before it is timed; ratios are over merged.

    .venv/bin/python bench/bench_branch_layouts.py
"""

from __future__ import annotations

import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

LAYOUTS = ("merged", "branch", "shared_down", "concat", "shared_concat")


def build(layout: str, n_in: int, outs: list[int], ranks: list[int], tokens: int) -> bytes:
    """A graph of len(outs) layers reading one input x (tokens x n_in), in ``layout``."""
    rng = np.random.default_rng(1)
    W = [rng.standard_normal((n_in, o), dtype=np.float32) * 0.02 for o in outs]
    D = [rng.standard_normal((n_in, r), dtype=np.float32) * 0.02 for r in ranks]
    U = [rng.standard_normal((r, o), dtype=np.float32) * 0.02 for r, o in zip(ranks, outs)]
    inits, nodes = {}, []

    def node(op: str, inputs: list[str], output: str, **attrs) -> None:
        nodes.append(helper.make_node(op, inputs, [output], **attrs))

    layers = range(len(outs))
    if layout == "merged":
        for i in layers:
            inits[f"W{i}"] = W[i] + D[i] @ U[i]
            node("MatMul", ["x", f"W{i}"], f"y{i}")
    elif layout in ("branch", "shared_down"):
        if layout == "shared_down":
            inits["D"], inits["splits"] = np.concatenate(D, 1), np.array(ranks, np.int64)
            node("MatMul", ["x", "D"], "h")
            nodes.append(helper.make_node("Split", ["h", "splits"], [f"h{i}" for i in layers], axis=1))
        for i in layers:
            inits[f"W{i}"], inits[f"U{i}"] = W[i], U[i]
            if layout == "branch":
                inits[f"D{i}"] = D[i]
                node("MatMul", ["x", f"D{i}"], f"h{i}")
            node("MatMul", ["x", f"W{i}"], f"b{i}")
            node("MatMul", [f"h{i}", f"U{i}"], f"d{i}")
            node("Add", [f"b{i}", f"d{i}"], f"y{i}")
    elif layout == "concat":
        for i in layers:
            inits[f"WU{i}"], inits[f"D{i}"] = np.concatenate([W[i], U[i]], 0), D[i]
            node("MatMul", ["x", f"D{i}"], f"h{i}")
            node("Concat", ["x", f"h{i}"], f"c{i}", axis=1)
            node("MatMul", [f"c{i}", f"WU{i}"], f"y{i}")
    else:  # shared_concat
        inits["D"] = np.concatenate(D, 1)
        node("MatMul", ["x", "D"], "h")
        node("Concat", ["x", "h"], "c", axis=1)
        offset = 0
        for i in layers:
            padded = np.zeros((sum(ranks), outs[i]), np.float32)
            padded[offset : offset + ranks[i]] = U[i]
            offset += ranks[i]
            inits[f"WU{i}"] = np.concatenate([W[i], padded], 0)
            node("MatMul", ["c", f"WU{i}"], f"y{i}")
    graph = helper.make_graph(
        nodes,
        layout,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [tokens, n_in])],
        [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [tokens, outs[i]]) for i in layers],
        [numpy_helper.from_array(value, name) for name, value in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9).SerializeToString()


def bench(n_in: int, outs: list[int], ranks: list[int], tokens: int, reps: int = 200) -> dict:
    """Best time of each layout over merged's, and merged's own in microseconds."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    x = np.random.default_rng(0).standard_normal((tokens, n_in), dtype=np.float32)
    sessions = {
        name: ort.InferenceSession(build(name, n_in, outs, ranks, tokens), options, providers=["CPUExecutionProvider"])
        for name in LAYOUTS
    }
    reference = sessions["branch"].run(None, {"x": x})
    for name, session in sessions.items():
        got = session.run(None, {"x": x})
        assert all(np.allclose(a, b, atol=1e-4) for a, b in zip(got, reference)), name
    best = dict.fromkeys(sessions, float("inf"))
    for _ in range(reps):
        for name, session in sessions.items():
            start = time.perf_counter()
            session.run(None, {"x": x})
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: round(best[name] / best["merged"], 3) for name in best} | {"merged_us": round(best["merged"] * 1e6)}


def main() -> None:
    print("| layers | tokens | " + " | ".join(LAYOUTS) + " | merged us |")
    print("|---" * (len(LAYOUTS) + 3) + "|")
    cases = {
        "q, k, v 512 (ranks 8, 3, 5)": (512, [512] * 3, [8, 3, 5]),
        "gate, up 512->1344 (6, 9)": (512, [1344] * 2, [6, 9]),
        "o 512 (7)": (512, [512], [7]),
    }
    for tokens in (1, 128):
        for label, (n_in, outs, ranks) in cases.items():
            row = bench(n_in, outs, ranks, tokens)
            print(
                f"| {label} | {tokens} | " + " | ".join(f"{row[n]:.3f}" for n in LAYOUTS) + f" | {row['merged_us']} |"
            )


if __name__ == "__main__":
    main()
