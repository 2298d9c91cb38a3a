"""Serve job: one gallery folder behind the similarity service under uvicorn (serve.py).

Checks the settings, loads the gallery (a damaged folder or another checkpoint stops here, in
one line naming the file), binds the address itself (a port in use is one line too, and
``port=0`` takes a free one), prints the URL, and serves until Ctrl-C or SIGTERM, which end
it gracefully (requests in flight finish) with exit status 0.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import re
import signal
import socket
import threading
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from siamese.checks import check_int_setting
from siamese.composition import given
from siamese.console import say, shown_path
from siamese.errors import ConfigError
from siamese.service import ServiceSettings, create_app
from siamese.service.security import LOOPBACK_NAMES

log = logging.getLogger(__name__)

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
# The key of a browser's /?key=KEY visit, as the access log would write it.
_KEY_IN_URL = re.compile(r"([?&]key=)[^&\s]*")


class RedactKey(logging.Filter):
    """Keeps the API key of ``/?key=KEY`` out of the access log (console and serve.log)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                _KEY_IN_URL.sub(r"\1<redacted>", a) if isinstance(a, str) else a
                for a in record.args
            )
        return True


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) is reachable from this machine only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_serve_config(cfg: DictConfig) -> ServiceSettings:
    """Fail at start, in one line, on settings that cannot work (nothing is read yet);
    returns the service's settings."""
    if given(cfg, "gallery_dir") is None:
        raise ConfigError(
            "gallery_dir is required: python serve.py gallery_dir=outputs/index/runs/<time> "
            "(a gallery folder of index.py)"
        )
    host = given(cfg, "host")
    if host is None:
        raise ConfigError("host is empty; use host=127.0.0.1 (this machine only) or host=0.0.0.0")
    check_int_setting("port", cfg.get("port"), 0, " from 0 (any free port) to 65535")
    if int(cfg.port) > 65535:
        raise ConfigError(f"port must be from 0 (any free port) to 65535, got {cfg.port}")
    serve = cfg.serve
    level = str(serve.get("log_level")).lower()
    if level not in LOG_LEVELS:
        raise ConfigError(
            f"serve.log_level={serve.get('log_level')!r} is unknown; choose one of "
            f"{', '.join(LOG_LEVELS)}"
        )
    if serve.get("max_connections") is not None:
        check_int_setting(
            "serve.max_connections", serve.max_connections, 1, " (null: no limit), e.g. 100"
        )
    threshold = cfg.get("threshold")
    return ServiceSettings(
        api_key=serve.get("api_key"),
        max_upload_mb=serve.max_upload_mb,
        max_image_pixels=serve.max_image_pixels,
        k=serve.k,
        max_k=serve.max_k,
        identify_by=str(cfg.identify.by),
        identify_k=cfg.identify.k,
        threshold=None if threshold is None else float(threshold),
        batch_max_size=serve.batch.max_size,
        batch_max_wait_ms=serve.batch.max_wait_ms,
        thumbnail_size=serve.thumbnail_size,
        thumbnail_cache=serve.thumbnail_cache,
        allowed_hosts=(*LOOPBACK_NAMES, host.strip("[]").lower()) if is_loopback(host) else None,
    )


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``; one ConfigError line when that cannot be."""
    try:
        infos = socket.getaddrinfo(
            host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise ConfigError(
            f"host={host!r} is not an address or a known host name ({exc.strerror}); use "
            "host=127.0.0.1 or an address of this machine"
        ) from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"port={port} on {host} is in use by another program; choose another port=, "
                "or port=0 for any free one"
            ) from None
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise ConfigError(
                f"port={port} needs privileges this user lacks; use a port from 1024 up"
            ) from None
        raise ConfigError(
            f"cannot listen on host={host!r} port={port} ({exc.strerror}); use an address of "
            "this machine, e.g. host=127.0.0.1"
        ) from None
    sock.setblocking(False)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def uvicorn_config(app: Any, cfg: DictConfig) -> Any:
    """uvicorn's settings for ``app``: Hydra's logging, the access log, no server header, and
    ``serve.max_connections`` (uvicorn's limit_concurrency: 503 beyond it)."""
    import uvicorn

    limit = cfg.serve.get("max_connections")
    return uvicorn.Config(
        app,
        log_config=None,  # Hydra's logging: the console and <run folder>/serve.log
        log_level=str(cfg.serve.log_level).lower(),
        access_log=bool(cfg.serve.access_log),
        server_header=False,
        timeout_graceful_shutdown=10,
        limit_concurrency=None if limit is None else int(limit),
    )


class _Stopped(BaseException):
    """SIGTERM, raised once uvicorn has shut down gracefully and hands the signal back."""


def run_serve(cfg: DictConfig) -> None:
    """Serve ``gallery_dir`` until Ctrl-C or SIGTERM."""
    import uvicorn

    from siamese.pipelines.search import load_gallery

    settings = check_serve_config(cfg)
    gallery = load_gallery(cfg)
    sock = bind(str(cfg.host), int(cfg.port))
    app = create_app(gallery, settings)
    url = url_of(sock)
    where = shown_path(Path(str(cfg.gallery_dir)).expanduser())
    key = f"; with the API key, open {url}?key=<key> once" if settings.api_key else ""
    say(f"serving {len(gallery)} items of {where} at {url} (API: {url}docs{key}; Ctrl-C stops)")
    if not is_loopback(str(cfg.host)) and not settings.api_key:
        log.warning(
            "host=%s serves anyone who can reach this machine, with no API key: set "
            "SIAMESE_API_KEY (or serve.api_key) to require one",
            cfg.host,
        )
    config = uvicorn_config(app, cfg)
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, RedactKey) for f in access.filters):
        access.addFilter(RedactKey())
    how = _serve(uvicorn.Server(config), sock)
    say(f"stopped serving ({how})")


def _serve(server: Any, sock: socket.socket) -> str:
    """Run ``server`` on ``sock``; returns what stopped it."""

    def stop(signum: int, frame: Any) -> None:
        raise _Stopped

    # uvicorn shuts down on SIGTERM, then raises the signal again once its own handler is
    # gone: this one turns that into a clean return instead of the default death by signal.
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, stop) if main else None
    try:
        server.run(sockets=[sock])
        return "shut down"
    except KeyboardInterrupt:
        return "Ctrl-C"
    except _Stopped:
        return "SIGTERM"
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        sock.close()
