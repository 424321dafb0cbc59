"""The explore page's server: every action through Flask's test client, bad input answered in JSON, the server
alive after errors, bound to 127.0.0.1; the loader and the command."""

from __future__ import annotations

import io
import time
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

from cratevit import create_model, save_checkpoint
from cratevit.cli import main
from cratevit.explore import Explorer, load_explorer
from cratevit.explore.app import HOST, MAX_UPLOAD, create_app, serve
from cratevit.explore.session import ImageItem
from cratevit.presets import data_preprocessing, pretrained_cfg_for


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def explorer():
    torch.manual_seed(0)
    model = create_model("crate_debug", patch_size=4, num_classes=4)
    rng = np.random.default_rng(0)
    items = [
        ImageItem(f"noise {i}", Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8))) for i in range(5)
    ]
    return Explorer(model, "debug", (0.5,) * 3, (0.5,) * 3, items[:2], items, ["a", "b", "c", "d"], "5 noise images")


def _client(explorer):
    """A test client of the page on port 80 (Host: localhost) that sends the page's token, as the page does."""
    app = create_app(explorer)
    c = app.test_client()
    c.environ_base["HTTP_X_CRATEVIT_TOKEN"] = app.config["TOKEN"]
    return c


@pytest.fixture(scope="module")
def client(explorer):
    return _client(explorer)


def _open(client, **data):
    r = client.post("/api/open", data=data)
    assert r.status_code == 200, r.json
    return r.json


def _wait_job(client, job):
    deadline = time.time() + 30
    while job["state"] == "running" and time.time() < deadline:
        time.sleep(0.05)
        job = client.get(f"/api/job/{job['id']}").json
    return job


def test_page_and_info(client) -> None:
    page = client.get("/")
    assert page.status_code == 200 and b"cratevit explore" in page.data and page.mimetype == "text/html"
    info = client.get("/api/info").json
    assert info["depth"] == 2 and info["heads"] == 2 and info["facets"] == ["token", "key", "attn", "code"]
    assert info["samples"] == ["noise 0", "noise 1"] and info["has_code"] and info["resizable"]


def test_view_of_a_sample_and_an_upload(client) -> None:
    opened = _open(client, sample="noise 1", size="32")
    assert opened["input_size"] == [32, 44] and opened["grid"] == [8, 11]  # 56x40 -> short side 32, multiples of 4
    v = client.get(
        f"/api/view?image_id={opened['image_id']}&layer=1&head=mean&facet=code&threshold=0.5&protocol=entries"
    ).json
    assert v["layer"] == 1 and v["head"] is None and v["grid"] == [8, 11]
    assert v["mask"]["fraction"] == pytest.approx(44 / 88)  # entries: the top half of the 88 patches
    assert len(v["attention"]["heads"]) == 2 and v["attention"]["src"].startswith("data:image/png;base64,")
    assert [c["name"] for c in v["classes"]] and sum(c["prob"] for c in v["classes"]) == pytest.approx(1.0)
    assert len(v["curves"]["image"]["rc"]) == 2 and len(v["curves"]["image"]["sparsity"]) == 2
    assert v["atoms"] and all(a["patches"] > 0 for a in v["atoms"])
    up = client.post("/api/open", data={"file": (io.BytesIO(_png(Image.new("L", (64, 64), 128))), "grey.png")})
    assert up.status_code == 200 and up.json["name"] == "grey.png" and up.json["input_size"] == [32, 32]
    v2 = client.get(f"/api/view?image_id={up.json['image_id']}&layer=0&head=1&facet=key&protocol=pca").json
    assert v2["head"] == 1 and v2["protocol"] == "pca"


@pytest.mark.parametrize(
    ("data", "name", "message"),
    [
        (b"", "empty.png", "empty.png: the file is empty"),
        (b"hello, not an image", "notes.jpg", "notes.jpg is not an image file"),
        (_png(Image.new("RGB", (64, 64)))[:60], "cut.png", "cut.png is not an image this page can read"),
        (_png(Image.new("1", (8000, 6000))), "huge.png", "8000x6000 pixels is more than this page opens"),
    ],
)
def test_bad_uploads_get_a_message(client, data, name, message) -> None:
    r = client.post("/api/open", data={"file": (io.BytesIO(data), name)})
    assert r.status_code == 400 and message in r.json["error"]
    assert client.get("/api/info").status_code == 200  # still serving


def test_too_large_and_bad_parameters(client) -> None:
    r = client.post("/api/open", data={"file": (io.BytesIO(b"0" * (MAX_UPLOAD + 1)), "big.png")})
    assert r.status_code == 413 and "larger than 32 MB" in r.json["error"]
    image_id = _open(client, sample="noise 0")["image_id"]
    cases = {
        f"/api/view?image_id={image_id}&layer=7": "layer 7 is out of range; this model has layers 0..1 (block indices, 0-based)",
        f"/api/view?image_id={image_id}&layer=one": "layer must be a whole number",
        f"/api/view?image_id={image_id}&layer=0&head=9": "head 9 is out of range",
        f"/api/view?image_id={image_id}&layer=0&facet=value": "facet 'value' does not exist",
        f"/api/view?image_id={image_id}&layer=0&threshold=1.5": "threshold 1.5 must lie in (0, 1]",
        f"/api/view?image_id={image_id}": "layer is missing",
        f"/api/atom?image_id={image_id}&layer=0&coord=500": "code coordinate 500 is out of range",
        f"/api/intervene?image_id={image_id}&layer=0&coord=1&value=nan": "finite number",
    }
    for url, message in cases.items():
        r = client.get(url)
        assert r.status_code == 400 and message in r.json["error"], (url, r.json)
    assert client.get("/api/view?image_id=gone&layer=0").status_code == 404
    assert "no sample image" in client.post("/api/open", data={"sample": "nope"}).json["error"]
    assert client.get("/api/job/nope").status_code == 404
    r = client.post("/api/open", data={"sample": "noise 0", "size": "800"})  # 28,000 tokens
    assert r.status_code == 400 and "choose a smaller input size" in r.json["error"]
    assert client.get("/api/nothing").status_code == 404


def test_a_bug_is_reported_and_the_server_lives_on(explorer, client, monkeypatch) -> None:
    def broken(*_a, **_k):
        raise RuntimeError("boom")

    monkeypatch.setattr(explorer, "view", broken)
    r = client.get("/api/view?image_id=x&layer=0")
    assert r.status_code == 500 and "internal error (RuntimeError: boom); this is a bug" in r.json["error"]
    monkeypatch.undo()
    assert client.get("/api/info").status_code == 200


def test_index_atoms_and_intervention(client) -> None:
    image_id = _open(client, sample="noise 0")["image_id"]
    v = client.get(f"/api/view?image_id={image_id}&layer=0").json
    assert v["curves"]["image_set"] == {} or "rc" in v["curves"]["image_set"]
    job = _wait_job(client, client.post("/api/index").json)
    assert job["state"] == "done" and job["done"] == job["total"] == 5
    v = client.get(f"/api/view?image_id={image_id}&layer=0").json
    assert len(v["curves"]["image_set"]["rc"]["mean"]) == 2 and v["curves"]["image_set_label"] == "5 noise images"
    coord = v["atoms"][0]["coord"]
    a = client.get(f"/api/atom?image_id={image_id}&layer=0&coord={coord}").json
    assert a["coord"] == coord and a["stats"]["images"] == 5 and 0 < a["stats"]["patch_frequency"] <= 1
    assert a["patches"] and a["patches"][0]["value"] >= a["patches"][-1]["value"] > 0
    assert a["patches"][0]["name"].startswith("noise") and a["here"]["active"] > 0
    r = client.get(f"/api/intervene?image_id={image_id}&layer=0&coord={coord}&value=0&head=1").json
    assert [item["layer"] for item in r["later"]] == [1] and r["later"][0]["change"] > 0
    assert r["top_class"]["logit_change"] > 0 and len(r["classes_after"]) == 4
    r = client.get(f"/api/intervene?image_id={image_id}&layer=1&coord={coord}&value=3").json
    assert r["later"] == [] and r["value"] == 3.0


def test_served_on_localhost_only(explorer) -> None:
    server = serve(explorer, port=0, background=True)
    try:
        assert server.server.server_address[0] == HOST == "127.0.0.1"
        with urllib.request.urlopen(server.url + "api/info", timeout=10) as r:
            assert b'"depth":2' in r.read()
    finally:
        server.stop()


def test_load_explorer_for_a_digits_checkpoint(tmp_path) -> None:
    torch.manual_seed(0)
    model = create_model("crate_debug")  # as a digits run writes it: the data's preprocessing and name
    model.pretrained_cfg = pretrained_cfg_for(model.config, data_preprocessing("digits"))
    ckpt = save_checkpoint(tmp_path / "digits.pt", model, train_config={"data": "digits"})
    ex = load_explorer(str(ckpt))
    info = ex.info()
    assert ex.mean == (0.5, 0.5, 0.5) and ex.class_names[:3] == ["0", "1", "2"]
    assert "astronaut" in info["samples"] and any(s.startswith("digit ") for s in info["samples"])
    assert info["image_set"] == {"label": "96 held-out digits images", "images": 96}
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (40, 40), (80 * i, 10, 10)).save(folder / f"im{i}.png")
    ex2 = load_explorer("crate_debug", images=folder)
    assert ex2.info()["image_set"]["images"] == 3 and "im2.png" in ex2.info()["samples"]


def test_missing_flask_names_the_extra(monkeypatch, capsys) -> None:
    import importlib.util

    import cratevit.errors

    real = importlib.util.find_spec
    monkeypatch.setattr(
        cratevit.errors.importlib.util, "find_spec", lambda n, *a: None if n == "flask" else real(n, *a)
    )
    assert main(["explore", "crate_debug"]) == 2
    assert "pip install 'cratevit[explore]'" in capsys.readouterr().err


def test_command_errors_are_one_line(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit, match="2"):  # refused by the parser (cratevit.cli._args.port_number)
        main(["explore", "crate_debug", "--port", "70000"])
    assert (
        "argument --port: must be a port number in 0..65535 (0: any free port), got '70000'" in capsys.readouterr().err
    )
    assert main(["explore", "crate_debug", "--images", str(tmp_path / "missing")]) == 2
    assert "not a folder of images" in capsys.readouterr().err
    assert main(["explore", "no_such_model"]) == 2
    assert "neither a checkpoint file nor a preset" in capsys.readouterr().err


def test_the_page_for_crate_alpha() -> None:
    """CRATE-alpha (its small preset): the code facet is the overcomplete A_2; atoms and interventions work."""
    torch.manual_seed(0)
    ex = load_explorer("crate_alpha_debug")
    client = _client(ex)
    info = client.get("/api/info").json
    assert info["family"] == "crate_alpha" and info["has_code"] and info["resizable"]
    image_id = _open(client, sample="chelsea")["image_id"]
    v = client.get(f"/api/view?image_id={image_id}&layer=1&facet=code&protocol=paper-pca&threshold=0.4").json
    assert "error" not in v and v["pca"]["explained"] and len(v["curves"]["image"]["sparsity"]) == 2
    coord = v["atoms"][0]["coord"]
    assert 0 <= coord < 4 * 32  # the code is 4x the width
    assert _wait_job(client, client.post("/api/index").json)["state"] == "done"
    a = client.get(f"/api/atom?image_id={image_id}&layer=0&coord={coord}").json
    assert a["stats"]["code_dim"] == 128 and a["patches"]
    r = client.get(f"/api/intervene?image_id={image_id}&layer=0&coord={coord}&value=0").json
    assert [item["layer"] for item in r["later"]] == [1] and r["top_class"]["logit_change"] > 0


def test_the_page_for_crate_mae() -> None:
    """CRATE-MAE (its digits preset): the encoder's attention, facets, atoms and interventions; no classes."""
    ex = load_explorer("mae_crate_digits")
    client = _client(ex)
    info = client.get("/api/info").json
    assert info["family"] == "crate_mae" and info["has_code"] and not info["classifier"] and not info["resizable"]
    image_id = _open(client, sample="astronaut")["image_id"]
    v = client.get(f"/api/view?image_id={image_id}&layer=2&facet=key").json
    assert v["classes"] == [] and len(v["attention"]["heads"]) == 3 and v["atoms"]
    coord = v["atoms"][0]["coord"]
    assert _wait_job(client, client.post("/api/index").json)["state"] == "done"
    assert client.get(f"/api/atom?image_id={image_id}&layer=0&coord={coord}").json["patches"]
    r = client.get(f"/api/intervene?image_id={image_id}&layer=0&coord={coord}&value=0").json
    assert [item["layer"] for item in r["later"]] == [1, 2] and r["classes_after"] == [] and "top_class" not in r


def test_the_command_serves_the_page() -> None:
    """``cratevit explore`` as a user runs it: a process that prints its 127.0.0.1 address and serves the page."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cratevit", "explore", "crate_debug", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        lines = []
        deadline = time.time() + 60
        while time.time() < deadline and not any("http://127.0.0.1:" in line for line in lines):
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
        url = next(w for line in lines for w in line.split() if w.startswith("http://127.0.0.1:"))
        with urllib.request.urlopen(url, timeout=10) as r:
            assert b"cratevit explore" in r.read()
        with urllib.request.urlopen(url + "api/info", timeout=10) as r:
            assert b'"family":"crate"' in r.read()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# --------------------------------------------------------------------------------------------- security (issue 22)
def test_a_foreign_host_or_site_is_refused(explorer) -> None:
    """DNS rebinding sends the attacker's Host: 403 with one line, and nothing of the model or the files."""
    app = create_app(explorer, port=8123)
    c = app.test_client()
    ok = c.get("/api/info", headers={"Host": "127.0.0.1:8123"})
    assert ok.status_code == 200 and c.get("/api/info", headers={"Host": "localhost:8123"}).status_code == 200
    for host in ("rebind.attacker.example", "rebind.attacker.example:8123", "127.0.0.1:8124", "127.0.0.1"):
        r = c.get("/api/info", headers={"Host": host})
        assert r.status_code == 403 and "is not this page's address" in r.json["error"], host
        assert "noise" not in r.get_data(as_text=True) and "\n" not in r.json["error"]
    assert c.get("/", headers={"Host": "rebind.attacker.example"}).status_code == 403
    r = c.get("/api/info", headers={"Host": "127.0.0.1:8123", "Sec-Fetch-Site": "cross-site"})
    assert r.status_code == 403 and "another site (cross-site)" in r.json["error"]
    link = {"Host": "127.0.0.1:8123", "Sec-Fetch-Site": "same-site", "Sec-Fetch-Mode": "navigate"}
    assert c.get("/", headers=link).status_code == 200  # a link from a notebook on another local port opens the page
    assert c.get("/api/info", headers=link).status_code == 403  # but nothing else
    assert c.get("/", headers=link).headers["X-Frame-Options"] == "DENY"


def test_a_post_needs_the_page_origin_or_its_token(explorer) -> None:
    app = create_app(explorer, port=8123)
    c = app.test_client()
    host = {"Host": "127.0.0.1:8123"}
    opened = len(explorer.open)
    for headers in ({}, {"Origin": "http://evil.example"}, {"Origin": "null"}, {"X-Cratevit-Token": "guess"},
                    {"Origin": "http://127.0.0.1:8124"}):  # fmt: skip
        r = c.post("/api/open", data={"sample": "noise 0"}, headers={**host, **headers})
        assert r.status_code == 403 and "without this page's token is refused" in r.json["error"], headers
        assert c.post("/api/index", headers={**host, **headers}).status_code == 403
    assert len(explorer.open) == opened  # nothing was opened
    assert c.post("/api/open", data={"sample": "noise 0"}, headers={**host, "Origin": "http://127.0.0.1:8123"}).json[
        "image_id"
    ]
    token = {"X-Cratevit-Token": app.config["TOKEN"]}
    assert c.post("/api/open", data={"sample": "noise 0"}, headers={**host, **token}).status_code == 200
    page = c.get("/", headers=host)
    assert app.config["TOKEN"].encode() in page.data and len(app.config["TOKEN"]) >= 20
    assert "default-src 'none'" in page.headers["Content-Security-Policy"]
    assert create_app(explorer).config["TOKEN"] != app.config["TOKEN"]  # a new token per run


def test_the_served_page_checks_the_real_host_header(explorer) -> None:
    import http.client

    server = serve(explorer, port=0, background=True)
    try:
        port = server.port
        conn = http.client.HTTPConnection(HOST, port, timeout=10)
        conn.request("GET", "/api/info", headers={"Host": "rebind.attacker.example"})
        r = conn.getresponse()
        assert r.status == 403 and b"is not this page's address" in r.read()
        conn.request("GET", "/api/info", headers={"Host": f"localhost:{port}"})
        assert conn.getresponse().status == 200
    finally:
        server.stop()


def _vmhwm_reset() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # resets the peak resident size (Linux)
        f.write("5")


def _vmhwm_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


@pytest.mark.parametrize(
    ("size", "message"),
    [
        ((100_000, 1), "100000x1 pixels; this page opens images of 1..8192 pixels a side"),
        ((2_000_000, 1), "2000000x1 pixels; this page opens images of 1..8192 pixels a side"),
        ((8000, 200), "8000x200 has an aspect ratio of 40:1; this page opens up to 10:1"),
    ],
)
def test_extreme_sizes_are_refused_from_the_header(client, size, message) -> None:
    """A 177-byte 100000x1 PNG used to take 11 s and 3.9 GB: now its header is enough to refuse it."""
    data = _png(Image.new("1", size))
    assert len(data) < 20_000
    _vmhwm_reset()
    base = _vmhwm_mb()
    t0 = time.perf_counter()
    r = client.post("/api/open", data={"file": (io.BytesIO(data), "long.png")})
    seconds = time.perf_counter() - t0
    assert r.status_code == 400 and message in r.json["error"]
    assert seconds < 0.1 and _vmhwm_mb() - base < 50


def test_the_token_budget_is_checked_before_resizing(client, monkeypatch) -> None:
    import cratevit.explore.session as session

    def no_resize(*_a, **_k):
        raise AssertionError("resized before the token check")

    monkeypatch.setattr(session, "prepare", no_resize)
    r = client.post("/api/open?size=1000", data={"file": (io.BytesIO(_png(Image.new("RGB", (2000, 1000)))), "w.png")})
    assert r.status_code == 400 and "tokens" in r.json["error"] and "choose a smaller input size" in r.json["error"]
    r = client.post("/api/open", data={"sample": "noise 0", "size": "1000"})
    assert r.status_code == 400 and "choose a smaller input size" in r.json["error"]


EPS = b"""%!PS-Adobe-3.0 EPSF-3.0
%%BoundingBox: 0 0 16 16
%%EndComments
newpath 0 0 moveto 16 16 lineto stroke
showpage
%%EOF
"""


def test_an_eps_upload_runs_nothing(client, monkeypatch) -> None:
    """Pillow would hand an EPS to Ghostscript; an upload only reaches PNG, JPEG, GIF, BMP, TIFF and WebP."""
    import subprocess

    from PIL import EpsImagePlugin

    with Image.open(io.BytesIO(EPS)) as img:
        assert img.format == "EPS"  # without the allow-list Pillow takes it
    ran = []
    for name in ("Popen", "run", "call", "check_call", "check_output"):
        monkeypatch.setattr(subprocess, name, lambda *a, _n=name, **k: ran.append(_n))
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: ran.append("Ghostscript"))
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: ran.append("EPS decoder"))
    r = client.post("/api/open", data={"file": (io.BytesIO(EPS), "figure.png")})
    assert r.status_code == 400 and "figure.png is not an image file this page can read" in r.json["error"]
    assert "PNG, JPEG, GIF, BMP, TIFF, WEBP" in r.json["error"] and ran == []


def test_allowed_formats_still_open(client) -> None:
    for fmt in ("JPEG", "GIF", "BMP", "TIFF", "WEBP"):
        buf = io.BytesIO()
        Image.new("RGB", (40, 30), (200, 30, 30)).save(buf, format=fmt)
        r = client.post("/api/open", data={"file": (io.BytesIO(buf.getvalue()), f"red.{fmt.lower()}")})
        assert r.status_code == 200 and r.json["input_size"] == [32, 44], fmt


def test_clamp_values_out_of_range_name_the_range(client) -> None:
    image_id = _open(client, sample="noise 0")["image_id"]
    for value in ("1e39", "-1001", "inf"):
        r = client.get(f"/api/intervene?image_id={image_id}&layer=0&coord=1&value={value}")
        assert r.status_code == 400, value
        assert "choose a value in -1000..1000" in r.json["error"] or "finite number" in r.json["error"]
    r = client.get(f"/api/intervene?image_id={image_id}&layer=0&coord=1&value=1e39")
    assert r.json["error"] == "clamp value 1e+39 is out of range; choose a value in -1000..1000"


def test_the_image_set_is_indexed_once_and_old_jobs_are_dropped(explorer, client) -> None:
    from cratevit.explore.session import KEEP_JOBS

    first = _wait_job(client, client.post("/api/index").json)
    assert first["state"] == "done"
    again = client.post("/api/index").json
    assert again["state"] == "done" and again["message"].startswith("already indexed: 5 images")
    assert again["id"] != first["id"]
    rebuilt = _wait_job(client, client.post("/api/index?rebuild=1").json)
    assert rebuilt["state"] == "done" and rebuilt["message"].startswith("indexed 5 images")
    for _ in range(KEEP_JOBS + 5):
        client.post("/api/index")
    assert len(explorer.jobs) <= KEEP_JOBS
    assert client.get(f"/api/job/{first['id']}").status_code == 404


def test_a_busy_port_is_one_line(capsys, torch_threads) -> None:  # run sets the page's thread count
    import socket

    with socket.socket() as busy:
        busy.bind((HOST, 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        assert main(["explore", "crate_debug", "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"cannot listen on 127.0.0.1:{port} (Address already in use); choose another --port")
    assert len(err.splitlines()) == 1


def test_help_states_the_limits() -> None:
    from cratevit.cli.explore import EPILOG
    from cratevit.explore import session, uploads

    assert f"{', '.join(uploads.UPLOAD_FORMATS)} only, at most {uploads.MAX_SIDE} pixels" in EPILOG
    assert f"{uploads.MAX_PIXELS // 1_000_000} megapixels" in EPILOG and f"{uploads.MAX_ASPECT:.0f}:1" in EPILOG
    assert f"{session.TRACE_BUDGET // 2**20} MB" in EPILOG and "Host is 127.0.0.1:PORT" in EPILOG


# --------------------------------------------------------------------------------------------- researcher's views
def test_random_weights_are_said(tmp_path) -> None:
    assert load_explorer("crate_debug").info()["weights"] == "random weights"
    ckpt = save_checkpoint(tmp_path / "m.pt", create_model("crate_debug"))
    assert load_explorer(str(ckpt)).info()["weights"] == "trained"


def test_colour_scales_and_attention_from_a_patch(client) -> None:
    image_id = _open(client, sample="noise 1", size="32")["image_id"]  # 8x11 patches
    base = f"/api/view?image_id={image_id}&layer=1"
    own = client.get(base).json
    heads = [h["scale"]["hi"] for h in own["attention"]["heads"]]
    assert own["attention"]["scale"]["lo"] == 0 and own["attention"]["scale"]["hi"] == pytest.approx(
        own["attention"]["max"]
    )
    shared = client.get(base + "&scale=shared").json
    assert {h["scale"]["hi"] for h in shared["attention"]["heads"]} == {shared["attention"]["scale"]["hi"]}
    assert shared["attention"]["scale"]["hi"] == pytest.approx(max(heads))
    assert np.array(own["attention"]["values"]).shape == (8, 11)
    q = client.get(base + "&query=13&head=0").json  # patch (1, 2)
    assert q["query"] == {"patch": 13, "row": 1, "col": 2}
    assert not np.allclose(q["attention"]["values"], client.get(base + "&head=0").json["attention"]["values"])
    assert q["pattern"]["tokens"] == 89 and q["pattern"]["prefix"] == 1
    r = client.get(base + "&query=88")
    assert r.status_code == 400 and "query patch 88 is out of range; this image has patches 0..87" in r.json["error"]
    assert "unknown colour scale" in client.get(base + "&scale=log").json["error"]


def test_difference_maps_and_the_clamp_sweep(client) -> None:
    image_id = _open(client, sample="noise 0")["image_id"]
    coord = client.get(f"/api/view?image_id={image_id}&layer=0").json["atoms"][0]["coord"]
    r = client.get(f"/api/intervene?image_id={image_id}&layer=0&coord={coord}&value=0").json
    later = r["later"][0]
    assert later["difference"].startswith("data:image/png") and later["difference_scale"]["cmap"] == "RdBu_r"
    assert later["difference_scale"]["lo"] == -later["difference_scale"]["hi"] > -1
    s = client.get(f"/api/sweep?image_id={image_id}&layer=0&coord={coord}").json
    assert len(s["values"]) == len(s["prob"]) == 8 and s["values"][0] == 0
    assert s["values"][3] == pytest.approx(s["peak_here"]) and all(0 <= p <= 1 for p in s["prob"])
    assert s["prob"][0] == pytest.approx(r["top_class"]["prob_after"], abs=1e-6)  # clamp 0, as the intervention
    info = client.get("/api/info").json
    assert "eps = 0.01" in info["definitions"]["rc"] and info["limits"]["clamp"] == [-1000, 1000]
    assert len(info["colormaps"]["inferno"]) == 11


def test_open_images_are_bounded_in_memory(explorer, client, monkeypatch) -> None:
    """Eight opens at the largest size used to hold ~6 GB: the open images' traces now share one budget."""
    import cratevit.explore.session as session

    first = _open(client, sample="noise 0", size="64")["image_id"]
    one = explorer.open[first].nbytes
    assert one > explorer.depth * explorer.heads * 257**2 * 4  # 16x16 patches + the class token: the attention alone
    monkeypatch.setattr(session, "OPEN_BUDGET", int(2.5 * one))
    ids = [_open(client, sample="noise 0", size="64")["image_id"] for _ in range(4)]
    assert sum(o.nbytes for o in explorer.open.values()) <= 2.5 * one
    assert ids[-1] in explorer.open and first not in explorer.open
    r = client.get(f"/api/view?image_id={first}&layer=0")
    assert r.status_code == 404 and "open it again" in r.json["error"]


def test_the_atoms_dictionary_column(explorer, client) -> None:
    """The atom's column of blocks.l.ista.dictionary and its energy in each head's subspace (a projection oracle)."""
    image_id = _open(client, sample="noise 0")["image_id"]
    _wait_job(client, client.post("/api/index").json)
    a = client.get(f"/api/atom?image_id={image_id}&layer=1&coord=5").json["dictionary"]
    d = explorer.model.blocks[1].ista.dictionary.detach().double()[:, 5]
    assert a["name"] == "blocks.1.ista.dictionary[:, 5]" and np.allclose(a["values"], d.numpy(), atol=1e-5)
    assert a["norm"] == pytest.approx(float(d.norm()))
    u = explorer.model.blocks[1].mssa.subspace_proj.weight.detach().double().reshape(2, -1, d.numel())
    for k in range(2):
        projected = u[k].T @ torch.linalg.solve(u[k] @ u[k].T, u[k] @ d)  # U^T (U U^T)^-1 U d
        assert a["head_energy"][k] == pytest.approx(float(projected.pow(2).sum() / d.pow(2).sum()), rel=1e-9)
    assert a["chance"] == u.shape[1] / d.numel()
