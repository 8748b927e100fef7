"""Run one grading step where the submission can reach neither the grader nor the repository.

A step is one Python process tree started by ``Sandbox.start``:

    grader --Popen(new session)--> boot --fork--> init --fork--> worker --exec--> harness

``boot`` and ``init`` are this file run as ``python -I -S sandbox.py --boot CONFIG``
(standard library only, so no site-packages and no editable install is on
their path). What they set up, strongest first, depending on what the machine
allows:

  * namespaces (root, or an unprivileged user namespace): new mount, PID,
    network and IPC namespaces. In the mount namespace every mount is made
    read-only; the repository, the submission's own folder, the report folder
    and the grader's home are covered by empty read-only tmpfs, with only the
    Python runtime (interpreter, site-packages) bound back read-only; /tmp,
    /var/tmp and /dev/shm are fresh size-limited tmpfs; /proc is a fresh proc
    of the new PID namespace (``hidepid=2``). The step's tree appears read-only
    at ``/tmp/grade``. No network. ``init`` is PID 1 of the namespace: when the
    worker exits, init exits and the kernel kills every process left in it,
    however it detached itself.
  * as root, the worker runs as ``nobody`` (supplementary groups: those owning
    the NVIDIA device nodes), with ``no_new_privs``; where ``nobody`` cannot
    open the GPU's device files (``Sandbox.probe`` checks), or without namespaces
    cannot walk to its tree, as uid 0 with every capability dropped instead: it
    cannot unmount, remount or pass file permissions, so the namespaces' view holds.
  * always: a new session; rlimits (CPU seconds, file size, core 0, open
    files, processes as ``nobody``; RLIMIT_AS only where no cgroup exists and
    CUDA is not in use: CUDA reserves more address space than any useful
    limit); a clean environment (the machine's CUDA/NCCL settings pass); the
    grader watches the resident memory of the whole process tree ten times a
    second and ends the step past the limit; boot and init are subreapers
    that kill every descendant still alive when the worker exits (the only
    cleanup without a PID namespace).
  * where a cgroup can be made under the grader's own (root), a memory
    backstop above the watched limit and a process-count limit for the whole
    tree; an out-of-memory kill is reported as such.

Where the namespaces cannot be built (``Sandbox.probe`` starts an empty step
first), every step of the grading falls back to the rest, and the report says so.

Output goes to one log file whose size RLIMIT_FSIZE caps (not to pipes that a
grandchild could hold open). Results come back over one pipe (``channel``
frames), which the grader drains in a thread. The first frame is init's
report of the isolation it achieved, sent before the worker exists, so the
worker cannot forge it.

Limits that remain (also in course/README.md): without namespaces (no root and
no user namespaces) the worker can read whatever the grader's user can; in the
user-namespace mode it runs under the grader's uid outside the namespace; the
tree a step leaves is bounded per file (RLIMIT_FSIZE) and by the tmpfs sizes,
and the host disk is never writable in the namespace modes.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "harness"))
import channel  # noqa: E402  (stdlib only; shared with the harness)

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = (
    0x00020000,
    0x08000000,
    0x10000000,
    0x20000000,
    0x40000000,
)
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = (
    1,
    2,
    4,
    8,
    32,
    4096,
    16384,
    1 << 18,
)
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 24, 36, 38
SYS_MOUNT_SETATTR, AT_FDCWD, AT_RECURSIVE, MOUNT_ATTR_RDONLY = 442, -100, 0x8000, 1

GRADE_DIR = "/tmp/grade"  # where a namespaced step sees its tree
HOME_DIR = "/tmp/home"


@dataclass
class Limits:
    wall_s: float  # the whole step; the grader's watchdog may stop it sooner
    memory_bytes: int | None = 6 << 30
    file_bytes: int = 64 << 20  # any one file, the log included
    nproc: int = 4096
    cpu_s: int | None = None  # default: wall_s times the CPU count


@dataclass
class Outcome:
    returncode: int | None  # the worker's exit code, -signal if a signal ended it
    timed_out: bool
    oom: bool
    wall_s: float
    log_tail: str
    isolation: dict
    frames: list  # (monotonic time, header, payload) in arrival order; the first is init's (``isolation``)
    channel_error: str
    peak_memory: int | None = None
    killed: bool = False  # the grader ended it (watchdog or wall limit)
    log_bytes: int = 0

    def why(self) -> str:
        """One phrase for how the step ended, for report lines."""
        if self.oom:
            return "killed: out of memory"
        if self.timed_out:
            return "timed out"
        if self.returncode is None:
            return "killed"
        if self.returncode < 0:
            try:
                name = signal.Signals(-self.returncode).name
            except ValueError:
                name = ""
            extra = " (output over the size limit)" if self.returncode == -signal.SIGXFSZ else ""
            return f"killed by signal {-self.returncode} {name}{extra}".strip()
        return f"exit code {self.returncode}"


# --- the grader's side -------------------------------------------------------------------------


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _under(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


def _traversable_by_others(path: Path) -> bool:
    """Can an unprivileged other user walk down to ``path``? (x for others on each ancestor)."""
    for p in [path, *path.parents]:
        try:
            if not os.stat(p).st_mode & 0o001:
                return False
        except OSError:
            return False
    return True


def python_runtime() -> tuple[str, list[str]]:
    """(interpreter, extra sys.path entries) for the worker: the base interpreter and the site dirs.

    The worker starts with ``-I -S``: no site processing, so no ``.pth`` file
    runs; an editable install's finder never loads. Its sys.path is then the
    standard library plus exactly these directories.
    """
    import site

    exe = os.path.realpath(sys.executable)
    dirs = list(site.getsitepackages()) + [
        p for p in sys.path if p.rstrip("/").endswith(("site-packages", "dist-packages"))
    ]
    dirs += [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    seen, out = set(), []
    for d in dirs:
        r = os.path.realpath(d)
        if r not in seen and os.path.isdir(r):
            seen.add(r)
            out.append(r)
    return exe, out


class _Reader(threading.Thread):
    """Drains the result pipe into frames, keeping at most ``cap`` bytes."""

    def __init__(self, fd: int, cap: int = 512 << 20):
        super().__init__(daemon=True)
        self.fd, self.cap, self.total = fd, cap, 0
        self.parser = channel.Parser()
        self.frames: list = []
        self.lock = threading.Lock()
        self.overflow = False

    def run(self) -> None:
        while True:
            try:
                data = os.read(self.fd, 1 << 16)
            except OSError:
                break
            if not data:
                break
            self.total += len(data)
            if self.total > self.cap:
                self.overflow = True  # keep draining so the writer never blocks, keep nothing
                continue
            self._add(self.parser.feed(data))
        self._add(self.parser.finish())
        os.close(self.fd)

    def _add(self, frames) -> None:
        with self.lock:
            self.frames += [(time.monotonic(), header, payload) for header, payload in frames]

    def snapshot(self) -> list:
        with self.lock:
            return list(self.frames)


class _Cgroup:
    """A memory (and pids) cgroup under the grader's own, where the machine lets root make one."""

    def __init__(self, name: str, memory_bytes: int | None, nproc: int):
        self.dirs: list[Path] = []
        self.memory: Path | None = None
        self.v2 = False
        if os.geteuid() != 0 or os.environ.get("SWATTN_GRADE_CGROUP", "1") == "0":
            return
        try:
            own = dict(line.split(":", 2)[1:] for line in Path("/proc/self/cgroup").read_text().splitlines())
        except (OSError, ValueError):
            return
        base = Path("/sys/fs/cgroup")
        if "" in own and (base / "cgroup.controllers").exists() and len(own) == 1:  # pure cgroup v2
            parent = base / own[""].lstrip("/")
            if "memory" in (parent / "cgroup.subtree_control").read_text().split():
                self._make(parent / name, {"memory.max": memory_bytes, "memory.swap.max": 0, "pids.max": nproc})
                self.memory, self.v2 = (self.dirs[0] if self.dirs else None), True
            return
        for ctrl, settings in (
            ("memory", {"memory.limit_in_bytes": memory_bytes, "memory.memsw.limit_in_bytes": memory_bytes}),
            ("pids", {"pids.max": nproc}),
        ):
            if ctrl in own and (base / ctrl).is_dir():
                if self._make(base / ctrl / own[ctrl].lstrip("/") / name, settings) and ctrl == "memory":
                    self.memory = self.dirs[-1]

    def _make(self, path: Path, settings: dict) -> bool:
        for stale in path.parent.glob("swattn-grade-*"):  # left by a grader that was killed outright
            pid = stale.name.split("-")[2]
            if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                try:
                    stale.rmdir()  # only if empty: its processes are gone
                except OSError:
                    pass
        try:
            path.mkdir()
        except OSError:
            return False
        self.dirs.append(path)
        for key, value in settings.items():
            if value is not None and (path / key).exists():
                try:
                    (path / key).write_text(str(value))
                except OSError:
                    pass  # memsw needs swap accounting; pids.max may be absent
        return True

    @property
    def procs_files(self) -> list[str]:
        return [str(d / "cgroup.procs") for d in self.dirs]

    def peak(self) -> int | None:
        if not self.memory:
            return None
        for name in ("memory.peak", "memory.max_usage_in_bytes"):
            try:
                return int((self.memory / name).read_text())
            except (OSError, ValueError):
                continue
        return None

    def oom_killed(self) -> bool:
        if not self.memory:
            return False
        for name in ("memory.events", "memory.oom_control"):
            try:
                for line in (self.memory / name).read_text().splitlines():
                    key, _, value = line.partition(" ")
                    if key == "oom_kill" and int(value) > 0:
                        return True
            except (OSError, ValueError):
                continue
        return False

    def kill_all(self) -> None:
        for _ in range(50):
            pids = []
            for d in self.dirs:
                try:
                    pids += [int(p) for p in (d / "cgroup.procs").read_text().split()]
                except OSError:
                    pass
            if not pids:
                return
            for pid in set(pids):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            time.sleep(0.02)

    def remove(self) -> None:
        self.kill_all()
        for d in reversed(self.dirs):
            for _ in range(50):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.02)


@dataclass
class Sandbox:
    """The isolation shared by every step of one grading.

    ``hide``: folders the worker must not see (the repository, the submission's
    folder, the report folder...). ``cuda``: the steps use the GPU (no
    RLIMIT_AS then). ``mode``: "auto" picks the strongest the machine allows;
    "basic" forces no namespaces (tests of the fallback).
    """

    hide: list[Path]
    cuda: bool = False
    mode: str = "auto"
    exe: str = ""
    site_dirs: list[str] = field(default_factory=list)
    fallback: str = ""  # why a weaker mode than asked for is in use
    keep_uid: bool = False  # root without capabilities instead of nobody (the GPU is not open to nobody)

    def __post_init__(self):
        if not self.exe:
            self.exe, self.site_dirs = python_runtime()
        self.hide = sorted({Path(p).resolve() for p in self.hide}, key=lambda p: len(p.parts))
        self.hide = [h for h in self.hide if len(h.parts) > 1 and not any(_under(h, o) and h != o for o in self.hide)]

        def allowed(d: str) -> bool:
            # A library folder may lie inside a hidden one (a venv in the repository); the hidden
            # folder itself, or a PYTHONPATH entry into it (PYTHONPATH=.), would bring it all back.
            p = Path(d)
            if any(_under(h, p) for h in self.hide):
                return False
            inside = any(_under(p, h) for h in self.hide)
            return not inside or p.name in ("site-packages", "dist-packages")

        self.site_dirs = [d for d in self.site_dirs if allowed(d)]

    def _exposed(self) -> list[str]:
        """The runtime directories the worker needs, including any inside a hidden folder."""
        prefixes = {os.path.realpath(p) for p in (sys.base_prefix, sys.base_exec_prefix)}
        return sorted(prefixes | set(self.site_dirs) | {os.path.dirname(self.exe)})

    def _hidden(self, as_root: bool) -> list[str]:
        hidden = [str(h) for h in self.hide]
        if as_root:
            # A runtime folder ``nobody`` cannot walk to (pyenv under a 0700 /root, say): cover
            # the first closed ancestor with a tmpfs and bind the runtime back in it.
            for d in self._exposed():
                p = Path(d)
                for anc in reversed([p, *p.parents]):
                    if len(anc.parts) > 1 and not (os.stat(anc).st_mode & 0o001):
                        hidden.append(str(anc))
                        break
        hidden = sorted(set(hidden), key=len)
        return [h for h in hidden if not any(h != o and _under(Path(h), Path(o)) for o in hidden)]

    def environment(self, namespaced: bool, home: str, tmp: str) -> dict:
        env = {
            "HOME": home,
            "TMPDIR": tmp,
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "PYTHONNOUSERSITE": "1",
            "TILELANG_CACHE_DIR": f"{home}/.tilelang/cache",
            "TILELANG_PRINT_ON_COMPILATION": "0",
            "XDG_CACHE_HOME": f"{home}/.cache",
            "TRITON_CACHE_DIR": f"{home}/.triton",
            "CUDA_CACHE_PATH": f"{home}/.nv",
            "MPLCONFIGDIR": f"{home}/.mpl",
        }
        # The machine's CUDA and communication settings go through (a shared GPU host may require
        # some, such as NVLink multicast off); nothing else of the grader's environment does.
        passed = ("CUDA_", "NCCL_", "NVSHMEM_", "NVIDIA_", "TORCH_SYMM_MEM_")
        for key, value in os.environ.items():
            if key.startswith(passed) or key in ("LD_LIBRARY_PATH", "OMP_NUM_THREADS"):
                env[key] = value
        hidden = [Path(h) for h in self.hide]
        path = [p for p in os.environ.get("PATH", "/usr/bin:/bin").split(os.pathsep) if p]
        env["PATH"] = os.pathsep.join(p for p in path if not any(_under(Path(p), h) for h in hidden))
        return env

    def probe(self, work: Path) -> None:
        """Start one empty step; if the namespaces cannot be built here (a gVisor kernel, a container
        without the rights), fall back to "basic" for the whole grading and say why."""
        if self.mode == "basic":
            return
        tree = work / "probe-tree"
        tree.mkdir(parents=True, exist_ok=True)
        run = self.start([self.exe, "-I", "-S", "-c", "pass"], tree, work / "probe", Limits(wall_s=60))
        outcome = run.finish()
        if outcome.returncode != 0 or outcome.isolation.get("mode") in (None, "basic"):
            why = outcome.isolation.get("error") or outcome.why()
            self.mode, self.fallback = "basic", f"namespaces unavailable ({why})"
            return
        names = ["nvidiactl", "nvidia-uvm", *(d.name for d in Path("/dev").glob("nvidia[0-9]*"))]
        devices = [f"/dev/{n}" for n in names if Path(f"/dev/{n}").is_char_device()]
        if self.cuda and devices and os.geteuid() == 0:
            check = f"import os\nfor d in {devices!r}:\n    os.close(os.open(d, os.O_RDWR))"
            outcome = self.start(
                [self.exe, "-I", "-S", "-c", check], tree, work / "probe-gpu", Limits(wall_s=60)
            ).finish()
            if outcome.returncode != 0:
                self.keep_uid = True
                self.fallback = "the GPU's device files are not open to nobody: runs as root with no capabilities"

    def start(self, argv: list[str], tree: Path, step_dir: Path, limits: Limits) -> Running:
        """Start ``argv`` (its first item the interpreter) in the sandbox; ``tree`` is its working tree.

        ``argv`` may name files of the tree as ``{tree}/...``: they are rewritten to
        where the worker sees the tree. ``step_dir`` holds the log and scratch
        folders; the worker never sees it in the namespace modes."""
        return Running(self, argv, tree, step_dir, limits)


def _children_by_parent() -> dict[int, list[int]]:
    """{parent pid: [child pids]} of every process this one can see in /proc."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rpartition(")")[2].split()[1]), []).append(int(d))
    return children


def _process_tree(root: int) -> list[int]:
    """``root`` and every process descended from it (however detached: a new session keeps its parent)."""
    children = _children_by_parent()
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def _rss(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
                    break
        except (OSError, ValueError):
            continue
    return total


class Running:
    """One started step: ``poll``, ``frames``, ``stop``, then ``finish`` for its ``Outcome``."""

    def __init__(self, box: Sandbox, argv: list[str], tree: Path, step_dir: Path, limits: Limits):
        self.box, self.limits, self.t0 = box, limits, time.monotonic()
        self.memory_killed, self.peak_rss = False, 0
        step_dir.mkdir(parents=True, exist_ok=True)
        as_root = os.geteuid() == 0
        # The cgroup is a backstop above the limit: the grader's watch of resident memory (below)
        # ends a step at the limit within a tenth of a second, before the kernel, squeezed at a
        # cgroup's edge, starts evicting the libraries' pages and the step crawls.
        backstop = limits.memory_bytes + max(1 << 30, limits.memory_bytes // 4) if limits.memory_bytes else None
        self.cgroup = _Cgroup(f"swattn-grade-{os.getpid()}-{os.urandom(4).hex()}", backstop, limits.nproc)
        try:
            self._start(argv, tree, step_dir, limits, as_root)
        except BaseException:
            self.cgroup.remove()  # a cgroup outlives its process: never leave one behind
            raise

    def _start(self, argv: list[str], tree: Path, step_dir: Path, limits: Limits, as_root: bool) -> None:
        for p in [tree, *[q for q in tree.rglob("*")]]:  # readable by ``nobody``, writable by no one
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        home, tmp = step_dir / "home", step_dir / "tmp"
        for d in (home, tmp):
            d.mkdir(exist_ok=True)
        nobody = _nobody() if as_root and not self.box.keep_uid else None
        if nobody:
            # Without namespaces ``nobody`` must walk to its tree: through, not into, the listing.
            for d in (step_dir, step_dir.parent):
                os.chmod(d, 0o711)
        if nobody and self.box.mode == "basic":
            # No namespace to bind the runtime, the tree or the scratch folders into: where
            # ``nobody`` cannot walk to one of them (a 0700 folder above, pytest's /tmp/pytest-of-root
            # say) the worker runs as root without capabilities instead.
            reachable = [tree, home, tmp, *map(Path, self.box._exposed())]
            if not all(_traversable_by_others(p) for p in reachable):
                nobody = None
        if nobody:
            for d in (home, tmp):
                os.chown(d, nobody[0], nobody[1])
        self.log_path = step_dir / "log.txt"
        read_fd, write_fd = os.pipe()
        config = {
            "argv": argv,
            "tree": str(tree),
            "home": str(home),
            "tmp": str(tmp),
            "mode": self.box.mode,
            "hide": self.box._hidden(as_root),
            "expose": self.box._exposed(),
            "nobody": nobody,
            "drop_caps": as_root and not nobody,  # root: nobody, or no capabilities
            "groups": _device_groups() if nobody else [],
            "cuda": self.box.cuda,
            "limits": {
                "memory": None if (self.cgroup.memory or self.box.cuda) else limits.memory_bytes,
                "cgroup_memory": bool(self.cgroup.memory),
                "watched_memory": limits.memory_bytes,
                "file": limits.file_bytes,
                "nproc": limits.nproc,
                "cpu": limits.cpu_s or int(limits.wall_s * max(1, os.cpu_count() or 1)) + 60,
            },
            "cgroup_procs": self.cgroup.procs_files,
            "fd": write_fd,
            "env_ns": self.box.environment(True, HOME_DIR, "/tmp"),
            "env_plain": self.box.environment(False, str(home), str(tmp)),
        }
        cfg_path = step_dir / "sandbox.json"
        cfg_path.write_text(json.dumps(config))
        os.chmod(cfg_path, 0o600)
        import subprocess

        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [self.box.exe, "-I", "-S", "-B", str(Path(__file__).resolve()), "--boot", str(cfg_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                pass_fds=(write_fd,),
                start_new_session=True,
                close_fds=True,
                cwd="/",
                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
            )
        os.close(write_fd)
        self.reader = _Reader(read_fd)
        self.reader.start()
        self.killed = False
        if limits.memory_bytes:
            # Works everywhere, CUDA included (which rules out RLIMIT_AS): the resident memory of
            # the whole process tree, checked ten times a second.
            threading.Thread(target=self._watch_memory, args=(limits.memory_bytes,), daemon=True).start()

    def _watch_memory(self, limit: int) -> None:
        while self.proc.poll() is None:
            rss = _rss(_process_tree(self.proc.pid))
            self.peak_rss = max(self.peak_rss, rss)
            if rss > limit:
                self.memory_killed = True
                self.stop()
                return
            time.sleep(0.1)

    def poll(self) -> bool:
        """True while the step runs."""
        return self.proc.poll() is None

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def frames(self) -> list:
        return self.reader.snapshot()

    def stop(self) -> None:
        """Kill the whole step: its process group (boot, init, worker), then anything left in its cgroup."""
        self.killed = True
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass
        self.cgroup.kill_all()

    def finish(self, timed_out: bool = False) -> Outcome:
        """Wait for the end (stopping it at the wall limit), clean up, and report."""
        remaining = self.limits.wall_s - self.elapsed()
        try:
            self.proc.wait(timeout=max(remaining, 0.1))
        except Exception:
            timed_out = True
            self.stop()
            self.proc.wait()
        # Boot exits only after its tree is gone; a straggler that escaped (no namespaces, no
        # cgroup) is killed through the process group, and the pipe is not waited on forever.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass
        self.reader.join(timeout=5)
        oom, peak = self.cgroup.oom_killed() or self.memory_killed, self.cgroup.peak() or self.peak_rss or None
        self.cgroup.remove()
        frames = self.reader.snapshot()
        isolation = frames[0][1] if frames and frames[0][1].get("type") == "sandbox" else {}
        code = self.proc.returncode
        if code is not None and code >= 128 and code - 128 in {s.value for s in signal.Signals}:
            code = -(code - 128)  # boot relays a signal death as 128 + signal
        if self.killed and not timed_out and not self.memory_killed:
            code = None
        error = self.reader.parser.error or ("more than 512 MiB on the result channel" if self.reader.overflow else "")
        return Outcome(
            returncode=code,
            timed_out=timed_out,
            oom=oom or (code == -signal.SIGKILL and _log_says_memory(self.log_path)),
            wall_s=self.elapsed(),
            log_tail=_tail_of(self.log_path),
            isolation=isolation,
            frames=frames,
            channel_error=error,
            peak_memory=peak,
            killed=self.killed,
            log_bytes=self.log_path.stat().st_size if self.log_path.exists() else 0,
        )


def _log_says_memory(path: Path) -> bool:
    return "MemoryError" in _tail_of(path, 4096)


def _tail_of(path: Path, n: int = 16384) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - n))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _nobody() -> tuple[int, int] | None:
    import pwd

    try:
        pw = pwd.getpwnam("nobody")
        return pw.pw_uid, pw.pw_gid
    except KeyError:
        return 65534, 65534


def _device_groups() -> list[int]:
    """Groups that own the NVIDIA device nodes (when they are not open to everyone)."""
    groups = set()
    for dev in Path("/dev").glob("nvidia*"):
        try:
            st = dev.stat()
        except OSError:
            continue
        if st.st_gid != 0 and not st.st_mode & 0o006:
            groups.add(st.st_gid)
    return sorted(groups)


# --- boot and init: this file run as `python -I -S sandbox.py --boot CONFIG` ---------------------


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


class _Mounts:
    def __init__(self):
        self.libc = _libc()

    def mount(self, src, target, fstype, flags, data=None) -> None:
        enc = lambda s: None if s is None else str(s).encode()  # noqa: E731
        _check(self.libc.mount(enc(src), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)), f"mount {target}")

    def readonly_tree(self, path: str) -> None:
        """Every mount at or under ``path`` read-only (mount_setattr; per-mount remount where it is missing)."""

        class MountAttr(ctypes.Structure):
            _fields_ = [(n, ctypes.c_uint64) for n in ("attr_set", "attr_clr", "propagation", "userns_fd")]

        attr = MountAttr(MOUNT_ATTR_RDONLY, 0, 0, 0)
        ret = self.libc.syscall(
            SYS_MOUNT_SETATTR, AT_FDCWD, path.encode(), AT_RECURSIVE, ctypes.byref(attr), ctypes.sizeof(attr)
        )
        if ret == 0:
            return
        mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
        for m in sorted({m for m in mounts if m == path or m.startswith(path.rstrip("/") + "/")}, key=len):
            try:
                self.mount(None, m, None, MS_REMOUNT | MS_BIND | MS_RDONLY)
            except OSError:
                pass  # a mount the kernel will not remount: its permissions still apply


def _unshare(flags: int) -> None:
    _check(_libc().unshare(flags), "unshare")


def _enter_namespaces(cfg: dict) -> str:
    """Enter new namespaces; return the mode reached: "root", "userns" or "" (none)."""
    if cfg["mode"] == "basic":
        return ""
    flags = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC
    if os.geteuid() == 0:
        try:
            _unshare(flags)
            return "root"
        except OSError:
            return ""
    uid, gid = os.getuid(), os.getgid()
    try:
        _unshare(flags | CLONE_NEWUSER)
    except OSError:
        return ""
    Path("/proc/self/setgroups").write_text("deny")
    Path("/proc/self/uid_map").write_text(f"0 {uid} 1")
    Path("/proc/self/gid_map").write_text(f"0 {gid} 1")
    return "userns"


def _setup_mounts(cfg: dict, notes: list[str]) -> None:
    """In init (PID 1 of the new namespaces): build the worker's view of the filesystem."""
    m = _Mounts()
    m.mount(None, "/", None, MS_REC | MS_PRIVATE)
    keep = {}
    for path in [cfg["tree"], *cfg["expose"]]:
        try:
            keep[path] = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            notes.append(f"cannot open {path}: {e.strerror}")
    m.readonly_tree("/")
    try:
        m.mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "hidepid=2")
    except OSError:  # a kernel without the option: the PID namespace alone keeps other processes out
        m.mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        notes.append("/proc without hidepid")
    hidden = list(cfg["hide"])
    for h in hidden:
        if os.path.isdir(h):
            m.mount("tmpfs", h, "tmpfs", MS_NOSUID | MS_NODEV, "mode=755,size=1m")
    scratch = [("/tmp", "size=2g"), ("/var/tmp", "size=256m"), ("/dev/shm", "size=1g")]
    for target, size in scratch:
        if os.path.isdir(target) and not any(_under(Path(target), Path(h)) for h in hidden):
            m.mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV, f"mode=1777,{size}")
    covered = hidden + [t for t, _ in scratch]
    for path, fd in sorted(keep.items(), key=lambda kv: len(kv[0])):
        if path == cfg["tree"]:
            continue
        if any(_under(Path(path), Path(c)) for c in covered):  # put the runtime back where it was
            os.makedirs(path, exist_ok=True)
            m.mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
            m.readonly_tree(path)
    os.makedirs(GRADE_DIR, exist_ok=True)
    m.mount(f"/proc/self/fd/{keep[cfg['tree']]}", GRADE_DIR, None, MS_BIND | MS_REC)
    m.readonly_tree(GRADE_DIR)
    os.makedirs(HOME_DIR, mode=0o700, exist_ok=True)
    if cfg["nobody"]:
        os.chown(HOME_DIR, *cfg["nobody"])
    for h in hidden:
        if os.path.isdir(h):
            try:
                m.mount(None, h, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
            except OSError as e:
                notes.append(f"{h} stays writable: {e.strerror}")
    for fd in keep.values():
        os.close(fd)


def _set_limits(cfg: dict) -> None:
    import resource

    lim = cfg["limits"]
    settings = [
        (resource.RLIMIT_CORE, 0),
        (resource.RLIMIT_FSIZE, lim["file"]),
        (resource.RLIMIT_CPU, lim["cpu"]),
        (resource.RLIMIT_NOFILE, 4096),
    ]
    if lim["memory"]:
        settings.append((resource.RLIMIT_AS, lim["memory"]))
    if cfg["nobody"]:  # counts every process of the user: only meaningful for a user of its own
        settings.append((resource.RLIMIT_NPROC, lim["nproc"]))
    for res, value in settings:
        soft, hard = resource.getrlimit(res)
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(res, (value, value))


def _worker(cfg: dict, mode: str) -> None:
    """In the worker, just before exec: limits, identity, then the harness."""
    libc = _libc()
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    _set_limits(cfg)
    if cfg["nobody"]:
        uid, gid = cfg["nobody"]
        os.setgroups(cfg["groups"])
        os.setgid(gid)
        os.setuid(uid)
    elif cfg.get("drop_caps"):
        _drop_capabilities(libc)
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    tree = GRADE_DIR if mode else cfg["tree"]
    env = cfg["env_ns"] if mode else cfg["env_plain"]
    if mode:
        os.makedirs(env["HOME"], exist_ok=True)
    argv = [a.replace("{tree}", tree).replace("{fd}", str(cfg["fd"])) for a in cfg["argv"]]
    os.chdir(tree)
    os.execve(argv[0], argv, env)


def _drop_capabilities(libc) -> None:
    """uid 0 without any capability, now and after exec: it cannot remount, unmount, or pass file permissions."""
    for cap in range(64):
        libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)  # EINVAL past the last capability: ignored

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    header, data = Header(0x20080522, 0), (Data * 2)()  # _LINUX_CAPABILITY_VERSION_3: two 32-bit words
    _check(libc.capset(ctypes.byref(header), ctypes.byref(data)), "capset")


def _reap_all(worker: int) -> int:
    """Wait for the worker, then kill and reap every other descendant; return the worker's status."""
    status = None
    while status is None:
        try:
            pid, st = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        if pid == worker:
            status = st
    me = os.getpid()
    for _ in range(200):  # orphans re-parent to us (subreaper or PID 1): kill until none is left
        kids = _children(me)
        if not kids:
            break
        for pid in kids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            pass
        time.sleep(0.01)
    return status if status is not None else 0


def _children(ppid: int) -> list[int]:
    return _children_by_parent().get(ppid, [])


def _exit_code(status: int) -> int:
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def boot(cfg_path: str) -> None:
    cfg = json.loads(Path(cfg_path).read_text())
    libc = _libc()
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # the grader killed outright takes its step along
    for procs in cfg["cgroup_procs"]:
        try:
            Path(procs).write_text(str(os.getpid()))
        except OSError:
            pass
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    mode = _enter_namespaces(cfg)
    init = os.fork()
    if init:
        os.close(cfg["fd"])
        os._exit(_exit_code(_reap_all(init)))
    # init
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    notes: list[str] = []
    if mode:
        try:
            _setup_mounts(cfg, notes)
        except OSError as e:
            os.write(cfg["fd"], channel.frame({"type": "sandbox", "mode": mode, "error": str(e), "notes": notes}))
            os._exit(70)  # never run the submission with a half-built view (Sandbox.probe falls back)
    identity = (
        "nobody" if cfg["nobody"] else ("root without capabilities" if cfg.get("drop_caps") else "the grader's user")
    )
    lim = cfg["limits"]
    memory = f"{lim['watched_memory'] / (1 << 30):g} GiB resident, watched by the grader"
    memory += " + cgroup backstop" if lim["cgroup_memory"] else (" + RLIMIT_AS" if lim["memory"] else "")
    level = {"root": "namespaces", "userns": "user namespace", "": "none"}[mode]
    report = {"type": "sandbox", "mode": mode or "basic", "namespaces": level, "user": identity, "memory_limit": memory}
    report["notes"] = notes
    os.write(cfg["fd"], channel.frame(report))
    worker = os.fork()
    if worker == 0:
        try:
            _worker(cfg, mode)
        except BaseException as e:  # noqa: BLE001  (exec failed: say why, in the log)
            os.write(2, f"sandbox: cannot start the worker: {e!r}\n".encode())
        os._exit(127)
    os.close(cfg["fd"])
    os._exit(_exit_code(_reap_all(worker)))


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--boot":
    boot(sys.argv[2])
