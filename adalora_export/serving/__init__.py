"""Serving exported graphs: one loaded graph, many requests.

The runtime reads what the ONNX exporter wrote through the one definition of that directory
(``adalora_export.formats.onnx_dir``: file names, manifest) and imports nothing from the converters.
Nothing here imports onnxruntime until a graph is opened.

``server``: ``OnnxServer(onnx_dir)`` checks the directory, picks its engine once from the manifest,
and holds the tokenizer and the active adapter: ``generate`` / ``stream`` / ``chat`` (the model's
chat template, ending at its end-of-turn token) for causal LMs (greedy or sampling, stop strings, a
batch at once), ``classify`` and ``embed`` for encoders, ``run`` for one forward pass. ``infer`` is
the ``adalora-export infer`` command as one call; ``check_flags`` the one rule for its options that
do not apply.

``text``: ``RowText``, a row's text as its tokens arrive (what is stable: multi-byte characters
whole, stop strings held back and cut). ``tokenizer``: the directory's tokenizer read with the
``tokenizers`` library, as transformers reads it, without loading torch.

``engine``: the one interface a server drives (``Engine``: ``run``, ``set_adapter``,
``generate_batch_ids``, ``provider``) and ``GenerateOptions``, how each new token is chosen.

``ort_engine``: ``OrtEngine``, our own loop over an onnxruntime session for the graphs we export
(KV cache, left padding, sampling); adapters are ``.onnx_adapter`` files (``load_onnx_adapter``)
activated through ``RunOptions``.

``genai_engine``: ``GenaiEngine``, onnxruntime-genai's generator over the builder's optimized graphs
(fused attention over a shared cache buffer, int4), with ``og.Adapters`` for their adapter inputs.

``providers``: ``PROVIDERS``, ``cuda_usable`` (does CUDA really load) and ``create_session`` (CUDA
when asked or usable, else the CPU, quietly).

``safety``: ``check_onnx_dir``, the runtime's own check that no tensor's external data lies outside
the directory, before onnxruntime reads any of it.
"""

from ..formats.onnx_dir import ADAPTER_FILE, MANIFEST, MODEL_FILE
from .engine import Engine, GenerateOptions
from .genai_engine import GenaiEngine
from .ort_engine import OrtEngine, load_onnx_adapter
from .providers import PROVIDERS, create_session, cuda_usable
from .safety import check_onnx_dir
from .server import OnnxServer, infer

__all__ = [
    "ADAPTER_FILE",
    "MANIFEST",
    "MODEL_FILE",
    "PROVIDERS",
    "Engine",
    "GenaiEngine",
    "GenerateOptions",
    "OnnxServer",
    "OrtEngine",
    "check_onnx_dir",
    "create_session",
    "cuda_usable",
    "infer",
    "load_onnx_adapter",
]
