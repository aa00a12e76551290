"""A real IIIF server for the tests: a generated level-0 static tree (info.json, sizes and tiles, Image API 2 and 3),
Presentation manifests (v2, v3), collections and broken documents, served by http.server on 127.0.0.1 in a thread,
which records every path it is asked for. Images under /slow/ answer after `SLOW_S` seconds, /trickle sends its
body a byte at a time, /flaky.json answers 503 once, then the v2 manifest."""
from __future__ import annotations

import functools
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from PIL import Image

from conftest import make_image

FULL = (1200, 800)
SIZES = [(150, 100), (300, 200), (600, 400)]  # level-0 sizes: 600x400 is the smallest with a side >= 224
TILE = 512
SLOW_S = 3.0


@dataclass
class IiifSite:
    root: Path
    base: str
    requests: list[str] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    def url(self, path: str) -> str:
        return f"{self.base}/{path.lstrip('/')}"

    def fetched_images(self) -> list[str]:
        return [p for p in self.requests if p.endswith(".jpg")]


def write_json(path: Path, document: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, ensure_ascii=False), encoding="utf-8")


def write_service(site_root: Path, base: str, prefix: str, version: int, seed: int, full=FULL, sizes=SIZES,
                  tiles: bool = True) -> str:
    """A level-0 static image service at /{prefix}: info.json, every listed size, the full image and its tiles;
    returns the service id."""
    service = f"{base}/{prefix}"
    folder = site_root / prefix
    image = make_image(*full, seed=seed)
    size_path = (lambda w, h: f"{w},{h}") if version == 3 else (lambda w, h: f"{w},")
    for w, h in sizes:
        _save(image.resize((w, h)), folder / "full" / size_path(w, h) / "0" / "default.jpg")
    _save(image, folder / "full" / ("max" if version == 3 else "full") / "0" / "default.jpg")
    if tiles:
        for y in range(0, full[1], TILE):
            for x in range(0, full[0], TILE):
                w, h = min(TILE, full[0] - x), min(TILE, full[1] - y)
                _save(image.crop((x, y, x + w, y + h)),
                      folder / f"{x},{y},{w},{h}" / size_path(w, h) / "0" / "default.jpg")
    info = {"width": full[0], "height": full[1], "sizes": [{"width": w, "height": h} for w, h in sizes],
            "tiles": [{"width": TILE, "scaleFactors": [1]}], "protocol": "http://iiif.io/api/image"}
    if version == 3:
        info = {"@context": "http://iiif.io/api/image/3/context.json", "id": service, "type": "ImageService3",
                "profile": "level0", **info}
    else:
        info = {"@context": "http://iiif.io/api/image/2/context.json", "@id": service,
                "profile": ["http://iiif.io/api/image/2/level0.json"], **info}
    write_json(folder / "info.json", info)
    return service


def canvas_v3(base: str, manifest: str, n: int, service: str, label: dict, version: int = 3,
              size=FULL) -> dict:
    canvas = f"{base}/{manifest}/canvas/{n}"
    kind = f"ImageService{version}"
    return {"id": canvas, "type": "Canvas", "label": label, "width": size[0] * 2, "height": size[1] * 2,
            "items": [{"id": f"{canvas}/page", "type": "AnnotationPage",
                       "items": [{"id": f"{canvas}/anno", "type": "Annotation", "motivation": "painting",
                                  "target": canvas,
                                  "body": {"id": f"{service}/full/max/0/default.jpg", "type": "Image",
                                           "format": "image/jpeg", "width": size[0], "height": size[1],
                                           "service": [{"id": service, "type": kind, "profile": "level0"}]}}]}]}


def manifest_v3(base: str, name: str, canvases: list[dict], label: dict) -> dict:
    return {"@context": "http://iiif.io/api/presentation/3/context.json", "id": f"{base}/{name}/manifest.json",
            "type": "Manifest", "label": label,
            "metadata": [{"label": {"zh": ["年代"], "en": ["Date"]}, "value": {"zh": ["唐代"], "en": ["Tang"]}}],
            "items": canvases}


def manifest_v2(base: str, name: str, services: list[str]) -> dict:
    canvases = []
    for n, service in enumerate(services):
        canvas = f"{base}/{name}/canvas/{n}"
        canvases.append({"@id": canvas, "@type": "sc:Canvas", "label": f"第{n + 1}页", "width": FULL[0],
                         "height": FULL[1],
                         "images": [{"@type": "oa:Annotation", "motivation": "sc:painting", "on": canvas,
                                     "resource": {"@id": f"{service}/full/full/0/default.jpg",
                                                  "@type": "dctypes:Image", "width": FULL[0], "height": FULL[1],
                                                  "service": {"@context": "http://iiif.io/api/image/2/context.json",
                                                              "@id": service,
                                                              "profile": "http://iiif.io/api/image/2/level0.json"}}}]})
    return {"@context": "http://iiif.io/api/presentation/2/context.json", "@id": f"{base}/{name}/manifest.json",
            "@type": "sc:Manifest",
            "label": [{"@value": "蓝色丝绸", "@language": "zh"}, {"@value": "Blue silk", "@language": "en"}],
            "metadata": [{"label": "Material", "value": [{"@value": "丝", "@language": "zh"}]}],
            "sequences": [{"@type": "sc:Sequence", "canvases": canvases}]}


def build_site(root: Path, base: str) -> None:
    """The whole tree: /m3 (v3, 3 canvases), /m2 (v2, 2 canvases), /collection.json (v3) -> m3 and a v2 collection
    /c2.json -> m2; /bad (a 404 info.json, a 404 image, a slow image, a huge level-0 image without sizes, a good
    one); /corrupt (an image that is not one, between two good ones); /broken.json (not JSON) and /notiiif.json
    (JSON, not IIIF)."""
    v3 = [write_service(root, base, f"iiif3/img{i}", 3, seed=10 + i) for i in range(3)]
    v2 = [write_service(root, base, f"iiif2/img{i}", 2, seed=20 + i) for i in range(2)]
    murals = {"zh": ["敦煌壁画"], "en": ["Dunhuang murals"]}
    write_json(root / "m3" / "manifest.json", manifest_v3(
        base, "m3", [canvas_v3(base, "m3", n, s, {"zh": [f"第{n + 1}幅"], "en": [f"panel {n + 1}"]})
                     for n, s in enumerate(v3)], murals))
    write_json(root / "m2" / "manifest.json", manifest_v2(base, "m2", v2))
    write_json(root / "c2.json", {"@context": "http://iiif.io/api/presentation/2/context.json",
                                  "@id": f"{base}/c2.json", "@type": "sc:Collection", "label": "丝绸",
                                  "manifests": [{"@id": f"{base}/m2/manifest.json", "@type": "sc:Manifest"}]})
    write_json(root / "collection.json", {
        "@context": "http://iiif.io/api/presentation/3/context.json", "id": f"{base}/collection.json",
        "type": "Collection", "label": {"zh": ["馆藏"], "en": ["Holdings"]},
        "items": [{"id": f"{base}/m3/manifest.json", "type": "Manifest", "label": murals},
                  {"id": f"{base}/c2.json", "type": "Collection", "label": {"zh": ["丝绸"]}}]})
    good = write_service(root, base, "iiif3/good", 3, seed=40, tiles=False)
    missing = write_service(root, base, "iiif3/gone", 3, seed=41, tiles=False)
    for path in (root / "iiif3/gone/full").glob("*/0/default.jpg"):
        path.unlink()  # info.json answers, every image 404s
    slow = write_service(root, base, "slow/img", 3, seed=42, tiles=False)
    huge = write_service(root, base, "iiif3/huge", 3, seed=43, full=(1600, 1600), sizes=[], tiles=False)
    broken = [good, f"{base}/iiif3/nowhere", missing, slow, huge]
    write_json(root / "bad" / "manifest.json", manifest_v3(
        base, "bad", [canvas_v3(base, "bad", n, s, {"none": [f"bad {n}"]}) for n, s in enumerate(broken)],
        {"none": ["broken things"]}))
    corrupt = write_service(root, base, "iiif3/corrupt", 3, seed=44, tiles=False)
    (root / "iiif3/corrupt/full/600,400/0/default.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a JPEG after all")
    write_json(root / "corrupt" / "manifest.json", manifest_v3(
        base, "corrupt", [canvas_v3(base, "corrupt", n, s, {"none": [f"corrupt {n}"]})
                          for n, s in enumerate([good, corrupt, good])], {"none": ["one corrupt image"]}))
    (root / "broken.json").write_text("{not json", encoding="utf-8")
    (root / "flaky.json").write_bytes((root / "m2" / "manifest.json").read_bytes())
    write_json(root / "notiiif.json", {"hello": "world"})


class _Handler(SimpleHTTPRequestHandler):
    def __init__(self, *args, site: IiifSite, **kwargs) -> None:
        self.site = site
        super().__init__(*args, directory=str(site.root), **kwargs)

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.site.requests.append(self.path)
        if self.path.startswith("/slow/") and self.path.endswith(".jpg"):
            time.sleep(SLOW_S)
        if self.path == "/trickle":  # headers at once, then a byte every 0.2 s
            self.send_response(200)
            self.send_header("Content-Length", "20")
            self.end_headers()
            for _ in range(20):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.2)
            return
        if self.path == "/flaky.json" and self.site.requests.count(self.path) == 1:  # 503, then the document
            self.send_error(503, "try again")
            return
        super().do_GET()

    def log_message(self, *args) -> None:
        pass


def start_site(root: Path, port: int = 0) -> IiifSite:
    """Build the tree under `root`, serve it on 127.0.0.1:`port` (0: a free port); stop with `stop_site`."""
    server = ThreadingHTTPServer(("127.0.0.1", port), lambda *a, **k: None)  # placeholder handler, replaced below
    site = IiifSite(root, f"http://127.0.0.1:{server.server_address[1]}", server=server)
    server.RequestHandlerClass = functools.partial(_Handler, site=site)
    server.daemon_threads = True
    server.handle_error = lambda request, address: None  # a client that gave up (timeouts, byte limits) is expected
    build_site(root, site.base)
    threading.Thread(target=server.serve_forever, daemon=True, name="iiif-site").start()
    return site


def stop_site(site: IiifSite) -> None:
    site.server.shutdown()
    site.server.server_close()


def _save(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.convert("RGB").save(path, format="JPEG", quality=85)
