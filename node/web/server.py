"""Run the web application with uvicorn in a thread of ``qcnode serve``."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import TracebackType

from node.logs import get_logger
from node.web.app import NodeView, create_app

log = get_logger(__name__)
START_TIMEOUT = 15.0


class WebServer:
    """uvicorn serving :func:`~node.web.app.create_app` on ``host:port`` (a context
    manager: started on enter, stopped on exit)."""

    def __init__(self, view: NodeView, host: str, port: int, *,
                 certfile: Path | None = None, keyfile: Path | None = None) -> None:
        import ssl

        import uvicorn

        self.config = uvicorn.Config(
            create_app(view), host=host, port=port, log_config=None, access_log=False,
            lifespan="off", ssl_certfile=str(certfile) if certfile else None,
            ssl_keyfile=str(keyfile) if keyfile else None,
            ssl_version=ssl.PROTOCOL_TLS_SERVER,
            ssl_ciphers="ECDHE+AESGCM:ECDHE+CHACHA20")  # BCP 195, as the DICOM TLS port
        self.server = uvicorn.Server(self.config)
        self._thread = threading.Thread(target=self.server.run, name="qcnode-web",
                                        daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        """Where it listens (the bound port when 0 was asked for)."""
        sockets = [s for srv in getattr(self.server, "servers", []) for s in srv.sockets]
        if not sockets:
            raise RuntimeError("web server not listening")
        host, port = sockets[0].getsockname()[:2]
        return str(host), int(port)

    def __enter__(self) -> WebServer:
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"web server did not start on {self.config.host}:"
                                   f"{self.config.port}")
            time.sleep(0.02)
        host, port = self.address
        log.info("web_listening", host=host, port=port)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=10.0)
