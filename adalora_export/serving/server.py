"""``OnnxServer``: one exported directory, many requests; ``infer``: the ``infer`` command as one call."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..formats.onnx_dir import ADAPTER_FILE, OnnxKind, takes_adapters
from ..io import read_json
from .engine import Engine, GenerateOptions
from .genai_engine import GenaiEngine
from .ort_engine import OrtEngine
from .safety import check_adapter_file, check_onnx_dir
from .text import RowText
from .tokenizer import end_of_turn_ids, load_tokenizer

SAMPLING_FLAGS = ("temperature", "top_k", "top_p", "seed")  # what only a draw (--sample) reads


def check_flags(onnx_dir: Path, manifest: dict, provider: str = "auto", sample: bool = False, **given) -> None:
    """The one rule for options that do not apply to a request (the CLI's exit 2, one line).

    ``given``: the options the caller set (None or empty: not given): ``prompt``, ``chat``, ``text``,
    ``system``, ``stop``, ``repetition_penalty`` and the sampling options (``SAMPLING_FLAGS``), which
    apply only with ``sample``. An optimized graph runs on the provider it was built for (``export
    --target``): ``provider`` must be auto or that one.
    """
    task = manifest["task"]
    given_ = {name for name, value in given.items() if value is not None and value != () and value != []}
    causal = task == "causal_lm"
    holds = f"{onnx_dir} holds a {task} graph"
    generation = "applies only to generation (--prompt, --chat)"
    rules = [  # (flag, whether it applies, why not)
        *[(name, sample, "applies only with --sample") for name in SAMPLING_FLAGS],
        ("prompt", causal, f"needs a causal LM; {holds} (use --text)"),
        ("chat", causal, f"needs a causal LM; {holds} (use --text)"),
        ("text", not causal, f"needs a classifier or an encoder; {holds} (use --prompt or --chat)"),
        ("system", "chat" in given_, "applies only with --chat"),
        ("stop", "text" not in given_, generation),
        ("repetition_penalty", "text" not in given_, generation),
        ("sample", "text" not in given_, generation),
    ]
    if sample:
        given_.add("sample")
    for name, applies, why in rules:
        if name in given_ and not applies:
            raise UserError(f"--{name} {why}")
    target = manifest.get("target") or "cpu"
    if manifest["kind"] == OnnxKind.OPTIMIZED.value and provider not in ("auto", target):
        raise UserError(
            f"--provider {provider} does not apply: {onnx_dir} holds an optimized graph built for {target} "
            "(its provider is fixed at build time: export --target)"
        )


def open_engine(onnx_dir: Path, model_path: Path, manifest: dict, provider: str, threads: int | None) -> Engine:
    """The engine for a checked directory: onnxruntime-genai for the builder's optimized graphs (it owns
    their shared cache buffer and the search), else our loop over an onnxruntime session."""
    check_flags(onnx_dir, manifest, provider)
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
        self._end_of_turn: frozenset[int] | None = None
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
        if path is not None:
            check_adapter_file(path, self.manifest, self.onnx_dir)
        self.engine.set_adapter(path)
        self.adapter = None if path is None else Path(path)

    @property
    def tokenizer(self):
        """The directory's tokenizer, read without torch where it has a ``tokenizer.json`` (``tokenizer.py``)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.onnx_dir)
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
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        stop_token_ids: Sequence[int] = (),
    ) -> Iterator[list[int | None]]:
        """Generate for several prompts at once; yields, per step, each row's new token (None once the
        row has ended with an end-of-sequence token or one of ``stop_token_ids``, which is kept).

        Each row gets what it would alone (see the engines). Greedy, or with ``do_sample`` a draw seeded
        by ``seed`` from softmax(logits / temperature) over the top_k best, then their nucleus of
        probability ``top_p``; ``repetition_penalty`` (> 1 discourages tokens already in the sequence)
        applies to both; ``use_cache``: through the KV cache when the graph has one.
        """
        if self.task != "causal_lm":
            raise UserError(f"{self.onnx_dir} holds a {self.task} graph; generation needs a causal LM")
        if max_new_tokens < 0:
            raise UserError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if do_sample and not temperature > 0:
            raise UserError(f"temperature must be > 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise UserError(f"top_k must be >= 1, got {top_k}")
        if not 0 < top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {top_p}")
        if not repetition_penalty > 0:
            raise UserError(f"repetition_penalty must be > 0, got {repetition_penalty}")
        if not batch or any(len(ids) == 0 for ids in batch):
            raise UserError("every prompt needs at least one token")
        options = GenerateOptions(
            do_sample, temperature, top_k, seed, use_cache, top_p, repetition_penalty, frozenset(stop_token_ids)
        )
        yield from self.engine.generate_batch_ids(batch, max_new_tokens, options)

    def generate_ids(self, input_ids: list[int], max_new_tokens: int = 32, **options) -> list[int]:
        """New token ids after ``input_ids`` (see ``generate_batch_ids`` for the options)."""
        return [step[0] for step in self.generate_batch_ids([list(input_ids)], max_new_tokens, **options)]

    def generate(
        self,
        prompt: str | list[str],
        max_new_tokens: int = 32,
        on_text: Callable[[int, str], None] | None = None,
        stop: str | Sequence[str] = (),
        **options,
    ) -> str | list[str]:
        """The text generated after ``prompt`` (or after each of a list of prompts, in one batch).

        ``on_text(row, piece)`` is called with each piece of text as soon as it is decoded and stable (a
        character whose tokens are not all in yet waits for them). A row ends when its text contains one
        of the ``stop`` strings; the text returned is cut before it. The options are
        ``generate_batch_ids``'s.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        batch = [self.tokenizer(p)["input_ids"] for p in prompts]
        texts = self._complete(batch, max_new_tokens, on_text, stop, options)
        return texts[0] if isinstance(prompt, str) else texts

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        max_new_tokens: int = 32,
        on_text: Callable[[int, str], None] | None = None,
        stop: str | Sequence[str] = (),
        **options,
    ) -> str | list[str]:
        """The assistant's reply to a conversation (a list of ``{"role", "content"}`` dicts), or to each
        of a list of conversations in one batch, through the model's own chat template (``chat_ids``).

        Generation ends at the template's end-of-turn token (``end_of_turn_ids``) as well as the
        model's end-of-sequence ids; streaming, ``stop`` and the options are ``generate``'s.
        """
        if isinstance(messages, (list, tuple)) and messages and all(isinstance(m, (list, tuple)) for m in messages):
            conversations, single = list(messages), False
        else:
            conversations, single = [messages], True
        batch = [self.chat_ids(conversation) for conversation in conversations]
        options["stop_token_ids"] = {*options.get("stop_token_ids", ()), *self.end_of_turn_ids}
        texts = self._complete(batch, max_new_tokens, on_text, stop, options)
        return texts[0] if single else texts

    def chat_ids(self, messages: list[dict]) -> list[int]:
        """The token ids of a conversation rendered by the tokenizer's chat template, with the prompt
        that opens the assistant's turn (transformers' ``apply_chat_template``, for every engine)."""
        if not isinstance(messages, (list, tuple)) or not messages:
            raise UserError("a conversation needs at least one message")
        for message in messages:
            if not (
                isinstance(message, dict)
                and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)
            ):
                raise UserError(f'every message is a dict with a "role" and a "content" string, got {message!r:.80}')
        if not any(message["role"] == "user" for message in messages):
            raise UserError("a conversation needs a user message")
        if not self.tokenizer.chat_template:
            raise UserError(f"the tokenizer in {self.onnx_dir} has no chat template: use --prompt")
        from jinja2.exceptions import TemplateError

        try:
            ids = self.tokenizer.apply_chat_template(
                list(messages), add_generation_prompt=True, tokenize=True, return_dict=False
            )
        except TemplateError as exc:  # the template's own refusal (roles out of order, say)
            raise UserError(f"the chat template of {self.onnx_dir} refuses the conversation: {exc}") from None
        return [int(i) for i in ids]

    @property
    def end_of_turn_ids(self) -> frozenset[int]:
        """The special token the chat template writes right after an assistant's message (``<|im_end|>``,
        ``<|eot_id|>``, ``<end_of_turn>``...); empty without a template, or when it writes none."""
        if self._end_of_turn is None:
            self._end_of_turn = frozenset(end_of_turn_ids(self.tokenizer))
        return self._end_of_turn

    def stream(self, prompt: str, max_new_tokens: int = 32, stop: str | Sequence[str] = (), **options) -> Iterator[str]:
        """The text generated after ``prompt``, piece by piece as it is decoded (see ``generate``)."""
        rows = [RowText(self._decode, _stop_strings(stop))]
        for _, piece in self._pieces([self.tokenizer(prompt)["input_ids"]], rows, max_new_tokens, options):
            yield piece

    def _complete(self, batch, max_new_tokens, on_text, stop, options) -> list[str]:
        rows = [RowText(self._decode, _stop_strings(stop)) for _ in batch]
        for row, piece in self._pieces(batch, rows, max_new_tokens, options):
            if on_text is not None:
                on_text(row, piece)
        return [row.text for row in rows]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _pieces(
        self, batch: list[list[int]], rows: list[RowText], max_new_tokens: int, options: dict
    ) -> Iterator[tuple[int, str]]:
        """(row, new text) as tokens arrive and the text becomes stable; ``rows`` collect the tokens and
        the final texts. Generation ends when every row has ended or reached a stop string."""
        steps = self.generate_batch_ids(batch, max_new_tokens, **options)
        try:
            for step in steps:
                for row, (token, text) in enumerate(zip(step, rows)):
                    if text.finished:
                        continue
                    piece = text.finish() if token is None else text.add(token)
                    if piece:
                        yield row, piece
                if all(text.finished for text in rows):
                    break
        finally:
            steps.close()
        for row, text in enumerate(rows):  # the rest (a character the last token left incomplete)
            piece = "" if text.finished else text.finish()
            if piece:
                yield row, piece

    # -- encoders and classifiers -------------------------------------------------------------

    @property
    def max_length(self) -> int | None:
        """Tokens per text that encoders and classifiers take: the training length where the export
        records it, else the model's position limit (a longer text would index past the position
        embeddings); texts are truncated to it."""
        if self.manifest.get("max_length"):
            return self.manifest["max_length"]
        config = read_json(self.onnx_dir / "config.json")
        text = config.get("text_config") or config
        return text.get("max_position_embeddings") or text.get("n_positions")

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
        if self.adapter is None and self.manifest.get("head_in_base") is False and takes_adapters(self.manifest):
            raise UserError(
                f"the classification head of {self.onnx_dir} is trained by its adapter (the base had none): "
                f"pass an adapter, e.g. --adapter {self.onnx_dir / ADAPTER_FILE}"
            )
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


def _stop_strings(stop: str | Sequence[str] | None) -> tuple[str, ...]:
    stop = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if not all(isinstance(s, str) and s for s in stop):
        raise UserError(f"stop strings must be non-empty text, got {list(stop)!r:.80}")
    return stop


def infer(
    onnx_dir: str | os.PathLike,
    *,
    prompt: str | None = None,
    chat: str | None = None,
    system: str | None = None,
    text: str | None = None,
    adapter: str | os.PathLike | None = None,
    provider: str = "auto",
    max_new_tokens: int = 32,
    sample: bool = False,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    repetition_penalty: float | None = None,
    stop: Sequence[str] = (),
    on_text: Callable[[str], None] | None = None,
) -> str:
    """The line ``adalora-export infer`` prints: the text generated after ``prompt``, or the assistant's
    reply to the user message ``chat`` (after the ``system`` message, if any) through the model's chat
    template (causal LMs); for ``text`` a JSON classification (sequence classifier) or a JSON mean-pooled
    embedding (encoder). ``on_text`` receives the generated text piece by piece (streaming).

    Options that do not apply to the request are refused (``check_flags``): the sampling options
    without ``sample``, ``system`` without ``chat``, a provider an optimized graph was not built for.
    """
    if sum(x is not None for x in (prompt, chat, text)) != 1:
        raise UserError("give exactly one of --prompt or --chat (causal LMs) or --text (classifiers, encoders)")
    _, manifest = check_onnx_dir(onnx_dir)
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    asked = dict(prompt=prompt, chat=chat, text=text, system=system, stop=stop, repetition_penalty=repetition_penalty)
    check_flags(Path(onnx_dir), manifest, provider, sample, **sampling, **asked)
    server = OnnxServer(onnx_dir, provider=provider, adapter=adapter)
    if text is not None:
        if server.task == "seq_cls":
            return json.dumps(server.classify(text)[0])
        return json.dumps({"embedding": server.embed(text)[0].round(6).tolist()})
    options = {name: value for name, value in sampling.items() if value is not None}
    if repetition_penalty is not None:
        options["repetition_penalty"] = repetition_penalty
    stream = (lambda _, piece: on_text(piece)) if on_text is not None else None
    if chat is not None:
        messages = ([{"role": "system", "content": system}] if system is not None else []) + [
            {"role": "user", "content": chat}
        ]
        return server.chat(messages, max_new_tokens, on_text=stream, stop=stop, do_sample=sample, **options)
    return server.generate(prompt, max_new_tokens, on_text=stream, stop=stop, do_sample=sample, **options)
