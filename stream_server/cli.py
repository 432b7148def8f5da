"""``musetalk-stream``: serve, mint tokens, check or fetch models, and the command-line client."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from stream_server.settings import TIER_NAMES, Settings


def _serve(args: argparse.Namespace) -> int:
    from stream_server.allocator import apply_allocator

    settings = Settings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    apply_allocator(settings.server)  # first: it may re-execute the process

    import uvicorn

    from stream_server.app import create_app
    from stream_server.drain import DrainingServer
    from stream_server.header_deadline import with_header_timeout
    from stream_server.ws_abort import AbortableWebSocketProtocol

    # Encoder and frame-worker threads share the GIL with the event loop: hand it back sooner.
    sys.setswitchinterval(0.001)
    host = args.host or settings.server.host
    port = args.port or settings.server.port
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=with_header_timeout(settings.server.header_timeout_s),
        ws=AbortableWebSocketProtocol,
        ws_max_size=settings.limits.max_message_bytes,
        ws_per_message_deflate=False,
        ws_ping_interval=settings.server.ws_ping_interval_s,
        ws_ping_timeout=settings.server.ws_ping_timeout_s,
        log_level="info",
    )
    DrainingServer(config, app, settings.cluster.drain_timeout_s).run()
    return 0


def _token(args: argparse.Namespace) -> int:
    from stream_server.auth import Authenticator

    settings = Settings()
    secret_file = (settings.server.data_dir / "hs256.secret").resolve()
    if not settings.auth.hs256_secret and not secret_file.is_file():
        # Never make a secret here: the server would not know it and would reject every token.
        print(
            f"error: no HS256 secret: auth.hs256_secret is not set and {secret_file} does not exist.\n"
            "The server keeps its generated secret in <server.data_dir>/hs256.secret: run this command "
            "with the server's MTS_* environment or MTS_CONFIG (e.g. MTS_SERVER__DATA_DIR=/path/to/var), "
            "or from the folder the server runs in.",
            file=sys.stderr,
        )
        return 2
    auth = Authenticator(settings.auth, secret_file)
    roles = ["admin"] if args.admin else None
    print(auth.mint(args.sub, args.tier, ttl_s=args.ttl, roles=roles))
    return 0


def _models(args: argparse.Namespace) -> int:
    """``models check`` names every file: missing required ones (exit 1: MuseTalk cannot run, the
    server falls back to the lite engine) and missing optional ones with what each costs."""
    from inference.musetalk.layout import download_models, model_report

    root = Path(args.dir or Settings().engine.models_dir)
    if args.action == "download":
        download_models(root)
    report = model_report(root)
    missing = [f for f in report if f.required and not f.present]
    for f in report:
        state = "ok     " if f.present else "MISSING"
        kind = "required" if f.required else "optional"
        also = f" (or {', '.join(f.alternatives)})" if f.alternatives else ""
        line = f"  {state} {kind}  {f.path}{also}: {f.purpose}"
        if not f.present and not f.required:
            line += f"; without it {f.without}"
        print(line)
    if missing:
        print(f"{root}: incomplete, MuseTalk cannot run (engine.kind auto serves the lite engine):", file=sys.stderr)
        for f in missing:
            also = f" (or {', '.join(f.alternatives)})" if f.alternatives else ""
            print(f"  - missing required {f.path}{also}", file=sys.stderr)
        return 1
    optional = sum(not f.present for f in report)
    print(f"{root}: complete" + (f" ({optional} optional files missing, see above)" if optional else ""))
    return 0


def _client(args: argparse.Namespace) -> int:
    from stream_server.client import run_client

    return run_client(args)


def _pregen(args: argparse.Namespace) -> int:
    """Render templates for an avatar into the server's clip store, through the server."""
    from stream_server.auth import Authenticator
    from stream_server.client import run_pregen
    from stream_server.templates import TemplateLibrary

    settings = Settings()
    library = TemplateLibrary.load(Path(settings.templates.file) if settings.templates.file else None)
    templates = args.template or library.ids()
    unknown = [t for t in templates if library.get(t) is None]
    if unknown:
        print(f"unknown template(s) {', '.join(unknown)}; the library has {', '.join(library.ids())}", file=sys.stderr)
        return 2
    if args.token is None:
        auth = Authenticator(settings.auth, settings.server.data_dir / "hs256.secret")
        args.token = auth.mint("pregen", "low", ttl_s=3600)
    return run_pregen(args, templates)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="musetalk-stream", description=__doc__)
    sub = parser.add_subparsers(dest="command")

    serve = sub.add_parser("serve", help="run the server (the default command)")
    serve.add_argument("--host", default=None, help="bind address (default: server.host)")
    serve.add_argument("--port", type=int, default=None, help="bind port (default: server.port)")
    serve.set_defaults(func=_serve)

    token = sub.add_parser("token", help="mint an HS256 token from the configured secret")
    token.add_argument("--sub", required=True, help="the identity the token names")
    token.add_argument("--tier", required=True, choices=TIER_NAMES)
    token.add_argument("--ttl", type=float, default=86_400, help="seconds until it expires (default one day)")
    token.add_argument("--admin", action="store_true", help="grant the admin role")
    token.set_defaults(func=_token)

    models = sub.add_parser("models", help="check or download the MuseTalk weights")
    models.add_argument("action", choices=["check", "download"])
    models.add_argument("--dir", default=None, help="models folder (default: engine.models_dir)")
    models.set_defaults(func=_models)

    client = sub.add_parser("client", help="send audio, wait in line, save the lip-synced video")
    client.add_argument("--avatar", required=True)
    client.add_argument("--audio", required=True, type=Path)
    client.add_argument("-o", "--output", required=True, type=Path)
    client.add_argument("--server", default="http://127.0.0.1:8000")
    client.add_argument("--token", default=None)
    client.set_defaults(func=_client)
    pregen = sub.add_parser("pregen", help="render template phrases for an avatar into the clip store")
    pregen.add_argument("--avatar", required=True)
    pregen.add_argument("--template", action="append", default=None,
                        help="a template id (repeatable; default: every template in templates.file)")
    pregen.add_argument("--server", default="http://127.0.0.1:8000")
    pregen.add_argument("--token", default=None, help="default: a low-tier token minted from the configured secret")
    pregen.set_defaults(func=_pregen)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["serve", *(argv or [])])
    sys.exit(args.func(args))
