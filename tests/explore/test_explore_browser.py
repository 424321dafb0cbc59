"""The explore page in a real browser: headless Chromium (Debian's ``chromium`` and ``chromium-driver`` packages,
driven by selenium; nothing downloads) loads the page, uploads images, switches layer and head, opens an atom,
intervenes, and reads back the rendered pictures and numbers. The screenshots are kept under the test's tmp dir
and, when ``CRATEVIT_ARTIFACTS`` names a folder (CI sets it), copied there."""

from __future__ import annotations

import base64
import io
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cratevit import create_model
from cratevit.explore import Explorer
from cratevit.explore.app import serve
from cratevit.explore.session import ImageItem, builtin_samples

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver  # the dev extra; like the browser, a missing piece fails the test, never skips it

    if not (CHROMIUM and DRIVER):  # CI installs them (.ci/run)
        pytest.fail("the browser test needs Chromium and its driver: apt-get install -y chromium chromium-driver")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1400,1300",
    ):
        opts.add_argument(flag)
    opts.add_experimental_option("prefs", {"profile.default_content_setting_values.automatic_downloads": 1})
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


HOSTILE = '<img src=x onerror="document.body.dataset.pwned=1">'  # a file name a user's --images folder may hold


@pytest.fixture(scope="module")
def server():
    torch.manual_seed(0)
    model = create_model("crate_nano", num_classes=6)
    photos = builtin_samples()[:3]
    photos.append(ImageItem(HOSTILE + ".png", photos[2].image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)))
    explorer = Explorer(model, "crate_nano", (0.5,) * 3, (0.5,) * 3, photos, photos,
                        [f"shape {i}" for i in range(6)], f"4 photos, one named {HOSTILE}", trained=False)  # fmt: skip
    srv = serve(explorer, port=0, background=True)
    srv.explorer = explorer
    yield srv
    srv.stop()


def _picture(driver, element_id: str) -> np.ndarray:
    src = driver.find_element("id", element_id).get_attribute("src")
    assert src.startswith("data:image/png;base64,"), f"{element_id} shows no picture"
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB"))


def _wait(driver, condition, what: str, timeout: float = 30):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda d: condition(d), message=f"timed out waiting for {what}")


def _renders(driver) -> int:
    return int(driver.find_element("tag name", "body").get_attribute("data-renders") or 0)


def _numbers(driver) -> dict[str, str]:
    rows = driver.find_elements("css selector", "#numbers tr")
    return {r.find_elements("tag name", "td")[0].text: r.find_elements("tag name", "td")[1].text for r in rows}


def _keep(driver, tmp_path: Path, name: str) -> Path:
    shot = tmp_path / name
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1400, max(900, int(height) + 150))  # the whole page in one picture
    driver.execute_script("window.scrollTo(0, 0)")
    driver.save_screenshot(str(shot))
    if os.environ.get("CRATEVIT_ARTIFACTS"):
        out = Path(os.environ["CRATEVIT_ARTIFACTS"])
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, out / name)
    return shot


def test_page_upload_switch_atoms_and_bad_upload(browser, server, tmp_path) -> None:
    from selenium.webdriver.support.ui import Select

    d = browser
    d.get(server.url)
    _wait(d, lambda d: _renders(d) >= 1, "the first picture")
    assert (
        "crate_nano" in d.find_element("id", "model").text
        and "6 layers (0..5), 3 heads" in d.find_element("id", "model").text
    )

    # upload a real photo (a file the browser sends, as a user would)
    photo = tmp_path / "cat photo.png"
    builtin_samples()[1].image.resize((240, 160)).save(photo)
    n = _renders(d)
    d.find_element("id", "file").send_keys(str(photo))
    _wait(d, lambda d: _renders(d) > n and "cat photo.png" in d.find_element("id", "cap-input").text, "the upload")
    assert "48x32" in d.find_element("id", "cap-input").text  # 240x160 -> short side 32, keep aspect
    first = {k: _picture(d, f"img-{k}") for k in ("input", "attention", "rollout", "mask", "pca")}
    for name, pic in first.items():
        assert pic.shape[1] == 256 and pic.std() > 1, f"{name} picture is blank"
    assert len(d.find_elements("css selector", "#heads img")) == 3

    # switch layer, then head: the attention picture and the numbers change
    numbers_last = _numbers(d)
    n = _renders(d)
    Select(d.find_element("id", "layer")).select_by_value("1")
    _wait(d, lambda d: _renders(d) > n, "the layer switch")
    assert "layer 1" in d.find_element("id", "cap-attention").text
    numbers_l1 = _numbers(d)
    assert numbers_l1["R^c layer 1 (nats)"] and numbers_l1 != numbers_last
    att_mean = _picture(d, "img-attention")
    n = _renders(d)
    Select(d.find_element("id", "head")).select_by_value("2")
    _wait(d, lambda d: _renders(d) > n, "the head switch")
    assert "head 2" in d.find_element("id", "cap-attention").text
    assert not np.array_equal(_picture(d, "img-attention"), att_mean)
    assert d.find_element("css selector", "#heads img.chosen").get_attribute("data-head") == "2"
    entropy = float(_numbers(d)["attention entropy"].split()[0])
    assert 0 < entropy <= np.log(12 * 8) + 1e-3  # a distribution over the 12x8 patches
    _wait(d, lambda d: d.find_element("tag name", "body").get_attribute("data-index") == "done", "the image-set index")

    # the per-layer curves: this image (6 layers) beside the image set's band once it is indexed
    _wait(d, lambda d: d.find_elements("css selector", "#curves polyline.set"), "the image set's curves")
    for curve in ("rc", "sparsity"):
        points = d.find_element("css selector", f"#curves svg[data-curve={curve}] polyline.image").get_attribute(
            "points"
        )
        assert len(points.split()) == 6
    assert d.find_elements("css selector", "#curves svg[data-curve=rc] polygon.band")

    # an atom of layer 1, then the intervention clamping it to 0
    d.find_elements("css selector", "#atoms button")[0].click()
    _wait(d, lambda d: d.find_element("tag name", "body").get_attribute("data-atom") is not None, "the atom view")
    assert len(d.find_elements("css selector", "#atom-patches img")) > 0
    assert "active on patches" in d.find_element("id", "atom-stats").text
    d.find_element("id", "btn-clamp").click()
    _wait(
        d, lambda d: d.find_element("tag name", "body").get_attribute("data-intervened") is not None, "the intervention"
    )
    assert len(d.find_elements("css selector", "#later figure")) == 4  # layers 2..5 recomputed
    assert 0 <= float(d.find_element("id", "prob-after").text) <= 1
    _keep(d, tmp_path, "explore-page.png")

    # a bad upload: a message in the page, and the page keeps working
    bad = tmp_path / "notes.png"
    bad.write_text("this is not an image")
    d.find_element("id", "file").send_keys(str(bad))
    error = _wait(
        d, lambda d: d.find_element("id", "error").is_displayed() and d.find_element("id", "error"), "the error"
    )
    assert "notes.png is not an image file" in error.text
    _keep(d, tmp_path, "explore-bad-upload.png")
    n = _renders(d)
    Select(d.find_element("id", "layer")).select_by_value("0")
    _wait(d, lambda d: _renders(d) > n, "a view after the bad upload")
    assert not d.find_element("id", "error").is_displayed()


def test_page_for_a_timm_vit(browser, tmp_path) -> None:
    """A timm ViT: attention, masks and PCA; no atoms or curves panels."""
    import timm

    from cratevit.explore.app import serve as serve_page

    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=10, depth=3
    )
    photos = [ImageItem("checker", Image.fromarray((np.indices((64, 64)).sum(0) % 16 < 8).astype(np.uint8) * 255))]
    srv = serve_page(Explorer(vit, "vit", (0.5,) * 3, (0.5,) * 3, photos, photos), port=0, background=True)
    try:
        browser.get(srv.url)
        _wait(browser, lambda d: _renders(d) >= 1, "the first picture")
        assert not browser.find_element("id", "atoms-box").is_displayed()
        assert _picture(browser, "img-attention").std() > 1
        assert [o.text for o in browser.find_elements("css selector", "#facet option")] == ["token", "key", "attn"]
    finally:
        srv.stop()


def _body(driver, key: str) -> str | None:
    return driver.find_element("tag name", "body").get_attribute(f"data-{key}")


def _not_injected(driver) -> None:
    assert _body(driver, "pwned") is None, "a file name ran as script"
    assert not driver.find_elements("css selector", 'img[src="x"]'), "a file name became an element"


def test_file_names_are_text_never_markup(browser, server, tmp_path) -> None:
    """HTML in an uploaded file's name and in the image set's names is shown as text: no element, no script."""
    from selenium.webdriver.support.ui import Select

    d = browser
    d.get(server.url)
    _wait(d, lambda d: _renders(d) >= 1, "the first picture")
    assert "random weights" in d.find_element("id", "weights").text  # crate_nano built at random
    assert "0-based" in d.find_element("tag name", "header").text
    Select(d.find_element("id", "sample")).select_by_visible_text(HOSTILE + ".png")  # a sample named with HTML
    _wait(d, lambda d: HOSTILE in d.find_element("id", "cap-input").text, "the sample with an HTML name")
    _not_injected(d)
    upload = tmp_path / (HOSTILE.replace("/", "") + ".png")
    builtin_samples()[0].image.resize((64, 64)).save(upload)
    n = _renders(d)
    d.find_element("id", "file").send_keys(str(upload))
    _wait(d, lambda d: _renders(d) > n and upload.name in d.find_element("id", "cap-input").text, "the upload")
    assert f"{upload.name} (uploaded)" == Select(d.find_element("id", "sample")).first_selected_option.text
    _not_injected(d)
    _wait(d, lambda d: _body(d, "index") == "done", "the image-set index")
    _wait(d, lambda d: d.find_elements("css selector", "#curves polyline.set"), "the image set's curves")
    assert HOSTILE in d.find_element("id", "curves-legend").text  # the image set's label, as text
    for button in range(len(d.find_elements("css selector", "#atoms button"))):  # atoms whose top patches show it
        d.find_elements("css selector", "#atoms button")[button].click()
        _wait(d, lambda d: _body(d, "atom") is not None, "the atom view")
        names = [i.get_attribute("data-name") for i in d.find_elements("css selector", "#atom-patches img")]
        if HOSTILE + ".png" in names:
            break
    assert HOSTILE + ".png" in names, "no atom's top patches came from the image named with HTML"
    _not_injected(d)
    _keep(d, tmp_path, "explore-html-names.png")


def test_researcher_views_permalink_and_export(browser, server, tmp_path) -> None:
    """Colour bars, a shared scale, attention from a clicked patch, the intervention's difference map and clamp
    sweep, a permalink that reopens the same view, and the export's PNG and JSON."""
    import json

    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.support.ui import Select

    d = browser
    d.get(server.url)
    _wait(d, lambda d: _renders(d) >= 1, "the first picture")
    bar = d.find_element("css selector", "#bar-attention .cbar")
    assert float(bar.get_attribute("data-lo")) == 0 < float(bar.get_attribute("data-hi")) <= 1
    assert "layer (block index, 0-based)" in d.find_element("id", "layer-label").text
    titles = {td.text: td.get_attribute("title") for td in d.find_elements("css selector", "#numbers td[title]")}
    rc = next(t for name, t in titles.items() if name.startswith("R^c layer"))
    assert "logdet(I + p/(n eps) Z_k^T Z_k)" in rc and "eps = 0.01" in rc  # the definition on hover
    assert "sparsity = 1 - density" in next(t for name, t in titles.items() if name.startswith("code density"))
    n = _renders(d)
    Select(d.find_element("id", "layer")).select_by_value("2")
    _wait(d, lambda d: _renders(d) > n, "layer 2")
    n = _renders(d)
    Select(d.find_element("id", "scale")).select_by_value("shared")
    _wait(d, lambda d: _renders(d) > n and d.find_elements("css selector", "#bar-heads .cbar"), "the shared scale")
    shared = d.find_element("css selector", "#bar-heads .cbar").get_attribute("data-hi")
    assert d.find_element("css selector", "#bar-attention .cbar").get_attribute("data-hi") == shared

    # click a patch: the map becomes that patch's attention, outlined
    before = _picture(d, "img-attention")
    img = d.find_element("id", "img-attention")
    n = _renders(d)
    ActionChains(d).move_to_element_with_offset(
        img, -img.size["width"] // 4, -img.size["height"] // 4
    ).click().perform()
    _wait(d, lambda d: _renders(d) > n and "patch (" in d.find_element("id", "query-text").text, "the patch query")
    assert "from patch (" in d.find_element("id", "cap-attention").text
    assert not np.array_equal(_picture(d, "img-attention"), before)
    assert _picture(d, "img-pattern").std() > 1

    # an atom, the intervention's difference maps and the clamp sweep
    d.find_elements("css selector", "#atoms button")[0].click()
    _wait(d, lambda d: _body(d, "atom") is not None, "the atom view")
    assert d.find_elements("css selector", "#hist rect")
    assert len(d.find_elements("css selector", "#dict rect.entry")) == 96  # crate_nano's width: the column
    assert len(d.find_elements("css selector", "#dict rect.head-energy")) == 3
    d.find_element("id", "btn-clamp").click()
    _wait(d, lambda d: _body(d, "sweep") is not None, "the clamp sweep")
    assert len(d.find_elements("css selector", "#later img.difference")) == 3  # layers 3..5
    bars = d.find_elements("css selector", "#later .cbar[data-cmap=RdBu_r]")
    assert bars and float(bars[0].get_attribute("data-lo")) == -float(bars[0].get_attribute("data-hi"))
    assert len(d.find_elements("css selector", "#sweep circle.point")) == 8
    assert d.find_elements("css selector", "#sweep line.unedited")
    _keep(d, tmp_path, "explore-researcher.png")

    # the permalink reopens the same view
    url, shown = d.current_url, _picture(d, "img-attention")
    for key in ("layer=2", "scale=shared", "query=", "atom=", "image="):
        assert key in url, (key, url)
    d.get("about:blank")
    d.get(url)
    _wait(
        d,
        lambda d: _renders(d) >= 1 and _body(d, "atom") is not None,
        f"the permalink's view ({url}; {d.find_element('id', 'error').text})",
    )
    assert Select(d.find_element("id", "layer")).first_selected_option.text == "2"
    assert "patch (" in d.find_element("id", "query-text").text
    assert np.array_equal(_picture(d, "img-attention"), shown)

    # two images side by side
    n = _renders(d)
    Select(d.find_element("id", "sample2")).select_by_visible_text("coffee")
    _wait(d, lambda d: _renders(d) > n and d.find_element("id", "compare-row").is_displayed(), "the second image")
    assert _picture(d, "img2-attention").std() > 1 and "compare=coffee" in d.current_url

    # export: the current view's picture and numbers
    out = tmp_path / "downloads"
    out.mkdir()
    d.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(out)})
    d.find_element("id", "btn-export").click()
    deadline = time.time() + 30
    while time.time() < deadline and len([p for p in out.iterdir() if p.suffix in (".png", ".json")]) < 2:
        time.sleep(0.2)
    files = {p.suffix: p for p in out.iterdir()}
    assert set(files) >= {".png", ".json"}, sorted(out.iterdir())
    numbers = json.loads(files[".json"].read_text())
    assert numbers["view"]["layer"] == 2 and numbers["weights"] == "random weights"
    assert numbers["view"]["query"] is not None and numbers["atom"]["coord"] >= 0  # as the permalink restored them
    assert numbers["second_image"]["name"] == "coffee" and numbers["layer_numbering"] == "block index, 0-based"
    assert "src" not in numbers["view"]["attention"]  # numbers only: the pictures are in the PNG
    picture = Image.open(files[".png"])
    assert picture.width > 1000 and np.asarray(picture.convert("L")).std() > 10
    if os.environ.get("CRATEVIT_ARTIFACTS"):
        shutil.copy(files[".png"], Path(os.environ["CRATEVIT_ARTIFACTS"]) / "explore-export.png")

    # keys step through layers and heads (outside the inputs)
    from selenium.webdriver.common.keys import Keys

    d.find_element("tag name", "h1").click()  # the focus leaves the selects
    n = _renders(d)
    ActionChains(d).send_keys(Keys.ARROW_RIGHT).perform()
    _wait(d, lambda d: _renders(d) > n, "the next layer")
    n = _renders(d)
    ActionChains(d).send_keys(Keys.ARROW_DOWN).perform()
    _wait(d, lambda d: _renders(d) > n, "the next head")
    assert Select(d.find_element("id", "layer")).first_selected_option.text == "3"
    assert Select(d.find_element("id", "head")).first_selected_option.text == "0"
    assert "layer 3, head 0" in d.find_element("id", "cap-attention").text


def test_a_cross_origin_post_is_refused(browser, server, caplog) -> None:
    """A page of another origin (a plain page on another local port) posts to the explorer: the server refuses it
    and opens nothing. (The explorer's own page could not even send it: its CSP allows fetches to itself only.)"""
    import logging
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Blank(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(b"<!doctype html><title>another page</title>")

        def log_message(self, *_args: object) -> None:
            pass

    other = ThreadingHTTPServer(("127.0.0.1", 0), Blank)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        browser.get(f"http://127.0.0.1:{other.server_address[1]}/")
        opened = len(server.explorer.open)
        with caplog.at_level(logging.WARNING, logger="cratevit.explore"):
            status = browser.execute_async_script(
                """const done = arguments[arguments.length - 1];
                const body = new FormData(); body.append("sample", "astronaut");
                fetch(arguments[0] + "api/open", {method: "POST", body, mode: "no-cors"})
                  .then((r) => done(r.type), (e) => done("blocked: " + e));""",
                server.url,
            )
            deadline = time.time() + 10
            while "refused POST /api/open" not in caplog.text and time.time() < deadline:
                time.sleep(0.1)
        assert status == "opaque"  # sent; the answer is unreadable to that page anyway
        assert "refused POST /api/open" in caplog.text and "same-site" in caplog.text
        assert len(server.explorer.open) == opened
    finally:
        other.shutdown()


@pytest.fixture(scope="module")
def sae_server(tmp_path_factory):
    """A digits checkpoint (crate_debug, a 4x4 patch grid) with a tiny TopK SAE trained here on its layer 0's ISTA
    input; the SAE's file name holds HTML."""
    from cratevit import save_checkpoint
    from cratevit.analysis.activations import layer_activations
    from cratevit.analysis.sae import SAEConfig, SparseAutoencoder
    from cratevit.analysis.sae_features import weights_fingerprint
    from cratevit.analysis.sae_train import SAETrainConfig, save_sae, tensor_batches, train_sae
    from cratevit.explore import load_explorer
    from cratevit.presets import data_preprocessing, pretrained_cfg_for

    tmp = tmp_path_factory.mktemp("sae-page")
    torch.manual_seed(0)
    model = create_model("crate_debug").eval()
    model.pretrained_cfg = pretrained_cfg_for(model.config, data_preprocessing("digits"))
    ckpt = save_checkpoint(tmp / "digits.pt", model, train_config={"data": "digits"})
    acts = layer_activations(model, torch.rand(32, 3, 32, 32) * 2 - 1, 0, ("ista_in",))["ista_in"][:, 1:]
    acts = acts.reshape(-1, acts.shape[-1])
    sae = SparseAutoencoder(SAEConfig(d_in=acts.shape[-1], expansion=4, arch="topk", k=4))
    sae.initialize_from(acts)
    train_sae(sae, tensor_batches(acts, 256), SAETrainConfig(steps=60, lr=3e-3, warmup_steps=5, plot=False))
    meta = {"model": str(ckpt), "model_fingerprint": weights_fingerprint(model), "layer": 0, "site": "ista_in"}
    path = save_sae(tmp / f"{HOSTILE}.pt", sae, meta=meta)
    srv = serve(load_explorer(str(ckpt), saes=[path]), port=0, background=True)
    yield srv
    srv.stop()


def test_sae_features_beside_the_atoms(browser, sae_server, tmp_path) -> None:
    """The SAE panel: a feature of the list, its map and metrics (defined on hover), top patches, a nearest ISTA atom
    opened in the atoms panel, the clamp's effect, and a permalink that reopens the feature."""
    d = browser
    d.get(sae_server.url)
    _wait(d, lambda d: _renders(d) >= 1 and d.find_elements("css selector", "#sae-features button"), "the SAE list")
    assert d.find_element("id", "sae-box").is_displayed()
    assert "layer 0 (0-based), hook blocks.0.norm2" in d.find_element("id", "sae-where").text
    assert HOSTILE in d.find_element("css selector", "#sae option").text  # the file name, as text
    _not_injected(d)
    # the page indexes the SAE's codes of the image set after the atoms', then lists the features again
    _wait(d, lambda d: d.find_elements("css selector", "#sae-metrics td[title]"), "the SAE's metrics on the image set")
    button = d.find_elements("css selector", "#sae-features button")[0]
    feature = button.get_attribute("data-feature")
    button.click()
    _wait(d, lambda d: _body(d, "sae-feature") == f"0:{feature}", "the SAE feature view")
    here = _picture(d, "img-sae-here")
    assert here.shape[1] == 256 and here.std() > 1
    assert float(d.find_element("css selector", "#bar-sae .cbar").get_attribute("data-lo")) == 0
    stats = {td.text: td.get_attribute("title") for td in d.find_elements("css selector", "#sae-stats td[title]")}
    assert "fraction of the image set's patch tokens" in stats["firing frequency"]
    assert "mean activation" in stats and "SAE L0 / FVE / dead" in stats
    metrics = {td.text: td.get_attribute("title") for td in d.find_elements("css selector", "#sae-metrics td[title]")}
    assert set(metrics) == {"L0", "FVE", "dead fraction"} and "fraction of variance explained" in metrics["FVE"]
    assert d.find_elements("css selector", "#sae-patches img") and d.find_elements("css selector", "#sae-hist-svg rect")
    _not_injected(d)

    # the nearest ISTA atom opens in the atoms panel
    atom = d.find_elements("css selector", "#sae-atoms button")[0]
    coord = atom.get_attribute("data-atom")
    assert "cos" in atom.text
    atom.click()
    _wait(d, lambda d: _body(d, "atom") == f"0:{coord}", "the nearest atom")

    # clamp the feature to 0 on every patch: the prediction and layer 1's attention before / after / difference
    d.find_element("id", "sae-clamp").clear()
    d.find_element("id", "sae-clamp").send_keys("0")
    d.find_element("id", "btn-sae-clamp").click()
    _wait(d, lambda d: _body(d, "sae-clamped") == f"0:{feature}:0", "the SAE clamp")
    assert len(d.find_elements("css selector", "#sae-later img.difference")) == 1  # layer 1
    assert float(d.find_element("id", "sae-logit-change").text) > 0
    assert "error term kept" in d.find_element("id", "sae-intervention").text
    _keep(d, tmp_path, "explore-sae.png")

    # the export's numbers hold the SAE panel
    import json

    out = tmp_path / "downloads"
    out.mkdir()
    d.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(out)})
    d.find_element("id", "btn-export").click()
    deadline = time.time() + 30
    while time.time() < deadline and not [p for p in out.iterdir() if p.suffix == ".json"]:
        time.sleep(0.2)
    numbers = json.loads(next(p for p in out.iterdir() if p.suffix == ".json").read_text())
    assert numbers["sae_feature"]["feature"] == int(feature) and numbers["sae_feature"]["hook"] == "blocks.0.norm2"
    assert numbers["sae_clamp"]["value"] == 0 and numbers["sae"]["metrics"]["l0"] > 0
    assert "src" not in numbers["sae_feature"]["here"]  # numbers only

    # the permalink holds the SAE and the feature
    url = d.current_url
    assert "sae=0" in url and f"feature={feature}" in url, url
    d.get("about:blank")
    d.get(url)
    _wait(d, lambda d: _body(d, "sae-feature") == f"0:{feature}", f"the permalink's feature ({url})")
