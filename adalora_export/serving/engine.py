"""The one interface ``OnnxServer`` drives, whichever runtime runs the graph.

An engine holds one loaded graph and the active adapter: ``run`` is one forward pass,
``generate_batch_ids`` the token loop (the server checks the request first), ``set_adapter`` swaps the
adapter (the server checks first that the graph takes adapters). ``OrtEngine`` is our own loop over an
onnxruntime session; ``GenaiEngine`` drives onnxruntime-genai (the builder's optimized graphs).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class GenerateOptions:
    """How each new token is chosen: the argmax, or (``do_sample``) a draw seeded by ``seed`` from
    softmax(logits / ``temperature``) over the ``top_k`` best, then the smallest set of those whose
    probabilities sum to ``top_p`` (nucleus). ``repetition_penalty`` (greedy and sampling, CTRL's rule as
    transformers and onnxruntime-genai apply it) divides a positive logit, and multiplies a negative
    one, of every token already in the sequence, prompt included. A row ends at an end-of-sequence
    token of the manifest or one of ``stop_token_ids`` (a chat template's end of turn), which is kept.
    ``use_cache``: feed only the tokens the graph has not seen through its KV cache, when it has one
    (onnxruntime-genai always does)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    seed: int | None = None
    use_cache: bool = True
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop_token_ids: frozenset[int] = frozenset()

    def end_ids(self, manifest: dict) -> set[int]:
        """The tokens that end a row: the manifest's end-of-sequence ids and ``stop_token_ids``."""
        return set(manifest.get("eos_token_ids") or []) | set(self.stop_token_ids)


class Engine(ABC):
    """One loaded graph and its active adapter, for many requests."""

    session = None  # the onnxruntime InferenceSession, when the engine runs one itself
    genai_model = None  # the onnxruntime_genai.Model, when onnxruntime-genai drives the graph
    input_names: frozenset[str] = frozenset()  # the graph inputs ``run`` feeds

    @property
    @abstractmethod
    def provider(self) -> str:
        """The execution provider the graph runs on (``CUDAExecutionProvider``, ``CPUExecutionProvider``)."""

    @abstractmethod
    def set_adapter(self, path: str | os.PathLike | None) -> None:
        """Activate an ``.onnx_adapter`` for the following requests; None: the base model, holding no adapter."""

    @abstractmethod
    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One forward pass with the active adapter; outputs by name."""

    @abstractmethod
    def generate_batch_ids(
        self, batch: list[list[int]], max_new_tokens: int, options: GenerateOptions
    ) -> Iterator[list[int | None]]:
        """Per step, each row's new token (None once the row has ended with an end-of-sequence token)."""
