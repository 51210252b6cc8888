"""``.onnx_adapter`` files: an adapter's branch (and head) weights as onnxruntime adapter parameters.

Written beside an adapter-input graph at export, and for any other AdaLoRA adapter of the same base
afterwards (``write_onnx_adapter``): the graph's rank axes are symbolic, so any ranks fit.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from adalora_export.adapter import CompactAdapter
from adalora_export.errors import UserError
from adalora_export.formats.onnx_dir import open_onnx_dir, takes_adapters
from adalora_export.io import atomic_output_file, check_output_path

from .branches import branch_weights


def write_onnx_adapter(
    adapter: CompactAdapter, onnx_dir: str | os.PathLike, output: str | os.PathLike, *, overwrite: bool = False
) -> Path:
    """Write ``adapter`` as an ``.onnx_adapter`` file for the adapter-input graph in ``onnx_dir``.

    Any AdaLoRA adapter for the same base fits, whatever its ranks, as long as its modules are
    among the graph's adapted layers (a layer the adapter leaves out, or at rank 0, stays the base).
    """
    check_output_path(output, overwrite, inputs={"the graph directory": onnx_dir})
    _, manifest = open_onnx_dir(onnx_dir)
    if not takes_adapters(manifest):
        raise UserError(f"{onnx_dir} was exported without --adapter-inputs; adapters cannot be swapped into it")
    with atomic_output_file(output, overwrite) as tmp:
        write_adapter_file(adapter, manifest, tmp)
    return Path(output)


def write_adapter_file(adapter: CompactAdapter, manifest: dict, path: Path) -> None:
    """Write the adapter's parameters for the graph ``manifest`` describes to ``path``, in the graph's dtype.

    A UserError when a module or extra weight is not an input of that graph (an adapter for another base).
    """
    import onnxruntime as ort

    params = _parameters(adapter, manifest)
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters({name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for name, v in params.items()})
    fmt.export_adapter(str(path))


def _parameters(adapter: CompactAdapter, manifest: dict) -> dict[str, np.ndarray]:
    """Graph input name -> value for every non-zero-rank branch and every extra weight of ``adapter``."""
    branches, extras = manifest["branches"], manifest.get("extra_inputs", {})
    float_type = np.float16 if manifest["dtype"] == "fp16" else np.float32
    params = {}
    for path, module in adapter.modules.items():
        branch = branches.get(path)
        if branch is None:
            raise UserError(
                f"adapter module {path} is not an adapted layer of this graph: an adapter for another base?"
            )
        if (branch["in"], branch["out"]) != (module.in_features, module.out_features):
            raise UserError(
                f"adapter module {path} is {module.out_features}x{module.in_features}, the graph's layer is "
                f"{branch['out']}x{branch['in']}: an adapter for another base?"
            )
        if module.rank == 0:
            continue  # the graph's empty default is exactly rank 0
        down, up = branch_weights(adapter, path)
        params[branch["down"]] = down.numpy().astype(float_type)
        params[branch["up"]] = up.numpy().astype(float_type)
    for name, value in adapter.extra_weights.items():
        if name not in extras or list(value.shape) != extras[name]:
            raise UserError(f"adapter weight {name} {tuple(value.shape)} is not an input of this graph")
        params[name] = value.float().numpy().astype(float_type)
    return params
