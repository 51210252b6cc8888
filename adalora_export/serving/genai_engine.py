"""onnxruntime-genai's generator over the builder's optimized graphs (fused attention over a shared
cache buffer, int4 weights): it owns the cache and the search, we only feed prompts and read tokens.

Adapters (graphs built with adapter inputs) are ``og.Adapters`` holding one ``.onnx_adapter`` under
one name, activated on each generator; with no adapter the engine holds none. A plain forward pass is
not offered: the graph's inputs are onnxruntime-genai's (cache buffers it sizes itself).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..formats.onnx_dir import import_onnxruntime_genai
from .engine import Engine, GenerateOptions

_ACTIVE = "active"  # the name the active adapter is loaded under


class GenaiEngine(Engine):
    """An ``onnxruntime_genai.Model`` over ``onnx_dir`` and the active adapter, if any."""

    def __init__(self, onnx_dir: Path, manifest: dict):
        og = import_onnxruntime_genai()
        self.onnx_dir, self.manifest = onnx_dir, manifest
        self.genai_model = og.Model(str(onnx_dir))
        self.adapters = None  # og.Adapters holding the active adapter, only while one is active

    @property
    def provider(self) -> str:
        return "CUDAExecutionProvider" if self.manifest.get("target") == "cuda" else "CPUExecutionProvider"

    def set_adapter(self, path: str | os.PathLike | None) -> None:
        if path is None:
            self.adapters = None  # released: generators run the base graph
            return
        adapters = import_onnxruntime_genai().Adapters(self.genai_model)
        try:
            adapters.load(str(path), _ACTIVE)
        except RuntimeError as exc:
            raise UserError(f"{path} does not fit the graph in {self.onnx_dir}: {str(exc).splitlines()[0]}") from None
        self.adapters = adapters

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise UserError(
            f"{self.onnx_dir} holds an optimized graph, which runs through onnxruntime-genai only: use "
            "generate or stream, or genai_model for onnxruntime-genai's own API (no plain forward pass)"
        )

    def generate_batch_ids(
        self, batch: list[list[int]], max_new_tokens: int, options: GenerateOptions
    ) -> Iterator[list[int | None]]:
        """One generator per prompt length, stepped together.

        Rows of one length share a generator (one graph run per step for all of them). Rows are not
        padded into one: onnxruntime-genai's left padding shifts a padded row's positions, so it would
        not get what it gets alone (measured: other tokens on a random-weight model).
        """
        eos = options.end_ids(self.manifest)
        groups: dict[int, list[int]] = {}
        for row, ids in enumerate(batch):
            groups.setdefault(len(ids), []).append(row)
        generators = [
            (rows, self._generator([batch[r] for r in rows], max_new_tokens, options)) for rows in groups.values()
        ]
        done = [max_new_tokens == 0] * len(batch)
        while not all(done):
            step: list[int | None] = [None] * len(batch)
            for rows, generator in generators:
                if all(done[r] for r in rows) or generator.is_done():
                    for r in rows:
                        done[r] = True
                    continue
                generator.generate_next_token()
                for r, token in zip(rows, generator.get_next_tokens()):
                    if not done[r]:
                        step[r] = int(token)
                        done[r] = int(token) in eos
            if any(t is not None for t in step):
                yield step

    def _generator(self, prompts: list[list[int]], max_new_tokens: int, options: GenerateOptions):
        """A generator over prompts of one length, with the active adapter, the prompts appended."""
        og = import_onnxruntime_genai()
        params = og.GeneratorParams(self.genai_model)
        length = len(prompts[0]) + max_new_tokens
        search = {"batch_size": len(prompts), "max_length": length, "do_sample": options.do_sample}
        if options.do_sample:
            search["temperature"] = options.temperature
            # No top_k: the whole vocabulary, as our own loop draws (0; not the config's default of 50).
            search["top_k"] = options.top_k or 0
            if options.top_p < 1.0:
                search["top_p"] = options.top_p
            if options.seed is not None:
                search["random_seed"] = options.seed
        if options.repetition_penalty != 1.0:
            search["repetition_penalty"] = options.repetition_penalty
        params.set_search_options(**search)
        generator = og.Generator(self.genai_model, params)
        if self.adapters is not None:
            generator.set_active_adapter(self.adapters, _ACTIVE)
        generator.append_tokens(np.asarray(prompts, dtype=np.int32))
        return generator
