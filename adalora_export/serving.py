"""Serving exported graphs with onnxruntime: one session, many requests.

``OnnxServer(onnx_dir)`` holds the session, the tokenizer and (optionally) an active
``.onnx_adapter``; ``generate`` for causal LMs (greedy or sampling, through the KV cache when the
graph has one), ``classify`` and ``embed`` for encoders. Adapters are applied through
``RunOptions.add_active_adapter`` on plain ``run`` (onnxruntime ignores active adapters in
``run_with_iobinding``). ``infer`` is the ``adalora-export infer`` command as one call.

The directory layout (file names, manifest) is the exporter's, read through
``adalora_export.converters.onnx.layout``; the runtime adds its own safety check of the graph's
external data before onnxruntime reads it.
"""

from __future__ import annotations

import ctypes
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from .errors import UserError
from .formats.onnx_dir import (
    ADAPTER_FILE,
    MANIFEST,
    MODEL_FILE,
    OnnxKind,
    import_onnxruntime_genai,
    open_onnx_dir,
)

__all__ = [
    "ADAPTER_FILE",
    "MANIFEST",
    "MODEL_FILE",
    "PROVIDERS",
    "OnnxServer",
    "check_onnx_dir",
    "create_session",
    "cuda_usable",
    "infer",
    "load_onnx_adapter",
]
PROVIDERS = ("auto", "cuda", "cpu")
_QUIET = 3  # onnxruntime log severity: errors only (no "initializer in graph inputs" warnings)


def check_onnx_dir(onnx_dir: str | os.PathLike) -> tuple[Path, dict]:
    """Validate an exported directory and return (model path, manifest).

    Refuses a config that asks for remote code, and external-data locations that leave the directory
    (``..``, absolute paths, symlinks) in any tensor of the graph (initializers, constants, subgraphs):
    onnxruntime would otherwise read whatever file such a graph names.
    """
    import onnx

    onnx_dir = Path(onnx_dir)
    model_path, manifest = open_onnx_dir(onnx_dir)
    try:
        graph = onnx.load(str(model_path), load_external_data=False)
    except Exception as exc:  # protobuf decode errors have several types
        raise UserError(f"{model_path} is not a valid ONNX file ({str(exc).splitlines()[0]})") from None
    root = onnx_dir.resolve()
    for tensor in _all_tensors(graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = onnx_dir / location
        if (
            not location
            or os.path.isabs(location)
            or ".." in Path(location).parts
            or target.is_symlink()
            or root not in target.resolve().parents
        ):
            raise UserError(
                f"{model_path}: tensor {tensor.name} points at external data {location!r} outside {onnx_dir}"
            )
        if not target.is_file():
            raise UserError(f"missing file {target} (external data of {model_path})")
    return model_path, manifest


def _all_tensors(model):
    """Every TensorProto of a model: initializers, sparse ones, node attributes, subgraphs, functions."""

    def of_nodes(nodes):
        for node in nodes:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                for sparse in [attr.sparse_tensor] if attr.HasField("sparse_tensor") else []:
                    yield from (sparse.values, sparse.indices)
                for sub in [attr.g] if attr.HasField("g") else []:
                    yield from of_graph(sub)
                for sub in attr.graphs:
                    yield from of_graph(sub)

    def of_graph(graph):
        yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield from (sparse.values, sparse.indices)
        yield from of_nodes(graph.node)

    yield from of_graph(model.graph)
    for function in model.functions:
        yield from of_nodes(function.node)


def cuda_usable() -> bool:
    """True when onnxruntime's CUDA provider would really load: a GPU, its driver and the CUDA libraries.

    Checked quietly with the dynamic loader: onnxruntime-gpu itself logs errors when it tries and fails.
    """
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    try:
        driver = ctypes.CDLL("libcuda.so.1")
        count = ctypes.c_int(0)
        if driver.cuInit(0) != 0 or driver.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value < 1:
            return False
        capi = Path(ort.__file__).parent / "capi"
        ctypes.CDLL(str(capi / "libonnxruntime_providers_shared.so"), mode=ctypes.RTLD_GLOBAL)
        ctypes.CDLL(str(capi / "libonnxruntime_providers_cuda.so"))
    except (OSError, AttributeError):
        return False
    return True


def create_session(model_path: str | os.PathLike, provider: str = "auto", threads: int | None = None):
    """An InferenceSession on ``provider`` (auto: CUDA when it really loads, else the CPU, silently)."""
    import onnxruntime as ort

    if provider not in PROVIDERS:
        raise UserError(f"unknown provider {provider!r}: expected one of {', '.join(PROVIDERS)}")
    use_cuda = provider != "cpu" and cuda_usable()
    if provider == "cuda" and not use_cuda:
        raise UserError("--provider cuda: no usable CUDA GPU (driver, CUDA libraries or onnxruntime-gpu missing)")
    options = ort.SessionOptions()
    options.log_severity_level = _QUIET
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if use_cuda else ["CPUExecutionProvider"]
    session = ort.InferenceSession(str(model_path), sess_options=options, providers=providers)
    if provider == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
        raise UserError("--provider cuda: onnxruntime could not start its CUDA provider")
    return session


def _open_session(model_path: Path, provider: str, threads: int | None):
    """``create_session`` for a graph handed to us: onnxruntime's refusal to load it (damaged or truncated
    graph or weights) is bad input. (At export time the same failure would be our bug.)"""
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

    refused = (ort_errors.Fail, ort_errors.InvalidGraph, ort_errors.InvalidProtobuf, ort_errors.NoSuchFile)
    try:
        return create_session(model_path, provider, threads)
    except refused as exc:
        raise UserError(f"onnxruntime cannot load {model_path}: {str(exc).splitlines()[0]}") from None


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


class OnnxServer:
    """One onnxruntime session over an exported directory, for many requests."""

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
        self._genai = self._genai_adapter = None
        if self.manifest["kind"] == OnnxKind.OPTIMIZED.value:
            # The builder's graph (fused attention over a shared cache buffer) is driven by its own
            # runtime, onnxruntime-genai, which owns the cache and the search.
            og = import_onnxruntime_genai()
            self._genai = og.Model(str(self.onnx_dir))
            self.session, self._input_types = None, {}
        else:
            self.session = _open_session(model_path, provider, threads)
            self._input_types = {i.name: i.type for i in self.session.get_inputs()}
        self._float = np.float16 if self.manifest["dtype"] == "fp16" else np.float32
        self._tokenizer = None
        self._run_options = None
        self.set_adapter(adapter)

    @property
    def provider(self) -> str:
        if self._genai is not None:
            return "CUDAExecutionProvider" if self.manifest.get("target") == "cuda" else "CPUExecutionProvider"
        return self.session.get_providers()[0]

    @property
    def genai_model(self):
        """The ``onnxruntime_genai.Model`` this server drives (optimized graphs), else None: for
        callers that want onnxruntime-genai's own API on the model already loaded."""
        return self._genai

    @property
    def with_past(self) -> bool:
        return bool(self.manifest.get("with_past"))

    def set_adapter(self, path: str | os.PathLike | None) -> None:
        """Activate an ``.onnx_adapter`` for the following requests (None: the base model)."""
        import onnxruntime as ort

        if path is None:
            self._run_options = self._genai_adapter = None
            return
        if self._genai is not None and self.manifest.get("adapter_inputs"):
            og = import_onnxruntime_genai()
            self._genai_adapters = og.Adapters(self._genai)
            try:
                self._genai_adapters.load(str(path), "active")
            except RuntimeError as exc:
                raise UserError(
                    f"{path} does not fit the graph in {self.onnx_dir}: {str(exc).splitlines()[0]}"
                ) from None
            self._genai_adapter = "active"
            return
        if self.manifest["kind"] != OnnxKind.ADAPTER_INPUTS.value:
            raise UserError(f"{self.onnx_dir} was exported without --adapter-inputs; it takes no adapter file")
        options = ort.RunOptions()
        self._lora = load_onnx_adapter(path)  # keep it alive as long as the options use it
        options.add_active_adapter(self._lora)
        self._run_options = options

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
        """One forward pass; only the inputs the graph takes are fed, with the active adapter if any."""
        feeds = {name: value for name, value in feeds.items() if name in self._input_types}
        outputs = self.session.run(None, feeds, self._run_options)
        return dict(zip([o.name for o in self.session.get_outputs()], outputs))

    # -- causal LMs --------------------------------------------------------------------------

    def _step(self, ids: np.ndarray, mask: np.ndarray, past: list[np.ndarray] | None) -> tuple[np.ndarray, list]:
        """Logits of the last position, and the new cache (when the graph has one)."""
        # Positions count real tokens only, so a left-padded row is where it would be alone.
        positions = np.clip(mask.cumsum(-1) - 1, 0, None)[:, -ids.shape[1] :].astype(np.int64)
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        if self.with_past:
            if past is None:
                past = self._empty_past(ids.shape[0])
            cache = self.manifest["cache"]
            feeds.update(zip(cache["inputs"], past))
        out = self.run(feeds)
        presents = [out[name] for name in self.manifest["cache"]["outputs"]] if self.with_past else []
        return out["logits"][:, -1].astype(np.float32), presents

    def _empty_past(self, batch: int) -> list[np.ndarray]:
        cache = self.manifest["cache"]
        shape = (batch, cache["num_kv_heads"], 0, cache["head_dim"])
        return [np.zeros(shape, self._float) for _ in cache["inputs"]]

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

        Prompts are left-padded to one width (padding carries no attention; positions count real
        tokens only), so each row gets what it would alone, one graph run per step for all of them.
        """
        if self.task != "causal_lm":
            raise UserError(f"{self.onnx_dir} holds a {self.task} graph; generation needs a causal LM")
        if max_new_tokens < 0:
            raise UserError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if do_sample and not temperature > 0:
            raise UserError(f"temperature must be > 0, got {temperature}")
        if not batch or any(len(ids) == 0 for ids in batch):
            raise UserError("every prompt needs at least one token")
        if self._genai is not None:
            yield from self._genai_steps(batch, max_new_tokens, do_sample, temperature, top_k, seed)
            return
        rng = np.random.default_rng(seed)
        eos = set(self.manifest.get("eos_token_ids") or [])
        pad = self.manifest.get("pad_token_id") or next(iter(eos), 0)
        width = max(len(ids) for ids in batch)
        sequences = np.asarray([[pad] * (width - len(ids)) + list(ids) for ids in batch], dtype=np.int64)
        mask = np.asarray([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], dtype=np.int64)
        cached = use_cache and self.with_past
        fresh, past, done = sequences, None, [False] * len(batch)
        for _ in range(max_new_tokens):
            # With the cache, only the tokens the graph has not seen yet are fed.
            logits, presents = self._step(fresh if cached else sequences, mask, past if cached else None)
            past = presents if cached else None
            step = [None if done[i] else _pick(row, do_sample, temperature, top_k, rng) for i, row in enumerate(logits)]
            done = [d or t in eos for d, t in zip(done, step)]
            yield step
            if all(done):
                return
            fresh = np.asarray([[pad if t is None else t] for t in step], dtype=np.int64)
            sequences = np.concatenate([sequences, fresh], axis=1)
            mask = np.concatenate([mask, np.ones((len(batch), 1), dtype=np.int64)], axis=1)

    def _genai_steps(
        self, batch: list[list[int]], max_new_tokens: int, do_sample: bool, temperature: float, top_k, seed
    ) -> Iterator[list[int | None]]:
        """``generate_batch_ids`` on onnxruntime-genai: one generator per prompt length, stepped together.

        Rows of one length share a generator (one graph run per step for all of them). Rows are not
        padded into one: onnxruntime-genai's left padding shifts a padded row's positions, so it would
        not get what it gets alone (measured: other tokens on a random-weight model).
        """
        og = import_onnxruntime_genai()
        eos = set(self.manifest.get("eos_token_ids") or [])
        groups: dict[int, list[int]] = {}
        for row, ids in enumerate(batch):
            groups.setdefault(len(ids), []).append(row)
        generators = []
        for length, rows in groups.items():
            params = og.GeneratorParams(self._genai)
            search = {"batch_size": len(rows), "max_length": length + max_new_tokens, "do_sample": do_sample}
            if do_sample:
                search["temperature"] = temperature
                if top_k:
                    search["top_k"] = top_k
                if seed is not None:
                    search["random_seed"] = seed
            params.set_search_options(**search)
            generator = og.Generator(self._genai, params)
            if self._genai_adapter is not None:
                generator.set_active_adapter(self._genai_adapters, self._genai_adapter)
            generator.append_tokens(np.asarray([batch[r] for r in rows], dtype=np.int32))
            generators.append((rows, generator))
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
        if "token_type_ids" in self._input_types and "token_type_ids" not in feeds:
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


def _pick(logits: np.ndarray, do_sample: bool, temperature: float, top_k: int | None, rng) -> int:
    """Greedy argmax, or a draw from softmax(logits / temperature) over the top_k candidates."""
    if not do_sample:
        return int(np.argmax(logits))
    scores = logits.astype(np.float64) / temperature
    if top_k:
        cutoff = np.partition(scores, -top_k)[-top_k] if top_k < scores.size else -np.inf
        scores = np.where(scores >= cutoff, scores, -np.inf)
    probs = np.exp(scores - scores.max())
    probs /= probs.sum()
    return int(rng.choice(scores.size, p=probs))


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
