"""The code interpreter on a real Jupyter kernel: state, outputs in order, images, time and memory
limits, restarts, the file guard, network and process refusal, and sessions kept apart.

One kernel serves most tests of this module (a test that restarts it says so); tests that need
other limits start their own.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import time

import pytest

from glmkit.agent.interpreter import InterpreterError, InterpreterSession, SandboxLimits, network_isolation

LIMITS = SandboxLimits(timeout=2, interrupt_grace=3, memory_mb=1024)


@pytest.fixture(scope="module")
def sessions_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("sessions")


@pytest.fixture(scope="module")
def session(sessions_dir):
    with InterpreterSession(LIMITS, sessions_dir=sessions_dir) as s:
        s.start()
        yield s


def test_state_is_kept_across_cells(session):
    assert session.run("state_a = 40").observation == "```result\n[no output]\n```"
    run = session.run("state_a += 2\nstate_a")
    assert run.status == "ok" and not run.restarted
    assert [(o.kind, o.text) for o in run.outputs] == [("result", "42")]
    assert run.observation == "```result\n42\n```"


def test_outputs_in_order_with_an_image_between_prints(session):
    run = session.run("import sys\n"
                      "import matplotlib.pyplot as plt\n"
                      "print('before')\n"
                      "print('a warning', file=sys.stderr)\n"
                      "plt.plot([1, 2, 3], [1, 4, 9]); plt.show()\n"
                      "print('after')\n"
                      "'the value'")
    assert run.status == "ok", run.text
    assert [o.kind for o in run.outputs] == ["stdout", "stderr", "image", "stdout", "result"]
    assert run.outputs[0].text == "before\n" and run.outputs[1].text == "a warning\n"
    assert run.outputs[3].text == "after\n" and run.outputs[4].text == "'the value'"
    image = run.images[0]
    assert image.mime == "image/png" and image.data.startswith(b"\x89PNG\r\n\x1a\n")
    assert image.path.read_bytes() == image.data and image.path.parent == session.outputs_dir
    assert not image.path.is_relative_to(session.workdir)  # the model's folder holds only its own files
    assert re.search(r"\[image \d+: \d+x\d+ PNG, shown to the user; <Figure size 640x480 with 1 Axes>\]", image.text)
    lines = run.observation.splitlines()
    assert lines[0] == "```result" and lines[-1] == "```"
    assert lines[1:4] == ["before", "a warning", image.text] and lines[4:6] == ["after", "'the value'"]


def test_errors_come_back_as_clean_tracebacks(session):
    run = session.run("print('first')\n1 / 0\nprint('never')")
    assert run.status == "error" and not run.restarted
    assert [o.kind for o in run.outputs] == ["stdout", "error"]
    traceback = run.outputs[1].text
    assert "\x1b" not in traceback and "\x1b" not in run.observation
    assert traceback.startswith("ZeroDivisionError") and traceback.endswith("ZeroDivisionError: division by zero")
    assert "----> 2 1 / 0" in traceback
    assert session.run("print('still here')").observation == "```result\nstill here\n```"


def test_an_infinite_loop_is_interrupted_and_the_next_cell_runs(session):
    session.run("kept_b = 'kept'")
    started = time.monotonic()
    run = session.run("while True:\n    pass")
    assert LIMITS.timeout <= time.monotonic() - started < LIMITS.timeout + LIMITS.interrupt_grace
    assert run.status == "timeout" and not run.restarted
    assert "KeyboardInterrupt" in run.text
    assert "still running after the time limit of 2 s and was interrupted; variables are kept" in run.observation
    assert session.run("kept_b").outputs[0].text == "'kept'"  # same kernel, same state


def test_a_memory_bomb_is_stopped_and_the_kernel_restarted(session):
    session.run("lost_c = 1")
    restarts = session.restarts
    run = session.run("hog = []\nwhile True:\n    hog.append(b'x' * 2**20)")
    assert run.status == "error" and run.restarted and session.restarts == restarts + 1
    assert "MemoryError" in run.text
    assert "ran out of memory (the limit is 1024 MB), so the kernel was restarted" in run.observation
    assert "all variables, imports and definitions are lost" in run.observation
    after = session.run("print('fresh'); 'lost_c' in dir()")
    assert after.status == "ok" and after.text == "fresh\nFalse"


def test_a_kernel_that_dies_is_restarted_and_the_model_told(session):
    run = session.run("import os\nos._exit(3)")
    assert run.status == "died" and run.restarted
    assert "the kernel died while running this code: it exited with status 3" in run.observation
    pid = int(session.run("import os; os.getpid()").outputs[0].text)
    os.kill(pid, signal.SIGKILL)  # dies between two cells
    time.sleep(0.2)
    run = session.run("print('back')")
    assert run.status == "ok" and run.restarted
    assert run.outputs[0].text == "back\n"
    assert "the kernel had stopped since the last code ran: it was killed (SIGKILL)" in run.observation


def test_writes_outside_the_working_directory_are_refused(session, tmp_path):
    outside = tmp_path / "outside.txt"
    existing = tmp_path / "existing.txt"
    existing.write_text("keep me")
    (session.workdir / "link").symlink_to(tmp_path, target_is_directory=True)  # a way out, by symlink
    attempts = [f"open({str(outside)!r}, 'w')",
                f"import pathlib; pathlib.Path({str(outside)!r}).write_text('x')",
                f"import os; os.remove({str(existing)!r})",
                f"import os; os.mkdir({str(tmp_path / 'newdir')!r})",
                f"import shutil; shutil.copy('/etc/hostname', {str(outside)!r})",
                "open('link/via_symlink.txt', 'w')",
                f"import os; os.open({str(outside)!r}, os.O_WRONLY | os.O_CREAT)",
                f"import sqlite3; sqlite3.connect({str(tmp_path / 'db.sqlite')!r})"]
    for code in attempts:
        run = session.run(code)
        assert run.status == "error", code
        assert "PermissionError" in run.text and "writing outside the working directory is not allowed" in run.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing.txt"] and existing.read_text() == "keep me"
    # Inside the working directory and the session's temporary directory, writing works.
    run = session.run("import tempfile, os\n"
                      "open('inside.txt', 'w').write('ok')\n"
                      "os.rename('inside.txt', 'moved.txt')\n"
                      "with tempfile.NamedTemporaryFile() as f: f.write(b'x')\n"
                      "open('moved.txt').read()")
    assert run.status == "ok", run.text
    assert (session.workdir / "moved.txt").read_text() == "ok"
    # Reading elsewhere is allowed; moving a file out of the working directory is a write outside it.
    assert session.run("len(open('/etc/hostname').read()) >= 0").text == "True"
    run = session.run(f"import os; os.rename('moved.txt', {str(outside)!r})")
    assert "writing outside the working directory is not allowed" in run.text


def test_uploaded_files_appear_in_the_working_directory(session):
    session.upload("data/numbers.csv", b"a,b\n1,2\n")
    assert session.run("open('data/numbers.csv').read()").text == "'a,b\\n1,2\\n'"
    with pytest.raises(ValueError, match="not a file name inside the working directory"):
        session.upload("../escape.txt", b"x")


def test_processes_and_network_are_refused(session):
    run = session.run("import subprocess; subprocess.run(['true'])")
    assert "starting processes is not allowed" in run.text
    with socket.socket() as server:  # a listener on loopback, which the kernel must not reach
        server.bind(("127.0.0.1", 0))
        server.listen()
        run = session.run(f"import socket; socket.socket().connect(('127.0.0.1', {server.getsockname()[1]}))")
    assert "PermissionError" in run.text and "network access is not allowed" in run.text
    run = session.run("import socket; socket.getaddrinfo('localhost', 80)")
    assert "network access (name lookup) is not allowed" in run.text
    assert isinstance(session.network_cut, bool)
    interfaces = session.run("import socket; sorted(name for _, name in socket.if_nameindex())").text
    if network_isolation():  # the OS allows a network namespace: the kernel's is empty
        assert session.network_cut and interfaces == "['lo']"
    else:
        assert not session.network_cut


def test_long_output_is_cut_visibly(session):
    run = session.run("print('x' * 10000)")
    assert len(run.outputs[0].text) == 10001  # the outputs are whole; the model's observation is cut
    assert "characters cut: the output has 10000 characters and the limit is 4000" in run.observation
    assert len(run.observation) < 4300


def test_two_sessions_share_no_variables_and_no_files(session, sessions_dir):
    session.run("secret_d = 'from session one'\nopen('mine.txt', 'w').write('one')")
    with InterpreterSession(LIMITS, sessions_dir=sessions_dir) as other:
        assert other.root != session.root and other.workdir != session.workdir
        assert "NameError" in other.run("secret_d").text
        assert other.run("import os; sorted(os.listdir('.'))").text == "[]"
        for code in [f"open({str(session.workdir / 'mine.txt')!r}).read()",
                     f"import os; os.listdir({str(session.workdir)!r})",
                     f"open({str(session.workdir / 'theirs.txt')!r}, 'w')"]:
            run = other.run(code)
            assert "another session's files are not accessible" in run.text, code
    assert not (session.workdir / "theirs.txt").exists()
    assert session.run("secret_d").text == "'from session one'"


def test_closed_session_removes_its_folder(sessions_dir):
    s = InterpreterSession(LIMITS, sessions_dir=sessions_dir)
    s.run("1")
    root = s.root
    s.close()
    assert not root.exists() and s.closed
    with pytest.raises(InterpreterError, match="closed"):
        s.run("1")


def test_bad_limits_are_refused():
    with pytest.raises(ValueError, match="timeout must be a positive"):
        SandboxLimits(timeout=0)
    with pytest.raises(ValueError, match="memory_mb must be a positive int or None"):
        SandboxLimits(memory_mb=-1)


@pytest.mark.slow
def test_a_cell_that_ignores_the_interrupt_gets_a_restarted_kernel(sessions_dir):
    with InterpreterSession(SandboxLimits(timeout=1, interrupt_grace=1), sessions_dir=sessions_dir) as s:
        s.run("lost_e = 1")
        run = s.run("import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True:\n    pass")
        assert run.status == "timeout" and run.restarted
        assert "did not stop when interrupted, so the kernel was restarted" in run.observation
        assert "NameError" in s.run("lost_e").text


@pytest.mark.slow
def test_the_cpu_time_budget_ends_and_restarts_the_kernel(sessions_dir):
    with InterpreterSession(SandboxLimits(timeout=30, cpu_seconds=2), sessions_dir=sessions_dir) as s:
        run = s.run("while True:\n    pass")
        assert run.status == "died" and run.restarted
        assert "it used up its CPU-time budget of 2 s" in run.observation
        assert s.run("print('again')").text == "again"
