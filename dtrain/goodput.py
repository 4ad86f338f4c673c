"""A run's goodput, from what it already writes: the share of its wall-clock spent on steps that
count, and where the rest went (docs/run-directory.md, "Goodput").

The categories are those of Google's ml-goodput-measurement where they apply here:

- productive: the steps that count (not rolled back), at each leg's steady step time;
- start-up: each leg from its process's start to training (imports, process group, plan, model),
  less its checkpoint load, which is its own category;
- checkpoint save: how long saves held training (each save's ``blocked_s``);
- evaluation: each validation's seconds (``eval_s`` of the eval lines);
- lost to interruptions: steps a later leg trained again, at their step time;
- between legs: no process of the run was alive (the launcher or scheduler restarting it);
- other: the rest (logging, the step boundary, slower first steps, a stop's wait).

The wall-clock runs from the first leg's process start to the run's last record. A leg's steady
step time is ``global batch / samples/s`` over its train lines after the first (which holds
first-step costs), as in ``benchmarks/goodput.py``.
"""

from __future__ import annotations

import statistics

CATEGORIES = ("start-up", "checkpoint load", "checkpoint save", "evaluation", "lost to interruptions", "between legs")


def goodput(legs: list[dict], events: list[dict], metrics: list[dict], last_commit: int | None = None) -> dict | None:
    """``legs`` as ``dtrain.report.check_run`` finds them; ``last_commit`` the newest committed step:
    a last leg that was killed keeps only the steps up to it. None without records."""
    starts = {e["leg"]: e for e in events if e["event"] in ("start", "resume") and isinstance(e.get("leg"), str)}
    times = [r["time"] for r in metrics if isinstance(r.get("time"), (int, float))]
    times += [e["time"] for e in events if isinstance(e.get("time"), (int, float))]
    if not legs or not times:
        return None
    badput = dict.fromkeys(CATEGORIES, 0.0)
    productive = 0.0
    for i, leg in enumerate(legs):
        start = starts.get(leg["leg"], {})
        batch = start.get("global_batch_size")
        rates = [r["samples_per_s"] for r in metrics if r.get("kind") == "train" and r.get("leg") == leg["leg"]]
        steady = [batch / rate for rate in (rates[1:] or rates) if rate > 0] if batch else []
        step_time = statistics.mean(steady) if steady else 0.0
        following = legs[i + 1] if i + 1 < len(legs) else None
        kept_until = min(leg["last_step"], following["from_step"]) if following else leg["last_step"]
        lost = leg["lost_steps"]
        if following is None and leg["ended"] == "killed" and last_commit is not None:
            kept_until = min(kept_until, max(last_commit, leg["from_step"]))  # the rest is not saved
            lost = leg["last_step"] - kept_until
        productive += max(kept_until - leg["from_step"], 0) * step_time
        badput["lost to interruptions"] += lost * step_time
        marks = start.get("startup", {})
        began = marks.get("process", start.get("time"))
        if began is not None and start.get("time") is not None:
            load = marks["restored"] - marks["built"] if "restored" in marks and "built" in marks else 0.0
            badput["checkpoint load"] += load
            badput["start-up"] += start["time"] - began - load
        if following is not None:
            next_marks = starts.get(following["leg"], {}).get("startup", {})
            next_began = next_marks.get("process", following["started"])
            last_seen = max((t for t in times if t < next_began), default=next_began)
            badput["between legs"] += max(next_began - last_seen, 0.0)
    first = starts.get(legs[0]["leg"], {})
    began = first.get("startup", {}).get("process", legs[0]["started"])
    wall = max(times) - began
    badput["checkpoint save"] = sum(e.get("blocked_s", 0.0) for e in events if e["event"] == "checkpoint")
    badput["evaluation"] = sum(r.get("eval_s", 0.0) for r in metrics if r.get("kind") == "eval")
    badput["other"] = wall - productive - sum(badput.values())
    return {
        "wall_s": wall,
        "productive_s": productive,
        "goodput": productive / wall if wall > 0 else 0.0,
        "badput_s": badput,
    }


def format_goodput(result: dict) -> list[str]:
    lines = [
        f"  goodput {result['goodput']:.1%}: {result['productive_s']:.1f} s of steps that count "
        f"in {result['wall_s']:.1f} s of wall-clock"
    ]
    parts = [f"{name} {seconds:.1f} s" for name, seconds in result["badput_s"].items() if abs(seconds) >= 0.05]
    if parts:
        lines.append("    badput: " + ", ".join(parts))
    return lines
