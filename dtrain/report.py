"""The run checker: what happened to a run, from its events, metrics, samples and checkpoints.

Each start of the process group is a *leg* (a ``start`` or ``resume`` event with
an id). A leg ends with ``end`` (done), ``stop`` (a signal or --stop-at-step:
saved first) or nothing (killed or crashed). Steps a leg completed beyond the
step the next leg resumed from were lost and done again. With sample records
(``--data.record_indices=true``) the checker also counts, per epoch, how often
each sample was consumed by the steps that count (those not rolled back).
"""

from __future__ import annotations

from collections import Counter

from .goodput import format_goodput, goodput
from .rundir import METRICS, SAMPLES, RunDirectory


def check_run(run: RunDirectory | str) -> dict:
    run = run if isinstance(run, RunDirectory) else RunDirectory(run)
    run.check_holds_run()
    events = run.events()
    metrics = run.read_jsonl(METRICS)  # once: on object stores each read is a GET
    train = [
        r
        for r in metrics
        if r.get("kind") == "train" and isinstance(r.get("leg"), str) and isinstance(r.get("step"), int)
    ]
    events = [e for e in events if isinstance(e.get("step", 0), int)]
    replica_events = [e for e in events if "replica_id" in e]
    events = [e for e in events if "replica_id" not in e]
    starts = [e for e in events if e["event"] in ("start", "resume") and isinstance(e.get("leg"), str) and "step" in e]
    legs = []
    for i, start in enumerate(starts):
        later = events[events.index(start) + 1 :]
        following = starts[i + 1] if i + 1 < len(starts) else None
        ending = next(
            (
                e
                for e in later
                if e["event"] in ("end", "stop", "diverged")
                and "step" in e
                and (following is None or e["time"] <= following["time"])
            ),
            None,
        )
        # Train lines come every log_interval steps: for a killed leg this is a lower bound.
        completed = max(
            [r["step"] for r in train if r["leg"] == start["leg"]] + [ending["step"] if ending else start["step"]]
        )
        how = (
            "finished"
            if ending and ending["event"] == "end"
            else "diverged"
            if ending and ending["event"] == "diverged"
            else f"stopped ({ending.get('reason', 'asked')})"
            if ending
            else "killed"
        )
        legs.append(
            {
                "leg": start["leg"],
                "started": start["time"],
                "from_step": start["step"],
                "world_size": start.get("world_size"),
                "last_step": completed,
                "ended": how,
                "lost_steps": max(completed - following["step"], 0) if following else 0,
            }
        )
    report = {
        "run": run.url,
        "legs": legs,
        "finished": bool(legs) and legs[-1]["ended"] == "finished",
        "interruptions": len(legs) - 1 if legs else 0,
        "steps_lost": sum(leg["lost_steps"] for leg in legs),
    }
    if replica_events:
        report.update(_replica_legs(replica_events))
    report["coverage"], rolled_back = _coverage(run, legs, replica_events)
    report["steps_lost"] += rolled_back
    report["checkpoints"], last_commit = _checkpoints(run)
    report["goodput"] = None if replica_events else goodput(legs, events, metrics, last_commit)
    report["ok"] = report["checkpoints"]["unloadable"] == 0 and all(
        e["duplicates"] == 0 and e["missing"] == 0 for e in report["coverage"].values()
    )
    return report


def _replica_legs(events: list[dict]) -> dict:
    """Replica groups (docs/fault-tolerance.md): each start of a group is a leg; it began from a
    checkpoint or healed from a live peer, and ended, left on a signal, or was killed."""
    legs = []
    for i, start in enumerate(events):
        if start["event"] not in ("start", "resume", "heal"):
            continue
        later = [e for e in events[i + 1 :] if e["replica_id"] == start["replica_id"]]
        following = next((j for j, e in enumerate(later) if e["event"] in ("start", "resume", "heal")), len(later))
        ending = next((e for e in later[:following] if e["event"] in ("end", "stop", "diverged")), None)
        how = (
            "finished"
            if ending and ending["event"] == "end"
            else f"stopped ({ending.get('reason', 'asked')})"
            if ending
            else "killed"
        )
        legs.append(
            {
                "leg": start.get("leg"),
                "replica_id": start["replica_id"],
                "started": start["time"],
                "how": {"heal": "healed", "resume": "from a checkpoint"}.get(start["event"], "started"),
                "from_step": start["step"],
                "world_size": start.get("world_size"),
                "last_step": ending["step"] if ending else None,
                "ended": how,
            }
        )
    return {
        "legs": legs,
        "finished": any(leg["ended"] == "finished" for leg in legs),
        "interruptions": sum(leg["ended"] != "finished" for leg in legs),
        "heals": sum(leg["how"] == "healed" for leg in legs),
        "steps_lost": 0,
    }


def _coverage(run: RunDirectory, legs: list[dict], replica_events: list[dict]) -> tuple[dict, int]:
    """Per epoch: samples consumed by surviving steps, and duplicates/missing positions; and the
    replica groups' steps rolled back."""
    window = {}  # leg -> [first, last] steps that survived (later legs redo the rest)
    for i, leg in enumerate(legs):
        end = legs[i + 1]["from_step"] if i + 1 < len(legs) else float("inf")
        window[leg["leg"]] = (leg["from_step"], end)
    counts: dict[int, Counter] = {}
    replica_records, conflicts, rolled_back = [], 0, 0
    for name in run.logs(SAMPLES):
        for record in run.read_jsonl(f"{SAMPLES}/{name}"):
            if "replicas" in record:
                replica_records.append(record)
                continue
            first, end = window.get(record.get("leg"), (0, -1))
            if first <= record["step"] < end:
                for epoch, position in zip(record["epochs"], record["positions"]):
                    counts.setdefault(epoch, Counter())[position] += 1
    if replica_records:
        steps, conflicts, rolled_back = _replica_steps(replica_records, replica_events)
        for record in steps.values():
            for epoch, position in zip(record["epochs"], record["positions"]):
                counts.setdefault(epoch, Counter())[position] += 1
    out = {}
    last = max(counts, default=-1)
    for epoch, counter in sorted(counts.items()):
        span = max(counter) + 1
        missing = 0 if epoch == last else span - len(counter)  # the last epoch may be partial
        out[epoch] = {
            "samples": sum(counter.values()),
            "distinct": len(counter),
            "duplicates": sum(c - 1 for c in counter.values()) + conflicts,
            "missing": missing,
        }
    return out, rolled_back


def _replica_steps(records: list[dict], events: list[dict]) -> tuple[dict[int, dict], int, int]:
    """The committed steps of replica groups that count, and how many records disagree.

    Each replica group records the whole global batch of every step it committed, so a step
    survives as long as one group wrote it; the records of one step agree. A start of a replica
    group from a checkpoint (not a heal) rolls back every step at or after the checkpoint's that
    was recorded before it: nobody alive held them (dtrain/replica_trainer.py).
    """
    rollbacks = [(e["time"], e["step"]) for e in events if e["event"] in ("start", "resume")]
    steps, conflicts, rolled_back = {}, 0, set()
    for record in records:
        if any(time > record["time"] and step <= record["step"] for time, step in rollbacks):
            rolled_back.add(record["step"])
            continue
        batch = (record["epochs"], record["positions"])
        kept = steps.setdefault(record["step"], record)
        conflicts += (kept["epochs"], kept["positions"]) != batch
    return steps, conflicts, len(rolled_back)


def _checkpoints(run: RunDirectory) -> tuple[dict, int | None]:
    """The checkpoints' summary, and the newest committed step of training (None without one)."""
    catalog = run.catalog()
    listing = catalog.scan()
    bad = {m.directory: problems for m in listing.committed if (problems := catalog.problems(m))}
    trained = listing.trained
    summary = {
        "committed": len(listing.committed),
        "torn": len(listing.torn),
        "unloadable": len(bad),
        "damaged": len(listing.damaged),
        "rejected": len(listing.rejected),
        "problems": bad,
    }
    return summary, trained[-1].step if trained else None


def format_report(report: dict) -> str:
    lines = [
        f"run {report['run']}: {'finished' if report['finished'] else 'not finished'}, "
        f"{report['interruptions']} interruption(s), {report['steps_lost']} step(s) lost"
    ]
    for leg in report["legs"]:
        if "replica_id" in leg:
            lines.append(
                f"  replica {leg['replica_id']}: {leg['world_size']} rank(s), {leg['how']} at step "
                f"{leg['from_step']}, {leg['ended']}"
                + (f" at step {leg['last_step']}" if leg["last_step"] is not None else "")
            )
            continue
        lines.append(
            f"  leg {leg['leg']}: {leg['world_size']} rank(s), steps {leg['from_step']}->{leg['last_step']}, "
            f"{leg['ended']}, lost {leg['lost_steps']}"
        )
    for epoch, entry in report["coverage"].items():
        verdict = "exactly once" if not entry["duplicates"] and not entry["missing"] else "BROKEN"
        lines.append(
            f"  epoch {epoch}: {entry['samples']} samples, {entry['duplicates']} repeated, "
            f"{entry['missing']} missing: {verdict}"
        )
    if report.get("goodput"):
        lines += format_goodput(report["goodput"])
    ck = report["checkpoints"]
    lines.append(
        f"  checkpoints: {ck['committed']} committed, {ck['unloadable']} unloadable, {ck['torn']} torn, "
        f"{ck['damaged']} damaged, {ck['rejected']} quarantined"
    )
    for name, problems in ck["problems"].items():
        lines.append(f"    {name}: {'; '.join(problems)}")
    lines.append("OK" if report["ok"] else "PROBLEMS FOUND")
    return "\n".join(lines)
