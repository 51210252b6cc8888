"""``OnnxServer``: one exported directory, many requests; ``infer``: the ``infer`` command as one call."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..formats.onnx_dir import OnnxKind, takes_adapters
from .engine import Engine, GenerateOptions
from .genai_engine import GenaiEngine
from .ort_engine import OrtEngine
from .safety import check_onnx_dir


def open_engine(onnx_dir: Path, model_path: Path, manifest: dict, provider: str, threads: int | None) -> Engine:
    """The engine for a checked directory: onnxruntime-genai for the builder's optimized graphs (it owns
    their shared cache buffer and the search), else our loop over an onnxruntime session."""
    if manifest["kind"] == OnnxKind.OPTIMIZED.value:
        return GenaiEngine(onnx_dir, manifest)
    return OrtEngine(model_path, manifest, provider, threads)


class OnnxServer:
    """One loaded graph over an exported directory, for many requests."""

    def __init__(
        self,
        onnx_dir: str | os.PathLike,
        provider: str = "auto",
        adapter: str | os.PathLike | None = None,
        threads: int | None = None,
    ):
        self.onnx_dir = Path(onnx_dir)
        model_path, self.manifest = check_onnx_dir(self.onnx_dir)
        self.task = self.manifest["task"]
        self.engine = open_engine(self.onnx_dir, model_path, self.manifest, provider, threads)
        self._tokenizer = None
        self.set_adapter(adapter)

    @property
    def provider(self) -> str:
        return self.engine.provider

    @property
    def session(self):
        """The onnxruntime InferenceSession (None for optimized graphs, which onnxruntime-genai runs)."""
        return self.engine.session

    @property
    def genai_model(self):
        """The ``onnxruntime_genai.Model`` this server drives (optimized graphs), else None: for
        callers that want onnxruntime-genai's own API on the model already loaded."""
        return self.engine.genai_model

    @property
    def with_past(self) -> bool:
        return bool(self.manifest.get("with_past"))

    def set_adapter(self, path: str | os.PathLike | None) -> None:
        """Activate an ``.onnx_adapter`` for the following requests (None: the base model)."""
        if path is not None and not takes_adapters(self.manifest):
            raise UserError(f"{self.onnx_dir} was exported without --adapter-inputs; it takes no adapter file")
        self.engine.set_adapter(path)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            try:
                self._tokenizer = AutoTokenizer.from_pretrained(
                    str(self.onnx_dir), local_files_only=True, trust_remote_code=False
                )
            except (OSError, ValueError) as exc:
                raise UserError(f"no usable tokenizer in {self.onnx_dir}: {str(exc).splitlines()[0]}") from None
        return self._tokenizer

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One forward pass; only the inputs the graph takes are fed, with the active adapter if any.
        (Not for optimized graphs: onnxruntime-genai runs those, through ``generate`` / ``stream``.)"""
        return self.engine.run(feeds)

    # -- causal LMs --------------------------------------------------------------------------

    def generate_batch_ids(
        self,
        batch: list[list[int]],
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        seed: int | None = None,
        use_cache: bool = True,
    ) -> Iterator[list[int | None]]:
        """Generate for several prompts at once; yields, per step, each row's new token (None once the
        row has ended with an end-of-sequence token, which is kept).

        Each row gets what it would alone (see the engines). Greedy, or with ``do_sample`` a draw seeded
        by ``seed`` from softmax(logits / temperature) over the top_k best; ``use_cache``: through the
        KV cache when the graph has one.
        """
        if self.task != "causal_lm":
            raise UserError(f"{self.onnx_dir} holds a {self.task} graph; generation needs a causal LM")
        if max_new_tokens < 0:
            raise UserError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if do_sample and not temperature > 0:
            raise UserError(f"temperature must be > 0, got {temperature}")
        if not batch or any(len(ids) == 0 for ids in batch):
            raise UserError("every prompt needs at least one token")
        options = GenerateOptions(do_sample, temperature, top_k, seed, use_cache)
        yield from self.engine.generate_batch_ids(batch, max_new_tokens, options)

    def generate_ids(self, input_ids: list[int], max_new_tokens: int = 32, **options) -> list[int]:
        """New token ids after ``input_ids`` (see ``generate_batch_ids`` for the options)."""
        return [step[0] for step in self.generate_batch_ids([list(input_ids)], max_new_tokens, **options)]

    def generate(
        self,
        prompt: str | list[str],
        max_new_tokens: int = 32,
        on_text: Callable[[int, str], None] | None = None,
        **options,
    ) -> str | list[str]:
        """The text generated after ``prompt`` (or after each of a list of prompts, in one batch).

        ``on_text(row, piece)`` is called with each piece of text as soon as it is decoded; the
        options are ``generate_batch_ids``'s.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        new: list[list[int]] = [[] for _ in prompts]
        for row, piece in self._pieces(prompts, new, max_new_tokens, **options):
            if on_text is not None:
                on_text(row, piece)
        texts = [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in new]
        return texts[0] if isinstance(prompt, str) else texts

    def stream(self, prompt: str, max_new_tokens: int = 32, **options) -> Iterator[str]:
        """The text generated after ``prompt``, piece by piece as each token is decoded."""
        for _, piece in self._pieces([prompt], [[]], max_new_tokens, **options):
            yield piece

    def _pieces(
        self, prompts: list[str], new: list[list[int]], max_new_tokens: int, **options
    ) -> Iterator[tuple[int, str]]:
        """(row, new text) as tokens arrive; ``new`` collects each row's token ids."""
        batch = [self.tokenizer(p)["input_ids"] for p in prompts]
        shown = [""] * len(prompts)
        for step in self.generate_batch_ids(batch, max_new_tokens, **options):
            for row, token in enumerate(step):
                if token is None:
                    continue
                new[row].append(token)
                # Decode the whole tail: a character may span tokens, and a piece is only what it adds.
                text = self.tokenizer.decode(new[row], skip_special_tokens=True)
                if text != shown[row] and text.startswith(shown[row]):
                    yield row, text[len(shown[row]) :]
                    shown[row] = text

    # -- encoders and classifiers -------------------------------------------------------------

    @property
    def max_length(self) -> int | None:
        """Tokens per text the model was trained with (texts are truncated to it), if the export knows."""
        return self.manifest.get("max_length")

    def _encode(self, texts: list[str]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        # Truncate as training did (its first max_length tokens), so served predictions match evaluation.
        cut = {"truncation": True, "max_length": self.max_length} if self.max_length else {}
        enc = self.tokenizer(texts, padding=True, return_tensors="np", **cut)
        feeds = {name: np.asarray(value, dtype=np.int64) for name, value in enc.items()}
        if "token_type_ids" in self.engine.input_names and "token_type_ids" not in feeds:
            feeds["token_type_ids"] = np.zeros_like(feeds["input_ids"])
        return feeds, self.run(feeds)

    def classify(self, text: str | list[str]) -> list[dict]:
        """Per text: the predicted label, its probability and all probabilities by label; ``truncated``
        says whether the text was cut to the training length (``max_length``)."""
        if self.task != "seq_cls":
            raise UserError(f"{self.onnx_dir} holds a {self.task} graph; classify needs a sequence classifier")
        texts = [text] if isinstance(text, str) else list(text)
        _, out = self._encode(texts)
        lengths = [len(ids) for ids in self.tokenizer(texts)["input_ids"]]  # before truncation
        logits = out["logits"].astype(np.float64)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        labels = self.manifest.get("labels") or {}
        results = []
        for row, length in zip(probs, lengths):
            names = [labels.get(str(i), str(i)) for i in range(len(row))]
            best = int(row.argmax())
            result = {"label": names[best], "score": float(row[best]), "scores": dict(zip(names, row.tolist()))}
            if self.max_length:
                result["truncated"] = length > self.max_length
            results.append(result)
        return results

    def embed(self, text: str | list[str]) -> np.ndarray:
        """Mean of the last hidden state over each text's tokens (sentence-transformers' pooling), fp32."""
        if self.task != "encoder":
            raise UserError(f"{self.onnx_dir} holds a {self.task} graph; embed needs an encoder")
        texts = [text] if isinstance(text, str) else list(text)
        feeds, out = self._encode(texts)
        hidden = out["last_hidden_state"].astype(np.float32)
        mask = feeds["attention_mask"][..., None].astype(np.float32)
        return (hidden * mask).sum(1) / np.maximum(mask.sum(1), 1.0)


def infer(
    onnx_dir: str | os.PathLike,
    *,
    prompt: str | None = None,
    text: str | None = None,
    adapter: str | os.PathLike | None = None,
    provider: str = "auto",
    max_new_tokens: int = 32,
    sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int | None = None,
    on_text: Callable[[str], None] | None = None,
) -> str:
    """The line ``adalora-export infer`` prints: the text generated after ``prompt`` (causal LM), or for
    ``text`` a JSON classification (sequence classifier) or a JSON mean-pooled embedding (encoder).
    ``on_text`` receives the generated text piece by piece as it is decoded (streaming)."""
    if (prompt is None) == (text is None):
        raise UserError("give exactly one of --prompt (causal LM) or --text (classifier, encoder)")
    server = OnnxServer(onnx_dir, provider=provider, adapter=adapter)
    if prompt is not None:
        options = dict(do_sample=sample, temperature=temperature, top_k=top_k, seed=seed)
        stream = (lambda _, piece: on_text(piece)) if on_text is not None else None
        return server.generate(prompt, max_new_tokens, on_text=stream, **options)
    if server.task == "seq_cls":
        return json.dumps(server.classify(text)[0])
    return json.dumps({"embedding": server.embed(text)[0].round(6).tolist()})
