"""`neoxja serve` (routed here by neoxja.cli): an OpenAI-compatible HTTP server for one model.

The pieces: engine.py (continuous batching, the model's only user), app.py (the FastAPI app), protocol.py (the
API's fields and shapes), metrics.py (/metrics). This file loads the model as the other commands do
(neoxja.commands), binds the socket itself so that a taken port is one clear error line, and runs uvicorn."""
from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys

from ..commands import add_model_arguments
from ..errors import InputError

API_KEY_ENV = "NEOXJA_API_KEY"
EPILOG = f"""\
endpoints: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health, GET /metrics
example:   neoxja serve --model rinna/japanese-gpt-neox-3.6b-instruction-ppo --port 8000
           curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
                -d '{{"prompt": "吾輩は猫である。", "max_tokens": 32}}'
The API key may also come from ${API_KEY_ENV} (keeps it out of the process list)."""


def add_cli_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    model = add_model_arguments(parser)
    model.add_argument("--served-model-name", help="the model id clients use (default: --model as given)")
    http = parser.add_argument_group("server")
    http.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, this machine "
                                                          "only; 0.0.0.0 exposes the server to the network)")
    http.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    http.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                      help=f"require 'Authorization: Bearer KEY' on /v1 routes (default: ${API_KEY_ENV}, else none)")
    http.add_argument("--max-batch", type=int, default=8, help="most sequences decoded together (default 8)")
    http.add_argument("--max-queue", type=int, default=64, help="most sequences waiting for the batch; beyond it "
                                                                "requests get 429 (default 64)")
    http.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (default 1 MiB)")
    http.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                      help="uvicorn's log level (default info: one access line per request)")


def cli_main(args: argparse.Namespace, name: str) -> int:
    try:
        import uvicorn
    except ModuleNotFoundError:
        raise InputError("neoxja serve needs FastAPI and uvicorn: pip install 'neoxja[server]'") from None
    from ..commands import load_pipeline, warnings_as_lines
    from ..pipelines import DEMO_MODEL_DIR
    from .app import create_app
    from .engine import Engine

    if args.max_body_bytes < 1:
        raise InputError(f"--max-body-bytes must be positive, got {args.max_body_bytes}")
    with warnings_as_lines(name):
        sock = _listen(args.host, args.port)
        if args.api_key is None and not _is_loopback(sock):
            print(f"neoxja {name}: warning: listening on {args.host} without --api-key: anyone who can reach this "
                  "machine can use the model", file=sys.stderr)
        pipe = load_pipeline(args, {})
        engine = Engine(pipe.model, pipe.tokenizer, max_batch=args.max_batch, max_queue=args.max_queue)
        model_name = args.served_model_name or args.model or DEMO_MODEL_DIR.name
        app = create_app(engine, model_name, api_key=args.api_key, max_body_bytes=args.max_body_bytes)
        host, port = sock.getsockname()[:2]
        print(f"neoxja {name}: serving {model_name} at http://{_url_host(host)}:{port}/v1", file=sys.stderr,
              flush=True)
        # Connections are bounded too: beyond what the batch and the queue can use (plus room for /health and
        # /metrics), uvicorn answers 503 at once instead of holding request bodies in memory.
        connections = 4 * (args.max_batch + args.max_queue) + 16
        config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=5,
                                limit_concurrency=connections)
        with engine:
            uvicorn.Server(config).run(sockets=[sock])
    return 0


def _listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, or an InputError saying why it cannot be."""
    if not 0 <= port <= 65535:
        raise InputError(f"--port must be between 0 and 65535, got {port}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as err:
        raise InputError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    return sock


def _is_loopback(sock: socket.socket) -> bool:
    return ipaddress.ip_address(sock.getsockname()[0].split("%")[0]).is_loopback


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
