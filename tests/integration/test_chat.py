"""Chat through the model's own template, sampling (top_p, repetition penalty), stop strings and the
flags that do not apply, on both engines: our loop over onnxruntime (a merged graph with a KV cache)
and onnxruntime-genai (the builder's optimized graph) of one tiny Llama whose tokenizer has a ChatML
template (as SmolLM2-Instruct's); multi-byte text streamed whole through a byte-level tokenizer."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from adapters import adapter_at_ranks, make_adapter
from cli_runs import run_cli
from models import GPT2_TARGETS, WORDS, make_base

from adalora_export.errors import UserError
from adalora_export.formats.peft import save_adapter
from adalora_export.serving import OnnxServer, infer
from adalora_export.sources import load_adapter

og = pytest.importorskip("onnxruntime_genai")

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MESSAGES = [{"role": "system", "content": "the cat"}, {"role": "user", "content": "a dog sat on the mat"}]
OTHER = [{"role": "user", "content": "big red bird"}]
NEW = 12
END_AT = 3  # the planted end of turn replaces the greedy reply's fourth token


def chat_base(path, tokens=("<|im_start|>", "<|im_end|>")):
    """A random Llama (hidden 64: the builder's CPU attention wants head_size % 16 == 0) with a word-level
    tokenizer, ChatML special tokens and template. The special tokens' output rows are zero (logit 0),
    so greedy decoding runs on words and never ends by itself."""
    from transformers import LlamaForCausalLM

    from adalora_export.toy import toy_config, toy_tokenizer

    tok = toy_tokenizer(WORDS + ["user", "assistant", "system"])
    tok.add_special_tokens({"additional_special_tokens": list(tokens)})
    tok.chat_template = CHATML
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = toy_config("llama", len(tok), 64, 2, tie_word_embeddings=False, **ids)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight[tok.all_special_ids] = 0
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path, tok


@torch.no_grad()
def greedy(model, ids: list[int], new: int, stop: set[int] = frozenset(), penalty: float = 1.0) -> list[int]:
    out = model.generate(
        torch.tensor([ids]),
        max_new_tokens=new,
        do_sample=False,
        eos_token_id=sorted(stop) or None,
        repetition_penalty=penalty,
        pad_token_id=0,
    )
    return out[0, len(ids) :].tolist()


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    """Both graphs of base + adapter, the reference model and the expected reply: the base's output row of
    <|im_end|> is set so that greedy decoding ends its turn after END_AT words."""
    tmp = tmp_path_factory.mktemp("chat")
    base, tok = chat_base(tmp / "base")
    adapter_dir = make_adapter(base, tmp / "adapter", ranks=(2, 0, 3, 1))
    adapter = load_adapter(adapter_dir)
    ids = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=False)
    model = adapter.apply_to(adapter.load_base(base))
    plain = greedy(model, ids, NEW)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    # The output head is not adapted: plant the end of turn in the base, as the row whose logit is 2
    # below the best for the reply's first END_AT tokens and 2 above it for the next one.
    seen = []
    hook = model.lm_head.register_forward_hook(lambda module, args, out: seen.append(args[0][0]))
    with torch.no_grad():
        logits = model(torch.tensor([ids + plain[:END_AT]])).logits[0, len(ids) - 1 :]
    hook.remove()
    best = logits.max(-1).values
    target = torch.cat([best[:END_AT] - 2, best[END_AT:] + 2])
    raw = adapter.load_base(base)
    with torch.no_grad():
        raw.lm_head.weight[end] = torch.linalg.pinv(seen[0][len(ids) - 1 :]) @ target
    raw.save_pretrained(base)
    model = adapter.apply_to(adapter.load_base(base))
    want = greedy(model, ids, NEW, {end, tok.eos_token_id})
    assert want == plain[:END_AT] + [end], (plain, want)  # the planted end of turn is reached
    graphs = {"merged": tmp / "merged", "optimized": tmp / "optimized"}
    assert run_cli("export", adapter_dir, "--onnx", "--merge", "--with-past", "-o", graphs["merged"]) == 0
    assert run_cli("export", adapter_dir, "--onnx", "--merge", "--optimized", "-o", graphs["optimized"]) == 0
    return dict(tmp=tmp, base=base, tok=tok, model=model, ids=ids, want=want, end=end, graphs=graphs)


@pytest.fixture(scope="module", params=["merged", "optimized"])
def server(request, chat):
    return OnnxServer(chat["graphs"][request.param], provider="auto")


# -- the template ------------------------------------------------------------------------------------


def test_chat_ids_are_transformers_apply_chat_template(chat, server):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(chat["base"])
    for messages in (MESSAGES, OTHER):
        want = reference.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
        assert server.chat_ids(messages) == want  # the same ids on both engines
    assert server.end_of_turn_ids == {chat["end"]}
    text = reference.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert server.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False) == text


def test_the_reply_ends_at_the_end_of_turn_on_both_engines(chat, server):
    want = chat["want"]
    text = chat["tok"].decode(want, skip_special_tokens=True)
    pieces = []
    assert server.chat(MESSAGES, NEW, on_text=lambda row, piece: pieces.append(piece)) == text
    assert "".join(pieces) == text and text
    # Without the end-of-turn id the same prompt runs on past it: the stop set is what ends the reply.
    longer = server.generate_ids(chat["ids"], NEW)
    assert longer[: len(want)] == want and len(longer) > len(want)
    # A batch of conversations: each gets what it gets alone.
    alone = server.chat(OTHER, NEW)
    assert server.chat([MESSAGES, OTHER], NEW) == [text, alone]


def test_infer_chat_prints_the_reply(chat, capsys):
    graph = chat["graphs"]["merged"]
    system, user = MESSAGES[0]["content"], MESSAGES[1]["content"]
    text = chat["tok"].decode(chat["want"], skip_special_tokens=True)
    capsys.readouterr()
    assert run_cli("infer", graph, "--chat", user, "--system", system, "--max_new_tokens", NEW) == 0
    assert capsys.readouterr().out == text + "\n"
    assert infer(graph, chat=user, system=system, max_new_tokens=NEW) == text


def test_bad_conversations_and_a_tokenizer_without_template_are_refused(chat, tmp_path, capsys):
    server = OnnxServer(chat["graphs"]["merged"])
    for bad, match in [
        ([], "at least one message"),
        ([{"role": "system", "content": "the cat"}], "user message"),
        ([{"role": "user"}], "role"),
        (["the cat"], "role"),
    ]:
        with pytest.raises(UserError, match=match):
            server.chat(bad)
    bare = shutil.copytree(chat["graphs"]["merged"], tmp_path / "bare")
    (bare / "chat_template.jinja").unlink()
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert run_cli("infer", bare, "--chat", "the cat") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no chat template" in err
    assert OnnxServer(bare).end_of_turn_ids == frozenset()


# -- sampling and stop strings -------------------------------------------------------------------------


def test_top_p_keeps_the_nucleus(chat, server):
    ids = chat["ids"]
    greedy_ids = server.generate_ids(ids, NEW)
    # a nucleus of tiny mass holds the best token alone: greedy, whatever the seed and temperature
    for seed in range(3):
        assert server.generate_ids(ids, NEW, do_sample=True, temperature=3.0, top_p=1e-6, seed=seed) == greedy_ids
    draws = {tuple(server.generate_ids(ids, NEW, do_sample=True, temperature=3.0, top_p=0.9, seed=s)) for s in range(4)}
    assert len(draws) > 1
    with pytest.raises(UserError, match="top_p"):
        server.generate_ids(ids, 2, do_sample=True, top_p=0)


def test_repetition_penalty_matches_transformers(chat, server):
    ids = chat["ids"]
    for penalty in (1.8, 0.7):
        want = greedy(chat["model"], ids, NEW, {chat["end"], chat["tok"].eos_token_id}, penalty=penalty)
        got = server.generate_ids(ids, NEW, repetition_penalty=penalty, stop_token_ids=[chat["end"]])
        assert got == want, penalty
    assert server.generate_ids(ids, NEW, repetition_penalty=1.8) != server.generate_ids(ids, NEW)
    with pytest.raises(UserError, match="repetition_penalty"):
        server.generate_ids(ids, 2, repetition_penalty=0)


def test_stop_strings_end_generation_and_cut_the_text(chat, server):
    prompt = "the cat sat"
    whole = server.generate(prompt, NEW)
    words = whole.split()
    assert len(words) >= 4
    stop = words[2]  # a word of the text: generation ends once it appears
    cut = whole[: whole.index(stop)]
    pieces = []
    assert server.generate(prompt, NEW, stop=["zebra", stop], on_text=lambda r, p: pieces.append(p)) == cut
    assert "".join(pieces) == cut and all(stop not in p for p in pieces)
    assert "".join(server.stream(prompt, NEW, stop=stop)) == cut
    assert server.generate([prompt, "a dog"], NEW, stop=stop)[0] == cut
    with pytest.raises(UserError, match="stop strings"):
        server.generate(prompt, 2, stop=[""])


def test_infer_sampling_and_stop_flags(chat, capsys):
    graph = chat["graphs"]["merged"]
    server = OnnxServer(graph)
    options = dict(do_sample=True, temperature=2.0, top_k=5, top_p=0.8, seed=3, repetition_penalty=1.3)
    want = server.generate("the cat", NEW, stop="zebra", **options)
    argv = ["--sample", "--temperature", 2.0, "--top_k", 5, "--top_p", 0.8, "--seed", 3, "--repetition_penalty", 1.3]
    capsys.readouterr()
    assert run_cli("infer", graph, "--prompt", "the cat", "--max_new_tokens", NEW, *argv, "--stop", "zebra") == 0
    assert capsys.readouterr().out == want + "\n"


# -- flags that do not apply -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def classifier(chat):
    base = make_base(chat["tmp"] / "bert", "bert")
    adapter = make_adapter_for_classifier(base, chat["tmp"] / "bert-adapter")
    out = chat["tmp"] / "bert-onnx"
    assert run_cli("export", adapter, "--onnx", "--merge", "-o", out) == 0
    return out


def make_adapter_for_classifier(base, out):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(base)
    meta = dict(task_type="seq_cls", base_model_name_or_path=str(base))
    adapter = adapter_at_ranks(model, ["query", "value"], [2, 1], **meta)
    return save_adapter(adapter, out)


def test_flags_that_do_not_apply_exit_2_with_one_line(chat, classifier, capsys):
    merged, optimized = chat["graphs"]["merged"], chat["graphs"]["optimized"]
    cases = [
        ([merged, "--prompt", "the cat", "--temperature", 0.5], "--temperature applies only with --sample"),
        ([merged, "--prompt", "the cat", "--top_k", 3], "--top_k applies only with --sample"),
        ([merged, "--prompt", "the cat", "--top_p", 0.5], "--top_p applies only with --sample"),
        ([merged, "--chat", "the cat", "--seed", 1], "--seed applies only with --sample"),
        ([merged, "--prompt", "the cat", "--system", "a dog"], "--system applies only with --chat"),
        ([merged, "--prompt", "the cat", "--chat", "a dog"], "exactly one of --prompt"),
        ([optimized, "--prompt", "the cat", "--provider", "cuda"], "built for cpu"),
        ([classifier, "--chat", "the cat"], "--chat needs a causal LM"),
        ([classifier, "--prompt", "the cat"], "--prompt needs a causal LM"),
        ([classifier, "--text", "the cat", "--stop", "a"], "--stop applies only to generation"),
        ([classifier, "--text", "the cat", "--sample"], "--sample applies only to generation"),
        ([merged, "--text", "the cat"], "--text needs a classifier or an encoder"),
    ]
    for argv, message in cases:
        capsys.readouterr()
        assert run_cli("infer", *argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, (argv, err)
    # the provider an optimized graph was built for, or auto, is fine
    assert run_cli("infer", optimized, "--prompt", "the cat", "--max_new_tokens", 2, "--provider", "cpu") == 0
    with pytest.raises(UserError, match="built for cpu"):
        OnnxServer(optimized, provider="cuda")
    assert json.loads(infer(classifier, text="the cat"))["label"]


# -- multi-byte characters ------------------------------------------------------------------------------


def byte_level_base(path):
    """A random GPT-2 with a GPT-2 style byte-level BPE (256 bytes + a few merges): any character outside
    ASCII spans several tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

    from adalora_export.toy import toy_config

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=alphabet, special_tokens=["<|endoftext|>"])
    bpe.train_from_iterator(["the cat sat on the mat", "Emoji for happy:"] * 20, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    eos = tok.eos_token_id
    config = toy_config("gpt2", len(tok), 32, 2, n_positions=128, bos_token_id=eos, eos_token_id=eos)
    torch.manual_seed(1)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        model.lm_head.weight[eos] = 0  # never ends by itself
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path, model, tok


def test_multibyte_characters_stream_whole(tmp_path):
    base, model, tok = byte_level_base(tmp_path / "base")
    assert len(tok("😀")["input_ids"]) == 4  # one character, four tokens
    adapter = adapter_at_ranks(model, GPT2_TARGETS, [2, 1], base_model_name_or_path=str(base), task_type="causal_lm")
    out = tmp_path / "onnx"
    adapter_dir = save_adapter(adapter, tmp_path / "adapter")
    assert run_cli("export", adapter_dir, "--onnx", "--merge", "--with-past", "-o", out) == 0
    server = OnnxServer(out, provider="cpu")
    prompt = "Emoji for happy: 😀, sad: 😢, angry:"
    broken = 0
    for seed in range(6):  # hot draws over 300 byte tokens: many characters span tokens, some never complete
        options = dict(do_sample=True, temperature=3.0, seed=seed)
        whole = server.generate(prompt, 40, **options)
        pieces = list(server.stream(prompt, 40, **options))
        assert "".join(pieces) == whole, seed
        if "\ufffd" not in whole:
            assert all("\ufffd" not in p for p in pieces), seed
        ids = server.generate_ids(tok(prompt)["input_ids"], 40, **options)
        tails = [tok.decode(ids[: i + 1], skip_special_tokens=True) for i in range(len(ids))]
        broken += any(t.endswith("\ufffd") and i + 1 < len(tails) for i, t in enumerate(tails))
    assert broken  # some decoded tail ended in U+FFFD mid-stream (what used to stop the stream)


# -- start-up ------------------------------------------------------------------------------------------


def test_help_and_infer_do_not_import_torch(chat):
    import os
    import subprocess
    import sys

    from cli_runs import ROOT, SUBPROCESS_ENV

    runs = [
        ["--help"],
        ["infer", "--help"],
        ["infer", str(chat["graphs"]["merged"]), "--prompt", "the cat", "--max_new_tokens", "3"],
        ["infer", str(chat["graphs"]["merged"]), "--chat", "the cat", "--system", "a dog"],
        ["infer", str(chat["graphs"]["optimized"]), "--chat", "the cat", "--sample", "--seed", "1"],
    ]
    code = (
        "import sys\n"
        "from adalora_export.cli import main\n"
        "try:\n"
        "    main(sys.argv[1:])\n"
        "except SystemExit as exc:\n"
        "    assert not exc.code, exc.code\n"
        "print('torch' in sys.modules)\n"
    )
    env = {**os.environ, **SUBPROCESS_ENV}
    for argv in runs:
        done = subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, env=env, capture_output=True, text=True)
        assert done.returncode == 0, (argv, done.stderr[-2000:])
        assert done.stdout.splitlines()[-1] == "False", argv  # torch never loaded
    # the package's names import on first use: AdaLoraConfig without torch, CompactAdapter with it
    check = (
        "import sys; import adalora_export as a; a.AdaLoraConfig; print('torch' in sys.modules); "
        "from adalora_export import CompactAdapter; print('torch' in sys.modules, CompactAdapter.__name__)"
    )
    done = subprocess.run([sys.executable, "-c", check], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.stdout.split() == ["False", "True", "CompactAdapter"], done.stderr[-2000:]
