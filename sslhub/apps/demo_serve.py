"""Serving the demo: the port checked before anything loads, the ``sslhub demo`` command line that
serves it, and where it is served, in sslhub's words (``sslhub.apps.demo.launch`` uses them).
"""
from __future__ import annotations

import shlex
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sslhub.errors import InputError

if TYPE_CHECKING:
    import gradio as gr

FIRST_PORT = 7860  # Gradio's first port when none is given


def check_port(host: str, port: int) -> None:
    """``InputError`` naming ``--port`` when ``host:port`` cannot be bound (another server holds it).

    Checked before the model loads and the data is embedded (minutes for a large ``--data``), and in
    sslhub's words: Gradio's own error advises its ``server_port`` argument and an environment variable.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does: TIME_WAIT is free
        try:
            probe.bind((host.strip("[]"), port))
        except OSError as e:
            raise InputError(_port_message(host, port, e.strerror or str(e))) from None


def _port_message(host: str, port: int | None, reason: str) -> str:
    if port is None:
        return (f"cannot serve on {host} at any port from {FIRST_PORT} ({reason}): choose a free one with --port, "
                "and check --host")
    return (f"cannot serve on {host}:{port} ({reason}): choose another port with --port, or leave --port out "
            f"to take the first free one from {FIRST_PORT}")


def demo_command(model: Any, index: Any = None, data: Any = None, split: str | None = None,
                 host: str = "127.0.0.1", port: int | None = None) -> str:
    """The ``sslhub demo`` command line that serves this demo (``MODEL`` for an ``Encoder`` object)."""
    args = ["sslhub", "demo", str(model) if isinstance(model, (str, Path)) else "MODEL"]
    if isinstance(index, (str, Path)):
        args += ["--index", str(index)]
    if data is not None:
        args += ["--data", str(data)]
    if split not in (None, "train"):
        args += ["--split", split]
    if host != "127.0.0.1":
        args += ["--host", host]
    if port is not None:
        args += ["--port", str(port)]
    return shlex.join(args)


def _announce(demo: gr.Blocks, command: str, share: bool) -> None:
    """Where the demo is served, in sslhub's words, on stderr.

    Gradio's own lines (hidden by ``quiet=True``) say "set `share=True` in `launch()`", which a
    ``sslhub demo`` user never calls. Gradio still prints the public link itself when there is one.
    """
    print(f"sslhub demo: serving on {demo.local_url} (Ctrl-C stops it)", file=sys.stderr, flush=True)
    if not share:
        print(f"sslhub demo: for a public *.gradio.live link too, run {command} --share", file=sys.stderr, flush=True)
