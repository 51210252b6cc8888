"""The inputs of the bad-input matrix (tests/system/test_hardening_*.py), shared by its files."""

from __future__ import annotations

import pytest
from bad_input import Env
from forkserver import ForkServer


@pytest.fixture(scope="session")
def hardening_env(tmp_path_factory, tiny_base, llama_base, gpt2_base, llama_adapter, train_data, short_schedule_flags):
    """bad_input.Env: the shared bases, adapter and data, and a fork server for the out-of-disk runs."""
    work = tmp_path_factory.mktemp("hardening")
    server = ForkServer(work / "logs")  # imports in the background until the first run
    yield Env(
        work=work,
        base=llama_base,
        gpt2=gpt2_base,
        wide=tiny_base(hidden=64),
        adapter=llama_adapter,
        data=train_data,
        server=server,
        train_flags=list(short_schedule_flags),
    )
    server.close()
