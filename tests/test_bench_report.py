"""The benchmark's report logic without a server: failed requests are counted by kind and named."""

from collections import Counter

import httpx

from bench.load import error_kind, summarize
from bench.report import markdown


def test_failed_requests_are_reported_by_kind():
    kinds = Counter()
    kinds[error_kind(httpx.Response(503, text='{"error":"overloaded"}'))] += 2
    kinds[error_kind(None, httpx.ReadTimeout("timed out"))] += 1
    server = [{"timing_ms": {"queue": 1.0, "inference": 5.0, "total": 7.0}, "batch_size": 1,
               "memory": {"peak_rss_mb": 300.0}}] * 3
    level = {**summarize([10.0, 12.0, 30.0], kinds, 1.0, server), "client": "python", "client_cpu_cores": 0.1}
    assert level["errors"] == 3 and level["requests"] == 3 and level["throughput_img_s"] == 3.0
    assert level["rejected_503"] == 2 and level["rejected_share"] == round(2 / 6, 4)
    assert level["error_kinds"] == {'HTTP 503: {"error":"overloaded"}': 2, "ReadTimeout: timed out": 1}
    assert error_kind(None, httpx.ConnectError("")) == "ConnectError"
    result = {"hardware": "test CPU", "images": 3, "duration_s": 1.0, "baselines": {},
              "runs": {"service-int8": {"kind": "service", "variant": "int8", "provider": "CPUExecutionProvider",
                                        "python": {"64": level}}}}
    page = markdown(result)
    assert "| 64 | python | 3.0 |" in page
    assert '- python c=64: 2 x HTTP 503: {"error":"overloaded"}' in page and "- python c=64: 1 x ReadTimeout: timed out" in page
