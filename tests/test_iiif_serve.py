"""The server's IIIF side: POST /v1/index/iiif from the generated level-0 site (tests/iiif_server.py), IIIF links
in search hits, and the Content Search 2.0 service and manifests, validated against the specification's JSON shapes
(Search 2.0 AnnotationPage / AnnotationCollection, Presentation 3 Manifest with a SearchService2)."""
from __future__ import annotations

import time
from types import SimpleNamespace
from urllib.parse import quote

import jsonschema
import pytest
from fastapi.testclient import TestClient

from engine.errors import InputError
from engine.iiif.search_service import SEARCH_CONTEXT, manifest_key, search_page
from engine.laclip import LaclipConfig
from engine.serve.__main__ import build_parser, config_from_args
from engine.serve.app import create_app
from engine.serve.core import ServeConfig, ServerCore
from engine.serve.guards import AccessPolicy
from engine.serve.metrics import ServerMetrics
from iiif_server import start_site, stop_site

KEY = "iiif-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
VIEWER = "https://viewer.example/?manifest={manifest}&canvas={canvas}"

_REF = {"type": "object", "required": ["id", "type"], "properties": {"id": {"type": "string"},
                                                                     "type": {"const": "AnnotationPage"}}}
_LANGUAGE_MAP = {"type": "object", "additionalProperties": {"type": "array", "items": {"type": "string"}}}
_XYWH = r"^xywh=\d+,\d+,\d+,\d+$"
ANNOTATION_PAGE = {  # Content Search 2.0, section 3 (responses): an AnnotationPage of Annotations
    "type": "object",
    "required": ["@context", "id", "type", "items"],
    "properties": {
        "@context": {"const": SEARCH_CONTEXT},
        "id": {"type": "string", "format": "uri"},
        "type": {"const": "AnnotationPage"},
        "startIndex": {"type": "integer", "minimum": 0},
        "next": _REF, "prev": _REF,
        "ignored": {"type": "array", "items": {"type": "string"}},
        "partOf": {"type": "object", "required": ["id", "type"], "properties": {
            "type": {"const": "AnnotationCollection"}, "total": {"type": "integer", "minimum": 0},
            "first": _REF, "last": _REF}},
        "items": {"type": "array", "items": {
            "type": "object", "required": ["id", "type", "motivation", "body", "target"],
            "properties": {
                "type": {"const": "Annotation"}, "motivation": {"type": "string"}, "label": _LANGUAGE_MAP,
                "body": {"type": "object", "required": ["type", "value"],
                         "properties": {"type": {"const": "TextualBody"}, "value": {"type": "string"}}},
                "target": {"oneOf": [
                    {"type": "string", "pattern": r"^https?://[^#]+#" + _XYWH[1:]},
                    {"type": "object", "required": ["type", "source"], "properties": {
                        "type": {"const": "SpecificResource"},
                        "source": {"type": "object", "required": ["id", "type"],
                                   "properties": {"type": {"const": "Canvas"}}},
                        "selector": {"type": "object", "required": ["type", "value"], "properties": {
                            "type": {"const": "FragmentSelector"}, "value": {"pattern": _XYWH}}}}}]}}}},
    },
}
MANIFEST = {  # Presentation 3.0 Manifest > Canvas > AnnotationPage > painting Annotation > Image with a service
    "type": "object",
    "required": ["@context", "id", "type", "label", "items", "service"],
    "properties": {
        "@context": {"type": "array", "contains": {"const": "http://iiif.io/api/presentation/3/context.json"}},
        "type": {"const": "Manifest"}, "label": _LANGUAGE_MAP,
        "service": {"type": "array", "contains": {"type": "object", "required": ["id", "type"],
                                                  "properties": {"type": {"const": "SearchService2"}}}},
        "items": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["id", "type", "width", "height", "items"],
            "properties": {
                "type": {"const": "Canvas"}, "width": {"type": "integer"}, "height": {"type": "integer"},
                "items": {"type": "array", "items": {
                    "type": "object", "required": ["id", "type", "items"],
                    "properties": {"type": {"const": "AnnotationPage"}, "items": {"type": "array", "items": {
                        "type": "object", "required": ["id", "type", "motivation", "body", "target"],
                        "properties": {"motivation": {"const": "painting"}, "body": {
                            "type": "object", "required": ["id", "type", "service"],
                            "properties": {"type": {"const": "Image"}}}}}}}}}}}},
    },
}


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    served = start_site(tmp_path_factory.mktemp("iiif-site"))
    yield served
    stop_site(served)


@pytest.fixture(scope="module")
def client(tiny_checkpoint, tmp_path_factory):
    config = ServeConfig(model="tiny", checkpoint=str(tiny_checkpoint), index_dir=tmp_path_factory.mktemp("idx"),
                         laclip=LaclipConfig(), iiif_viewer=VIEWER)  # LACLIP: hits have crop evidence
    app = create_app(ServerCore(config), ServerMetrics(), policy=AccessPolicy(api_key=KEY))
    with TestClient(app) as test_client:
        deadline = time.monotonic() + 120
        while test_client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "the server did not get ready"
            time.sleep(0.2)
        yield test_client


@pytest.fixture(scope="module")
def indexed(client, site):
    answer = client.post("/v1/index/iiif", json={"source": site.url("collection.json")}, headers=AUTH)
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_index_route_needs_the_key_and_indexes_a_collection(client, site, indexed):
    assert client.post("/v1/index/iiif", json={"source": site.url("collection.json")}).status_code == 401
    assert sorted(indexed["added"]) == sorted([site.url(f"m3/canvas/{n}") for n in range(3)]
                                              + [site.url(f"m2/canvas/{n}") for n in range(2)])
    assert indexed["problems"] == [] and indexed["manifests"] == 2 and indexed["images"] == 5
    again = client.post("/v1/index/iiif", json={"source": site.url("collection.json")}, headers=AUTH).json()
    assert again["added"] == [] and again["already_indexed"] == 5


def test_index_route_reports_bad_canvases_and_refuses_local_files(client, site, indexed):
    refused = client.post("/v1/index/iiif", json={"source": site.url("bad/manifest.json")}, headers=AUTH)
    assert refused.status_code == 422 and site.url("bad/canvas/1") in refused.json()["detail"]
    assert client.get("/v1/info").json()["images"] == 5  # nothing added
    skipped = client.post("/v1/index/iiif", json={"source": site.url("bad/manifest.json"), "skip_bad": True},
                          headers=AUTH).json()
    # the server's default fetch policy (20 s, 20 MB) takes the slow and the big image; the 404s are reported
    assert sorted(skipped["added"]) == [site.url(f"bad/canvas/{n}") for n in (0, 3, 4)]
    assert sorted((p["file"], p["kind"]) for p in skipped["problems"]) == [
        (site.url("bad/canvas/1"), "unreachable"), (site.url("bad/canvas/2"), "undecodable")]
    for source in ("/etc/passwd", str(site.root / "m3" / "manifest.json")):
        answer = client.post("/v1/index/iiif", json={"source": source}, headers=AUTH)
        assert answer.status_code == 422 and "http(s) URL" in answer.json()["detail"]
    assert client.post("/v1/index/iiif", json={"source": site.url("notiiif.json")}, headers=AUTH).status_code == 422


def test_an_image_that_does_not_decode_is_isolated_from_its_chunk(client, site, indexed):
    answer = client.post("/v1/index/iiif", json={"source": site.url("corrupt/manifest.json"), "skip_bad": True},
                         headers=AUTH).json()
    assert answer["added"] == [site.url("corrupt/canvas/0"), site.url("corrupt/canvas/2")]
    [problem] = answer["problems"]
    assert (problem["file"], problem["kind"]) == (site.url("corrupt/canvas/1"), "undecodable")
    deleted = client.post("/v1/index/images/delete", json={"ids": answer["added"]}, headers=AUTH)
    assert deleted.status_code == 200  # the searches below count the other manifests' canvases only


def test_image_hits_carry_iiif_links_and_the_viewer_url(client, site, indexed):
    hits = client.post("/v1/search/images", json={"query": "敦煌壁画", "k": 5, "explain": False},
                       headers=AUTH).json()["hits"]
    hit = next(h for h in hits if h["id"] == site.url("m3/canvas/0"))
    links = hit["payload"]["iiif"]
    assert links["image"] == site.url("iiif3/img0/full/max/0/default.jpg")
    assert links["canvas"] == site.url("m3/canvas/0") + "#xywh=0,0,2400,1600"  # no evidence: the whole canvas
    assert links["region"] is None and links["manifest"] == site.url("m3/manifest.json")
    assert links["viewer"] == (f"https://viewer.example/?manifest={quote(site.url('m3/manifest.json'), safe='')}"
                               f"&canvas={quote(site.url('m3/canvas/0'), safe='')}")


def test_content_search_is_public_valid_and_ranked(client, site, indexed):
    answer = client.get("/iiif/search", params={"q": "敦煌壁画中的飞天"})  # no key: viewers cannot send one
    assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == "*"
    assert answer.headers["content-type"].startswith("application/ld+json")
    page = answer.json()
    jsonschema.validate(page, ANNOTATION_PAGE)
    assert page["partOf"]["total"] == 8 and len(page["items"]) == 8  # the collection's 5 + 3 of /bad
    sources = [a["target"]["source"]["id"] for a in page["items"]]
    hits = client.post("/v1/search/images", json={"query": "敦煌壁画中的飞天", "k": 8},
                       headers=AUTH).json()["hits"]
    assert sources == [h["id"] for h in hits]  # ranked by score, as the search API ranks them
    first = page["items"][0]["target"]
    assert first["source"]["partOf"][0]["type"] == "Manifest" and first["selector"]["value"].startswith("xywh=")
    assert client.get("/iiif/search", params={"q": "x", "motivation": "painting"}).json()["ignored"] == ["motivation"]


def test_search_inside_one_manifest_by_key_or_within(client, site, indexed):
    key = manifest_key(site.url("m3/manifest.json"))
    page = client.get(f"/iiif/search/{key}", params={"q": "飞天"}).json()
    jsonschema.validate(page, ANNOTATION_PAGE)
    targets = [a["target"] for a in page["items"]]
    assert sorted(t.split("#")[0] for t in targets) == [site.url(f"m3/canvas/{n}") for n in range(3)]
    explained = client.post("/v1/search/images", json={"query": "飞天", "k": 3, "explain": True, "where": {
        "manifest": site.url("m3/manifest.json")}}, headers=AUTH).json()["hits"]
    assert targets == [h["payload"]["iiif"]["canvas"] for h in explained]  # each canvas's best crop
    assert all(h["payload"]["iiif"]["region"].startswith(site.url("iiif3/img")) for h in explained)
    assert not any(t.endswith("#xywh=0,0,2400,1600") for t in targets)  # a crop, not the whole canvas
    within = client.get("/iiif/search", params={"q": "飞天", "within": site.url("m3/manifest.json")}).json()
    assert [a["target"] for a in within["items"]] == targets and "within=" in within["id"]


def test_search_errors_are_named(client, indexed):
    assert client.get("/iiif/search").status_code == 422
    assert client.get("/iiif/search", params={"q": "x", "page": 9}).status_code == 422
    assert client.get("/iiif/search/nosuchkey", params={"q": "x"}).status_code == 404
    assert client.get("/iiif/manifest/nosuchkey").status_code == 404


def test_engine_manifests_declare_the_search_service(client, site, indexed):
    key = manifest_key(site.url("m3/manifest.json"))
    answer = client.get(f"/iiif/manifest/{key}")
    assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == "*"
    manifest = answer.json()
    jsonschema.validate(manifest, MANIFEST)
    assert manifest["service"] == [{"id": f"http://testserver/iiif/search/{key}", "type": "SearchService2"}]
    assert [c["id"] for c in manifest["items"]] == [site.url(f"m3/canvas/{n}") for n in range(3)]
    body = manifest["items"][0]["items"][0]["items"][0]["body"]
    assert body["service"] == [{"id": site.url("iiif3/img0"), "type": "ImageService3", "profile": "level0"}]
    assert manifest["label"] == {"zh": ["敦煌壁画"], "en": ["Dunhuang murals"]}
    collection = client.get("/iiif/collection").json()
    assert f"http://testserver/iiif/manifest/{key}" in [m["id"] for m in collection["items"]]


def test_manifests_follow_the_index_after_a_delete(client, site, indexed):
    key = manifest_key(site.url("m3/manifest.json"))
    assert len(client.get(f"/iiif/manifest/{key}").json()["items"]) == 3
    deleted = client.post("/v1/index/images/delete", json={"ids": [site.url("m3/canvas/2")]}, headers=AUTH)
    assert deleted.status_code == 200
    assert [c["id"] for c in client.get(f"/iiif/manifest/{key}").json()["items"]] == [
        site.url("m3/canvas/0"), site.url("m3/canvas/1")]
    page = client.get(f"/iiif/search/{key}", params={"q": "飞天"}).json()
    assert sorted(a["target"].split("#")[0] for a in page["items"]) == [site.url(f"m3/canvas/{n}") for n in (0, 1)]


def test_the_viewer_flag_is_checked_and_reaches_the_config(capsys):
    parser = build_parser()
    config = config_from_args(parser, parser.parse_args(["--model", "tiny", "--in-memory", "--iiif-viewer", VIEWER]))
    assert config.iiif_viewer == VIEWER
    with pytest.raises(SystemExit):
        config_from_args(parser, parser.parse_args(["--model", "tiny", "--iiif-viewer", "javascript:alert(1)"]))
    assert "{manifest}" in capsys.readouterr().err


def test_search_pages_link_each_other_and_refuse_pages_past_the_end():
    hits = [SimpleNamespace(id=f"c{i}", score=1 - i / 100, payload={
        "title": f"canvas {i}", "iiif": {"canvas": f"https://m/c{i}#xywh=0,0,10,10", "manifest": "https://m"}})
        for i in range(45)]
    first = search_page("https://e/iiif/search", "飞天", hits, 1, page_size=20)
    last = search_page("https://e/iiif/search", "飞天", hits, 3, page_size=20)
    for page in (first, last):
        jsonschema.validate(page, ANNOTATION_PAGE)
    assert (first["partOf"]["total"], first["startIndex"], len(first["items"])) == (45, 0, 20)
    assert first["next"]["id"] == "https://e/iiif/search?q=%E9%A3%9E%E5%A4%A9&page=2" and "prev" not in first
    assert (last["startIndex"], len(last["items"]), "next" in last) == (40, 5, False)
    assert last["partOf"]["last"]["id"] == last["id"]
    with pytest.raises(InputError, match="page must be between 1 and 3"):
        search_page("https://e/iiif/search", "飞天", hits, 4, page_size=20)
