"""The explore page's web server: Flask routes over an :class:`~cratevit.explore.session.Explorer`, bound to
127.0.0.1 only. Errors a user can cause (a file that is not an image, a layer out of range) come back as JSON
``{"error": ...}`` shown in the page; anything else is logged with its traceback and reported in the page as a
bug, and the server keeps serving.

Security model (docs/explore.md): binding to 127.0.0.1 keeps other machines out, but not other web pages open in
the user's browser. So every request is checked before it reaches a route (:func:`refusal`):

- ``Host`` must be ``127.0.0.1:PORT`` or ``localhost:PORT``, PORT the one the server printed: a DNS-rebinding page
  (``Host: rebind.attacker.example``) reads nothing;
- a request a browser marks ``Sec-Fetch-Site: cross-site`` or ``same-site`` (another page, another local port) is
  refused, except following a link to the page itself (a top-level navigation to ``/``, which the other page cannot
  read, and the page cannot be framed);
- a POST (opening a file or sample, indexing) needs ``Origin`` equal to the page's own origin, or the header
  ``X-Cratevit-Token`` with the per-run token written into the page (a random 128-bit value, new each run).

A refused request gets 403 and one line naming the reason.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import socket
import threading
from importlib import resources
from typing import Any

from ..errors import UserError, require
from .session import Explorer

__all__ = ["HOST", "TOKEN_HEADER", "create_app", "refusal", "serve"]

HOST = "127.0.0.1"
"""The only address the explore page listens on and answers for (loopback; other ``Host`` headers are refused)."""
MAX_UPLOAD = 32 * 2**20  # bytes
TOKEN_HEADER = "X-Cratevit-Token"
"""The request header that must carry the page's session token."""
log = logging.getLogger("cratevit.explore")


def _flask() -> Any:
    require("flask", "explore", "the explore page")
    import flask

    return flask


def allowed_hosts(port: int) -> set[str]:
    """The ``Host`` values of the page's own address (port 80 is left out of a Host header by browsers)."""
    names = (HOST, "localhost")
    return {f"{n}:{port}" for n in names} | (set(names) if port == 80 else set())


def refusal(method: str, headers: Any, port: int, token: str, path: str = "/api") -> str | None:
    """Why a request must be refused (one line), or None: the checks of the module's security model."""
    host = headers.get("Host", "")
    if host not in allowed_hosts(port):
        return f"Host {host[:80]!r} is not this page's address; open http://{HOST}:{port}/ (DNS rebinding refused)"
    site = headers.get("Sec-Fetch-Site", "")
    navigation = method == "GET" and path == "/" and headers.get("Sec-Fetch-Mode") == "navigate"  # a followed link
    if site in ("cross-site", "same-site") and not navigation:
        return f"a request from another site ({site}) is refused; use the page at http://{HOST}:{port}/"
    if method == "POST":
        origin = headers.get("Origin")
        sent = headers.get(TOKEN_HEADER, "")
        if not (origin and origin in {f"http://{h}" for h in allowed_hosts(port)}) and not (
            sent and secrets.compare_digest(sent, token)
        ):
            return (
                f"a POST from origin {str(origin)[:80]!r} without this page's token is refused; "
                f"use the page at http://{HOST}:{port}/"
            )
    return None


def create_app(explorer: Explorer, port: int = 80, token: str | None = None) -> Any:
    """The Flask application serving the page and its JSON API for ``explorer`` on ``port`` (the port in the Host
    header every request must carry); ``token``: the per-run token POSTs may carry (default: a new random one,
    in ``app.config["TOKEN"]``)."""
    flask = _flask()
    from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

    app = flask.Flask("cratevit.explore", static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = MAX_UPLOAD
    app.config["TOKEN"] = token = token or secrets.token_urlsafe(16)
    page = resources.files("cratevit.explore").joinpath("page.html").read_text(encoding="utf-8")
    page = page.replace("{{TOKEN}}", token)
    req = flask.request

    @app.before_request
    def check_request() -> Any:
        reason = refusal(req.method, req.headers, port, token, req.path)
        if reason is not None:
            log.warning("explore: refused %s %s: %s", req.method, req.path, reason)
            return flask.jsonify(error=reason), 403
        return None

    def arg(name: str, kind: type, default: Any = None, required: bool = False) -> Any:
        raw = req.values.get(name, "").strip()
        if raw in ("", "mean"):  # "mean": the head average
            if required:
                raise UserError(f"{name} is missing")
            return default
        try:
            return kind(raw)
        except ValueError:  # int('x'), float('x')
            raise UserError(f"{name} must be a {'number' if kind is float else 'whole number'}, got {raw!r}") from None

    @app.errorhandler(UserError)
    def bad_input(e: UserError) -> Any:
        return flask.jsonify(error=str(e)), 400

    @app.errorhandler(KeyError)
    def missing(e: KeyError) -> Any:
        return flask.jsonify(error=str(e.args[0]) if e.args else "not found"), 404

    @app.errorhandler(RequestEntityTooLarge)
    def too_large(_e: Exception) -> Any:
        return flask.jsonify(error=f"the file is larger than {MAX_UPLOAD // 2**20} MB; choose a smaller image"), 413

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException) -> Any:
        return flask.jsonify(error=f"{e.code} {e.name}: {e.description}"), e.code

    @app.errorhandler(Exception)
    def bug(e: Exception) -> Any:
        log.exception("explore: unexpected error")
        return flask.jsonify(error=f"internal error ({type(e).__name__}: {e}); this is a bug, please report it"), 500

    @app.get("/")
    def index() -> Any:
        r = flask.Response(page, mimetype="text/html")
        r.headers["Content-Security-Policy"] = (
            "default-src 'none'; img-src data: blob:; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
            "connect-src 'self'; frame-ancestors 'none'"
        )
        r.headers["X-Frame-Options"] = "DENY"
        r.headers["Referrer-Policy"] = "no-referrer"
        return r

    @app.get("/api/info")
    def info() -> Any:
        return flask.jsonify(explorer.info())

    @app.post("/api/open")
    def open_image() -> Any:
        size = arg("size", int)
        upload = req.files.get("file")
        if upload is not None:
            return flask.jsonify(explorer.open_upload(upload.read(), upload.filename or "upload", size))
        name = arg("sample", str)
        if not name:
            raise UserError("choose a sample image or a file to open")
        return flask.jsonify(explorer.open_sample(name, size))

    @app.get("/api/view")
    def view() -> Any:
        return flask.jsonify(
            explorer.view(
                arg("image_id", str, required=True),
                arg("layer", int, required=True),
                arg("head", int),
                arg("facet", str, "key"),
                arg("threshold", float, 0.6),
                arg("protocol", str, "mass"),
                arg("query", int),
                arg("scale", str, "own"),
            )
        )

    @app.post("/api/index")
    def index_set() -> Any:
        return flask.jsonify(explorer.start_index(arg("layer", int), rebuild=arg("rebuild", str, "") in ("1", "true")))

    @app.get("/api/job/<job_id>")
    def job(job_id: str) -> Any:
        return flask.jsonify(explorer.job(job_id))

    @app.get("/api/atom")
    def atom() -> Any:
        return flask.jsonify(
            explorer.atom(
                arg("image_id", str, required=True), arg("layer", int, required=True), arg("coord", int, required=True)
            )
        )

    @app.get("/api/intervene")
    def intervene() -> Any:
        return flask.jsonify(
            explorer.intervene(
                arg("image_id", str, required=True), arg("layer", int, required=True), arg("coord", int, required=True), arg("value", float, 0.0),
                arg("head", int), arg("scale", str, "own"),
            )
        )  # fmt: skip

    @app.get("/api/sweep")
    def sweep() -> Any:
        return flask.jsonify(
            explorer.sweep(
                arg("image_id", str, required=True), arg("layer", int, required=True), arg("coord", int, required=True)
            )
        )

    @app.get("/api/sae/features")
    def sae_features() -> Any:
        return flask.jsonify(explorer.sae_features(arg("image_id", str, required=True), arg("sae", int, 0)))

    @app.post("/api/sae/index")
    def sae_index() -> Any:
        return flask.jsonify(
            explorer.start_sae_index(arg("sae", int, 0), rebuild=arg("rebuild", str, "") in ("1", "true"))
        )

    @app.get("/api/sae/feature")
    def sae_feature() -> Any:
        return flask.jsonify(
            explorer.sae_feature(
                arg("image_id", str, required=True), arg("sae", int, 0), arg("feature", int, required=True)
            )
        )

    @app.get("/api/sae/clamp")
    def sae_clamp() -> Any:
        return flask.jsonify(
            explorer.sae_clamp(
                arg("image_id", str, required=True), arg("sae", int, 0), arg("feature", int, required=True),
                arg("value", float, 0.0), arg("head", int), arg("scale", str, "own"),
            )
        )  # fmt: skip

    return app


class _Server(threading.Thread):
    """The werkzeug server in a thread (for tests and notebooks): ``.url``, ``.port``, ``.app``, ``.stop()``; the
    socket is bound here, so a busy port is a one-line :class:`UserError` (werkzeug would print and exit)."""

    def __init__(self, explorer: Explorer, port: int) -> None:
        from werkzeug.serving import make_server

        super().__init__(daemon=True, name="cratevit-explore")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as werkzeug: a restart need not wait
        try:
            sock.bind((HOST, port))
            sock.listen(128)
        except OSError as e:  # werkzeug would print its own message and exit
            sock.close()
            raise UserError(f"cannot listen on {HOST}:{port} ({e.strerror}); choose another --port") from None
        port = sock.getsockname()[1]
        self.app = create_app(explorer, port)
        self.server = make_server(HOST, port, self.app, threaded=True, fd=sock.fileno())
        sock.close()  # werkzeug holds its own duplicate of the socket
        self.port = port
        self.url = f"http://{HOST}:{port}/"

    def run(self) -> None:
        self.server.serve_forever()

    def stop(self) -> None:
        self.server.shutdown()
        self.join(timeout=10)


def serve(explorer: Explorer, port: int = 8000, background: bool = False) -> _Server:
    """Serve the page on 127.0.0.1:``port`` (0: a free port). ``background=True`` returns the running server
    thread; otherwise this blocks until Ctrl-C."""
    server = _Server(explorer, port)
    if background:
        server.start()
        return server
    print(f"cratevit explore: {explorer.name} on {server.url} (Ctrl-C stops)", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    return server
