"""Child processes that do not outlive the process that started them."""

from __future__ import annotations

import ctypes
import signal

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """`preexec_fn` for a child of `trawl up` (a service, the embedded nats-server): the
    kernel sends it SIGTERM if its parent dies, even by SIGKILL, so no orphan keeps capturing
    or serving. The children run in sessions of their own (a terminal's Ctrl-C reaches only
    `trawl up`), so a process-group kill would not reach them."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
