"""Run a function on N local ranks: `launch` for one call, `RankPool` to keep the ranks for many.

    losses = sharded.launch(train, 60, nprocs=2)       # rank 0's return value
    with RankPool(4) as pool:
        results = pool.run(check, x)                   # every rank's, in rank order

Each rank is a fresh `python -m sharded._worker` process (sharded/_worker.py), not a
multiprocessing.spawn child: the function travels by cloudpickle, so one defined in a
notebook cell, in `__main__` or inside another function works. A rank joins a process
group with `sharded.distributed.init` (gloo on CPU; NCCL with one GPU per rank), then
runs jobs. Its stdout and stderr appear line by line in this process's `sys.stdout` and
`sys.stderr`, prefixed `[rank r] `, written from the calling thread, so they show in the
running notebook cell and in pytest's capture. `launch` is a pool that runs one job.

[Note: failures never hang] One loop in the calling thread waits on everything at once
(multiprocessing.connection.wait over every rank's control connection and output
pipes), with the deadline as its timeout:
  - a rank answers ("error", traceback): stop every rank, raise RankError naming it;
  - a control connection reaches EOF or a process is gone: the rank died without a
    Python exception (segfault, os._exit, the OOM killer): stop every rank, raise
    RankError with its exit code and the last lines of its stderr;
  - the deadline passes: stop every rank, raise TimeoutError.
To stop is to SIGKILL each rank's process group (a rank starts its own session, so its
children go too), reap it, and read its pipes to EOF so that nothing it printed is lost.
Ranks blocked in a collective with a failed peer are killed, not waited for, so a
failure is reported at once. A rank that waits on a collective which another rank
skipped fails after `collective_timeout` seconds, reported as above: it raises
CollectiveTimeout on gloo; on NCCL torch's watchdog takes it down and the RankError
quotes the watchdog's line (see [Note: NCCL connects at init] in sharded/distributed.py).

[Note: root cause] When a rank dies, its peers' pending collectives fail too
("Connection closed by peer"), and their errors may arrive first. So a rank found
exited when anything fails is reported as the cause, the others' errors after it.
"""
from __future__ import annotations

import collections
import os
import pickle
import re
import secrets
import signal
import site
import socket
import subprocess
import sys
import threading
import time
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, Listener, wait
from typing import Any, Callable, Collection

import cloudpickle
import torch

__all__ = ["RankError", "RankPool", "launch"]

_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the folder that holds sharded/
_CONNECT_POLL_S = 0.05  # while ranks are connecting: how often to pick up new connections
_DEATH_POLL_S = 1.0  # how often to look for a rank that died while something kept its connection open
_STOP_GRACE_S = 10.0  # close(): how long ranks get to leave the process group before being killed
_TAIL_LINES = 20  # lines of a dead rank's stderr quoted in its RankError
# torch's C++ logs errors glog-style, "[rank0]:[E1122 15:45:35.96 ProcessGroupNCCL.cpp:689] ...":
# a rank that NCCL's watchdog takes down says why there, far above the tail of its stderr.
_TORCH_ERROR = re.compile(r"\[E\d{4} \d\d:\d\d:\d\d")
_TORCH_ERROR_LINES = 3


class RankError(RuntimeError):
    """A rank raised or died; every rank of its pool was stopped.

    `rank` is the failing rank; `exitcode` is its exit status if it died without a
    Python exception (negative: killed by that signal), else None.
    """

    def __init__(self, message: str, rank: int, exitcode: int | None = None):
        super().__init__(message)
        self.rank, self.exitcode = rank, exitcode


class _Output:
    """One of a rank's pipes (stdout or stderr), copied to ours line by line with a `[rank r] ` prefix.

    A line ends at "\\n", "\\r\\n" or a lone "\\r", so progress bars that redraw with "\\r"
    stay live. `sys.stdout` / `sys.stderr` is looked up at each write: pytest and Jupyter
    replace it between tests and cells.
    """

    def __init__(self, pipe: Any, rank: int, target: str):
        self.pipe, self.target = pipe, target
        self.prefix = f"[rank {rank}] "
        self.partial = b""
        self.open = True
        self.tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
        self.torch_errors: list[str] = []  # the first lines torch's C++ logged at error level

    def fileno(self) -> int:
        return self.pipe.fileno()

    def pump(self) -> None:
        """Read what is there (call when readable) and write out its complete lines."""
        data = os.read(self.fileno(), 1 << 16)
        if not data:
            self.open = False
        lines, self.partial = _split_lines(self.partial + data, final=not data)
        stream = getattr(sys, self.target)
        for line in lines:
            text = line.decode(errors="replace")
            if stream is not None:
                stream.write(self.prefix + text)
            if self.target == "stderr" and text.strip():
                self.tail.append(text.rstrip())
                if len(self.torch_errors) < _TORCH_ERROR_LINES and _TORCH_ERROR.search(text):
                    self.torch_errors.append(text.strip())
        if lines and stream is not None:
            stream.flush()


def _split_lines(buf: bytes, final: bool) -> tuple[list[bytes], bytes]:
    """The complete lines of `buf` (each with its ending) and the unfinished rest ('' if `final`)."""
    lines, start = [], 0
    for m in re.finditer(rb"\r\n|\n|\r", buf):
        if m.group() == b"\r" and m.end() == len(buf) and not final:
            break  # maybe the first half of a "\r\n" split across reads
        lines.append(buf[start : m.end()])
        start = m.end()
    rest = buf[start:]
    if final and rest:
        return lines + [rest + b"\n"], b""
    return lines, rest


class _Rank:
    """One worker process: its Popen, output pipes and (once it has said hello) control connection."""

    def __init__(self, index: int, proc: subprocess.Popen):
        self.index, self.proc = index, proc
        self.outputs = (_Output(proc.stdout, index, "stdout"), _Output(proc.stderr, index, "stderr"))
        self.conn: Connection | None = None


class RankPool:
    """`nprocs` live ranks that run many jobs: `pool.run(fn, *args, **kwargs)` -> every rank's result.

    Ranks start on the first `run` (and again after a failure) and import torch once,
    which is what makes hundreds of multi-rank test examples affordable. Any failure
    stops every rank and raises RankError (or TimeoutError); the next `run` respawns.
    Use as a context manager or call `close()`. Not thread-safe: one `run` at a time.

    device: "cpu" (gloo; CUDA hidden from the ranks) or "cuda" (NCCL, rank r on cuda:r).
    timeout: seconds each `run` (and the start-up) may take; None for no limit.
    collective_timeout: seconds a collective may wait before it fails on its rank (the
      process group's timeout); default half of `timeout` (5 min without one), so a
      hung collective is named before the whole job is killed.
    """

    def __init__(
        self,
        nprocs: int,
        device: str = "cpu",
        timeout: float | None = 300.0,
        collective_timeout: float | None = None,
    ):
        if not isinstance(nprocs, int) or isinstance(nprocs, bool) or nprocs < 1:
            raise ValueError(f"RankPool(nprocs={nprocs!r}): nprocs must be a positive int")
        if device not in ("cpu", "cuda"):
            raise ValueError(f"RankPool(device={device!r}): device must be 'cpu' or 'cuda' (launch also takes 'auto')")
        if device == "cuda" and torch.cuda.device_count() < nprocs:
            raise ValueError(
                f"nprocs={nprocs} on device='cuda' needs one GPU per rank, but {torch.cuda.device_count()} "
                "are visible; lower nprocs or use device='cpu'"
            )
        for name, value in (("timeout", timeout), ("collective_timeout", collective_timeout)):
            if value is not None and not value > 0:
                raise ValueError(f"RankPool({name}={value!r}): give a positive number of seconds, or None")
        self.nprocs, self.device, self.timeout = nprocs, device, timeout
        if collective_timeout is None:
            collective_timeout = timeout / 2 if timeout is not None else 300.0
        self.collective_timeout = collective_timeout
        self._ranks: list[_Rank] = []

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Any]:
        """`fn(*args, **kwargs)` on every rank; their results in rank order."""
        return self._run(fn, args, kwargs, keep=range(self.nprocs), deadline=_deadline(self.timeout))

    def close(self) -> None:
        """Ask every rank to leave its process group and exit; kill those still there after 10 s."""
        if not self._ranks:
            return
        for rank in self._ranks:
            try:
                if rank.conn is not None:
                    rank.conn.send(("close",))
            except OSError:
                pass  # already gone
        end = time.monotonic() + _STOP_GRACE_S
        while time.monotonic() < end and any(r.proc.poll() is None for r in self._ranks):
            self._pump_outputs(timeout=0.1)
        self._kill()

    def __enter__(self) -> RankPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self._ranks else "stopped"
        return f"RankPool(nprocs={self.nprocs}, device={self.device!r}; {state})"

    # -- internals ---------------------------------------------------------------

    def _run(self, fn: Callable, args: tuple, kwargs: dict, keep: Collection[int], deadline: float | None) -> list:
        job = cloudpickle.dumps((fn, args, kwargs))  # before any rank starts: an unpicklable job fails cheaply
        what = f"running {getattr(fn, '__qualname__', repr(fn))}"
        try:
            if not self._ranks:
                self._start(deadline)
            for rank in self._ranks:
                try:
                    rank.conn.send(("run", list(sys.path), job, rank.index in keep))
                except OSError:
                    pass  # the rank died: _await reports it with its exit code
            replies = self._await(what, deadline)
        except BaseException:
            self._kill()  # KeyboardInterrupt included: never leave ranks behind
            raise
        return [pickle.loads(r) if r is not None else None for r in replies]

    def _start(self, deadline: float | None) -> None:
        authkey = secrets.token_bytes(32)
        with Listener(("127.0.0.1", 0), authkey=authkey) as listener:
            accepted: list[Connection] = []
            stop = threading.Event()
            acceptor = threading.Thread(target=_accept, args=(listener, self.nprocs, accepted, stop), daemon=True)
            acceptor.start()
            master_port = _free_port()
            self._ranks = [self._spawn(r, listener.address, master_port, authkey) for r in range(self.nprocs)]
            try:
                self._await("starting (sharded.distributed.init)", deadline, accepted)
            finally:
                if acceptor.is_alive():  # start-up failed before every rank connected
                    stop.set()
                    _poke(listener.address)
                    acceptor.join(timeout=5)
                for conn in accepted:
                    conn.close()

    def _spawn(self, index: int, address: tuple[str, int], master_port: int, authkey: bytes) -> _Rank:
        env = dict(os.environ)
        env.update(
            RANK=str(index),
            LOCAL_RANK=str(index),
            WORLD_SIZE=str(self.nprocs),
            LOCAL_WORLD_SIZE=str(self.nprocs),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(master_port),
            PYTHONUNBUFFERED="1",  # lines reach us as they are printed
        )
        if _PACKAGE_ROOT not in site.getsitepackages():  # a checkout, not an install: `-m sharded._worker` needs it
            env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, os.environ.get("PYTHONPATH")) if p)
        if "OMP_NUM_THREADS" not in os.environ:
            # Ranks share the host's cores: one intra-op thread per CPU rank (also what
            # makes reductions deterministic); a fair share for GPU ranks' host work.
            threads = 1 if self.device == "cpu" else max(1, (os.cpu_count() or 1) // self.nprocs)
            env["OMP_NUM_THREADS"] = str(threads)
        if self.device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""  # gloo ranks never touch (or initialize) a GPU
        backend = "gloo" if self.device == "cpu" else "nccl"
        cmd = [sys.executable, "-m", "sharded._worker", address[0], str(address[1]), backend]
        cmd.append(str(self.collective_timeout))
        proc = subprocess.Popen(
            cmd,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group: _kill takes its children too
        )
        proc.stdin.write(authkey.hex().encode() + b"\n")  # the secret stays off argv and the environment
        proc.stdin.close()
        return _Rank(index, proc)

    def _await(self, what: str, deadline: float | None, accepted: list[Connection] | None = None) -> list[Any]:
        """Copy output until every rank has replied; any failure stops all ranks and raises."""
        replies: dict[int, Any] = {}
        hello: list[Connection] = []  # connected, not yet said which rank they are
        owner: dict[Connection, int] = {r.conn: r.index for r in self._ranks if r.conn is not None}
        while len(replies) < self.nprocs:
            while accepted:
                hello.append(accepted.pop())
            connecting = len(owner) < self.nprocs
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                self._timed_out(what, [r for r in range(self.nprocs) if r not in replies])
            poll = _CONNECT_POLL_S if connecting else _DEATH_POLL_S
            waiting = [c for c, r in owner.items() if r not in replies] + hello + self._open_outputs()
            raised: dict[int, str] = {}
            died: set[int] = set()
            for obj in wait(waiting, timeout=poll if left is None else min(poll, left)):
                if isinstance(obj, _Output):
                    obj.pump()
                    continue
                try:
                    kind, *payload = obj.recv()
                except (EOFError, OSError):
                    if obj in owner:
                        died.add(owner[obj])
                    else:
                        hello.remove(obj)  # its process's exit is noticed below
                    continue
                if kind == "hello":
                    hello.remove(obj)
                    owner[obj] = payload[0]
                    self._ranks[payload[0]].conn = obj
                elif kind == "error":
                    raised[owner[obj]] = payload[0]
                else:
                    replies[owner[obj]] = payload[0]
            died |= {r.index for r in self._ranks if r.proc.poll() is not None}
            if raised or died:
                self._failed(what, raised, died)
        self._pump_outputs(timeout=0)  # the ranks flushed before replying: their output is in the pipes
        return [replies[r] for r in range(self.nprocs)]

    def _open_outputs(self) -> list[_Output]:
        return [o for r in self._ranks for o in r.outputs if o.open]

    def _pump_outputs(self, timeout: float) -> None:
        """Copy out what is readable now; with a timeout, wait that long for the first bytes."""
        end = time.monotonic() + max(timeout, 1.0)  # bounded, in case a rank's thread prints nonstop
        ready = wait(self._open_outputs(), timeout=timeout)
        while ready and time.monotonic() < end:
            for out in ready:
                out.pump()
            ready = wait(self._open_outputs(), timeout=0)

    def _kill(self) -> None:
        """Stop every rank now (see [Note: failures never hang]) and copy out the rest of its output."""
        for rank in self._ranks:
            if rank.proc.poll() is None:
                try:
                    os.killpg(rank.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for rank in self._ranks:
            try:
                rank.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass  # stuck in the kernel (a wedged driver): nothing more we can do
        end = time.monotonic() + 5.0
        while self._open_outputs() and time.monotonic() < end:
            self._pump_outputs(timeout=0.1)
        for rank in self._ranks:
            if rank.conn is not None:
                rank.conn.close()
            rank.proc.stdout.close()
            rank.proc.stderr.close()
        self._ranks = []

    def _failed(self, what: str, raised: dict[int, str], died: set[int]) -> None:
        """Stop every rank and raise RankError for the root cause (see [Note: root cause])."""
        ranks, n = self._ranks, self.nprocs
        for r in sorted(died):
            try:  # a rank may have sent its error just before exiting
                if ranks[r].conn is not None and ranks[r].conn.poll():
                    kind, *payload = ranks[r].conn.recv()
                    if kind == "error":
                        raised[r] = payload[0]
            except (EOFError, OSError):
                pass
            try:  # let a dying rank finish dying, for its real exit code
                ranks[r].proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        died = died - raised.keys()
        codes = {r: ranks[r].proc.returncode for r in died}
        self._kill()  # reads the pipes to EOF: the tails below are complete
        failures = [
            (r, f"rank {r} of {n} {_exit_text(codes[r])} while {what}, without a Python exception")
            for r in sorted(died)
        ]
        failures += [(r, f"rank {r} of {n} raised while {what}") for r in sorted(raised)]
        first, text = failures[0]
        message = f"{text} (every rank was stopped)"
        if first in raised:
            message += f":\n{raised[first].rstrip()}"
        else:
            err = ranks[first].outputs[1]
            if err.torch_errors:
                message += "; torch logged:\n" + "\n".join(err.torch_errors)
            if err.tail:
                message += "\nthe last lines of its stderr:\n" + "\n".join(err.tail)
        for r, text in failures[1:]:
            message += f"\nalso: {text}" + (f": {_last_line(raised[r])}" if r in raised else "")
        raise RankError(message, rank=first, exitcode=codes.get(first))

    def _timed_out(self, what: str, waiting: list[int]) -> None:
        self._kill()
        raise TimeoutError(
            f"{what} on {self.nprocs} rank(s) did not finish within timeout={self.timeout} s "
            f"(still waiting for rank(s) {', '.join(map(str, waiting))}); every rank was stopped. "
            f"If a rank waits on a collective that another skipped, collective_timeout (now "
            f"{self.collective_timeout:g} s, below timeout) names it; if the work is just slow, raise timeout="
        )


def launch(
    fn: Callable[..., Any],
    *args: Any,
    nprocs: int = 2,
    device: str = "auto",
    timeout: float | None = 300.0,
    collective_timeout: float | None = None,
    **kwargs: Any,
) -> Any:
    """Run `fn(*args, **kwargs)` on `nprocs` new local ranks; return rank 0's result.

    Each rank runs `sharded.distributed.init()` first, so `fn` finds the process group
    and the default mesh (dp = nprocs) ready.
    device: "cpu" (gloo), "cuda" (NCCL, one GPU per rank) or "auto" (cuda when there is a
      GPU for every rank, else cpu).
    timeout: seconds for the whole call, start-up included (None: no limit); past it,
      the ranks are killed and TimeoutError is raised.
    collective_timeout: the process group's timeout, see `RankPool`.
    A rank that raises or dies stops all of them and raises RankError.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() and torch.cuda.device_count() >= nprocs else "cpu"
    pool = RankPool(nprocs, device=device, timeout=timeout, collective_timeout=collective_timeout)
    try:
        return pool._run(fn, args, kwargs, keep={0}, deadline=_deadline(timeout))[0]
    finally:
        pool.close()



def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def _free_port() -> int:
    """A TCP port that is free now, for rank 0's rendezvous store.

    [Note: port race] Another process could take it before rank 0 binds it; then start-up
    fails with "address already in use" as a RankError, and the next run picks again.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _accept(listener: Listener, n: int, accepted: list[Connection], stop: threading.Event) -> None:
    """Accept the ranks' control connections, on a thread since Listener.accept has no timeout."""
    count = 0
    while count < n and not stop.is_set():
        try:
            conn = listener.accept()
        except (OSError, EOFError, AuthenticationError):
            continue  # a stranger without the authkey, or our own _poke
        if stop.is_set():
            conn.close()
            return
        accepted.append(conn)
        count += 1


def _poke(address: tuple[str, int]) -> None:
    """Wake the accept thread so it sees `stop`."""
    try:
        socket.create_connection(address, timeout=1).close()
    except OSError:
        pass


def _exit_text(code: int | None) -> str:
    if code is None:
        return "exited"
    if code >= 0:
        return f"exited with code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    return f"was killed by {name} (exit code {code})"


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""
