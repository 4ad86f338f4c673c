"""The peer heartbeat (dtrain/heartbeat.py): a rank exits when the next one stops, or the job's store
does, and not while its peer is merely busy."""
import os
import signal
import subprocess
import sys
import time

from loopback_nodes import free_port

RANK = """
import os, sys, time
from dtrain.heartbeat import PeerHeartbeat
heartbeat = PeerHeartbeat.for_job(int(sys.argv[1]), 2, 1.0)
print("beating", flush=True)
time.sleep(float(sys.argv[2]))  # busy: a long save or step holds the main thread, not the beat
print("busy done", flush=True)
time.sleep(60)
"""
STORE = """
import sys, time, torch.distributed as dist
store = dist.TCPStore("127.0.0.1", int(sys.argv[1]), is_master=True, wait_for_workers=False)
print("serving", flush=True)
time.sleep(120)
"""


def start(script, *args, env):
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def test_a_rank_exits_when_its_peer_stops_or_the_store_stops_but_not_while_the_peer_is_busy():
    port = free_port()
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    store = start(STORE, port, env=env)
    ranks = []
    try:
        assert store.stdout.readline().strip() == "serving"
        ranks = [start(RANK, rank, 3, env=env) for rank in (0, 1)]
        assert [r.stdout.readline().strip() for r in ranks] == ["beating"] * 2
        # three timeouts in a "long step": both keep beating from their own thread
        assert [r.stdout.readline().strip() for r in ranks] == ["busy done"] * 2
        assert all(r.poll() is None for r in ranks)
        os.kill(ranks[1].pid, signal.SIGSTOP)
        stopped = time.monotonic()
        assert ranks[0].wait(timeout=30) == 1
        assert time.monotonic() - stopped < 5  # a timeout of 1 s and a beat, not a collective's 600 s
        assert "rank 0: no heartbeat from rank 1 for" in ranks[0].stderr.read()

        # the store stopped (the node that hosts it froze): its requests block, every rank leaves
        os.kill(ranks[1].pid, signal.SIGKILL)
        ranks = [start(RANK, rank, 0, env=env) for rank in (0, 1)]
        assert [r.stdout.readline().strip() for r in ranks] == ["beating"] * 2
        os.kill(store.pid, signal.SIGSTOP)
        assert [r.wait(timeout=30) for r in ranks] == [1, 1]
        assert all("or the job's store is" in r.stderr.read() for r in ranks)
    finally:
        for process in [store, *ranks]:
            process.kill()


def test_one_rank_or_a_timeout_of_zero_starts_no_heartbeat():
    from dtrain.heartbeat import PeerHeartbeat

    assert PeerHeartbeat.for_job(0, 1, 60) is None
    assert PeerHeartbeat.for_job(0, 2, 0) is None
