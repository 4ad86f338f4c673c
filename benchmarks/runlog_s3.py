"""Bytes and requests a run's metrics log costs on S3, measured on a loopback S3 server (moto).

    python benchmarks/runlog_s3.py [--lines 10000] [--every 100]

Writes ``--lines`` train-log lines (the size dtrain writes) through
``RunDirectory`` to an S3 run directory, shipping a part every ``--every``
lines (a checkpoint save every ``--every`` logged steps), and counts the bytes
and requests the server saw, against the final size of the log. Beside it, the
append that dtrain used before (``fs.open(path, "a")`` per line, which s3fs
turns into a download and re-upload of the whole object) for a tenth of the
lines: its traffic grows with the square of the length.

Then a month of events (``--events``, one part each, as a checkpoint every 10
minutes ships them), with the parts merged as they pile up (dtrain/log_parts.py)
and without: the objects left, bytes moved, and the requests of reading it back.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def line(step: int) -> dict:
    return {
        "epoch": step // 100,
        "kind": "train",
        "leg": "0123456789ab",
        "loss": 1.0 / (step + 1),
        "lr": 3e-4,
        "samples_per_s": 1234.5,
        "samples_seen": 16 * step,
        "step": step,
        "time": time.time(),
    }


def traffic(requests, prefix: str) -> dict:
    mine = [r for r in requests if r.path.startswith(prefix)]
    return {"requests": len(mine), "bytes_up": sum(r.sent for r in mine), "bytes_down": sum(r.received for r in mine)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=10_000)
    parser.add_argument("--every", type=int, default=100, help="lines between shipped parts (between saves)")
    parser.add_argument("--events", type=int, default=4320, help="events shipped one part each (30 days of saves)")
    args = parser.parse_args()
    import s3server

    server, endpoint = s3server.start_server()
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=endpoint,
    )
    import s3fs

    from dtrain import log_parts
    from dtrain.rundir import EVENTS, METRICS, RunDirectory, parts_of

    s3fs.S3FileSystem().mkdir("bench")

    run = RunDirectory("s3://bench/parts")
    started = time.perf_counter()
    for step in range(1, args.lines + 1):
        run.append_jsonl(METRICS, line(step))
        if step % args.every == 0:
            run.ship()
    run.ship()
    parts_s = time.perf_counter() - started
    parts = traffic(s3server.S3_REQUESTS, "/bench/parts/metrics")  # the writing, before reading it back
    size = sum(len(json.dumps(r, sort_keys=True)) + 1 for r in run.read_jsonl(METRICS))

    appended_lines = args.lines // 10
    fs = s3fs.S3FileSystem()
    s3server.S3_REQUESTS.clear()
    started = time.perf_counter()
    for step in range(1, appended_lines + 1):
        with fs.open("bench/append/metrics.jsonl", "a") as f:
            f.write(json.dumps(line(step), sort_keys=True) + "\n")
    append_s = time.perf_counter() - started
    append_size = fs.size("bench/append/metrics.jsonl")
    append = traffic(s3server.S3_REQUESTS, "/bench/append/metrics")

    events = {}
    for label, merge_at in (("merged", log_parts.MERGE_AT), ("unmerged", 10**9)):
        log_parts.MERGE_AT = merge_at
        run = RunDirectory(f"s3://bench/{label}")
        s3server.S3_REQUESTS.clear()
        started = time.perf_counter()
        for i in range(args.events):
            run.event("checkpoint", step=100 * i, directory=f"step_{100 * i:08d}", total_s=1.234, bytes=532_000_000)
        written_s, writing = time.perf_counter() - started, list(s3server.S3_REQUESTS)
        s3server.S3_REQUESTS.clear()
        started = time.perf_counter()
        records = RunDirectory(run.url).read_jsonl(EVENTS)
        assert [r["step"] for r in records] == [100 * i for i in range(args.events)]
        read_s, reading = time.perf_counter() - started, list(s3server.S3_REQUESTS)
        log_size = sum(len(json.dumps(r, sort_keys=True)) + 1 for r in records)
        events[label] = (len(run.list(parts_of(EVENTS))), log_size, writing, written_s, reading, read_s)
    server.stop()

    moved = parts["bytes_up"] + parts["bytes_down"]
    print(
        f"parts:  {args.lines} lines, a part every {args.every}: log {size / 1e6:.2f} MB, moved "
        f"{moved / 1e6:.2f} MB ({moved / size:.3f}x the log), {parts['requests']} requests, {parts_s:.1f} s"
    )
    moved = append["bytes_up"] + append["bytes_down"]
    print(
        f"append: {appended_lines} lines, one append each: log {append_size / 1e6:.2f} MB, moved "
        f"{moved / 1e6:.1f} MB ({moved / append_size:.0f}x the log), {append['requests']} requests, "
        f"{append_s:.1f} s; at {args.lines} lines about {moved * 100 / 1e9:.1f} GB (n^2)"
    )
    print(f"\n{args.events} events, one part each: | objects left | moved / log | write requests | reading it back |")
    for label, (objects, log_size, writing, written_s, reading, read_s) in events.items():
        moved = sum(r.sent + r.received for r in writing)
        print(
            f"| {label} | {objects} | {moved / log_size:.2f}x of {log_size / 1e6:.2f} MB "
            f"| {len(writing)} in {written_s:.1f} s "
            f"| {len(reading)} requests, {read_s:.2f} s |"
        )


if __name__ == "__main__":
    main()
