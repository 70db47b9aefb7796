"""Serve a model over an OpenAI-compatible HTTP API, with a chat page at /.

Endpoints: POST /v1/chat/completions (tools, streaming, n, stop, logprobs, json_object),
POST /v1/completions, GET /v1/models, GET /health, GET /metrics (Prometheus). Point any OpenAI
client at http://HOST:PORT/v1. Requests run on the continuous-batching engine when glmkit has it
(--backend auto), else one at a time; at most --max-pending generations are admitted at once, more
get a 503. Needs the `serve` extra: pip install 'glmkit[serve]'.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import CommandError, add_model_args, load_chat_model


def add_args(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser)
    group = parser.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 for all)")
    group.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    group.add_argument("--api-key", action="append", default=[], metavar="KEY",
                       help="accept requests with 'Authorization: Bearer KEY' only; give it several times for "
                            "several keys (default: no key needed)")
    group.add_argument("--api-key-file", type=Path, default=None, metavar="FILE",
                       help="read accepted keys from FILE, one per line (keeps them out of the process list)")
    group.add_argument("--served-model-name", default=None, metavar="NAME",
                       help="the model name clients send (default: the --model folder's name, or the Hub id)")
    group.add_argument("--backend", choices=["auto", "batched", "sequential"], default="auto",
                       help="batched: continuous batching; sequential: one request at a time; "
                            "auto (default): batched when available")
    group.add_argument("--max-num-seqs", type=int, default=64, metavar="N",
                       help="requests the batched engine runs at once (default: 64)")
    group.add_argument("--max-pending", type=int, default=256, metavar="N",
                       help="generations admitted at once, running or queued; more get 503 (default: 256)")
    group.add_argument("--max-body-bytes", type=int, default=4 * 2**20, metavar="BYTES",
                       help="larger request bodies get 413 (default: 4 MiB)")
    group.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def main(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from glmkit.server.app import create_app
        from glmkit.server.backend import make_backend
    except ModuleNotFoundError as e:
        raise CommandError(f"glmkit serve needs {e.name}: pip install 'glmkit[serve]'") from None
    for name in ("port", "max_num_seqs", "max_pending", "max_body_bytes"):
        if getattr(args, name) < 1:
            raise CommandError(f"--{name.replace('_', '-')} must be at least 1")
    keys = list(args.api_key) + _read_keys(args.api_key_file)
    name = args.served_model_name or (Path(args.model).name if Path(args.model).is_dir() else args.model)
    chat_model = load_chat_model(args)
    try:
        backend = make_backend(args.backend, chat_model.model, chat_model.tokenizer, args.max_num_seqs)
    except ModuleNotFoundError as e:
        raise CommandError(f"--backend {args.backend} needs {e.name}, which this installation lacks") from None
    app = create_app(chat_model, api_keys=keys, model_name=name, backend=backend, max_pending=args.max_pending,
                     max_body_bytes=args.max_body_bytes)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"glmkit: serving {name!r} ({type(backend).__name__}) at http://{shown}:{args.port} — chat page at /, "
          f"OpenAI API at /v1" + (f", {len(keys)} API key(s) required" if keys else ""), file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def _read_keys(path: Path | None) -> list[str]:
    if path is None:
        return []
    try:
        keys = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except OSError as e:
        raise CommandError(f"cannot read --api-key-file {path}: {e.strerror}") from None
    if not keys:
        raise CommandError(f"--api-key-file {path} holds no keys")
    return keys
