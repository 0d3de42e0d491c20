"""The demo's numbers: per-run summaries, the comparison, and ``report.json``.

Every figure the terminal or a plot shows is computed here from what the runs measured, and
written to ``report.json``: nothing is estimated or filled in.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

import sona
from sona.demo.simulation import DemoSettings, RunRecord
from sona.demo.world import DemoWorld, Phase

LATENCY_EDGES_US = 10.0 ** np.arange(0.0, 6.05, 0.1)
"""Ten bins per decade from 1 µs to 1 s; values outside are counted in the end bins."""


def accounting(stats: Any) -> dict[str, Any]:
    """Both accounting identities of one run (API.md), with their terms.

    ``holds``: submitted == applied + skipped + dropped + dead-lettered + in flight.
    ``consolidation_holds``: applied == consolidated + evicted + pending.
    """
    s = stats
    total = s.instant_count + s.skipped_count + s.dropped_samples + s.dead_lettered + s.in_flight
    return {
        "submitted": s.submitted_count,
        "applied": s.instant_count,
        "skipped": s.skipped_count,
        "dropped": s.dropped_samples,
        "dead_lettered": s.dead_lettered,
        "in_flight": s.in_flight,
        "holds": s.submitted_count == total,
        "consolidated": s.consolidated_count,
        "evicted": s.evicted_samples,
        "pending": s.pending_samples,
        "consolidation_holds": s.instant_count
        == s.consolidated_count + s.evicted_samples + s.pending_samples,
    }


def accounting_line(stats: Any) -> str:
    """The identity with its numbers and verdict, as the demo prints it."""
    return accounting_line_from(accounting(stats))


def consolidation_line_from(a: dict[str, Any]) -> str:
    return (
        f"applied {a['applied']} == consolidated {a['consolidated']} + evicted {a['evicted']}"
        f" + pending {a['pending']}: " + ("holds" if a["consolidation_holds"] else "DOES NOT HOLD")
    )


def accounting_line_from(a: dict[str, Any]) -> str:
    flight = f" + in flight {a['in_flight']}" if a["in_flight"] else ""
    return (
        f"submitted {a['submitted']} == applied {a['applied']} + skipped {a['skipped']}"
        f" + dropped {a['dropped']} + dead-lettered {a['dead_lettered']}{flight}: "
        + ("holds" if a["holds"] else "DOES NOT HOLD")
    )


def latency_summary(latencies_us: list[float]) -> dict[str, Any]:
    """Percentiles and a histogram on fixed log-spaced bins (the same for every run)."""
    if not latencies_us:
        return {"count": 0}
    lat = np.asarray(latencies_us, dtype=np.float64)
    counts, _ = np.histogram(np.clip(lat, LATENCY_EDGES_US[0], LATENCY_EDGES_US[-1]),
                             bins=LATENCY_EDGES_US)  # fmt: skip
    return {
        "count": int(lat.size),
        "p50_us": round(float(np.percentile(lat, 50)), 2),
        "p99_us": round(float(np.percentile(lat, 99)), 2),
        "mean_us": round(float(lat.mean()), 2),
        "max_us": round(float(lat.max()), 2),
        "histogram": {
            "edges_us": [round(float(e), 3) for e in LATENCY_EDGES_US],
            "counts": counts.tolist(),
        },
    }


MIN_GAIN_FOR_SHARE = 0.1
"""A share of the gain kept is computed only when the domain gained at least this fraction of
its room above the frozen base (1 − base quality; 0.02 at the demo's base of 0.8). Quality
moves by a few thousandths between measurements without any learning, so the share of a
smaller gain says more about that wobble than about forgetting (a gain of 0.0015 gave -300 %)."""


def min_gain_for_share(base: float) -> float:
    """The smallest gain over ``base`` whose kept share the report computes."""
    return MIN_GAIN_FOR_SHARE * (1.0 - base)


def returns(record: RunRecord, phases: list[Phase], base: list[float]) -> list[dict[str, Any]]:
    """For every phase that returns to a domain: its quality when traffic left it last time,
    when traffic comes back, and the share of its gain over the frozen base that survived
    (``None`` when the gain was too small for a share to mean anything). A run that stopped
    early (its last measurement is where it stopped) has no return it did not reach."""
    out = []
    served = record.eval_steps[-1]
    for phase in phases:
        if not phase.returning or phase.start > served:
            continue
        last = [p for p in phases if p.index < phase.index and p.domain == phase.domain][-1]
        d = phase.domain
        learned = record.quality_at(last.stop)[d]
        at_return = record.quality_at(phase.start)[d]
        gain = learned - base[d]
        out.append(
            {
                "phase_index": phase.index,
                "domain": d,
                "left_at_step": last.stop,
                "returned_at_step": phase.start,
                "quality_when_left": round(learned, 4),
                "quality_at_return": round(at_return, 4),
                "gain_over_base": round(gain, 4),
                "kept_fraction_of_gain": round((at_return - base[d]) / gain, 4)
                if gain >= min_gain_for_share(base[d])
                else None,
            }
        )
    return out


def run_summary(record: RunRecord, phases: list[Phase], world: DemoWorld) -> dict[str, Any]:
    base = world.base_quality
    final = record.quality[-1]
    deltas = record.background_quality_deltas
    return {
        "label": record.label,
        "title": record.title,
        "ewc_lambda": record.ewc_lambda,
        "seconds": round(record.seconds, 2),
        "stopped_early": record.stopped,
        "requests_served": record.eval_steps[-1],
        "final_quality": [round(q, 4) for q in final],
        "final_above_base": [bool(q > b) for q, b in zip(final, base, strict=True)],
        "best_quality": [round(max(q[d] for q in record.quality), 4) for d in range(len(base))],
        "returns": returns(record, phases, base),
        "timeline": {
            "step": record.eval_steps,
            "seconds": [round(t, 3) for t in record.eval_seconds],
            "quality": [[round(v, 4) for v in q] for q in record.quality],
        },
        "instant_latency": latency_summary(record.latencies_us),
        "accounting": accounting(record.stats),
        "stats": msgspec.to_builtins(record.stats),
        "supervisor": record.supervisor,
        "events": record.event_counts,
        "markers": record.markers,
        "feedback": record.feedback.describe(),
        "background_quality_delta": {
            "measured_runs": len(deltas),
            "median": round(float(np.median(deltas)), 4) if deltas else None,
        },
        "deep_quality_delta": [round(d, 4) for d in record.deep_quality_deltas],
    }


def comparison(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """sona against the same run without EWC, on every return to an earlier domain.

    Two questions: which run forgets less (the share of its own gain over the frozen base that
    survived until traffic came back, of which the part lost is compared: when neither run
    lost any, sona does not forget less; ``None``, unknown, when a run gained too little for a
    share), and which one serves the returning traffic better (the held-out quality at that
    moment). They can disagree: protecting what was learned can slow learning the next domain,
    so there may be less to keep.
    """
    out: dict[str, Any] = {
        "every_domain_above_base": {k: all(r["final_above_base"]) for k, r in runs.items()},
    }
    if "sona" in runs and "no-ewc" in runs:
        rows = []
        plain = {r["phase_index"]: r for r in runs["no-ewc"]["returns"]}
        ours = {r["phase_index"] for r in runs["sona"]["returns"]}
        # a return only one run reached (the other stopped early) cannot be compared
        unmatched = len(ours ^ set(plain))
        for a in runs["sona"]["returns"]:
            if a["phase_index"] not in plain:
                continue
            b = plain[a["phase_index"]]
            fa, fb = a["kept_fraction_of_gain"], b["kept_fraction_of_gain"]
            rows.append(
                {
                    "phase_index": a["phase_index"],
                    "domain": a["domain"],
                    "sona_at_return": a["quality_at_return"],
                    "no_ewc_at_return": b["quality_at_return"],
                    "sona_kept_fraction": fa,
                    "no_ewc_kept_fraction": fb,
                    "sona_higher_at_return": a["quality_at_return"] > b["quality_at_return"],
                    "sona_forgets_less": None
                    if fa is None or fb is None
                    else forgotten(fa) < forgotten(fb),
                    "neither_forgot": None if fa is None or fb is None else min(fa, fb) >= 1.0,
                }
            )
        out["returns"] = rows
        if rows or unmatched:
            unknown: list[bool | None] = [None] * unmatched
            out["sona_higher_at_every_return"] = all_of(
                [r["sona_higher_at_return"] for r in rows] + unknown
            )
            out["sona_forgets_less_on_every_return"] = all_of(
                [r["sona_forgets_less"] for r in rows] + unknown
            )
    return out


def forgotten(kept: float) -> float:
    """The share of a gain that was lost: 0 when the domain kept all of it or more (a share
    above 1 means it went on improving while traffic was away: nothing was forgotten, and a
    larger share is not "forgetting less")."""
    return max(0.0, 1.0 - kept)


def forgets_less_verdict(answer: bool | None) -> str:
    """``sona_forgets_less_on_every_return`` in words, unknown said as unknown."""
    if answer is None:
        return (
            "could not be told whether sona forgets less on every return: a run gained too "
            "little over the frozen base for its kept share to be measured, or stopped before "
            "traffic returned"
        )
    return f"sona forgets less on every return: {'yes' if answer else 'no'}"


def all_of(answers: list[bool | None]) -> bool | None:
    """ "Yes on every one" over answers that may be unknown (``None``): ``False`` as soon as
    one is no, ``None`` if none is no but one is unknown, else ``True``."""
    if any(a is False for a in answers):
        return False
    if any(a is None for a in answers):
        return None
    return True


def build(
    settings: DemoSettings,
    world: DemoWorld,
    phases: list[Phase],
    records: list[RunRecord],
    *,
    command: str,
) -> dict[str, Any]:
    runs = {r.label: run_summary(r, phases, world) for r in records}
    return {
        "sona_version": sona.__version__,
        "command": command,
        "settings": {
            "steps": settings.steps,
            "dim": settings.dim,
            "domains": settings.domains,
            "seed": settings.seed,
            "chaos": settings.chaos,
            "batch": settings.batch,
            "instant_lr": settings.instant_lr,
        },
        "world": world.describe(),
        "users": settings.users.describe(),
        "phases": [
            {
                "index": p.index,
                "domain": p.domain,
                "start": p.start,
                "stop": p.stop,
                "returning": p.returning,
            }
            for p in phases
        ],
        "base_quality": [round(q, 4) for q in world.base_quality],
        "runs": runs,
        "comparison": comparison(runs),
        "files": [],
    }


def write(report: dict[str, Any], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path
