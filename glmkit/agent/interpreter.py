"""The code interpreter: the model's Python runs on a real Jupyter kernel, one sandboxed kernel per
session (per conversation), with its state kept from one cell to the next.

    with InterpreterSession(SandboxLimits(timeout=30, memory_mb=2048)) as session:
        session.upload("data.csv", b"a,b\\n1,2\\n")
        run = session.run("import pandas as pd; pd.read_csv('data.csv')")
        run.outputs        # stdout, stderr, results, images, errors, in the order the kernel sent them
        run.observation    # what the model reads: the outputs as text, fenced as a ```result block

Each cell's outputs come back in order: stdout and stderr (consecutive pieces of one stream
merged), results and displays (their text/plain), errors (the traceback with its ANSI colour codes
stripped) and images (PNG or JPEG: the bytes, a file in the session's `outputs` folder, and a
one-line description for the model). The observation is cut by `observation.truncate`.

What the sandbox does (Linux; `kernel_launcher` applies the in-process parts):
- A kernel process of its own per session, started in the session's working directory
  (`workdir`, where uploaded files go) with its own temporary directory (TMPDIR) and config
  folders. Two sessions share no variables and no folders.
- Time: a cell that runs past `timeout` seconds (wall clock) is interrupted (SIGINT, i.e.
  KeyboardInterrupt; the kernel's state is kept); if it has not stopped `interrupt_grace` seconds
  later, the kernel is restarted. CPU: `cpu_seconds` is the CPU-time budget of one kernel process
  over its life, its start (about a second) included (RLIMIT_CPU); spending it ends the process,
  which is then restarted with a fresh budget.
- Memory: `memory_mb` bounds the kernel's data segment and private writable memory (RLIMIT_DATA;
  above its resident memory: reserved, untouched memory counts too, which is why numerical
  libraries get `threads` threads, not one per core). An allocation beyond it fails: Python
  raises MemoryError, and a cell that ends in MemoryError restarts the kernel, to free what the
  cell had filled. `file_mb` bounds the size of one file the kernel writes (RLIMIT_FSIZE).
- A kernel that dies, for any reason, is restarted, and the model is told that its variables
  are lost (files in the working directory are kept).
- Network: cut for the kernel and everything it starts by running it in a new, empty network
  namespace (`unshare --net`, or `unshare --user --map-root-user --net` without root), where the
  OS allows it; `network_cut` says whether it did. The audit hook also refuses Python's own
  internet sockets and name lookups; where the OS allows no namespace, that is all there is (a
  warning says so): C libraries and child processes are then not stopped. The kernel talks to
  glmkit over Unix-domain sockets, which need no network.
- Files: an audit hook in the kernel refuses writes outside the working and temporary
  directories, opening or listing another session's folder, and starting processes (each listed
  exactly in `kernel_launcher`).

What it does not protect against: it is a guard against accidents and careless code, not a
boundary against code written to escape. The kernel runs as the same OS user as glmkit (as root,
if glmkit runs as root: then code can raise its own limits). The audit hook sees only what Python
code does through the standard library: C extensions and ctypes can write anywhere the user may,
and the checks on a path can race with a symlink swapped in between. Reading files elsewhere on
the machine (outside other sessions' folders) is allowed. Processes, when allowed, are not
guarded by the hook (they keep the limits and the network namespace). Disk use in total is not
limited (only each file's size). For a real boundary, run glmkit as an unprivileged user in a
container or VM.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
import weakref
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from .observation import result_block, truncate

LAUNCHER = Path(__file__).with_name("kernel_launcher.py")
IMAGE_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG"}
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")
_LOST = "all variables, imports and definitions are lost; files in the working directory are kept"


class InterpreterError(RuntimeError):
    """The kernel could not be started (or restarted)."""


@dataclass(frozen=True)
class SandboxLimits:
    """The limits one session runs under; None turns a limit off."""

    timeout: float = 30.0  # wall-clock seconds a cell may run before it is interrupted
    interrupt_grace: float = 5.0  # seconds an interrupted cell has to stop before the kernel is restarted
    cpu_seconds: int | None = 600  # CPU seconds of one kernel process (RLIMIT_CPU); then it is restarted
    memory_mb: int | None = 2048  # RLIMIT_DATA of the kernel process
    file_mb: int | None = 1024  # the largest file the kernel may write (RLIMIT_FSIZE)
    threads: int | None = 4  # threads of numerical libraries (OpenMP, OpenBLAS, MKL): each reserves memory
    network: bool = False  # False: cut where the OS allows (see network_cut)
    processes: bool = False  # allow the kernel's code to start processes (shell commands, pip)
    max_output_chars: int = 4000  # the observation's text is cut by observation.truncate beyond this
    startup_timeout: float = 60.0  # seconds to wait for a kernel to start

    def __post_init__(self) -> None:
        for name in ("timeout", "interrupt_grace", "startup_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"SandboxLimits.{name} must be a positive number of seconds, got {getattr(self, name)!r}")
        for name in ("cpu_seconds", "memory_mb", "file_mb", "threads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"SandboxLimits.{name} must be a positive int or None, got {value!r}")
        if self.max_output_chars < 1:
            raise ValueError(f"SandboxLimits.max_output_chars must be at least 1, got {self.max_output_chars!r}")


@dataclass(frozen=True)
class Output:
    """One output of a cell. kind: stdout, stderr, result, display, image or error.

    text: the stream text, the result's text/plain, the cleaned traceback, or (image) the
    description the model reads. data / mime / path: an image's bytes, type and saved file.
    """

    kind: str
    text: str
    data: bytes | None = field(default=None, repr=False)
    mime: str | None = None
    path: Path | None = None


@dataclass(frozen=True)
class Execution:
    """What running one cell did.

    status: "ok"; "error" (the code raised); "timeout" (interrupted at the time limit); "died"
    (the kernel process ended while the cell ran). restarted: the kernel was restarted during or
    right before this cell, so earlier state is gone. notes: what the sandbox did, as told to the
    model. observation: the text sent back to the model.
    """

    code: str
    outputs: list[Output]
    status: str
    restarted: bool
    notes: list[str]
    seconds: float
    observation: str

    @property
    def images(self) -> list[Output]:
        return [o for o in self.outputs if o.kind == "image"]

    @property
    def text(self) -> str:
        """The outputs and notes as the model reads them, before truncation and fencing."""
        return render_outputs(self.outputs, self.notes)


def render_outputs(outputs: list[Output], notes: list[str]) -> str:
    parts = [o.text if o.text.endswith("\n") else o.text + "\n" for o in outputs if o.text]
    parts += [f"[{note}]\n" for note in notes]
    return "".join(parts).rstrip("\n") or "[no output]"


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


def default_sessions_dir() -> Path:
    """The folder that holds every session's folder (one per OS user)."""
    return Path(tempfile.gettempdir()) / f"glmkit-sessions-{os.getuid()}"


@cache
def network_isolation() -> tuple[str, ...]:
    """The command prefix that runs a process in a new, empty network namespace; () where the OS
    does not allow one. Probed once per process."""
    unshare = shutil.which("unshare")
    if not unshare or not sys.platform.startswith("linux"):
        return ()
    for prefix in ((unshare, "--net", "--"), (unshare, "--user", "--map-root-user", "--net", "--")):
        try:
            probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return prefix
    return ()


class InterpreterSession:
    """One sandboxed Jupyter kernel and its folders: `workdir` (the kernel's working directory),
    `tmpdir` (its TMPDIR), `outputs_dir` (images). The kernel starts on the first `run` (or
    `start()`); `close()` stops it and removes the session's folder (a `workdir` given by the
    caller is kept). Thread-safe: cells run one at a time."""

    def __init__(self, limits: SandboxLimits | None = None, *, workdir: str | Path | None = None,
                 sessions_dir: str | Path | None = None, python: str | None = None):
        if os.name != "posix":
            raise InterpreterError("the code interpreter's sandbox needs a POSIX system (Linux)")
        self.limits = limits or SandboxLimits()
        self.sessions_dir = Path(sessions_dir) if sessions_dir else default_sessions_dir()
        self.sessions_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.root = Path(tempfile.mkdtemp(prefix="session-", dir=self.sessions_dir))
        self.workdir = Path(workdir).resolve() if workdir is not None else self.root / "work"
        self.tmpdir = self.root / "tmp"
        self.outputs_dir = self.root / "outputs"
        for folder in (self.workdir, self.tmpdir, self.outputs_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self.python = python or sys.executable
        self.network_cut: bool | None = None  # known once the kernel has started
        self.restarts = 0
        self._kernel: dict[str, Any] = {}  # "manager", "client", "log": shared with the finalizer
        self._lock = threading.Lock()
        self._images = 0
        self._finalizer = weakref.finalize(self, _shutdown, self._kernel, self.root)

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Start the kernel (if it is not running) and wait until it answers."""
        with self._lock:
            if "manager" not in self._kernel:
                self._start()

    def restart(self) -> None:
        """Restart the kernel, if it has started: a fresh interpreter, the same folders."""
        with self._lock:
            if "manager" in self._kernel:
                self._restart()

    def close(self) -> None:
        """Stop the kernel and remove the session's folder (not a `workdir` given by the caller)."""
        with self._lock:
            self._finalizer()

    def __enter__(self) -> InterpreterSession:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def upload(self, name: str, data: bytes | str | os.PathLike) -> Path:
        """Put a file in the working directory: `data` is its bytes, its text, or a path to copy."""
        target = (self.workdir / name).resolve()
        if not target.is_relative_to(self.workdir) or target == self.workdir:
            raise ValueError(f"{name!r} is not a file name inside the working directory")
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, bytes):
            target.write_bytes(data)
        elif isinstance(data, str):
            target.write_text(data, encoding="utf-8")
        else:
            shutil.copyfile(data, target)
        return target

    # ---- running -----------------------------------------------------------------------------
    def run(self, code: str) -> Execution:
        """Run one cell; never raises for what the code does (InterpreterError if no kernel starts)."""
        if not isinstance(code, str):
            raise TypeError(f"code must be a str, got {type(code).__name__}")
        with self._lock:
            if self.closed:
                raise InterpreterError("this interpreter session is closed")
            notes: list[str] = []
            restarted = False
            if "manager" not in self._kernel:
                self._start()
            elif not self._kernel["manager"].is_alive():
                notes.append(f"the kernel had stopped since the last code ran: {self._exit_reason()}. It was restarted "
                             f"before this code ran: {_LOST}")
                self._restart()
                restarted = True
            started = time.monotonic()
            outputs, status, more_notes, restarted_now = self._execute(code)
            notes += more_notes
            text = render_outputs(outputs, notes)
            observation = result_block(truncate(text, self.limits.max_output_chars))
            return Execution(code, outputs, status, restarted or restarted_now, notes, time.monotonic() - started,
                             observation)

    def _execute(self, code: str) -> tuple[list[Output], str, list[str], bool]:
        manager, client = self._kernel["manager"], self._kernel["client"]
        _drain(client.get_shell_msg)
        msg_id = client.execute(code, store_history=True, allow_stdin=False, stop_on_error=True)
        try:
            return self._wait(manager, client, msg_id)
        except KeyboardInterrupt:  # the caller gave up (Ctrl-C): stop the cell too, so the kernel is free
            manager.interrupt_kernel()
            raise

    def _wait(self, manager: Any, client: Any, msg_id: str) -> tuple[list[Output], str, list[str], bool]:
        """Collect the cell's outputs until the kernel is idle, enforcing the time limit."""
        collected = _Collector(self)
        deadline = time.monotonic() + self.limits.timeout
        interrupted_at: float | None = None
        while True:
            now = time.monotonic()
            if interrupted_at is None and now >= deadline:
                manager.interrupt_kernel()
                interrupted_at = now
            elif interrupted_at is not None and now >= interrupted_at + self.limits.interrupt_grace:
                self._restart()
                return collected.outputs, "timeout", [
                    f"the code was still running after the time limit of {self.limits.timeout:g} s and did not stop "
                    f"when interrupted, so the kernel was restarted: {_LOST}"], True
            try:
                message = client.get_iopub_msg(timeout=0.1)
            except queue.Empty:
                if not manager.is_alive():
                    reason = self._exit_reason()
                    self._restart()
                    return collected.outputs, "died", [f"the kernel died while running this code: {reason}. It was "
                                                       f"restarted: {_LOST}"], True
                continue
            if message["parent_header"].get("msg_id") != msg_id:
                continue  # e.g. the end of a cell interrupted earlier
            kind, content = message["msg_type"], message["content"]
            if kind == "status" and content.get("execution_state") == "idle":
                break
            collected.add(kind, content)
        if interrupted_at is not None:
            return collected.outputs, "timeout", [
                f"the code was still running after the time limit of {self.limits.timeout:g} s and was interrupted; "
                "variables are kept"], False
        if collected.error_name == "MemoryError":
            self._restart()
            limit = f" (the limit is {self.limits.memory_mb} MB)" if self.limits.memory_mb else ""
            return collected.outputs, "error", [f"the code ran out of memory{limit}, so the kernel was restarted to "
                                                f"free it: {_LOST}"], True
        return collected.outputs, "error" if collected.error_name else "ok", [], False

    # ---- the kernel process ------------------------------------------------------------------
    def _start(self) -> None:
        prefix: tuple[str, ...] = () if self.limits.network else network_isolation()
        self.network_cut = bool(prefix) and not self.limits.network
        if not self.limits.network and not prefix:
            warnings.warn("the code interpreter's network is not cut: this system does not allow a new network "
                          "namespace (unshare --net); only Python's own internet sockets are refused", stacklevel=4)
        manager = _kernel_manager([*prefix, self.python, str(LAUNCHER), "-f", "{connection_file}"], self.root)
        log = open(self.root / "kernel.log", "ab")  # the kernel's own stdout/stderr, kept out of the terminal
        self._kernel.update(manager=manager, log=log)
        try:
            manager.start_kernel(cwd=str(self.workdir), env=self._environment(), stdout=log, stderr=log)
            self._connect()
        except BaseException:
            _stop_kernel(self._kernel)  # the next run starts afresh
            raise

    def _restart(self) -> None:
        self.restarts += 1
        self._kernel.pop("client").stop_channels()
        self._kernel["manager"].restart_kernel(now=True)
        self._connect()

    def _connect(self) -> None:
        client = self._kernel["manager"].blocking_client()
        client.start_channels()
        self._kernel["client"] = client
        try:
            client.wait_for_ready(timeout=self.limits.startup_timeout)
        except RuntimeError as e:  # the kernel died or did not answer in time
            log = (self.root / "kernel.log").read_text(errors="replace").strip().splitlines()[-15:]
            raise InterpreterError(f"the code interpreter's kernel did not start ({e}); its log ends with:\n"
                                   + "\n".join(log)) from None

    def _environment(self) -> dict[str, str]:
        limits, tmp = self.limits, self.tmpdir
        settings = {
            "cpu_seconds": limits.cpu_seconds,
            "memory_bytes": limits.memory_mb * 2**20 if limits.memory_mb else None,
            "file_bytes": limits.file_mb * 2**20 if limits.file_mb else None,
            "writable": [str(self.workdir), str(tmp)],
            "own": [str(self.root), str(self.workdir)],
            "sessions_dir": str(self.sessions_dir),
            "allow_processes": limits.processes,
            "allow_network": limits.network,
            "font_cache": _matplotlib_cache_dir(),
        }
        threads = {name: str(limits.threads) for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
                   } if limits.threads else {}
        return {**os.environ, **threads, "GLMKIT_SANDBOX": json.dumps(settings), "TMPDIR": str(tmp), "TMP": str(tmp),
                "TEMP": str(tmp), "MPLCONFIGDIR": str(tmp / "matplotlib"), "IPYTHONDIR": str(tmp / "ipython"),
                "JUPYTER_RUNTIME_DIR": str(tmp / "jupyter"), "XDG_CACHE_HOME": str(tmp / "cache")}

    def _exit_reason(self) -> str:
        process = getattr(self._kernel["manager"].provisioner, "process", None)
        code = process.poll() if process is not None else None
        if code is None:
            return "it stopped answering"
        if code < 0:
            number = -code
            if number == signal.SIGXCPU and self.limits.cpu_seconds:
                return f"it used up its CPU-time budget of {self.limits.cpu_seconds} s"
            if number == signal.SIGKILL:
                return "it was killed (SIGKILL), possibly for using too much memory"
            return f"it was ended by signal {signal.Signals(number).name}"
        return f"it exited with status {code}"

    def _save_image(self, data: bytes, mime: str) -> tuple[int, Path]:
        """(number, file) of a new image of this session."""
        self._images += 1
        path = self.outputs_dir / f"image-{self._images}.{IMAGE_TYPES[mime].lower().replace('jpeg', 'jpg')}"
        path.write_bytes(data)
        return self._images, path


class _Collector:
    """A cell's outputs, in the order the kernel sent them."""

    def __init__(self, session: InterpreterSession):
        self.session = session
        self.outputs: list[Output] = []
        self.error_name: str | None = None

    def add(self, kind: str, content: dict[str, Any]) -> None:
        if kind == "stream":
            name, text = content.get("name", "stdout"), strip_ansi(content.get("text", ""))
            if self.outputs and self.outputs[-1].kind == name:  # one stream arrives in pieces
                text = self.outputs.pop().text + text
            self.outputs.append(Output(name, text))
        elif kind in ("execute_result", "display_data"):
            self.outputs.append(self._data_output("result" if kind == "execute_result" else "display",
                                                  content.get("data", {})))
        elif kind == "error":
            self.error_name = content.get("ename", "Error")
            self.outputs.append(Output("error", clean_traceback(content)))
        elif kind == "clear_output":
            self.outputs.clear()  # e.g. a progress display redrawn: only what stays on screen counts
        # update_display_data (a change to an earlier display) is not tracked: the first form is kept.

    def _data_output(self, kind: str, data: dict[str, Any]) -> Output:
        plain = strip_ansi(data.get("text/plain", ""))
        for mime, label in IMAGE_TYPES.items():
            if mime in data:
                raw = base64.b64decode(data[mime])
                number, path = self.session._save_image(raw, mime)
                size = _png_size(raw) if mime == "image/png" else None
                shape = f"{size[0]}x{size[1]} " if size else ""
                described = f"; {plain}" if plain else ""
                return Output("image", f"[image {number}: {shape}{label}, shown to the user{described}]", raw, mime, path)
        if plain:
            return Output(kind, plain)
        kinds = ", ".join(sorted(data)) or "nothing"
        return Output(kind, f"[a display of {kinds}, which has no text form]")


def clean_traceback(content: dict[str, Any]) -> str:
    """An error's traceback as plain text: ANSI codes stripped, IPython's dashed rule dropped."""
    lines = strip_ansi("\n".join(content.get("traceback") or [])).splitlines()
    lines = [line for line in lines if not re.fullmatch(r"-{20,}", line.strip())]
    text = "\n".join(lines).strip()
    return text or f"{content.get('ename', 'Error')}: {content.get('evalue', '')}".rstrip(": ")


def _png_size(data: bytes) -> tuple[int, int] | None:
    if data[:8] != b"\x89PNG\r\n\x1a\n" or len(data) < 24:
        return None
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def _drain(get) -> None:
    while True:
        try:
            get(timeout=0)
        except queue.Empty:
            return


def _matplotlib_cache_dir() -> str:
    if os.environ.get("MPLCONFIGDIR"):
        return os.environ["MPLCONFIGDIR"]
    return str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "matplotlib")


def _kernel_manager(argv: list[str], root: Path):
    """A KernelManager for one kernel started with `argv`, talking over Unix sockets in `root`.

    The kernel spec is given directly (no kernel.json installed anywhere); ipc transport because
    a kernel in its own network namespace has no usable TCP loopback to the parent.
    """
    try:
        from jupyter_client import KernelManager
        from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
    except ImportError as e:
        raise InterpreterError(f"the code interpreter needs jupyter_client and ipykernel ({e}); "
                               "install them with: pip install 'glmkit[agent]'") from None

    class OneSpec(KernelSpecManager):
        def get_kernel_spec(self, kernel_name: str, *args: Any, **kwargs: Any) -> KernelSpec:
            return KernelSpec(argv=argv, display_name="glmkit sandbox", language="python", interrupt_mode="signal")

    return KernelManager(kernel_spec_manager=OneSpec(), kernel_name="glmkit-sandbox", transport="ipc",
                         ip=str(root / "kernel"), connection_file=str(root / "kernel.json"))


def _stop_kernel(kernel: dict[str, Any]) -> None:
    client, manager, log = kernel.pop("client", None), kernel.pop("manager", None), kernel.pop("log", None)
    try:
        if client is not None:
            client.stop_channels()
        if manager is not None and manager.has_kernel:
            manager.shutdown_kernel(now=True)
    finally:
        if log is not None:
            log.close()


def _shutdown(kernel: dict[str, Any], root: Path) -> None:
    """Stop the kernel and remove the session's folder; also run when a session is garbage-collected."""
    try:
        _stop_kernel(kernel)
    finally:
        shutil.rmtree(root, ignore_errors=True)
