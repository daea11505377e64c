"""The ``avatarchat`` command: serve, say, chat, doctor, router."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported lazily: `avatarchat router` starts without the app's settings machinery
    from avatarchat.config import Settings

@contextmanager
def step(what: str) -> Iterator[None]:
    """Show progress of a long step on stderr."""
    print(f"… {what}", end="", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        yield
    except BaseException:
        print(" failed", file=sys.stderr)
        raise
    print(f"\r✓ {what} ({time.perf_counter() - start:.1f} s)", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    # Before any engine loads an OpenMP runtime (see engines/llm/runtime.py): idle threads sleep, not spin.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = argparse.ArgumentParser(prog="avatarchat", description=__doc__)
    parser.add_argument("--config", help="YAML config file (default: $AVATARCHAT_CONFIG)")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start the web app")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument(
        "--role", choices=["all", "gateway", "avatar"],
        help="all (default): one process; gateway: API + sessions, forwarding to services.avatar.url; avatar: the avatar service",
    )

    say = sub.add_parser("say", help="render the avatar speaking TEXT to an MP4")
    say.add_argument("text")
    say.add_argument("-o", "--output", required=True, type=Path)
    say.add_argument("--avatar")

    chat = sub.add_parser("chat", help="ask the LLM and render its answer to an MP4")
    chat.add_argument("text")
    chat.add_argument("-o", "--output", required=True, type=Path)
    chat.add_argument("--avatar")

    doctor = sub.add_parser("doctor", help="check engines, model files, dependencies and the port")
    what = doctor.add_mutually_exclusive_group()
    what.add_argument("--engines", action="store_true", help="only run each engine for real (in a child process)")
    what.add_argument("--files", action="store_true", help="only check packages, model files and the port")

    rt = sub.add_parser("router", help="run the LLM router alone (OpenAI-compatible, on its own YAML file)")
    # Its own dest: argparse would let the subcommand's default (None) overwrite a --config given before it.
    rt.add_argument("--config", dest="router_config", metavar="FILE", help="the router's YAML file (default: the --config before "
                    "'router', else $AVATARCHAT_CONFIG)")
    rt.add_argument("--host", default="127.0.0.1")
    rt.add_argument("--port", type=int, default=8100)
    rt.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])

    args = parser.parse_args(argv)
    if args.command == "router":
        from avatarchat.router.serve import serve as serve_router

        return serve_router(args.router_config or args.config, args.host, args.port, args.log_level)
    from avatarchat.config import ConfigError, load_settings

    try:
        settings = load_settings(args.config)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2

    if args.command == "serve":
        if args.role:
            settings.services.role = args.role
        return _serve(settings, args.host, args.port, args.config)
    if args.command == "doctor":
        from avatarchat.doctor import run_doctor

        return run_doctor(settings, files=not args.engines, engines=not args.files)
    if args.command == "say":
        return _render(settings, args.text, args.output, args.avatar, ask_llm=False)
    return _render(settings, args.text, args.output, args.avatar, ask_llm=True)


def _serve(settings: Settings, host: str | None, port: int | None, config_path: str | None = None) -> int:
    import uvicorn

    from avatarchat.logs import setup_logging
    from avatarchat.server.app import create_app
    from avatarchat.server.serving import uvicorn_options

    setup_logging(settings.server.log_level, settings.server.log_json)
    app = create_app(settings, config_path=config_path)
    uvicorn.run(
        app,
        host=host or settings.server.host,
        port=port if port is not None else settings.server.port,
        log_level=settings.server.log_level,
        **uvicorn_options(settings.server),
        ws_ping_interval=20,
        ws_ping_timeout=20,
    )
    return 0


def _render(settings: Settings, text: str, output: Path, avatar: str | None, ask_llm: bool) -> int:
    from avatarchat.render import RenderError, render_to_file

    try:
        info = render_to_file(settings, text, output, avatar or settings.avatar.default, ask_llm=ask_llm, step=step)
    except RenderError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if ask_llm:
        print(info.text)
    print(f"wrote {output} ({info.seconds:.2f} s of video, {info.frames} frames)", file=sys.stderr)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
