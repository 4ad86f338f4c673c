"""The peer heartbeat (dtrain/heartbeat.py): a rank exits when the next one stops, or the job's store
does, and not while its peer is busy, the whole job is suspended, or the store's host has died."""

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
    return subprocess.Popen(
        [sys.executable, "-c", script, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def job(busy_s: float):
    """A store and two ranks beating on it (a timeout of 1 s)."""
    port = free_port()
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    store = start(STORE, port, env=env)
    assert store.stdout.readline().strip() == "serving"
    ranks = [start(RANK, rank, busy_s, env=env) for rank in (0, 1)]
    assert [r.stdout.readline().strip() for r in ranks] == ["beating"] * 2
    return store, ranks


def signal_all(processes, number):
    for process in processes:
        process.send_signal(number)  # skips one already reaped


def test_a_rank_exits_when_its_peer_stops_but_not_while_it_is_busy_or_the_job_is_suspended():
    store, ranks = job(busy_s=3)
    try:
        # three timeouts in a "long step": both keep beating from their own thread
        assert [r.stdout.readline().strip() for r in ranks] == ["busy done"] * 2
        # the whole job suspended for three timeouts (SLURM's suspend, a paused container)
        signal_all([store, *ranks], signal.SIGSTOP)
        time.sleep(3)
        signal_all([store, *ranks], signal.SIGCONT)
        time.sleep(2)
        assert all(r.poll() is None for r in ranks), [r.stderr.read() for r in ranks if r.poll() is not None]
        ranks[1].send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        assert ranks[0].wait(timeout=30) == 1
        assert time.monotonic() - stopped < 5  # a timeout of 1 s and two beats, not a collective's 600 s
        assert "rank 0: no heartbeat from rank 1 for" in ranks[0].stderr.read()
    finally:
        signal_all([store, *ranks], signal.SIGKILL)


def test_a_stopped_store_ends_every_rank_and_a_dead_one_turns_the_heartbeat_off():
    store, ranks = job(busy_s=0)
    try:  # the node that hosts the store froze: its requests block, and every rank leaves
        store.send_signal(signal.SIGSTOP)
        assert [r.wait(timeout=30) for r in ranks] == [1, 1]
        assert all("a request to the job's store has not been answered for" in r.stderr.read() for r in ranks)
    finally:
        signal_all([store, *ranks], signal.SIGKILL)
    store, ranks = job(busy_s=0)
    try:  # its host died (torchrun's agent): not a hang; the lost agent is dtrain/preempt.py's to handle
        store.kill()
        time.sleep(3)
        assert all(r.poll() is None for r in ranks)
    finally:
        signal_all([store, *ranks], signal.SIGKILL)
    assert all("the job's store failed" in r.stderr.read() for r in ranks)


def test_one_rank_or_a_timeout_of_zero_starts_no_heartbeat():
    from dtrain.heartbeat import PeerHeartbeat

    assert PeerHeartbeat.for_job(0, 1, 60) is None
    assert PeerHeartbeat.for_job(0, 2, 0) is None
