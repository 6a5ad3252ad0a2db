"""Ports and processes on this machine: what the stack, the launcher and the tests share."""

from __future__ import annotations

import contextlib
import os
import socket


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with contextlib.closing(socket.socket()) as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def free_port(preferred: int | None = None) -> int:
    """A port free on 127.0.0.1 now (`preferred` when it is). Someone else may take it before it is used: a
    caller that must own it checks afterwards that what listens there is what it started."""
    if preferred:
        with contextlib.closing(socket.socket()) as s:
            # a port that only lingers from a process that ended (TIME_WAIT) is free for a server
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", preferred))
                return preferred
            except OSError:
                pass
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child counts as dead
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True
