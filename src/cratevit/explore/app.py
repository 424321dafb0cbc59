"""The explore page's web server: Flask routes over an :class:`~cratevit.explore.session.Explorer`, bound to
127.0.0.1 only. Errors a user can cause (a file that is not an image, a layer out of range) come back as JSON
``{"error": ...}`` shown in the page; anything else is logged with its traceback and reported in the page as a
bug, and the server keeps serving."""

from __future__ import annotations

import contextlib
import logging
import threading
from importlib import resources
from typing import Any

from ..errors import UserError, require
from .session import Explorer

__all__ = ["HOST", "create_app", "serve"]

HOST = "127.0.0.1"
MAX_UPLOAD = 32 * 2**20  # bytes
log = logging.getLogger("cratevit.explore")


def _flask() -> Any:
    require("flask", "explore", "the explore page")
    import flask

    return flask


def create_app(explorer: Explorer) -> Any:
    """The Flask application serving the page and its JSON API for ``explorer``."""
    flask = _flask()
    from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

    app = flask.Flask("cratevit.explore", static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = MAX_UPLOAD
    page = resources.files("cratevit.explore").joinpath("page.html").read_text(encoding="utf-8")
    req = flask.request

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
        return flask.Response(page, mimetype="text/html")

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
            )
        )

    @app.post("/api/index")
    def index_set() -> Any:
        return flask.jsonify(explorer.start_index(arg("layer", int)))

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
                arg("head", int),
            )
        )  # fmt: skip

    return app


class _Server(threading.Thread):
    """The werkzeug server in a thread (for tests and notebooks): ``.url``, ``.stop()``."""

    def __init__(self, app: Any, port: int) -> None:
        from werkzeug.serving import make_server

        super().__init__(daemon=True, name="cratevit-explore")
        self.server = make_server(HOST, port, app, threaded=True)
        self.url = f"http://{HOST}:{self.server.server_port}/"

    def run(self) -> None:
        self.server.serve_forever()

    def stop(self) -> None:
        self.server.shutdown()
        self.join(timeout=10)


def serve(explorer: Explorer, port: int = 8000, background: bool = False) -> _Server:
    """Serve the page on 127.0.0.1:``port`` (0: a free port). ``background=True`` returns the running server
    thread; otherwise this blocks until Ctrl-C."""
    server = _Server(create_app(explorer), port)
    if background:
        server.start()
        return server
    print(f"cratevit explore: {explorer.name} on {server.url} (Ctrl-C stops)", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    return server
