"""A property-based fuzzer (schemathesis) over the server's own OpenAPI document, against a real server with
a small index: no 5xx, every answer's status documented for its route, every body matching its schema.
Bounded to a CI-friendly number of examples per operation (FUZZ_EXAMPLES)."""
from __future__ import annotations

import base64
import os
import signal
from pathlib import Path

import httpx
import pytest

from conftest import SAMPLE_TEXTS, image_bytes, make_image
from engine.serve.launcher import ServerProcess

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
API_KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
FUZZ_EXAMPLES = int(os.environ.get("CNCLIP_FUZZ_EXAMPLES", "12"))
CHECKS = [schemathesis.checks.not_a_server_error, schemathesis.checks.status_code_conformance,
          schemathesis.checks.content_type_conformance, schemathesis.checks.response_schema_conformance,
          schemathesis.checks.response_headers_conformance]


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    log = tmp_path_factory.mktemp("fuzz") / "server.log"
    srv = ServerProcess(["--model", "tiny", "--in-memory", "--api-key", API_KEY, "--max-body-mb", "2",
                         "--max-pixels", "4000000"], log,
                        env={"OMP_NUM_THREADS": "1", "CNCLIP_API_KEY": None}, cwd=REPO)
    try:
        srv.wait_ready()
        with httpx.Client(base_url=srv.url, headers=AUTH, timeout=60) as c:
            c.post("/v1/index/texts", json={"texts": SAMPLE_TEXTS, "ids": [f"t{i}" for i in range(8)]})
            images = [base64.b64encode(image_bytes(make_image(90, 70, seed=i))).decode() for i in range(4)]
            c.post("/v1/index/images", json={"images": images, "ids": ["a", "b", "c", 4]}).raise_for_status()
        yield srv
    finally:
        srv.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
def api_schema(fuzz_server):
    return schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")


def test_no_5xx_no_undocumented_status_no_schema_violation(api_schema):
    failures = {}
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 15
    for operation in operations:
        @settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def fuzz(case) -> None:
            case.call_and_validate(headers=AUTH, timeout=60, checks=CHECKS)

        try:
            fuzz()
        except (Exception, BaseExceptionGroup) as exc:  # collect every operation's failure, then report them together
            failures[operation.label] = str(exc)[:2000]
    assert not failures, "\n\n".join(f"{label}:\n{text}" for label, text in failures.items())
