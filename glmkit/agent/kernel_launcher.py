"""The first code a sandboxed kernel runs: limits and a file guard, then the IPython kernel.

Run as a script (`python kernel_launcher.py -f CONNECTION_FILE`) by `interpreter.InterpreterSession`,
with the settings in the environment variable GLMKIT_SANDBOX (JSON; removed before user code runs).
It imports nothing from glmkit, so the kernel's Python needs only ipykernel.

In order, inside the kernel process, before any user code:
1. resource limits (inherited by any process the kernel starts): RLIMIT_CPU (CPU seconds of the
   process; at the soft limit the OS sends SIGXCPU, which ends it), RLIMIT_DATA (data segment and
   private writable memory; allocations beyond it fail, Python raises MemoryError), RLIMIT_FSIZE
   (largest file it may write).
2. an audit hook (PEP 578; it cannot be removed once added) that refuses, with PermissionError:
   - opening a file for writing, creating, removing, renaming, linking, truncating or changing
     the mode, owner or times of a path outside the writable folders (the session's working
     directory and temporary directory; /dev/null), checked on the real path (symlinks resolved);
   - opening, listing or entering another session's folder or files, reading included (a path
     under the sessions folder that is not this session's; os.stat and os.path.exists are not
     audited by Python, so another session's file names can still be probed);
   - starting processes (subprocess, os.system, os.exec*, os.spawn*, os.posix_spawn, os.fork,
     pty.spawn) unless allowed;
   - internet sockets (connect, bind, sendto, sendmsg on AF_INET / AF_INET6) and every name lookup
     (getaddrinfo) unless the network is allowed.
   A path given relative to a directory descriptor (dir_fd=) is checked as if relative to the
   current directory: Python's audit events do not carry the descriptor.
3. the IPython kernel (ipykernel), with IPython's history database turned off.
"""

import errno
import json
import os
import resource
import socket
import sys

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
INTERNET = (socket.AF_INET, socket.AF_INET6)
# event -> positions of the paths it writes (see the audit events table of the Python docs)
WRITE_EVENTS = {
    "os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.rename": (0, 1), "os.link": (1,),
    "os.symlink": (1,), "os.truncate": (0,), "os.chmod": (0,), "os.chown": (0,), "os.chflags": (0,),
    "os.utime": (0,), "os.setxattr": (0,), "os.removexattr": (0,), "shutil.rmtree": (0,),
    "shutil.move": (0, 1), "shutil.chown": (0,), "sqlite3.connect": (0,),
}
READ_EVENTS = {"os.listdir": (0,), "os.scandir": (0,), "os.chdir": (0,), "os.walk": (0,), "glob.glob": (0,)}
PROCESS_EVENTS = {"subprocess.Popen", "os.system", "os.exec", "os.spawn", "os.posix_spawn", "os.fork",
                  "os.forkpty", "pty.spawn"}
SOCKET_EVENTS = {"socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg"}


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def make_guard(writable, own, sessions_dir, allow_processes, allow_network):
    """The audit hook. `writable`, `own`: real paths of folders; `sessions_dir`: all sessions' parent."""
    writable = [os.path.realpath(p) for p in writable]
    own = [os.path.realpath(p) for p in own]
    sessions_dir = os.path.realpath(sessions_dir) if sessions_dir else None
    realpath, fsdecode = os.path.realpath, os.fsdecode

    def refuse(what, path=None):
        __tracebackhide__ = True  # IPython leaves the guard's own frames out of tracebacks
        raise PermissionError(errno.EACCES, f"glmkit sandbox: {what}", path)

    def check(path, writing):
        __tracebackhide__ = True
        if path is None or isinstance(path, int):  # a file descriptor: it was checked when opened
            return
        if isinstance(path, (str, bytes, os.PathLike)):
            real = realpath(fsdecode(path))
            if sessions_dir and _within(real, sessions_dir) and not any(_within(real, f) for f in own):
                refuse("another session's files are not accessible", real)
            if writing and real != os.devnull and not any(_within(real, f) for f in writable):
                refuse("writing outside the working directory is not allowed", real)

    def guard(event, args):
        __tracebackhide__ = True
        if event == "open":
            path, mode, flags = args
            writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & WRITE_FLAGS)
            check(path, writing)
        elif event in WRITE_EVENTS:
            if event == "sqlite3.connect" and (args[0] in (":memory:", "", b":memory:", b"")):
                return
            for i in WRITE_EVENTS[event]:
                check(args[i] if i < len(args) else None, True)
        elif event in READ_EVENTS:
            check(args[0] if args else None, False)
        elif event in PROCESS_EVENTS and not allow_processes:
            refuse("starting processes is not allowed in this session")
        elif not allow_network:
            if event in SOCKET_EVENTS and getattr(args[0], "family", None) in INTERNET:
                refuse("network access is not allowed in this session")
            if event == "socket.getaddrinfo":
                refuse("network access (name lookup) is not allowed in this session")

    return guard


def set_limits(cpu_seconds, memory_bytes, file_bytes):
    def lower(kind, soft, hard):
        old_hard = resource.getrlimit(kind)[1]
        if old_hard != resource.RLIM_INFINITY:
            hard = min(hard, old_hard)
            soft = min(soft, hard)
        resource.setrlimit(kind, (soft, hard))

    if cpu_seconds:
        lower(resource.RLIMIT_CPU, cpu_seconds, cpu_seconds + 5)  # SIGXCPU at the soft limit, SIGKILL at the hard
    if memory_bytes:
        lower(resource.RLIMIT_DATA, memory_bytes, memory_bytes)
    if file_bytes:
        lower(resource.RLIMIT_FSIZE, file_bytes, file_bytes)


def copy_font_cache(source, target):
    """Give matplotlib the user's font cache, so a fresh session does not rebuild it (seconds)."""
    if not source or not target or not os.path.isdir(source):
        return
    os.makedirs(target, exist_ok=True)
    for name in os.listdir(source):
        if name.startswith("fontlist") and name.endswith(".json"):
            try:
                with open(os.path.join(source, name), "rb") as src, open(os.path.join(target, name), "wb") as dst:
                    dst.write(src.read())
            except OSError:
                pass  # only a cache: matplotlib rebuilds what is missing


def main():
    settings = json.loads(os.environ.pop("GLMKIT_SANDBOX"))
    # Run as a script, this file's folder is sys.path[0]: user code must not import glmkit's modules by accident.
    if sys.path and os.path.realpath(sys.path[0]) == os.path.dirname(os.path.realpath(__file__)):
        del sys.path[0]
    set_limits(settings["cpu_seconds"], settings["memory_bytes"], settings["file_bytes"])
    copy_font_cache(settings.get("font_cache"), os.environ.get("MPLCONFIGDIR"))
    sys.addaudithook(make_guard(settings["writable"], settings["own"], settings["sessions_dir"],
                                settings["allow_processes"], settings["allow_network"]))
    from ipykernel.kernelapp import launch_new_instance

    launch_new_instance(argv=[*sys.argv[1:], "--HistoryManager.enabled=False"])


if __name__ == "__main__":
    main()
