"""`qlora serve`: the trained model behind an OpenAI-compatible API (FastAPI + uvicorn, the `serve` extra)."""

from __future__ import annotations

import importlib.util
import sys

from qlora_cli.errors import QloraError
from qlora_cli.serve.models import Limits, ServeTarget


def serve(
    target: ServeTarget, *, host: str, port: int, api_key: str | None, max_batch_size: int, limits: Limits
) -> None:
    """Load, then listen until SIGINT/SIGTERM; in-flight requests finish first (uvicorn's graceful shutdown)."""
    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        raise QloraError(f"qlora serve needs {' and '.join(missing)}: pip install 'qlora-cli[serve]'")
    import uvicorn

    from qlora_cli.serve.api import create_app
    from qlora_cli.serve.engine import Engine
    from qlora_cli.serve.models import load_served

    loaded, served = load_served(target)
    engine = Engine(loaded, served, max_batch_size=max_batch_size)
    app = create_app(engine, served, api_key=api_key, limits=limits)
    print(f"Serving {', '.join(served)} at http://{host}:{port}/v1 (OpenAI API; Ctrl-C stops)", file=sys.stderr)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=60)
    uvicorn.Server(config).run()
