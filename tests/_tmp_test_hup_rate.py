import signal, time, sys
sys.path.insert(0, "/work/main/tests")
import pytest
from test_uvicorn import *  # noqa

@pytest.mark.kernel
def test_hup_rate(supervisor, instances):
    sup, _, primary, _ = start_pair(supervisor, instances, CONFIGS["w2"])
    host, port = target(sup)
    steps = []
    with Load(host, port, concurrency=CONCURRENCY, duration=120) as load:
        time.sleep(0.3)
        for i in range(10):
            before = set(uvicorn_workers(primary.proc.pid))
            steps.append(Step("hup", time.monotonic()))
            primary.signal(signal.SIGHUP)
            wait_for(lambda: not (set(uvicorn_workers(primary.proc.pid)) & before), 30)
            time.sleep(0.3)
    rep = TracedReport(load.result, steps)
    print("\n", rep)
    for s in steps:
        print([ (round(a - s.at,3), round(b - s.at,3), k) for a,b,k in rep.failures_of(s)])
