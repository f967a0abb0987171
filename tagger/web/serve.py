"""``tagger serve``: run the webhook receiver (``POST /events``, ``GET /healthz``, ``GET /metrics``) with uvicorn."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from tagger.settings import env_name

log = logging.getLogger("tagger.web")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tagger serve",
        description="Receive signed product events over HTTP (POST /events) and record them in the outbox; "
                    "GET /healthz, GET /metrics (Prometheus), GET /docs and /openapi.json describe the API. "
                    f"Set {env_name('webhook_secret')} to the secret shared with the PIM.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    parser.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    parser.add_argument("--no-relay", action="store_true",
                        help="do not hand events to the broker after accepting them; leave it to `tagger relay`")
    parser.add_argument("--proxy-headers", action="store_true",
                        help="trust X-Forwarded-For/-Proto from the proxy in front (see uvicorn --forwarded-allow-ips)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    import uvicorn

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO if args.log_level == "debug" else logging.WARNING,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from tagger.cli import resolved_settings
    from tagger.web.app import create_app

    settings = resolved_settings()  # starts the embedded Postgres/Redis when none are configured
    if not settings.webhook_secret:
        log.warning("%s is not set: POST /events answers 503 until it is", env_name("webhook_secret"))
        print(f"tagger serve: warning: {env_name('webhook_secret')} is not set; POST /events answers 503 until it is")
    app = create_app(settings, relay=not args.no_relay)
    print(f"tagger serve: listening on http://{args.host}:{args.port} (POST /events, GET /healthz, GET /metrics)",
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, proxy_headers=args.proxy_headers,
                server_header=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
