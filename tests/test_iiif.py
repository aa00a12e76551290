"""IIIF as a source: documents (v2, v3, collections), the size fetched from info.json, region links, and indexing
a generated level-0 site served on 127.0.0.1 (tests/iiif_server.py), with its failure cases."""
from __future__ import annotations

import json
import time

import pytest

from engine.cli import main as cli_main
from engine.errors import InputError
from engine.iiif.documents import display, language_map, read_document
from engine.iiif.fetch import FetchFailed, FetchPolicy, fetch_bytes
from engine.iiif.harvest import IiifSource, list_iiif
from engine.iiif.images import ImageService, choose_size, needed_side, parse_info, scale_box
from engine.iiif.links import check_viewer, decorate_hit, hit_links
from engine.laclip import LaclipConfig
from engine.retriever import Hit, Retriever
from engine.sources import list_collection
from iiif_server import FULL, start_site, stop_site

FAST = FetchPolicy(timeout_s=1.0, retries=0, concurrency=4)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    served = start_site(tmp_path_factory.mktemp("iiif-site"))
    yield served
    stop_site(served)


# ---- pure parts ---------------------------------------------------------------------------------------------


def test_language_maps_keep_every_language_and_display_prefers_chinese():
    v2 = [{"@value": "Blue silk", "@language": "en"}, {"@value": "蓝色丝绸", "@language": "zh"}]
    assert language_map(v2) == {"en": ["Blue silk"], "zh": ["蓝色丝绸"]}
    assert display(language_map(v2)) == "蓝色丝绸"
    assert language_map("第1页") == {"none": ["第1页"]}
    assert display({"en": ["Tang"], "zh-Hant": ["唐代"]}) == "唐代"
    assert display({"fr": ["soie"]}) == "soie" and display({}, "x") == "x"


def test_level0_takes_the_smallest_listed_size_big_enough_never_the_full_image():
    service = ImageService("https://x/img", 3, 0, 4000, 3000, ((400, 300), (1000, 750), (2000, 1500)))
    assert (choose_size(service, 224).param, choose_size(service, 301).param) == ("400,300", "1000,750")
    assert choose_size(service, 5000).param == "2000,1500"  # none big enough: the largest listed, still not full
    v2 = ImageService("https://x/img", 2, 0, 4000, 3000, ((400, 300),))
    assert choose_size(v2, 224).param == "400,"
    assert choose_size(ImageService("https://x/img", 3, 0, 4000, 3000), 224).param == "max"  # nothing smaller


def test_higher_levels_ask_for_exactly_the_needed_size_within_the_limits():
    level2 = ImageService("https://x/img", 3, 2, 4000, 3000)
    choice = choose_size(level2, 224)
    assert (choice.param, choice.width, choice.height) == ("!299,224", 299, 224)
    assert choose_size(ImageService("https://x/img", 2, 1, 4000, 3000), 224).param == "299,"
    assert choose_size(ImageService("https://x/img", 3, 2, 200, 100), 224).param == "max"  # already small
    limited = ImageService("https://x/img", 3, 2, 4000, 3000, max_width=200)
    assert choose_size(limited, 224).width == 200


def test_needed_side_grows_with_laclip_crops():
    assert needed_side(224) == 224
    assert needed_side(224, LaclipConfig(num_crops=4, crop_area=(0.25, 0.6))) == 448
    assert needed_side(224, LaclipConfig(num_crops=9, crop_mode="grid")) == 672


def test_parse_info_reads_v2_and_v3_and_refuses_other_json():
    v2 = parse_info({"@context": "http://iiif.io/api/image/2/context.json", "@id": "https://x/a/",
                     "profile": ["http://iiif.io/api/image/2/level2.json", {"supports": ["sizeByW"]}],
                     "width": 10, "height": 20, "sizes": [{"width": 5, "height": 10}]}, "a")
    assert (v2.id, v2.version, v2.level, v2.sizes, "sizeByW" in v2.features) == ("https://x/a", 2, 2, ((5, 10),), True)
    v3 = parse_info({"@context": "http://iiif.io/api/image/3/context.json", "id": "https://x/b", "type":
                     "ImageService3", "profile": "level1", "width": 10, "height": 20}, "b")
    assert (v3.version, v3.level, v3.full_size_param) == (3, 1, "max")
    capped = parse_info({"@context": "http://iiif.io/api/image/3/context.json", "id": "https://x/c",
                         "profile": "level2", "width": 1000, "height": 4000, "maxWidth": 100}, "c")
    assert (capped.max_width, capped.max_height, choose_size(capped, 224).height) == (100, 100, 100)
    with pytest.raises(InputError, match="not a IIIF Image API info.json"):
        parse_info({"width": 1, "height": 1, "id": "x"}, "where")
    with pytest.raises(InputError, match="width/height"):
        parse_info({"@context": "http://iiif.io/api/image/3/context.json", "id": "x", "width": "big"}, "where")


def test_scale_box_maps_fetched_pixels_to_the_full_image_and_clamps():
    assert scale_box([60, 40, 360, 240], (600, 400), (1200, 800)) == (120, 80, 600, 400)
    assert scale_box([0, 0, 600, 400], (600, 400), (2400, 1600)) == (0, 0, 2400, 1600)
    assert scale_box([-5, -5, 900, 900], (600, 400), (1200, 800)) == (0, 0, 1200, 800)
    assert scale_box([10, 10, 10, 10], (100, 100), (50, 50)) == (5, 5, 1, 1)  # never empty
    with pytest.raises(InputError):
        scale_box([0, 0, 1, 1], (0, 10), (10, 10))


def _payload(version: int = 3) -> dict:
    return {"manifest": "https://m/manifest", "canvas": "https://m/canvas/1", "image_service": "https://img/s1",
            "image_api": version, "full_size": [1200, 800], "fetched_size": [600, 400], "canvas_size": [2400, 1600]}


def test_links_with_synthetic_evidence_scale_the_best_crop_to_the_image_and_the_canvas():
    evidence = {"image_size": [600, 400], "best": 1,
                "crops": [{"box": [0, 0, 10, 10], "similarity": 0.1, "weight": 0.2},
                          {"box": [60, 40, 360, 240], "similarity": 0.3, "weight": 0.8}]}
    links = hit_links(_payload(), evidence, "https://viewer.example/?manifest={manifest}&canvas={canvas}")
    assert links == {
        "image": "https://img/s1/full/max/0/default.jpg",
        "region": "https://img/s1/120,80,600,400/max/0/default.jpg",
        "canvas": "https://m/canvas/1#xywh=240,160,1200,800",
        "manifest": "https://m/manifest",
        "viewer": "https://viewer.example/?manifest=https%3A%2F%2Fm%2Fmanifest&canvas=https%3A%2F%2Fm%2Fcanvas%2F1"}
    assert hit_links(_payload(2), evidence)["region"] == "https://img/s1/120,80,600,400/full/0/default.jpg"


def test_links_without_evidence_cover_the_whole_canvas_and_other_hits_are_untouched():
    links = hit_links(_payload(), None)
    assert (links["region"], links["canvas"], links["viewer"]) == (None, "https://m/canvas/1#xywh=0,0,2400,1600", None)
    plain = Hit("cat", 0.5, {"source": "cat.jpg"})
    assert decorate_hit(plain) is plain
    decorated = decorate_hit(Hit("https://m/canvas/1", 0.5, _payload()))
    assert decorated.payload["iiif"]["canvas"].endswith("#xywh=0,0,2400,1600") and "iiif" not in _payload()
    with pytest.raises(InputError, match="manifest"):
        check_viewer("https://viewer.example/?canvas={canvas}")


def test_read_document_refuses_what_is_not_a_manifest_or_collection():
    with pytest.raises(InputError, match="not a IIIF Presentation document"):
        read_document({"hello": 1}, "x.json")
    with pytest.raises(InputError, match="neither a Manifest nor a Collection"):
        read_document({"@context": "http://iiif.io/api/presentation/3/context.json", "type": "Canvas", "id": "c"}, "c")


# ---- against the served site -----------------------------------------------------------------------------------


def test_v3_manifest_lists_canvases_with_payloads_and_the_right_sizes(site):
    listing = list_iiif(IiifSource(site.url("m3/manifest.json"), fetch=FAST))
    assert listing.problems == []
    assert [c.id for c in listing.canvases] == [site.url(f"m3/canvas/{n}") for n in range(3)]
    first = listing.canvases[0]
    assert first.url == site.url("iiif3/img0/full/600,400/0/default.jpg")  # level 0: a listed size, not max
    payload = first.payload
    assert payload["manifest"] == site.url("m3/manifest.json") and payload["canvas"] == first.id
    assert payload["label"] == {"zh": ["第1幅"], "en": ["panel 1"]} and payload["title"] == "第1幅"
    assert payload["manifest_label"] == {"zh": ["敦煌壁画"], "en": ["Dunhuang murals"]}
    assert payload["metadata"][0]["value"] == {"zh": ["唐代"], "en": ["Tang"]}
    assert payload["image_service"] == site.url("iiif3/img0") and payload["image_api"] == 3
    assert payload["full_size"] == list(FULL) and payload["fetched_size"] == [600, 400]
    assert payload["canvas_size"] == [FULL[0] * 2, FULL[1] * 2]
    json.dumps(payload)  # a payload is JSON


def test_collection_is_followed_through_a_nested_v2_collection_with_a_limit(site):
    listing = list_iiif(IiifSource(site.url("collection.json"), fetch=FAST))
    assert listing.problems == [] and listing.manifests == 2
    ids = [c.id for c in listing.canvases]
    assert ids == [site.url(f"m3/canvas/{n}") for n in range(3)] + [site.url(f"m2/canvas/{n}") for n in range(2)]
    v2 = listing.canvases[3]
    assert v2.url == site.url("iiif2/img0/full/600,/0/default.jpg")
    assert v2.payload["manifest_label"] == {"zh": ["蓝色丝绸"], "en": ["Blue silk"]}
    assert v2.payload["label"] == {"none": ["第1页"]} and v2.payload["image_api"] == 2
    limited = list_iiif(IiifSource(site.url("collection.json"), max_manifests=1, fetch=FAST))
    assert limited.manifests == 1 and limited.truncated and len(limited.canvases) == 3


def test_bad_sources_are_input_errors_naming_them(site, tmp_path):
    for path, message in (("broken.json", "not JSON"), ("notiiif.json", "not a IIIF Presentation"),
                          ("nothing-here.json", "HTTP 404")):
        with pytest.raises(InputError, match=message):
            list_iiif(IiifSource(site.url(path), fetch=FAST))
    with pytest.raises(InputError, match="not found"):
        list_iiif(IiifSource(str(tmp_path / "missing.json")))


def test_requests_retry_what_may_pass_and_never_outlast_the_timeout(site):
    site.requests.clear()
    assert len(list_iiif(IiifSource(site.url("flaky.json"), fetch=FetchPolicy(retries=1, backoff_s=0))).canvases) == 2
    assert site.requests.count("/flaky.json") == 2  # a 503, then the retry
    started = time.monotonic()
    with pytest.raises(FetchFailed, match="took longer than 0.5 s"):
        fetch_bytes(site.url("trickle"), FetchPolicy(timeout_s=0.5, retries=0))
    assert time.monotonic() - started < 2  # a server that trickles cannot hold a request past the timeout
    with pytest.raises(FetchFailed, match="exceeds the limit of 10 bytes"):
        fetch_bytes(site.url("trickle"), FetchPolicy(max_bytes=10, retries=0))


def test_local_manifest_file_and_auto_detection_in_list_collection(site, tmp_path):
    local = tmp_path / "m3.json"
    local.write_bytes((site.root / "m3" / "manifest.json").read_bytes())
    collection = list_collection([str(local), site.url("m2/manifest.json")])
    assert [r.kind for r in collection.images] == ["iiif"] * 5 and collection.problems == []
    ref = collection.images[0]
    assert ref.id == site.url("m3/canvas/0") and ref.payload["canvas"] == ref.id
    assert ref.open()[:2] == b"\xff\xd8"  # the JPEG bytes, fetched


# ---- indexing: the CLI, one process and Ray ---------------------------------------------------------------------


def _index(site, out, checkpoint, *extra):
    return ["index", "--model", "tiny", "--checkpoint", str(checkpoint), "--out", str(out), "--quiet", *extra]


def test_cli_indexes_a_collection_fetching_listed_sizes_never_the_full_image(site, tiny_checkpoint, tmp_path,
                                                                           capsys):
    site.requests.clear()
    out = tmp_path / "index"
    assert cli_main(_index(site, out, tiny_checkpoint, "--iiif", site.url("collection.json"))) == 0
    assert "added 5 images (0 already indexed, 0 bad skipped)" in capsys.readouterr().out
    images = site.fetched_images()
    assert sorted(images) == sorted([f"/iiif3/img{i}/full/600,400/0/default.jpg" for i in range(3)]
                                    + [f"/iiif2/img{i}/full/600,/0/default.jpg" for i in range(2)])
    assert not [p for p in site.requests if "/full/max/" in p or "/full/full/" in p]
    retriever = Retriever.load(out, checkpoint=tiny_checkpoint)
    canvas = site.url("m3/canvas/1")
    assert sorted(retriever.index.image_ids) == sorted([site.url(f"m3/canvas/{n}") for n in range(3)]
                                                       + [site.url(f"m2/canvas/{n}") for n in range(2)])
    payload = retriever.image_payload(canvas)
    assert payload["manifest"] == site.url("m3/manifest.json") and payload["title"] == "第2幅"
    hits = retriever.search_images("敦煌壁画中的飞天", k=5)
    assert {h.id for h in hits} == set(retriever.index.image_ids)
    assert cli_main(_index(site, out, tiny_checkpoint, "--iiif", site.url("collection.json"))) == 0
    assert "added 0 images (5 already indexed" in capsys.readouterr().out  # a rerun resumes


def test_crop_evidence_on_a_fetched_image_becomes_region_and_canvas_links(site, tiny_checkpoint):
    refs = list_collection([site.url("m3/manifest.json")]).images
    retriever = Retriever.from_checkpoint(tiny_checkpoint, model="tiny", laclip=LaclipConfig(), progress=False)
    retriever.add_images([r.open() for r in refs], [r.id for r in refs], [r.payload for r in refs])
    hits = retriever.search_images("敦煌壁画中的飞天", k=3, explain=True)
    for hit in hits:  # the best crop, found in the fetched 600x400 pixels, scaled to the 1200x800 image
        evidence = hit.evidence
        assert evidence["image_size"] == [600, 400]
        x0, y0, x1, y1 = evidence["crops"][evidence["best"]]["box"]
        links = decorate_hit(hit).payload["iiif"]
        service = hit.payload["image_service"]
        assert links["region"] == f"{service}/{2 * x0},{2 * y0},{2 * (x1 - x0)},{2 * (y1 - y0)}/max/0/default.jpg"
        assert links["canvas"] == f"{hit.id}#xywh={4 * x0},{4 * y0},{4 * (x1 - x0)},{4 * (y1 - y0)}"  # canvas 2x


def test_failures_are_reported_per_canvas_and_skipped_with_skip_bad(site, tiny_checkpoint, tmp_path, capsys):
    args = _index(site, tmp_path / "index", tiny_checkpoint, "--iiif", site.url("bad/manifest.json"),
                  "--iiif-timeout-s", "0.5", "--iiif-retries", "0", "--iiif-max-mb", "0.5")
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert "1 bad record " in err and site.url("bad/canvas/1") in err and "HTTP 404" in err  # listing stops first
    assert cli_main(args + ["--skip-bad"]) == 0
    captured = capsys.readouterr()
    assert "added 1 images (0 already indexed, 4 bad skipped)" in captured.out
    skipped = {line.removeprefix("skipped: ").split(": ")[0]: line for line in captured.err.splitlines()
               if line.startswith("skipped: ")}
    assert set(skipped) == {site.url(f"bad/canvas/{n}") for n in (1, 2, 3, 4)}
    assert "info.json: HTTP 404" in skipped[site.url("bad/canvas/1")]
    assert "default.jpg: HTTP 404" in skipped[site.url("bad/canvas/2")]
    assert "timed out" in skipped[site.url("bad/canvas/3")]
    assert "exceeds the limit of 524288 bytes" in skipped[site.url("bad/canvas/4")]
    assert Retriever.load(tmp_path / "index", checkpoint=tiny_checkpoint).index.image_ids == [site.url("bad/canvas/0")]


def test_cli_refuses_an_invalid_manifest_naming_it(site, tiny_checkpoint, tmp_path, capsys):
    for path, message in (("broken.json", "not JSON"), ("notiiif.json", "not a IIIF Presentation document")):
        assert cli_main(_index(site, tmp_path / "index", tiny_checkpoint, "--iiif", site.url(path))) == 2
        err = capsys.readouterr().err
        assert site.url(path) in err and message in err


@pytest.mark.slow
def test_ray_indexes_iiif_canvases_as_the_single_process_does(site, tiny_checkpoint, tmp_path, capsys):
    pytest.importorskip("ray.data")
    local = tmp_path / "local"
    assert cli_main(_index(site, local, tiny_checkpoint, "--iiif", site.url("collection.json"))) == 0
    on_ray = tmp_path / "ray"
    assert cli_main(_index(site, on_ray, tiny_checkpoint, "--iiif", site.url("collection.json"), "--ray",
                           "--cpus-per-worker", "0.5", "--cpus-per-task", "0.5", "--stall-timeout-s", "120")) == 0
    one, two = (Retriever.load(p, checkpoint=tiny_checkpoint) for p in (local, on_ray))
    assert sorted(one.index.image_ids) == sorted(two.index.image_ids)
    for canvas in one.index.image_ids:
        assert one.image_payload(canvas) == two.image_payload(canvas)
    assert [h.id for h in one.search_images("丝绸", k=5)] == [h.id for h in two.search_images("丝绸", k=5)]


def test_a_batch_fetches_its_iiif_images_concurrently(site):
    """The prepare stage opens a batch's refs with engine.sources.open_all: 4 images from a server that answers
    each after SLOW_S seconds arrive together, not one after another."""
    from engine.sources import ImageRef, open_all
    from iiif_server import SLOW_S

    url = site.url("slow/img/full/600,400/0/default.jpg")
    fetch = {"timeout_s": 4 * SLOW_S + 10, "retries": 0, "max_bytes": 1 << 24, "concurrency": 4}
    refs = [ImageRef(f"c{i}", f"c{i}", json.dumps({"url": url, "fetch": fetch}), "iiif") for i in range(4)]
    started = time.perf_counter()
    opened = open_all(refs)
    assert all(isinstance(data, bytes) and data[:2] == b"\xff\xd8" for data in opened), opened
    assert time.perf_counter() - started < 2.5 * SLOW_S  # one after another: 4 x SLOW_S
