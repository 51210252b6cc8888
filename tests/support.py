"""What the tests share: tiny real transformers models built from configs (no downloads), an AdaLoRA
training loop on them, and the hardening builders: tiny model directories, adapters, data, corrupt files,
file snapshots, and a fork server that runs CLI commands in child processes it can kill.

The fork server (``python tests/support.py serve``) imports torch, transformers, onnx and
every command's module once, then forks one child per request; a child runs ``cli.main(argv)``
exactly as ``python cli.py`` does, with its output in a log file and optionally a file-size limit.
The server kills a child with SIGKILL after a given delay and reaps it (so that the dead pid is gone,
as after a real kill). A request thus costs the command's own work, not seconds of imports.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import select
import struct
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
WORDS = "the a cat dog bird sat ran flew on under over mat tree house fast slow red blue big small".split()
# 12 optimizer steps on 48 records; budget phase 3..8, final shrink at step 8 (tfinal 4), a checkpoint every 2 steps.
TRAIN_FLAGS = [
    *("--max_steps", "12", "--batch_size", "4", "--lr", "1e-2", "--max_length", "16", "--seed", "3"),
    *("--save_steps", "2", "--keep_checkpoints", "0", "--adalora_init_r", "4", "--adalora_target_r", "2"),
    *("--adalora_tinit", "2", "--adalora_tfinal", "4", "--adalora_deltaT", "2", "--lora_alpha", "16"),
]
CHILD_WATCHDOG_S = 240  # a child still running after this dumps its stack into its log and exits
SERVER_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}


# ------------------------------------------------------------------------------------ models
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(seed: int = 0, hidden: int = 64, layers: int = 2, vocab: int = 128, causal_lm: bool = True):
    from transformers import LlamaForCausalLM, LlamaModel

    from adalora_export.toy import toy_config

    config = toy_config("llama", vocab, hidden, layers, max_position_embeddings=128, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return (LlamaForCausalLM if causal_lm else LlamaModel)(config).eval()


def tiny_gpt2(seed: int = 0, hidden: int = 64, layers: int = 2, vocab: int = 128):
    from transformers import GPT2LMHeadModel

    from adalora_export.toy import toy_config

    config = toy_config("gpt2", vocab, hidden, layers, n_positions=128)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config).eval()


def train_adalora(model, config, steps=None, trainable=None, seed=0, lr=2e-2, vocab=128, on_step=None):
    """Train ``model`` with our AdaLoRA core (inject, allocator, orthogonal term) on random tokens.

    Runs ``steps`` optimizer steps (default ``config.total_step``: through the final phase, so the
    layers end pruned to heterogeneous ranks), calling ``on_step(step, model, allocator)`` after each.
    Returns the allocator; the model is left in eval mode.
    """
    from adalora_export import RankAllocator, inject_adapters, orthogonal_regularizer

    inject_adapters(model, config, trainable=trainable)
    allocator = RankAllocator(model, config, total_step=config.total_step)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(1, (steps or config.total_step) + 1):
        ids = torch.randint(0, vocab, (4, 16), generator=g)
        loss = model(input_ids=ids, labels=ids).loss + config.orth_reg_weight * orthogonal_regularizer(model)
        loss.backward()
        optimizer.step()
        allocator.update_and_allocate(step, optimizer)
        optimizer.zero_grad(set_to_none=True)
        if on_step is not None:
            on_step(step, model, allocator)
    model.eval()
    return allocator


# ------------------------------------------------------------------------------------ inputs
def write_data(path: Path, n: int = 48, seed: int = 0) -> Path:
    """``n`` short sentences over WORDS as {"text": ...} JSONL records."""
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9))) for _ in range(n)]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines), encoding="utf-8")
    return path


def make_base(path: Path, arch: str = "llama", hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """A random-weight model directory (save_pretrained: config, safetensors, word-level tokenizer)."""
    from adalora_export.toy import write_toy_model

    return write_toy_model(path, WORDS, arch=arch, hidden=hidden, layers=layers, seed=seed)


def make_adapter(base_dir: Path, out: Path, seed: int = 0, ranks: tuple[int, ...] = (2, 0, 3, 1)) -> Path:
    """A compact adapter over the family's default targets of ``base_dir`` (random A, E, B at varied
    ranks, rank 0 included), naming ``base_dir`` as its base, saved as a PEFT AdaLoRA directory."""
    from transformers import AutoModelForCausalLM

    from adalora_export.formats.peft import save_adapter
    from adalora_export.model import default_target_modules

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    meta = dict(base_model_name_or_path=str(base_dir), task_type="causal_lm")
    adapter = adapter_at_ranks(model, default_target_modules(model), list(ranks), 4, 8.0, seed, **meta)
    return save_adapter(adapter, out)


def copy_tree(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst, symlinks=True)
    return dst


# --------------------------------------------------------------------------- corrupt files
def _split_safetensors(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def _write_safetensors(path: Path, header: dict, data: bytes) -> None:
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def corrupt_safetensors(path: Path, kind: str) -> None:
    """Damage a safetensors file the way downloads and tools do.

    cut_header: the file ends inside its JSON header; past_end: the header length points past the
    end of the file; bad_offsets: a tensor's byte range overlaps another's and runs past the data;
    wrong_dtype: a dtype string safetensors does not know; cut_data: the last bytes of the data are missing.
    """
    if kind == "cut_header":
        raw = path.read_bytes()
        (length,) = struct.unpack("<Q", raw[:8])
        path.write_bytes(raw[: 8 + length // 2])
    elif kind == "past_end":
        raw = path.read_bytes()
        path.write_bytes(struct.pack("<Q", len(raw) + 4096) + raw[8:])
    elif kind in ("bad_offsets", "wrong_dtype"):
        header, data = _split_safetensors(path)
        name = next(k for k, v in header.items() if k != "__metadata__" and v["data_offsets"][1] > 0)
        if kind == "bad_offsets":
            begin, end = header[name]["data_offsets"]
            header[name]["data_offsets"] = [begin + 4, end + len(data)]
        else:
            header[name]["dtype"] = "F31"
        _write_safetensors(path, header, data)
    elif kind == "cut_data":
        raw = path.read_bytes()
        path.write_bytes(raw[:-16])
    else:
        raise ValueError(kind)


def pickle_weights(src: Path, dst: Path) -> None:
    """Write ``src``'s tensors as a pickle file (torch.save), the way older checkpoints ship."""
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(str(src)), str(dst))


# ------------------------------------------------------------------------------- snapshots
def tree_digest(*paths: Path) -> dict[str, str]:
    """sha256 of every file under ``paths`` (files or directories), keyed by path; links by target."""
    out = {}
    for root in paths:
        root = Path(root)
        items = [root] if not root.is_dir() else sorted(p for p in root.rglob("*"))
        for p in items:
            if p.is_symlink():
                out[str(p)] = "link:" + os.readlink(p)
            elif p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
            elif p.is_dir():
                out[str(p)] = "dir"
    return out


def leftovers(path: Path) -> list[str]:
    """Hidden siblings that atomic outputs create beside ``path`` (``.NAME.tmp-*``, ``.NAME.old-*``)."""
    parent = Path(path).absolute().parent
    if not parent.is_dir():
        return []
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{Path(path).name}."))


def hidden_temps(root: Path) -> list[str]:
    """Every ``.*.tmp-*`` / ``.*.old-*`` entry below ``root`` (stale pieces of atomic writes)."""
    if not root.is_dir():
        return []
    return sorted(
        str(p.relative_to(root)) for p in root.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name or ".tmp" in p.name
    )


# ------------------------------------------------------------------------------ fork server
class ForkServer:
    """Runs CLI commands in forked children of a process that imported everything once (see module doc)."""

    def __init__(self, log_dir: Path):
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.count = 0
        env = {**os.environ, **SERVER_ENV}
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "serve"],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.ready = False  # it imports while the caller builds its fixtures

    def _request(self, request: dict, timeout: float) -> dict:
        if not self.ready:
            ready = self._reply(timeout=300)
            assert ready.get("ready") and ready["threads"] == 1, ready  # one thread: safe to fork
            self.ready = True
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._reply(timeout)

    def warm_up(self, argv: list) -> int:
        """Run ``argv`` (a short training run) inside the server itself, so that what the first model load,
        training step and plot initialise lazily is ready in every child. Returns the server's thread count."""
        return self._request({"warm": [str(a) for a in argv]}, timeout=300)["threads"]

    def run(
        self, argv: list[str], kill_after: float | None = None, fsize: int | None = None, timeout: float = 300
    ) -> dict:
        """Run ``cli.main(argv)`` in a child. Returns {"code": exit code (-9 when killed), "killed",
        "seconds", "log": the child's stdout and stderr}."""
        self.count += 1
        log = self.log_dir / f"run-{self.count}.log"
        request = {"argv": [str(a) for a in argv], "kill_after": kill_after, "fsize": fsize, "log": str(log)}
        reply = self._request(request, timeout)
        reply["log"] = log.read_text(errors="replace") if log.exists() else ""
        return reply

    def _reply(self, timeout: float) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.close()
            log = self.log_dir / f"run-{self.count}.log"
            tail = log.read_text(errors="replace")[-4000:] if log.exists() else "(no log)"
            raise TimeoutError(f"fork server gave no answer in {timeout} s; the child's log ends:\n{tail}")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"fork server exited with code {self.proc.wait()}")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _fresh_tqdm_locks() -> None:
    """Give this (forked) process tqdm write locks of its own.

    tqdm's default lock holds one multiprocessing semaphore for every tqdm class (transformers'
    progress bars included), and forked children share it: a child killed while drawing a bar
    leaves it taken, and the next child hangs on its first bar. Without the semaphore, tqdm falls
    back to a thread lock, and each class builds its lock anew on first use.
    """
    import tqdm.std

    tqdm.std.TqdmDefaultWriteLock.mp_lock = None
    classes = [tqdm.std.tqdm]
    while classes:
        cls = classes.pop()
        classes.extend(cls.__subclasses__())
        if "_lock" in cls.__dict__:
            delattr(cls, "_lock")


def _serve() -> None:
    """The server loop: one JSON request per stdin line, one JSON reply per stdout line."""
    import faulthandler
    import signal

    sys.path.insert(0, str(ROOT))
    os.chdir(ROOT)
    import torch

    torch.set_num_threads(1)
    # Everything a command imports lazily, imported once here so that children start at once. Not
    # onnxruntime: importing it starts a thread, and a process with threads is not safe to fork.
    import matplotlib.figure  # noqa: F401  (the rank heat map)
    import onnx  # noqa: F401
    import tqdm
    import transformers.models.gpt2.modeling_gpt2  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401

    import adalora_export.converters.lora  # noqa: F401
    import adalora_export.converters.merge  # noqa: F401
    import adalora_export.converters.onnx  # noqa: F401
    import adalora_export.prune  # noqa: F401
    import adalora_export.report  # noqa: F401
    import adalora_export.serving  # noqa: F401
    import adalora_export.training  # noqa: F401
    from adalora_export import cli

    tqdm.tqdm.monitor_interval = 0  # no monitor thread (see above)
    out = sys.stdout
    print(json.dumps({"ready": True, "threads": len(os.listdir("/proc/self/task"))}), file=out, flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if "warm" in request:
            with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
                try:
                    cli.main(request["warm"])
                except SystemExit:
                    pass
            print(json.dumps({"threads": len(os.listdir("/proc/self/task"))}), file=out, flush=True)
            continue
        started = time.monotonic()
        pid = os.fork()
        if pid == 0:  # the child: run the command, never return into the loop
            code = 1
            try:
                _fresh_tqdm_locks()
                fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                os.close(fd)
                # A hang shows where it happened (in the log) and ends the child instead of stalling the test.
                faulthandler.dump_traceback_later(CHILD_WATCHDOG_S, exit=True)
                sys.stdin = open(os.devnull)
                if request.get("fsize") is not None:
                    import resource

                    resource.setrlimit(resource.RLIMIT_FSIZE, (request["fsize"], request["fsize"]))
                try:
                    cli.main(request["argv"])
                    code = 0
                except SystemExit as exc:
                    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except BaseException:
                import traceback

                traceback.print_exc()
                code = 1
            finally:
                for stream in (sys.stdout, sys.stderr):
                    try:
                        stream.flush()
                    except Exception:
                        pass
                os._exit(code)
        killed, deadline = False, request.get("kill_after")
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if deadline is not None and time.monotonic() - started >= deadline:
                os.kill(pid, signal.SIGKILL)
                killed = True
                _, status = os.waitpid(pid, 0)  # reaped: the pid no longer exists, as after a real kill
                break
            time.sleep(0.002)
        killed = killed and os.WIFSIGNALED(status)  # it may have finished just before the kill
        reply = {"code": os.waitstatus_to_exitcode(status), "killed": killed, "seconds": time.monotonic() - started}
        print(json.dumps(reply), file=out, flush=True)


if __name__ == "__main__" and sys.argv[1:] == ["serve"]:
    _serve()


# -- ONNX export and serving: what tests/test_onnx_export.py and tests/test_serving.py share ----------


def save_base(model: torch.nn.Module, path: Path) -> Path:
    """Save a tiny model with a word-level tokenizer over its vocabulary (<unk> <s> </s> <pad> w4 w5 ...)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {tok: i for i, tok in enumerate(special)}
    vocab.update({f"w{i}": i for i in range(len(special), model.config.vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


def adapter_at_ranks(
    model: torch.nn.Module,
    targets: list[str],
    ranks: list[int],
    init_r: int = 6,
    lora_alpha: float = 12.0,
    seed: int = 0,
    **meta,
):
    """An in-memory CompactAdapter of random A, E, B at heterogeneous ranks (cycling through ``ranks``,
    zeros included) on ``model``'s ``targets``."""
    from transformers.pytorch_utils import Conv1D

    from adalora_export import AdaLoraConfig, CompactAdapter, ModuleAdapter
    from adalora_export.model import find_target_paths

    g = torch.Generator().manual_seed(seed)
    config = AdaLoraConfig(init_r=init_r, target_r=min(init_r, 2), lora_alpha=lora_alpha, target_modules=targets)
    modules = {}
    for i, path in enumerate(find_target_paths(model, targets)):
        layer = model.get_submodule(path)
        conv = isinstance(layer, Conv1D)
        in_f, out_f = layer.weight.shape if conv else layer.weight.shape[::-1]
        r = ranks[i % len(ranks)]
        modules[path] = ModuleAdapter(
            torch.randn(r, in_f, generator=g) * 0.2,
            torch.randn(r, 1, generator=g) * 0.5,
            torch.randn(out_f, r, generator=g) * 0.2,
            fan_in_fan_out=conv,
        )
    return CompactAdapter(config, modules, **meta)


def run_cli(*args) -> int:
    """The CLI in-process; its exit code."""
    from adalora_export.cli import main

    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        return exc.code
    return 0


def torch_forward(base_dir: Path, adapter, feeds: dict, task=None):
    """The first output (logits or last hidden state) of the base (+ unmerged adapter) in torch, fp32, as numpy."""
    from adalora_export.hf import load_pretrained

    model = load_pretrained(base_dir, task, dtype=torch.float32).eval()
    if adapter is not None:
        adapter.apply_to(model)
    kwargs = {k: torch.from_numpy(v) for k, v in feeds.items()}
    if "position_ids" in kwargs:
        kwargs["use_cache"] = False
    with torch.no_grad():
        return model(**kwargs)[0].float().numpy()


def assert_within_budget(run_dir: Path) -> None:
    """A finished run's adapter spends its budget: exactly (triplets) or, in parameters, at most LoRA at
    target_r's size and more than 80% of it (the next-best triplet did not fit)."""
    from adalora_export.sources import load_adapter

    pattern = json.loads((Path(run_dir) / "rank_pattern.json").read_text())
    adapter = load_adapter(Path(run_dir) / "adapter")
    if pattern["budget_unit"] == "triplets":
        assert 0 < sum(adapter.rank_pattern.values()) == pattern["budget"]
    else:
        assert 0.8 * pattern["budget"] < adapter.num_parameters() <= pattern["budget"]
