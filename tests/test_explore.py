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


@pytest.fixture(scope="module")
def client(explorer):
    return create_app(explorer).test_client()


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
        (_png(Image.new("1", (9000, 5000))), "huge.png", "9000x5000 pixels is more than this page opens"),
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
        f"/api/view?image_id={image_id}&layer=7": "layer 7 is out of range; this model has layers 0..1",
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
    client = create_app(ex).test_client()
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
    client = create_app(ex).test_client()
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
