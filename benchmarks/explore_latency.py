"""Response time of each action of the explore page, over HTTP as the browser makes the requests.

    python benchmarks/explore_latency.py MODEL [MODEL ...] [--repeat 5] [--sae SAE_CKPT]

MODEL is a checkpoint file, a preset or a timm name (needs ``requests`` besides the explore extra). Per action: the
median and the worst of ``--repeat`` calls, wall time from request to parsed JSON (server work + transfer of the PNG
data URIs). The first call of each image (its forward pass and curves figure) is the "open" and "first view" rows;
the image set is indexed once. POSTs carry the page's token, as the page sends it. With ``--sae`` (an SAE trained on
the one MODEL), the SAE panel's actions too: its feature list, a feature's view and a clamp.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time

import requests
import torch
from PIL import Image

from cratevit.explore import THREADS, load_explorer
from cratevit.explore.app import serve
from cratevit.explore.session import builtin_samples


def measure(spec: str, repeat: int, threads: int | None = None, sae: str | None = None) -> dict[str, list[float]]:
    t0 = time.perf_counter()
    ex = load_explorer(spec, saes=[sae] if sae else [])
    torch.set_num_threads(threads or THREADS)  # as `cratevit explore` does
    times: dict[str, list[float]] = {"load model + samples (startup)": [1000 * (time.perf_counter() - t0)]}
    server = serve(ex, port=0, background=True)
    url, session = server.url, requests.Session()
    session.headers["X-Cratevit-Token"] = server.app.config["TOKEN"]
    record = True

    def call(action: str, method: str, path: str, **kw: object) -> dict:
        t = time.perf_counter()
        r = session.request(method, url + path, timeout=120, **kw)
        r.raise_for_status()
        out = r.json()
        if record and action:
            times.setdefault(action, []).append(1000 * (time.perf_counter() - t))
        return out

    try:
        buf = io.BytesIO()
        builtin_samples()[1].image.save(buf, format="JPEG")
        photo = buf.getvalue()
        job = call("", "POST", "api/index")
        while job["state"] == "running":
            time.sleep(0.02)
            job = call("", "GET", f"api/job/{job['id']}")
        times[f"index image set (job, {ex.image_set_label})"] = [1000 * job["seconds"]]
        if sae:
            job = call("", "POST", "api/sae/index", params={"sae": 0})
            while job["state"] == "running":
                time.sleep(0.02)
                job = call("", "GET", f"api/job/{job['id']}")
            times[f"index SAE features (job, {ex.image_set_label})"] = [1000 * job["seconds"]]
        buf = io.BytesIO()
        Image.new("1", (100_000, 1)).save(buf, format="PNG")
        long_png = buf.getvalue()
        for i in range(-1, repeat):  # round -1 warms up each code path, not recorded
            record = i >= 0
            layer, head = max(i, 0) % ex.depth, max(i, 0) % ex.heads
            iid = call("open sample photo", "POST", "api/open", data={"sample": "astronaut"})["image_id"]
            call("first view of an image", "GET", "api/view", params={"image_id": iid, "layer": ex.depth - 1})
            files = {"file": ("chelsea.jpg", photo, "image/jpeg")}
            up = call("upload photo (JPEG)", "POST", "api/open", files=files)["image_id"]
            call("first view of an image", "GET", "api/view", params={"image_id": up, "layer": ex.depth - 1})
            view = {"image_id": iid, "layer": layer}
            v = call("switch layer", "GET", "api/view", params=view)
            call("switch head", "GET", "api/view", params={**view, "head": head})
            call("shared colour scale", "GET", "api/view", params={**view, "head": head, "scale": "shared"})
            patches = v["grid"][0] * v["grid"][1]
            call("attention from a clicked patch", "GET", "api/view", params={**view, "query": (7 * i) % patches})
            call("switch facet (PCA)", "GET", "api/view", params={**view, "head": head, "facet": "code"})
            params = {**view, "threshold": 0.4, "protocol": "entries"}
            call("switch threshold / mask protocol", "GET", "api/view", params=params)
            if v.get("atoms"):
                coord = v["atoms"][0]["coord"]
                call("atom view (top patches, stats)", "GET", "api/atom", params={**view, "coord": coord})
                params = {"image_id": iid, "layer": 0, "coord": coord, "value": 0}
                call("intervene (clamp, rerun later layers, difference maps)", "GET", "api/intervene", params=params)
                params.pop("value")
                call("clamp sweep (8 clamped passes)", "GET", "api/sweep", params=params)
            if sae:
                feats = call(
                    "SAE feature list (first on an image)", "GET", "api/sae/features", params={"image_id": iid}
                )
                feature = feats["features_here"][i % len(feats["features_here"])]["feature"]
                params = {"image_id": iid, "sae": 0, "feature": feature}
                call(
                    "SAE feature view (map, top patches, stats, nearest atoms)", "GET", "api/sae/feature", params=params
                )
                params["value"] = 0
                call("SAE clamp (spliced, error term kept; before/after maps)", "GET", "api/sae/clamp", params=params)
            call("index again (already indexed)", "POST", "api/index")
            t = time.perf_counter()
            r = session.post(url + "api/open", files={"file": ("long.png", long_png)}, timeout=60)
            if record:
                times.setdefault("refuse a 100000x1 PNG (header only)", []).append(1000 * (time.perf_counter() - t))
            assert r.status_code == 400 and "8192 pixels a side" in r.json()["error"]
            r = session.post(url + "api/open", files={"file": ("bad.png", b"not an image")}, timeout=60)
            assert r.status_code == 400 and "not an image" in r.json()["error"]
    finally:
        server.stop()
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: as cratevit explore)")
    p.add_argument("--sae", default=None, help="an SAE checkpoint trained on the (one) model: time its panel too")
    args = p.parse_args()
    if args.sae and len(args.models) != 1:
        p.error("--sae needs exactly one MODEL (the one the SAE was trained on)")
    for spec in args.models:
        times = measure(spec, args.repeat, args.threads, args.sae)
        print(f"\n{spec} ({torch.get_num_threads()} threads)")
        print("| action | median ms | worst ms | calls |\n|---|---|---|---|")
        for action, values in times.items():
            print(f"| {action} | {statistics.median(values):.0f} | {max(values):.0f} | {len(values)} |")


if __name__ == "__main__":
    main()
