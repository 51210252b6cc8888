"""The exported directory's tokenizer, read with the ``tokenizers`` library (no torch).

transformers loads torch as soon as its tokenizers are imported (about 2 s, more than a small model's
whole answer), so the server reads ``tokenizer.json`` itself, as transformers' fast tokenizers do, and
applies what transformers adds from ``tokenizer_config.json`` at load: the named and extra special
tokens (marked special, so ``skip_special_tokens`` drops them), the post-processor rebuilt when the
config sets ``add_bos_token`` / ``add_eos_token`` (or the file has none), the clean-up of spaces
(never for BPE). Chat templates render with transformers' own renderer (its jinja environment,
``transformers.utils.chat_template_utils``, which loads no torch), given the special tokens by name,
and the text is encoded without special tokens: ``apply_chat_template(..., add_generation_prompt=True)``.

A directory without ``tokenizer.json`` (a tokenizer transformers converts from a slow one) is read with
transformers' ``AutoTokenizer`` (``load_tokenizer``). Only the calls the server makes are offered.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import UserError

NAMED_SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def load_tokenizer(directory: Path):
    """``Tokenizer`` over ``directory``/tokenizer.json, else transformers' ``AutoTokenizer`` (loads torch)."""
    if (directory / "tokenizer.json").is_file():
        return Tokenizer(directory)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise UserError(f"no usable tokenizer in {directory}: {str(exc).splitlines()[0]}") from None


def _content(token) -> str | None:
    """A special token as the config writes it: a string, or an AddedToken's dict."""
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else None


def _read(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} is not valid JSON ({str(exc).splitlines()[0]})") from None
    return data if isinstance(data, dict) else {}


class Tokenizer:
    """A fast tokenizer from ``tokenizer.json`` and ``tokenizer_config.json``: encode, decode, chat."""

    def __init__(self, directory: str | Path):
        from tokenizers import AddedToken, processors
        from tokenizers import Tokenizer as Backend

        directory = Path(directory)
        try:
            self.backend = Backend.from_file(str(directory / "tokenizer.json"))
        except Exception as exc:  # tokenizers raises its own exception types for a bad file
            raise UserError(f"no usable tokenizer in {directory}: {str(exc).splitlines()[0]}") from None
        config = {**_read(directory / "special_tokens_map.json"), **_read(directory / "tokenizer_config.json")}
        self.special_tokens_map = {k: _content(config.get(k)) for k in NAMED_SPECIAL if _content(config.get(k))}
        extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
        extra = list(extra.values()) if isinstance(extra, dict) else list(extra)
        specials = [*self.special_tokens_map.values(), *(t for t in map(_content, extra) if t)]
        self.backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
        if "add_bos_token" in config or "add_eos_token" in config or self.backend.post_processor is None:
            self.backend.post_processor = self._post_processor(
                processors, bool(config.get("add_bos_token")), bool(config.get("add_eos_token"))
            )
        self.backend.no_truncation()
        self.backend.no_padding()
        self.padding_side = config.get("padding_side") or "right"
        self.truncation_side = config.get("truncation_side") or "right"
        self._clean_up = bool(config.get("clean_up_tokenization_spaces")) and type(self.backend.model).__name__ != "BPE"
        self.chat_template = self._chat_template(directory, config)

    def _post_processor(self, processors, add_bos: bool, add_eos: bool):
        """transformers' ``update_post_processor``: BOS and EOS around each sequence, as the config asks."""
        bos, eos = self.special_tokens_map.get("bos_token"), self.special_tokens_map.get("eos_token")
        add_bos, add_eos = add_bos and bos is not None, add_eos and eos is not None
        single = f"{(bos + ':0 ') if add_bos else ''}$A:0{(' ' + eos + ':0') if add_eos else ''}"
        pair = f"{single}{(' ' + bos + ':1') if add_bos else ''} $B:1{(' ' + eos + ':1') if add_eos else ''}"
        special = [(t, self.backend.token_to_id(t)) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
        return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)

    @staticmethod
    def _chat_template(directory: Path, config: dict) -> str | None:
        if (directory / "chat_template.jinja").is_file():
            return (directory / "chat_template.jinja").read_text(encoding="utf-8")
        template = config.get("chat_template") or _read(directory / "chat_template.json").get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        return template if isinstance(template, str) and template else None

    # -- what the server reads ------------------------------------------------------------------

    def token_id(self, name: str) -> int | None:
        token = self.special_tokens_map.get(name)
        return None if token is None else self.backend.token_to_id(token)

    @property
    def eos_token_id(self) -> int | None:
        return self.token_id("eos_token")

    @property
    def bos_token_id(self) -> int | None:
        return self.token_id("bos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self.token_id("pad_token")

    @property
    def all_special_ids(self) -> list[int]:
        return [i for i, token in self.added_tokens_decoder.items() if token.special]

    @property
    def added_tokens_decoder(self) -> dict:
        return self.backend.get_added_tokens_decoder()

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __call__(
        self,
        text: str | list[str],
        padding: bool = False,
        truncation: bool = False,
        max_length: int | None = None,
        return_tensors: str | None = None,
        add_special_tokens: bool = True,
    ) -> dict:
        """``input_ids``, ``attention_mask`` and ``token_type_ids`` of a text (lists) or of each of a list;
        ``padding`` to the longest, ``truncation`` to ``max_length`` tokens (special tokens counted);
        ``return_tensors="np"``: int64 arrays (a batch needs ``padding`` unless its lengths agree)."""
        texts = [text] if isinstance(text, str) else list(text)
        if truncation and max_length:
            self.backend.enable_truncation(max_length, direction=self.truncation_side)
        try:
            encodings = self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)
        finally:
            self.backend.no_truncation()
        out = {
            "input_ids": [e.ids for e in encodings],
            "attention_mask": [e.attention_mask for e in encodings],
            "token_type_ids": [e.type_ids for e in encodings],
        }
        if padding and texts:
            width = max(len(ids) for ids in out["input_ids"])
            if self.pad_token_id is None and any(len(ids) != width for ids in out["input_ids"]):
                raise UserError("the tokenizer has no padding token: give the texts one at a time")
            fill = {"input_ids": self.pad_token_id, "attention_mask": 0, "token_type_ids": 0}
            for name, rows in out.items():
                pad = [[fill[name]] * (width - len(row)) for row in rows]
                left = self.padding_side == "left"
                out[name] = [p + row if left else row + p for row, p in zip(rows, pad)]
        if return_tensors == "np":
            out = {name: np.asarray(rows, dtype=np.int64) for name, rows in out.items()}
        elif isinstance(text, str):
            out = {name: rows[0] for name, rows in out.items()}
        return out

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        text = self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        if self._clean_up:  # transformers' clean_up_tokenization (WordPiece and kin; never BPE)
            for spaced, joined in (
                (" .", "."),
                (" ?", "?"),
                (" !", "!"),
                (" ,", ","),
                (" ' ", "'"),
                (" n't", "n't"),
                (" 'm", "'m"),
                (" 's", "'s"),
                (" 've", "'ve"),
                (" 're", "'re"),
            ):
                text = text.replace(spaced, joined)
        return text

    def apply_chat_template(
        self,
        conversation: list[dict],
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        return_dict: bool = False,
    ) -> str | list[int]:
        """transformers' ``apply_chat_template`` for one conversation: its renderer, the special tokens
        by name, then the text encoded without adding special tokens."""
        if not self.chat_template:
            raise ValueError("the tokenizer has no chat template")
        from transformers.utils.chat_template_utils import render_jinja_template

        rendered, _ = render_jinja_template(
            conversations=[conversation],
            chat_template=self.chat_template,
            add_generation_prompt=add_generation_prompt,
            **self.special_tokens_map,
        )
        if not tokenize:
            return rendered[0]
        ids = self.backend.encode(rendered[0], add_special_tokens=False).ids
        return {"input_ids": ids} if return_dict else ids


def end_of_turn_ids(tokenizer) -> set[int]:
    """The special token a chat template writes right after an assistant's message: a conversation
    ending in one is rendered and the first token after the message read (empty when it is not special)."""
    if not tokenizer.chat_template:
        return set()
    marker = "adalora-export-end-of-turn-probe"
    conversation = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": marker}]
    try:
        text = tokenizer.apply_chat_template(conversation, tokenize=False)
    except Exception:  # a template may refuse a conversation that ends with the assistant: no probe then
        return set()
    at = text.rfind(marker)
    if at < 0:
        return set()
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    for token in tokenizer(text[at + len(marker) :], add_special_tokens=False)["input_ids"]:
        if token in special:
            return {int(token)}
        if tokenizer.decode([token]).strip():  # text before any special token: the template writes none
            return set()
    return set()
