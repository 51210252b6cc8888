"""Our own generation loop over one onnxruntime session: the graphs we export (merged, rank-compact,
adapter inputs), with or without a KV cache.

Adapters are ``.onnx_adapter`` files applied through ``RunOptions.add_active_adapter`` on plain ``run``
(onnxruntime ignores active adapters in ``run_with_iobinding``). A batch is left-padded to one width
(padding carries no attention; positions count real tokens only), so each row gets what it would alone.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..errors import UserError
from .engine import Engine, GenerateOptions
from .providers import open_session


def load_onnx_adapter(path: str | os.PathLike):
    """Memory-map an ``.onnx_adapter`` file as an ``onnxruntime.LoraAdapter``."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise UserError(f"missing file {path}")
    adapter = ort.LoraAdapter()
    try:
        adapter.Load(str(path))
    except Exception as exc:
        raise UserError(f"{path} is not a valid onnxruntime adapter file ({str(exc).splitlines()[0]})") from None
    return adapter


class OrtEngine(Engine):
    """An onnxruntime session over ``model_path`` and the loop that generates with it."""

    def __init__(self, model_path: Path, manifest: dict, provider: str = "auto", threads: int | None = None):
        self.manifest = manifest
        self.session = open_session(model_path, provider, threads)
        self.input_names = frozenset(i.name for i in self.session.get_inputs())
        self._output_names = [o.name for o in self.session.get_outputs()]
        self._float = np.float16 if manifest["dtype"] == "fp16" else np.float32
        self._with_past = bool(manifest.get("with_past"))
        self._run_options = self._lora = None

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    def set_adapter(self, path: str | os.PathLike | None) -> None:
        import onnxruntime as ort

        if path is None:
            self._run_options = self._lora = None
            return
        lora = load_onnx_adapter(path)
        options = ort.RunOptions()
        options.add_active_adapter(lora)
        self._run_options, self._lora = options, lora  # the adapter lives as long as the options use it

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One forward pass; only the inputs the graph takes are fed, with the active adapter if any."""
        feeds = {name: value for name, value in feeds.items() if name in self.input_names}
        return dict(zip(self._output_names, self.session.run(None, feeds, self._run_options)))

    def generate_batch_ids(
        self, batch: list[list[int]], max_new_tokens: int, options: GenerateOptions
    ) -> Iterator[list[int | None]]:
        rng = np.random.default_rng(options.seed)
        pad = self.manifest.get("pad_token_id") or next(iter(set(self.manifest.get("eos_token_ids") or [])), 0)
        eos = options.end_ids(self.manifest)
        seen = [set(ids) for ids in batch]  # the tokens a repetition penalty applies to (prompt included)
        width = max(len(ids) for ids in batch)
        sequences = np.asarray([[pad] * (width - len(ids)) + list(ids) for ids in batch], dtype=np.int64)
        mask = np.asarray([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], dtype=np.int64)
        cached = options.use_cache and self._with_past
        fresh, past, done = sequences, None, [False] * len(batch)
        for _ in range(max_new_tokens):
            # With the cache, only the tokens the graph has not seen yet are fed.
            logits, presents = self._step(fresh if cached else sequences, mask, past if cached else None)
            past = presents if cached else None
            step = [None if done[i] else _pick(row, options, rng, seen[i]) for i, row in enumerate(logits)]
            done = [d or t in eos for d, t in zip(done, step)]
            for row, token in zip(seen, step):
                if token is not None:
                    row.add(token)
            yield step
            if all(done):
                return
            fresh = np.asarray([[pad if t is None else t] for t in step], dtype=np.int64)
            sequences = np.concatenate([sequences, fresh], axis=1)
            mask = np.concatenate([mask, np.ones((len(batch), 1), dtype=np.int64)], axis=1)

    def _step(self, ids: np.ndarray, mask: np.ndarray, past: list[np.ndarray] | None) -> tuple[np.ndarray, list]:
        """Logits of the last position, and the new cache (when the graph has one)."""
        # Positions count real tokens only, so a left-padded row is where it would be alone.
        positions = np.clip(mask.cumsum(-1) - 1, 0, None)[:, -ids.shape[1] :].astype(np.int64)
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        if self._with_past:
            if past is None:
                past = self._empty_past(ids.shape[0])
            feeds.update(zip(self.manifest["cache"]["inputs"], past))
        out = self.run(feeds)
        presents = [out[name] for name in self.manifest["cache"]["outputs"]] if self._with_past else []
        return out["logits"][:, -1].astype(np.float32), presents

    def _empty_past(self, batch: int) -> list[np.ndarray]:
        cache = self.manifest["cache"]
        shape = (batch, cache["num_kv_heads"], 0, cache["head_dim"])
        return [np.zeros(shape, self._float) for _ in cache["inputs"]]


def _pick(logits: np.ndarray, options: GenerateOptions, rng, seen: set[int] = frozenset()) -> int:
    """Greedy argmax, or a draw from softmax(logits / temperature) over the top_k candidates and then
    the nucleus of probability top_p; a repetition penalty first (on the tokens in ``seen``), as
    transformers' logits processors order them."""
    if options.repetition_penalty != 1.0 and seen:
        logits = logits.copy()
        index = np.fromiter(seen, dtype=np.int64, count=len(seen))
        chosen = logits[index]
        logits[index] = np.where(chosen < 0, chosen * options.repetition_penalty, chosen / options.repetition_penalty)
    if not options.do_sample:
        return int(np.argmax(logits))
    scores = logits.astype(np.float64) / options.temperature
    top_k = options.top_k
    if top_k:
        cutoff = np.partition(scores, -top_k)[-top_k] if top_k < scores.size else -np.inf
        scores = np.where(scores >= cutoff, scores, -np.inf)
    probs = np.exp(scores - scores.max())
    probs /= probs.sum()
    if options.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        before = np.cumsum(probs[order]) - probs[order]  # the mass of the better candidates
        drop = order[before >= options.top_p]  # the best one always stays (before == 0)
        probs[drop] = 0.0
        probs /= probs.sum()
    return int(rng.choice(scores.size, p=probs))
