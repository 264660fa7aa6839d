"""One rank of a `RankPool` (sharded/launch.py): join the process group, then run jobs until told to stop.

    python -m sharded._worker HOST PORT BACKEND COLLECTIVE_TIMEOUT_S    # authkey: one hex line on stdin

RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT arrive in the environment, as
under torchrun. The parent and this rank talk over a multiprocessing connection, never
over stdout (stdout and stderr stay the user's; the parent copies them, prefixed):

    rank -> parent   ("hello", rank, pid)                   on connecting
    rank -> parent   ("ready", None) | ("error", traceback)  after joining the process group
    parent -> rank   ("run", sys_path, job, keep_result)    job: cloudpickle of (fn, args, kwargs)
    rank -> parent   ("ok", pickled result or None) | ("error", traceback)
    parent -> rank   ("close",)

[Note: orphaned ranks] A rank exits when its connection to the parent closes, whether
by ("close",) or because the parent died: ranks never outlive the process that
started them, and no one has to find them by name to clean up.

[Note: job isolation] Jobs share the process, so each starts from the default mesh
(what `init` returned), whatever the previous job set as current.
"""
from __future__ import annotations

import faulthandler
import os
import sys
import traceback
from multiprocessing.connection import Client, Connection

import cloudpickle

from sharded import distributed
from sharded.mesh import Mesh


def _format(err: BaseException) -> str:
    """The traceback of `err` from the user's code down (this module's frame left out)."""
    tb = err.__traceback__.tb_next if err.__traceback__ is not None else None
    return "".join(traceback.format_exception(type(err), err, tb))


def _run(job: bytes, keep_result: bool) -> tuple[str, object]:
    try:
        fn, args, kwargs = cloudpickle.loads(job)
        result = fn(*args, **kwargs)
        return "ok", (cloudpickle.dumps(result) if keep_result else None)
    except BaseException as err:  # noqa: B036 -- SystemExit from a job is a failure to report, not our exit
        return "error", _format(err)


def _serve(conn: Connection, mesh: Mesh) -> None:
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return  # see [Note: orphaned ranks]
        if message[0] == "close":
            return
        _, sys_path, job, keep_result = message
        # Modules the parent can import (a test file's folder, a notebook's) must be
        # importable here to unpickle functions that cloudpickle sent by reference.
        sys.path[:0] = [p for p in sys_path if p not in sys.path]
        Mesh.set_current(mesh)  # see [Note: job isolation]
        reply = _run(job, keep_result)
        sys.stdout.flush()
        sys.stderr.flush()  # before replying: the parent drains our output once it has every reply
        conn.send(reply)


def main(argv: list[str]) -> None:
    host, port, backend, collective_timeout = argv
    authkey = bytes.fromhex(sys.stdin.readline().strip())
    faulthandler.enable()  # a segfault prints every thread's Python stack to stderr, which the parent shows
    with Client((host, int(port)), authkey=authkey) as conn:
        conn.send(("hello", int(os.environ["RANK"]), os.getpid()))
        try:
            mesh = distributed.init(backend, timeout=float(collective_timeout))
        except BaseException as err:  # noqa: B036
            conn.send(("error", _format(err)))
            return
        conn.send(("ready", None))
        try:
            _serve(conn, mesh)
        finally:
            distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
