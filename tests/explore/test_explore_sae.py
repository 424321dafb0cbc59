"""The explore page's SAE features panel: a tiny SAE trained here on a digits model's layer, read through the page's
API (feature list, feature view with top patches, map, metrics and nearest ISTA atoms, clamp with the error term
kept), and SAE files that do not fit the model refused in one line."""

from __future__ import annotations

import time

import pytest
import torch

from cratevit import create_model, save_checkpoint
from cratevit.analysis import sae_features as sf
from cratevit.analysis.activations import ista_dictionary, layer_activations
from cratevit.analysis.sae import SAEConfig, SparseAutoencoder
from cratevit.analysis.sae_train import SAETrainConfig, save_sae, tensor_batches, train_sae
from cratevit.cli import main
from cratevit.explore import load_explorer
from cratevit.explore.app import create_app
from cratevit.presets import data_preprocessing, pretrained_cfg_for


def _train(model, x, layer: int, site: str, **cfg) -> SparseAutoencoder:
    """A TopK SAE fitted in a fraction of a second on the patch tokens of ``x`` at (layer, site)."""
    torch.manual_seed(0)
    acts = layer_activations(model, x, layer, (site,))[site][:, 1:].reshape(-1, model.config.dim)
    sae = SparseAutoencoder(SAEConfig(d_in=acts.shape[-1], **{"expansion": 4, "arch": "topk", "k": 4, **cfg}))
    sae.initialize_from(acts)
    train_sae(sae, tensor_batches(acts, 256), SAETrainConfig(steps=60, lr=3e-3, warmup_steps=5, plot=False))
    return sae.eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A digits checkpoint (crate_debug: 2 layers, dim 32, a 4x4 patch grid) and SAEs trained on its layer 0."""
    tmp = tmp_path_factory.mktemp("sae")
    torch.manual_seed(0)
    model = create_model("crate_debug")
    model.pretrained_cfg = pretrained_cfg_for(model.config, data_preprocessing("digits"))
    ckpt = save_checkpoint(tmp / "digits.pt", model, train_config={"data": "digits"})
    x = torch.rand(32, 3, 32, 32) * 2 - 1
    paths = {"ckpt": ckpt}
    fingerprint = sf.weights_fingerprint(model)
    for site in ("ista_in", "code"):
        sae = _train(model.eval(), x, 0, site)
        # the first records the weights' fingerprint and a path the file no longer has, the second only the path
        meta = {"model": "moved/digits.pt", "model_fingerprint": fingerprint} if site == "ista_in" else {}
        meta = {"model": str(ckpt), "layer": 0, "site": site, **meta}
        paths[site] = save_sae(tmp / f"{site}.pt", sae, meta=meta)
    torch.manual_seed(1)
    other = {"model": str(ckpt), "model_fingerprint": sf.weights_fingerprint(create_model("crate_debug"))}
    paths["weights"] = save_sae(tmp / "weights.pt", sae, meta={**other, "layer": 0, "site": "ista_in"})
    wide = SparseAutoencoder(SAEConfig(d_in=16, expansion=2))
    paths["width"] = save_sae(tmp / "width.pt", wide, meta={"model": str(ckpt), "layer": 0, "site": "ista_in"})
    paths["layer"] = save_sae(tmp / "layer.pt", wide, meta={"model": str(ckpt), "layer": 5, "site": "ista_in"})
    paths["other"] = save_sae(tmp / "other.pt", wide, meta={"model": "runs/shapes/best.pt", "layer": 0, "site": "z_in"})
    return paths


@pytest.fixture(scope="module")
def explorer(files):
    return load_explorer(str(files["ckpt"]), saes=[files["ista_in"], files["code"]])


@pytest.fixture(scope="module")
def client(explorer):
    app = create_app(explorer)
    c = app.test_client()
    c.environ_base["HTTP_X_CRATEVIT_TOKEN"] = app.config["TOKEN"]
    return c


@pytest.fixture(scope="module")
def image_id(client, explorer):
    sample = next(s for s in explorer.samples if s.startswith("digit "))
    r = client.post("/api/open", data={"sample": sample})
    assert r.status_code == 200, r.json
    return r.json["image_id"]


def _feature(client, image_id, sae, feature):
    r = client.get(f"/api/sae/feature?image_id={image_id}&sae={sae}&feature={feature}")
    assert r.status_code == 200, r.json
    if "pending" in r.json:
        job, deadline = r.json["pending"], time.time() + 30
        while job["state"] == "running" and time.time() < deadline:
            time.sleep(0.05)
            job = client.get(f"/api/job/{job['id']}").json
        assert job["state"] == "done", job
        r = client.get(f"/api/sae/feature?image_id={image_id}&sae={sae}&feature={feature}")
    return r.json


def test_info_lists_the_saes_with_their_hook_points(client) -> None:
    info = client.get("/api/info").json
    saes = info["saes"]
    assert [(s["sae"], s["layer"], s["hook"], s["features"]) for s in saes] == [
        (0, 0, "blocks.0.norm2", 128),
        (1, 0, "blocks.0.ista.code", 128),
    ]
    assert saes[0]["arch"] == "topk" and saes[0]["k"] == 4 and saes[0]["d_in"] == 32
    assert {"sae_l0", "sae_fve", "sae_dead", "feature_frequency", "feature_mean", "nearest_atoms"} <= set(
        info["definitions"]
    )


def test_feature_list_is_sorted_by_activation_on_the_image(client, explorer, image_id) -> None:
    r = client.get(f"/api/sae/features?image_id={image_id}&sae=0").json
    totals = [f["total"] for f in r["features_here"]]
    assert totals == sorted(totals, reverse=True) and 0 < len(totals) <= 12 and all(t > 0 for t in totals)
    # the same numbers from the SAE on the hook point's tokens
    item = explorer.open[image_id]
    x = layer_activations(explorer.model, item.prep.tensor[None], 0, ("ista_in",))["ista_in"][0, 1:]
    with torch.no_grad():
        f = explorer.saes[0].sae.encode(x)
    assert r["features_here"][0]["feature"] == int(f.sum(0).argmax())
    assert r["features_here"][0]["total"] == pytest.approx(float(f.sum(0).max()), rel=1e-5)
    assert r["active_here"] == int((f.sum(0) > 0).sum())
    assert int((f > 0).sum(-1).max()) <= 4  # TopK: k = 4 per token


def test_feature_view_top_patches_map_and_metrics(client, explorer, image_id) -> None:
    top = client.get(f"/api/sae/features?image_id={image_id}&sae=0").json["features_here"][0]["feature"]
    v = _feature(client, image_id, 0, top)
    assert v["feature"] == top and v["hook"] == "blocks.0.norm2" and v["layer"] == 0
    assert len(v["here"]["values"]) == 4 and all(len(row) == 4 for row in v["here"]["values"])  # the 4x4 grid
    assert v["here"]["src"].startswith("data:image/png;base64,") and v["here"]["scale"]["lo"] == 0
    values = [p["value"] for p in v["patches"]]
    assert 0 < len(values) <= 12 and values == sorted(values, reverse=True) and all(p["src"] for p in v["patches"])
    codes = explorer.sae_index[0].index.codes[..., top]  # (96 images, 4, 4)
    assert codes.shape == (96, 4, 4) and values[0] == pytest.approx(float(codes.max()))
    assert v["stats"]["patch_frequency"] == pytest.approx(float((codes > 0).float().mean()))
    assert v["stats"]["mean"] == pytest.approx(float(codes.mean()), rel=1e-5) and v["stats"]["features"] == 128
    m = v["metrics"]
    assert 0 < m["l0"] <= 4 and 0 < m["fve"] <= 1 and 0 <= m["dead_fraction"] < 1 and m["images"] == 96
    assert m["tokens"] == 96 * 16 and m["image_set"] == "96 held-out digits images"
    # the nearest ISTA atoms: cosines with the columns of blocks.0.ista.dictionary, largest first
    near = v["nearest_atoms"]
    u, d = explorer.saes[0].sae.dictionary.detach()[:, top].double(), ista_dictionary(explorer.model, 0).double()
    cos = (u @ d) / (u.norm() * d.norm(dim=0))
    assert near["atoms"][0] == {"coord": int(cos.argmax()), "cosine": round(float(cos.max()), 4)}
    assert [a["cosine"] for a in near["atoms"]] == sorted((a["cosine"] for a in near["atoms"]), reverse=True)
    assert "blocks.0.ista.dictionary" in near["space"]


def test_an_sae_on_the_code_is_compared_with_the_code_axes(client, explorer, image_id) -> None:
    v = _feature(client, image_id, 1, 5)
    u = explorer.saes[1].sae.dictionary.detach()[:, 5].double()
    assert v["nearest_atoms"]["atoms"][0]["coord"] == int(u.argmax())
    assert v["nearest_atoms"]["atoms"][0]["cosine"] == pytest.approx(float(u.max() / u.norm()), abs=1e-4)
    assert v["hook"] == "blocks.0.ista.code"


@pytest.mark.parametrize("sae", [0, 1])  # on blocks.0.norm2, on blocks.0.ista.code
def test_clamp_with_the_unedited_value_leaves_the_logits_unchanged(client, explorer, image_id, sae) -> None:
    feats = client.get(f"/api/sae/features?image_id={image_id}&sae={sae}").json["features_here"]
    silent = next(i for i in range(128) if i not in {f["feature"] for f in feats})
    r = client.get(f"/api/sae/clamp?image_id={image_id}&sae={sae}&feature={silent}&value=0").json
    assert r["top_class"]["logit_change"] == 0.0 and [layer["change"] for layer in r["later"]] == [0.0]
    assert [c["prob"] for c in r["classes_before"]] == [c["prob"] for c in r["classes_after"]]
    # bit-equal through the library, and equal to the plain forward
    s, x = explorer.saes[sae], explorer.open[image_id].prep.tensor[None]
    result = sf.clamp_feature(explorer.model, s, x, silent, 0.0)
    assert torch.equal(result.logits_before, result.logits_after)
    with torch.no_grad():
        assert torch.allclose(result.logits_before, explorer.model(x), atol=1e-6)
    assert torch.equal(result.patterns_before[1], result.patterns_after[1])


def test_clamp_changes_the_prediction_otherwise(client, image_id) -> None:
    top = client.get(f"/api/sae/features?image_id={image_id}&sae=0").json["features_here"][0]
    r = client.get(f"/api/sae/clamp?image_id={image_id}&sae=0&feature={top['feature']}&value=0&head=1").json
    assert r["top_class"]["logit_change"] > 0 and r["later"][0]["change"] > 0 and r["later"][0]["layer"] == 1
    assert r["peak_here"] == pytest.approx(top["max"]) and r["hook"] == "blocks.0.norm2" and r["head"] == 1
    boosted = client.get(f"/api/sae/clamp?image_id={image_id}&sae=0&feature={top['feature']}&value=50").json
    assert boosted["top_class"]["logit_change"] > r["top_class"]["logit_change"]
    assert {"before", "after", "difference", "scale", "difference_scale"} <= set(boosted["later"][0])


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("feature?sae=0&feature=128", "SAE feature 128 is out of range; this SAE has features 0..127"),
        ("feature?sae=0&feature=-1", "features 0..127"),
        ("clamp?sae=0&feature=999&value=0", "features 0..127"),
        ("clamp?sae=0&feature=3&value=5000", "clamp value 5000 is out of range; choose a value in -1000..1000"),
        ("clamp?sae=0&feature=3&value=nan", "finite number"),
        ("clamp?sae=0&feature=3&value=x", "value must be a number"),
        ("features?sae=2", "SAE 2 is out of range; this page has SAEs 0..1"),
        ("clamp?sae=0&feature=3&value=1&scale=x", "unknown colour scale"),
    ],
)
def test_out_of_range_requests_are_400_naming_the_range(client, image_id, query, message) -> None:
    r = client.get(f"/api/sae/{query}&image_id={image_id}")
    assert r.status_code == 400 and message in r.json["error"], r.json


def test_a_page_without_an_sae_says_how_to_load_one(files) -> None:
    ex = load_explorer(str(files["ckpt"]))
    app = create_app(ex)
    c = app.test_client()
    c.environ_base["HTTP_X_CRATEVIT_TOKEN"] = app.config["TOKEN"]
    assert c.get("/api/info").json["saes"] == []
    r = c.get("/api/sae/features?image_id=x&sae=0")
    assert r.status_code == 400 and "--sae SAE_CKPT" in r.json["error"]


@pytest.mark.parametrize(
    ("which", "message"),
    [
        ("width", "was trained on activations of width 16, but blocks.0.norm2"),
        ("layer", "reads layer 5 (0-based), but"),
        ("other", "was trained on runs/shapes/best.pt, a model other than"),
        ("weights", "digits.pt, other weights than"),
        ("ckpt", "is not an SAE checkpoint"),
    ],
)
def test_an_sae_that_does_not_fit_the_model_is_one_line(files, which, message, capsys) -> None:
    assert main(["explore", str(files["ckpt"]), "--sae", str(files[which]), "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_a_missing_sae_file_is_one_line(files, tmp_path, capsys) -> None:
    assert main(["explore", str(files["ckpt"]), "--sae", str(tmp_path / "none.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no such file" in err and len(err.splitlines()) == 1


def test_the_sae_index_is_one_job_and_runs_once(client) -> None:
    first = client.post("/api/sae/index?sae=1").json
    again = client.post("/api/sae/index?sae=1").json
    assert again["id"] == first["id"] or again["message"].startswith("already indexed")
    deadline = time.time() + 30
    while client.get(f"/api/job/{first['id']}").json["state"] == "running" and time.time() < deadline:
        time.sleep(0.05)
    done = client.post("/api/sae/index?sae=1").json
    assert done["state"] == "done" and done["message"].startswith("already indexed: 96 images")
    assert client.post("/api/sae/index?sae=1&rebuild=1").json["what"] == "sae_index"


def test_an_sae_on_a_timm_vit_layer(tmp_path) -> None:
    """The hooks reach a timm ViT too: its SAE's features and clamp (no ISTA atoms to compare with)."""
    import timm
    from PIL import Image

    from cratevit.explore import Explorer
    from cratevit.explore.session import ImageItem

    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=10, depth=3
    )
    vit.eval()
    x = torch.rand(16, 3, 32, 32) * 2 - 1
    acts = layer_activations(vit, x, 1, ("ista_in",))["ista_in"][:, 1:].reshape(-1, 192)
    sae = SparseAutoencoder(SAEConfig(d_in=192, expansion=2, arch="topk", k=8))
    sae.initialize_from(acts)
    meta = {"model": "vit", "model_fingerprint": sf.weights_fingerprint(vit), "layer": 1, "site": "ista_in"}
    path = save_sae(tmp_path / "vit.pt", sae.eval(), meta=meta)
    items = [ImageItem(f"noise {i}", Image.fromarray((torch.rand(32, 32, 3) * 255).byte().numpy())) for i in range(4)]
    ex = Explorer(vit, "vit", (0.5,) * 3, (0.5,) * 3, items, items, [str(i) for i in range(10)], "4 noise images")
    assert ex.add_sae(path).hook == "blocks.1.norm2"
    image_id = ex.open_sample("noise 0")["image_id"]
    feats = ex.sae_features(image_id, 0)["features_here"]
    silent = next(i for i in range(384) if i not in {f["feature"] for f in feats})
    unchanged = ex.sae_clamp(image_id, 0, silent, 0.0)
    assert unchanged["top_class"]["logit_change"] == 0.0 and [p["layer"] for p in unchanged["later"]] == [2]
    assert ex.sae_clamp(image_id, 0, feats[0]["feature"], 0.0)["top_class"]["logit_change"] > 0
    ex.start_sae_index(0)
    deadline = time.time() + 30
    while 0 not in ex.sae_index and time.time() < deadline:
        time.sleep(0.05)
    view = ex.sae_feature(image_id, 0, feats[0]["feature"])
    assert view["nearest_atoms"] is None and len(view["here"]["values"]) == 4 and view["metrics"]["images"] == 4


def test_an_sae_at_a_hook_point_the_model_lacks_is_one_line(tmp_path, capsys) -> None:
    """An SAE on the ISTA code, given to a model whose layers have no ISTA step (CRATE-MLP)."""
    torch.manual_seed(0)
    model = create_model("crate_mlp_digits")
    ckpt = save_checkpoint(tmp_path / "mlp.pt", model, train_config={"data": "digits"})
    meta = {"model": str(ckpt), "model_fingerprint": sf.weights_fingerprint(model), "layer": 1, "site": "code"}
    sae = save_sae(tmp_path / "code.pt", SparseAutoencoder(SAEConfig(d_in=model.config.dim)), meta=meta)
    assert main(["explore", str(ckpt), "--sae", str(sae)]) == 2
    err = capsys.readouterr().err.strip()
    assert "has no code (no sparse-coding step) for the site code" in err and len(err.splitlines()) == 1, err
