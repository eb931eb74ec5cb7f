"""`onerec serve --model EXPORT`: recommendations over HTTP (FastAPI under uvicorn).

The model and its catalogue load once; concurrent requests are gathered for up to
--max-wait-ms, or until --max-batch-size are waiting, and answered by one beam search
(onerec/serve/batcher.py). Routes, request fields and errors: onerec/serve/app.py.

The address is bound before the model loads, so a port in use is a message at once, and
--port 0 takes any free port (the log line "serving ... on http://HOST:PORT" names it).
SIGTERM or Ctrl+C stops accepting connections, lets the requests in flight finish (for at
most GRACEFUL_SHUTDOWN_S) and exits 0.
"""

from __future__ import annotations

import argparse
from onerec.stages.recommend import (
    add_device_argument,
    add_history_limit_argument,
    at_least_one,
    at_least_zero,
    bounded_int,
)

# Seconds a stopping server waits for the requests in flight.
GRACEFUL_SHUTDOWN_S = 10


# argparse type: a TCP port (0: any free port).
_port = bounded_int(0, 65535, "a port 0..65535 (0: any free port)")


def _milliseconds(text: str) -> float:
    """argparse type: a number of milliseconds >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text}: expected a number of milliseconds >= 0")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="export directory, e.g. runs/demo/pretrain/export")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=_port, default=8000, help="TCP port (0: any free port, named in the log)")
    parser.add_argument("--max-batch-size", type=at_least_one, default=64, help="requests per beam search")
    parser.add_argument("--max-wait-ms", type=_milliseconds, default=5.0,
                        help="how long a request waits for others to share its search (0: never)")
    parser.add_argument("--beam-width", type=at_least_one, default=None,
                        help="beams per request (default: the export's eval.beam_width); k may be 1..beam width")
    parser.add_argument("--max-queued", type=at_least_zero, default=None, metavar="N",
                        help="requests waiting at once before new ones get 503 (default 1024; 0: no limit)")
    parser.add_argument("--max-body-bytes", type=at_least_one, default=None, metavar="BYTES",
                        help="largest request body; larger ones get 413 (default 1 MiB)")
    add_history_limit_argument(parser)
    add_device_argument(parser)


def main(args: argparse.Namespace) -> None:
    import logging
    import signal
    from pathlib import Path

    sock = _listen(args.host, args.port)  # first: a port in use is a message before anything loads
    try:
        # Imported here: `onerec --help` must not pay for torch, FastAPI or uvicorn.
        import uvicorn

        from onerec.device import resolve_device
        from onerec.export import load_export
        from onerec.inference.recommend import Recommender, history_limit
        from onerec.serve.app import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_QUEUED, create_app

        exported = load_export(Path(args.model), resolve_device(args.device, setting="--device"))
        limit = history_limit(args.max_history_items, exported.cfg.data.max_history)
        recommender = Recommender(exported, args.beam_width, args.max_batch_size, limit, source=args.model)
        max_queued = DEFAULT_MAX_QUEUED if args.max_queued is None else args.max_queued
        max_body = DEFAULT_MAX_BODY_BYTES if args.max_body_bytes is None else args.max_body_bytes
        app = create_app(recommender, args.beam_width, args.max_batch_size, args.max_wait_ms, max_queued, max_body)
    except BaseException:
        sock.close()
        raise
    log = logging.getLogger("onerec.serve")
    host, port = sock.getsockname()[:2]
    url_host = f"[{host}]" if ":" in host else host
    log.info("serving %s (%d items, %s) on http://%s:%d", args.model, recommender.num_items, recommender.device,
             url_host, port)
    config = uvicorn.Config(app, lifespan="on", log_level="info", timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    server = uvicorn.Server(config)
    # uvicorn shuts down gracefully on SIGINT/SIGTERM and then raises the signal again for
    # the handler it found: this one notes it, so a requested stop ends the command with 0.
    stopped_by: list[str] = []
    previous = {sig: signal.signal(sig, lambda number, frame: stopped_by.append(signal.Signals(number).name))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
    log.info("stopped%s", f" ({stopped_by[0]})" if stopped_by else "")


def _listen(host: str, port: int):
    """A bound TCP socket for host:port; ResourceError naming both when it cannot be had."""
    import socket

    from onerec.errors import ResourceError

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as err:
        raise ResourceError(f"--host {host}: cannot resolve it ({err.strerror})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise ResourceError(
            f"--host {host} --port {port}: cannot listen there ({err.strerror}); choose another --port, "
            "or --port 0 for any free one"
        ) from None
    return sock
