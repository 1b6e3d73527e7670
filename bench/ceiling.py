"""The ceiling: a bare Litestar "hello" JSON app, served exactly as the real server is served.

Run by the benchmark as ``python -m bench.ceiling --server uvicorn --port P --workers 2``. The
uvicorn options mirror ``otp-server serve`` (src/otp_http/cli.py): same defaults for the HTTP
implementation and event loop ("auto": httptools and uvloop when installed), no access-log
configuration, no server header, no proxy-header rewriting.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

from litestar import Litestar, get


@get("/", sync_to_thread=False)
def hello() -> dict[str, str]:
    return {"message": "hello"}


def create_app() -> Litestar:
    return Litestar(route_handlers=[hello], openapi_config=None, debug=False, logging_config=None)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ceiling")
    parser.add_argument("--server", choices=["uvicorn", "granian"], default="uvicorn")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    if args.server == "granian":
        granian = shutil.which("granian", path=os.path.dirname(sys.executable))
        if granian is None:
            sys.exit("granian is not installed in this venv: .venv/bin/pip install granian")
        argv = [granian, "--interface", "asgi", "--factory", "--host", args.host]
        argv += ["--port", str(args.port), "--workers", str(args.workers), "--no-ws"]
        argv += ["--log-level", "warning", "bench.ceiling:create_app"]
        os.execv(granian, argv)
    import uvicorn

    uvicorn.run(
        "bench.ceiling:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_config=None,
        proxy_headers=False,
        server_header=False,
    )


if __name__ == "__main__":
    main()
