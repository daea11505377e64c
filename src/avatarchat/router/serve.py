"""``avatarchat router --config FILE`` (or ``avatarchat --config FILE router``, or ``$AVATARCHAT_CONFIG``):
the router as its own process (no models, no pydantic-settings)."""

from __future__ import annotations

import os
import sys

# The app's variable (avatarchat.config.CONFIG_ENV), not imported from there: that module pulls in pydantic.
CONFIG_ENV = "AVATARCHAT_CONFIG"


def serve(config: str | None, host: str, port: int, log_level: str = "info") -> int:
    source = ""
    if not config and os.environ.get(CONFIG_ENV):
        config, source = os.environ[CONFIG_ENV], f" (from ${CONFIG_ENV})"
    if not config:
        print(f"avatarchat router: no config file: pass --config FILE or set ${CONFIG_ENV} (see router.example.yaml)",
              file=sys.stderr)
        return 2
    from avatarchat.router.config import RouterConfigError, load_config

    try:
        cfg = load_config(config)
    except RouterConfigError as e:
        print(f"router config error{source}: {e}", file=sys.stderr)
        return 2
    import uvicorn

    from avatarchat.logs import setup_logging
    from avatarchat.router.app import create_app
    from avatarchat.router.service import Router

    setup_logging(log_level)
    app = create_app(Router(cfg, config))
    uvicorn.run(app, host=host, port=port, log_level=log_level, lifespan="on", access_log=False)
    return 0
