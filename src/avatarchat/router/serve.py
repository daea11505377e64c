"""``avatarchat router --config FILE``: the router as its own process (no models, no pydantic-settings)."""

from __future__ import annotations

import sys


def serve(config: str | None, host: str, port: int, log_level: str = "info") -> int:
    if not config:
        print("avatarchat router: --config FILE is required (see router.example.yaml)", file=sys.stderr)
        return 2
    from avatarchat.router.config import RouterConfigError, load_config

    try:
        cfg = load_config(config)
    except RouterConfigError as e:
        print(f"router config error: {e}", file=sys.stderr)
        return 2
    import uvicorn

    from avatarchat.logs import setup_logging
    from avatarchat.router.app import create_app
    from avatarchat.router.service import Router

    setup_logging(log_level)
    app = create_app(Router(cfg, config))
    uvicorn.run(app, host=host, port=port, log_level=log_level, lifespan="on", access_log=False)
    return 0
