"""The benchmark's report logic without a server: failed requests are counted by kind and named."""

import os
import subprocess
import sys
import time
from collections import Counter

import httpx
import numpy as np
import pytest

from bench.load import CpuMeter, combine_rounds, error_kind, summarize
from bench.report import markdown


def test_failed_requests_are_reported_by_kind():
    kinds = Counter()
    kinds['HTTP 503: {"error":"overloaded"}'] += 2  # as bench.load.classify names a 503
    kinds[error_kind(httpx.ReadTimeout("timed out"))] += 1
    server = [{"timing_ms": {"queue": 1.0, "inference": 5.0, "total": 7.0}, "batch_size": 1,
               "memory": {"peak_rss_mb": 300.0}}] * 3
    level = {**summarize([10.0, 12.0, 30.0], kinds, 1.0, server), "client": "python", "client_cpu_cores": 0.1}
    assert level["errors"] == 3 and level["requests"] == 3 and level["throughput_img_s"] == 3.0
    assert level["rejected_503"] == 2 and level["rejected_share"] == round(2 / 6, 4)
    assert level["error_kinds"] == {'HTTP 503: {"error":"overloaded"}': 2, "ReadTimeout: timed out": 1}
    assert error_kind(httpx.ConnectError("")) == "ConnectError"
    result = {"hardware": "test CPU", "images": 3, "duration_s": 1.0, "baselines": {},
              "runs": {"service-int8": {"kind": "service", "variant": "int8", "provider": "CPUExecutionProvider",
                                        "python": {"64": level}}}}
    page = markdown(result)
    assert "| 64 | python | 3.0 |" in page
    assert '- python c=64: 2 x HTTP 503: {"error":"overloaded"}' in page and "- python c=64: 1 x ReadTimeout: timed out" in page


def test_rounds_combine_into_one_level():
    """c=1 runs in short interleaved rounds: counts add up, percentiles are the rounds' median,
    the server's timings are averaged over every answer, memory is the highest."""
    def server(inference, rss):
        return [{"timing_ms": {"queue": 0.1, "inference": inference, "total": inference + 2}, "batch_size": 1,
                 "memory": {"peak_rss_mb": rss}}]

    rounds = [{**summarize(lat, Counter(errs), 1.0, server(inf, rss) * len(lat)), "client": "python", "client_cpu_cores": 0.1}
              for lat, errs, inf, rss in (([9.0, 10.0], {}, 6.0, 200.0), ([20.0], {"HTTP 503": 1}, 9.0, 210.0),
                                          ([8.0, 8.0, 8.0], {}, 5.0, 190.0))]
    level = combine_rounds(rounds)
    assert level["requests"] == 6 and level["errors"] == 1 and level["rejected_503"] == 1 and level["rounds"] == 3
    assert level["seconds"] == 3.0 and level["throughput_img_s"] == 2.0 and level["rejected_share"] == round(1 / 7, 4)
    assert level["p50"] == 9.5 and level["max"] == 20.0  # median of 9.5, 20, 8; the highest single answer
    assert level["server_inference_ms"] == round((6 * 2 + 9 + 5 * 3) / 6, 3) and level["peak_rss_mb"] == 210.0
    assert level["error_kinds"] == {"HTTP 503": 1} and rounds[0]["requests"] == 2  # the rounds are left as they were


def test_cpu_meter_counts_the_server_tree_and_rounds_add_up():
    """The bench's server CPU per answer: utime + stime of the server's process tree over the level
    (here this test's process and a live child, each busy for 0.3 s of CPU), and the idle share."""
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\n"
    meter = CpuMeter(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", burn + "print('burnt', flush=True)\ntime.sleep(30)"],
                             stdout=subprocess.PIPE, text=True)
    try:
        exec(burn)
        assert child.stdout.readline().strip() == "burnt"
        level = meter.add_to({"requests": 8, "rejected_503": 2})
    finally:
        child.kill()
        child.wait()
    assert 0.55 <= level["server_cpu_s"] <= 10 and 0 <= level["idle_share"] <= 1  # both, not only this one
    assert level["server_cpu_ms_per_answer"] == round(level["server_cpu_s"] * 1000 / 10, 2)
    assert CpuMeter(None).add_to({"requests": 1}) == {"requests": 1}  # --url: no process, no figure

    def rnd(cpu_s, n, idle, total):
        return {**summarize([5.0] * n, Counter(), 1.0, []), "client": "native", "client_cpu_cores": 0.0,
                "server_cpu_s": cpu_s, "cpu_idle_ticks": idle, "cpu_total_ticks": total}

    level = combine_rounds([rnd(1.0, 10, 5, 100), rnd(3.0, 10, 15, 100)])
    assert level["server_cpu_ms_per_answer"] == 200.0 and level["idle_share"] == 0.1 and level["server_cpu_s"] == 4.0
    result = {"hardware": "test CPU", "images": 1, "duration_s": 1.0, "baselines": {},
              "runs": {"service-int8": {"kind": "service", "variant": "int8", "provider": "CPUExecutionProvider",
                                        "native": {"1": level}}}}
    assert "| 200.0 | 10.0% |" in markdown(result)


def test_bench_cli_refuses_bad_arguments_with_one_line_before_any_slow_step(capsys):
    """An unknown variant, a URL where no service answers, bad levels: exit 2 with one line on
    stderr, at once (before the baselines, which take a minute)."""
    import socket
    import time

    from bench.cli import main
    from bench.servers import ROOT

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    model = str(ROOT / "models" / "nin-fashion-mnist")
    for argv, says in ((["--variants", "int9,fp32"], "int9 not in"), (["--variants", ","], "no variant named"),
                       (["--url", f"http://127.0.0.1:{closed}"], "no NiN service answers"),
                       (["--python-concurrency", "0"], "concurrency levels must be positive")):
        t = time.perf_counter()
        assert main(["--model", model, "--native-concurrency", "", *argv]) == 2
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1 and err.startswith("error: "), err
        assert time.perf_counter() - t < 5


def test_breakdown_phases_from_both_servers_own_clocks(client, served_model, monkeypatch):
    """bench.breakdown's two halves in process: the service's timing_ms (a real answer of the
    whole service through ASGI) and the reference's Server-Timing (bench/reference_timed.py: the
    reference app with its clocks), each split into before / inference / after / outside."""
    import importlib

    from starlette.testclient import TestClient

    from bench.breakdown import PHASES, phases_of, server_timing, table
    from serving import page

    png = (page.SAMPLES / "test0000-ankle-boot.png").read_bytes()
    answer = client.post("/classify", files={"image": ("a.png", png, "image/png")})
    t = answer.json()["timing_ms"]
    service = phases_of("service", answer, t["total"] + 2.0)
    assert service["inference"] == t["inference"] and service["in_app"] == pytest.approx(t["total"])
    assert service["before"] == pytest.approx(t["read"] + t["decode"] + t["preprocess"] + t["queue"])
    assert service["after"] >= 0 and service["outside"] == pytest.approx(2.0)

    monkeypatch.setenv("NIN_REF_MODEL", str(served_model))
    monkeypatch.setenv("NIN_REF_VARIANT", "int8")
    for name in ("bench.reference_timed", "bench.reference"):  # both read the model at import
        sys.modules.pop(name, None)
    timed = importlib.import_module("bench.reference_timed")
    try:
        with TestClient(timed.app) as ref:
            r = ref.post("/classify", files={"image": ("a.png", png, "image/png")})
            assert r.status_code == 200 and r.json()["label"] == answer.json()["label"]
            clocks = server_timing(r.headers["server-timing"])
            assert set(clocks) == {"before", "inference", "after"} and all(v > 0 for v in clocks.values())
            assert ref.get("/readyz").status_code == 200 and "server-timing" not in ref.get("/readyz").headers
        reference = phases_of("reference", r, 50.0)
        assert reference["in_app"] == pytest.approx(sum(clocks.values()))
        assert reference["outside"] == pytest.approx(50.0 - reference["in_app"])
    finally:
        for name in ("bench.reference_timed", "bench.reference"):
            sys.modules.pop(name, None)
    assert server_timing("before;dur=0.8, inference;dur=6.25") == {"before": 0.8, "inference": 6.25}
    row = {p: 1.0 for p in PHASES} | {"requests": 3}
    assert "| int8 | service | 1.00 | 1.00 |" in table({"int8": {"service": row, "reference": row}})


def test_breakdown_cli_refuses_bad_arguments_with_one_line(capsys, tmp_path):
    from bench.breakdown import main

    for argv, says in ((["--variants", "fp16"], "--variants takes int8"), (["--rounds", "0"], "must be positive"),
                       (["--model", str(tmp_path)], "no exported model")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1 and err.startswith("error: "), err


def test_ab_takes_medians_over_rounds_and_names_failures():
    from bench.ab import markdown, median_level

    rounds = [dict(p50=3.0, p90=4, p99=5, mean=3.1, throughput_img_s=300.0, rejected_share=0.0, server_cpu_ms_per_answer=6.0,
                   errors=0, rejected_503=0, error_kinds={}),
              dict(p50=4.0, p90=5, p99=9, mean=4.2, throughput_img_s=250.0, rejected_share=0.1, server_cpu_ms_per_answer=7.0,
                   errors=12, rejected_503=10, error_kinds={"HTTP 503": 10, "HTTP 429": 2}),
              dict(p50=3.5, p90=4, p99=6, mean=3.6, throughput_img_s=280.0, rejected_share=0.0, server_cpu_ms_per_answer=6.5,
                   errors=0, rejected_503=0, error_kinds={})]
    level = median_level(rounds)
    assert level["p50"] == 3.5 and level["throughput_img_s"] == 280.0 and level["p99"] == 6
    assert level["errors"] == 2 and level["error_kinds"] == ["HTTP 429", "HTTP 503"] and len(level["rounds"]) == 3
    table = markdown({"variant": "int8", "hardware": "2-core test CPU", "rounds": 3, "duration_s": 5, "levels": [1],
                      "arms": {"service": {"1": level}}, "in_process": {"batch1_ms": 1.5, "best_img_s": 900.0, "best_batch": 16}})
    assert "| service | 3.5 | 280.0 [2 failed: HTTP 429, HTTP 503] | 6 |" in table and "batch 1 1.5 ms" in table


def test_ab_pairs_the_first_arm_with_each_other_by_round():
    """The verdict a noisy VM allows: round by round against each peer, not medians alone."""
    from bench.ab import markdown, median_level, paired

    def level(*p50s):
        return median_level([dict(p50=p, p90=p, p99=p, mean=p, throughput_img_s=1000 / p, rejected_share=0.0, errors=0,
                                  rejected_503=0) for p in p50s])

    service, peer = level(3.0, 5.0, 4.0), level(3.5, 4.8, 4.5)
    d = paired(service["rounds"], peer["rounds"])
    assert d == {"p50_diff_ms": -0.5, "behind": 1, "rounds": 3, "img_s_ratio": 1.125}  # rounds: 3.5/3, 4.8/5, 4.5/4
    table = markdown({"variant": "int8", "hardware": "2-core test CPU", "rounds": 3, "duration_s": 5, "levels": [1],
                      "arms": {"service": {"1": service}, "peer": {"1": peer}}, "in_process": None})
    assert "| peer | -0.50, 1 of 3 | 1.12 |" in table


def test_ab_refuses_bad_arguments_in_one_line(capsys):
    from bench.ab import main

    assert main(["--arms", "service,nginx"]) == 2
    assert main(["--levels", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error: bad arguments") for line in err) and "nginx" in err[0]


def test_layers_refuses_a_bad_call_count_in_one_line(capsys):
    from bench.layers import main

    assert main(["--calls", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --calls must be at least 100, got 0"


def test_null_model_has_the_contract_and_costs_next_to_nothing(tmp_path):
    """bench/null_model.py: the service loads it like the shipped model (card checked, same input
    and output), and it answers in a small fraction of the model's time."""
    import dataclasses

    from bench.null_model import make_null_model
    from bench.servers import ROOT
    from serving.engine import Engine, Settings

    shipped = ROOT / "models" / "nin-fashion-mnist"
    folder = make_null_model(tmp_path / "null", shipped)
    real = Engine(dataclasses.replace(Settings(), model=str(shipped), variant="int8", lanes=0))
    null = Engine(dataclasses.replace(Settings(), model=str(folder), variant="int8", lanes=0))
    assert null.contract == real.contract and null.class_names == real.class_names
    x = np.random.default_rng(0).random((3, 1, 224, 224), dtype=np.float32)
    assert null.run(x)[0].shape == real.run(x)[0].shape == (3, 10)

    def best_ms(engine):
        times = []
        for _ in range(20):
            t = time.perf_counter()
            engine.run(x[:1])
            times.append(time.perf_counter() - t)
        return min(times) * 1000

    assert best_ms(null) < best_ms(real) / 5


def test_ab_reports_server_cpu_per_image_for_batch_arms():
    from bench.ab import ARMS, markdown, median_level

    assert ARMS["batch16"][2] == "/classify_batch" and ARMS["batch16"][5] == 16
    assert ARMS["workers-2"][1]["NIN_WORKERS"] == "2"
    level = median_level([dict(p50=10.0, p90=11, p99=12, mean=10.0, throughput_img_s=1600.0, rejected_share=0.0,
                               server_cpu_ms_per_answer=9.6, server_cpu_ms_per_image=0.6, errors=0, rejected_503=0)])
    table = markdown({"variant": "int8", "null_model": True, "hardware": "2-core test CPU", "rounds": 1, "duration_s": 5,
                      "levels": [16], "arms": {"batch16": {"16": level}}, "in_process": None})
    assert "null model" in table and "| batch16 | 0.6 |" in table
