"""What every benchmark uses: running and timing commands, ports, figures."""

import os
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MIB = 1 << 20
WARM_SAMPLES = 5  # warm mounts of each kind per run (B4, B9)


def log(message):
    print(f"== {message}", file=sys.stderr, flush=True)


def run(*args, **kwargs):
    kwargs.setdefault("check", True)
    return subprocess.run(list(args), **kwargs)


def timed(*args, **kwargs):
    # What earlier measurements wrote is flushed first, so its writeback does
    # not land in this one (it moved cold pulls by up to 2x here).
    os.sync()
    started = time.perf_counter()
    run(*args, **kwargs)
    return time.perf_counter() - started


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def human_seconds(value):
    if value < 1e-3:
        return f"{value * 1e6:.1f} µs"
    return f"{value * 1e3:.1f} ms" if value < 1 else f"{value:.2f} s"
