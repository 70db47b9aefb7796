"""A thread that hands the computing over, or falls idle, lets its OpenMP team go (glmkit.openmp_threads).

Each check runs in a fresh interpreter with two torch threads, counting the process's threads in
/proc/self/task: a thread's first parallel op starts a worker thread of its team, the release ends it.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from glmkit.openmp_threads import _loaded_runtimes

pytestmark = [
    pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in Linux's /proc"),
    pytest.mark.skipif("OpenMP" not in torch.__config__.parallel_info(), reason="this torch does not compute with OpenMP"),
]

TESTS = Path(__file__).parent

COUNT = """
import os, time
def threads(settle=0.2):
    time.sleep(settle)  # a released worker ends right after the call returns
    return len(os.listdir("/proc/self/task"))
"""


def run(script: str) -> list[str]:
    code = COUNT + textwrap.dedent(script)
    env = {"PYTHONPATH": f"{TESTS}:{TESTS.parent}", "GLMKIT_CPU_KERNELS": "0", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120,
                          cwd=TESTS, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_torchs_runtime_is_found():
    assert any("gomp" in Path(p).name or "omp" in Path(p).name for p in _loaded_runtimes())


def test_release_ends_the_calling_threads_team():
    base, team, released, after, again = run("""
        import torch
        from glmkit.openmp_threads import release_openmp_threads
        torch.set_num_threads(2)
        base = threads()
        x = torch.ones(4_000_000)
        x.add_(1)  # a parallel op: this thread's team starts
        team = threads()
        released = release_openmp_threads()
        after = threads()
        x.add_(1)  # the next parallel op starts a new team
        print(base, team, released, after, threads())
    """)
    assert int(team) == int(base) + 1 and released == "True"
    assert int(after) == int(base) and int(again) == int(base) + 1


def test_the_engine_thread_lets_its_team_go_when_idle():
    """The server's case: the main thread loaded the model (its team released), the engine's worker thread
    computes with a team of its own while requests run, and lets it go once there is nothing to do."""
    base, during, idle, reply = run("""
        import asyncio, torch
        from glmkit.engine import AsyncEngine
        from glmkit.openmp_threads import release_openmp_threads
        from glmkit.sampling import SamplingParams
        from tiny import real_tokenizer, tiny_model
        torch.set_num_threads(2)
        model, tok = tiny_model(0, hidden_size=512, ffn_hidden_size=1024), real_tokenizer()
        engine = AsyncEngine(model, tok, block_size=8)
        release_openmp_threads()
        base = threads()

        async def main():
            counts, tokens = [], 0
            async for delta in engine.generate(list(range(64790, 64792)) + [100] * 300,
                                               SamplingParams(temperature=0, max_new_tokens=8, stop_token_ids=[])):
                counts.append(threads(0))
                tokens += delta.token_id is not None
            idle = threads(0.5)
            await engine.stop()
            return max(counts), idle, tokens

        during, idle, tokens = asyncio.run(main())
        print(base, during, idle, tokens)
    """)
    assert int(reply) == 8
    assert int(during) == int(base) + 2  # the worker thread and its team's worker
    assert int(idle) == int(base) + 1  # the worker thread alone, waiting for work
