"""Numbers of a load session: percentiles, throughput, memory; as text and as JSON."""
from __future__ import annotations

import math
from typing import Any

from .memory import MIB, MemorySample
from .session import LoadReport, RunReport


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (p in (0, 100]); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def run_numbers(run: RunReport) -> dict[str, Any]:
    res = run.result
    done = res.completed
    ttft = [r.ttft_s for r in done if r.ttft_s is not None]
    total = [r.total_s for r in done]
    fast = [r.total_s for r in done if not r.plan.slow]
    tpot = [(r.total_s - r.ttft_s) / (r.tokens - 1) for r in done if r.ttft_s is not None and r.tokens > 1]
    slow = [r for r in res.streams if r.plan.slow]
    return {
        "streams": len(res.streams),
        "completed": len(done),
        "cancelled": sum(r.cancelled for r in res.streams),
        "errors": len(res.errors),
        "tokens": res.tokens,
        "wall_s": res.wall_s,
        "tokens_per_s": res.tokens / res.wall_s if res.wall_s > 0 else None,
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p99_s": percentile(ttft, 99),
        "latency_p50_s": percentile(total, 50),
        "latency_p99_s": percentile(total, 99),
        "tpot_p50_s": percentile(tpot, 50),  # time per output token after the first, per stream
        "fast_latency_max_s": max(fast) if fast else None,
        "slow_streams": [{"tokens": r.tokens, "messages": r.messages, "total_s": r.total_s,
                          "finish": r.finish.value if r.finish else None} for r in slow],
        "idle_after_s": run.idle_after_s,
        "server_codes": run.codes,
        "rss_mib": _mib(run.memory),
        "server_cpu_s": _cpu(run),
    }


def _cpu(run: RunReport) -> dict[str, float] | None:
    """CPU seconds the server spent on the run: its own process (gRPC front end) and the rest of
    its tree (the engine-core process and EP ranks; with server.engine_process=false, 0)."""
    if run.memory is None or run.before is None:
        return None
    front = run.memory.cpu_s - run.before.cpu_s
    return {"front_end": front, "engine": (run.memory.tree_cpu_s - run.before.tree_cpu_s) - front}


def _mib(sample: MemorySample | None) -> dict[str, float] | None:
    if sample is None:
        return None
    return {"server": sample.rss_bytes / MIB, "with_workers": sample.tree_rss_bytes / MIB,
            "server_peak": sample.peak_rss_bytes / MIB}


def to_json(report: LoadReport) -> dict[str, Any]:
    v = report.memory_verdict
    return {
        "spec": vars(report.spec),
        "runs": [run_numbers(r) for r in report.runs],
        "rss_ready_mib": _mib(report.ready_memory),
        "memory": None if v is None else {
            "baseline_mib": v.baseline_bytes / MIB, "final_mib": v.final_bytes / MIB,
            "growth_mib": v.growth_bytes / MIB, "tolerance_mib": v.tolerance_bytes / MIB, "ok": v.ok,
        },
        "in_process": None if report.in_process is None else [
            {"tokens": r.tokens, "wall_s": r.wall_s, "tokens_per_s": r.tokens_per_s, "ttft_p50_s": r.ttft_p50_s,
             "tpot_p50_s": r.tpot_p50_s}
            for r in report.in_process],
        "served_over_in_process": _ratio(report),
        "ok": report.ok,
        "failures": report.failures,
    }


def _ratio(report: LoadReport) -> float | None:
    """Served tokens/s of the last run over in-process tokens/s of the last run (both warm)."""
    if not report.in_process or not report.runs:
        return None
    served = run_numbers(report.runs[-1])["tokens_per_s"]
    engine = report.in_process[-1].tokens_per_s
    return served / engine if served and engine else None


def _s(value: float | None, unit: str = "s") -> str:
    return "-" if value is None else f"{value:.3f} {unit}"


def _ms(value: float | None) -> str:
    """Per-token times are a millisecond or two on a GPU: seconds to 3 places cannot tell 1.0 from 1.4."""
    return "-" if value is None else f"{value * 1e3:.2f} ms"


def to_text(report: LoadReport) -> str:
    spec, lines = report.spec, []
    lines.append(f"epserve-load: {spec.streams} streams x {spec.new_tokens} tokens (prompt {spec.prompt_tokens} ids, "
                 f"cancel {spec.cancel_fraction:.0%}, slow readers {spec.slow_readers}, seed {spec.seed})")
    if report.ready_memory:
        lines.append(f"  server RSS when ready: {report.ready_memory.tree_rss_bytes / MIB:.1f} MiB (with workers)")
    for n, run in enumerate(report.runs, 1):
        x = run_numbers(run)
        tag = " (warm-up)" if n == 1 and len(report.runs) > 1 else ""
        lines.append(f"  run {n}{tag}: {x['completed']} completed, {x['cancelled']} cancelled, {x['errors']} errors; "
                     f"{x['tokens']} tokens in {x['wall_s']:.2f} s = {x['tokens_per_s']:.1f} tokens/s")
        lines.append(f"    TTFT p50 {_s(x['ttft_p50_s'])}, p99 {_s(x['ttft_p99_s'])}; "
                     f"stream latency p50 {_s(x['latency_p50_s'])}, p99 {_s(x['latency_p99_s'])}")
        for s in x["slow_streams"]:
            lines.append(f"    slow reader: {s['tokens']} tokens in {s['messages']} messages, {s['total_s']:.2f} s, "
                         f"finish {s['finish']}")
        idle = "not idle!" if run.idle_after_s is None else f"idle after {run.idle_after_s:.2f} s"
        mem = f", RSS {x['rss_mib']['with_workers']:.1f} MiB" if x["rss_mib"] else ""
        if x["server_cpu_s"]:
            mem += (f", CPU {x['server_cpu_s']['front_end']:.2f} s front end + "
                    f"{x['server_cpu_s']['engine']:.2f} s engine core")
        lines.append(f"    server: {idle}, calls {x['server_codes']}{mem}")
    v = report.memory_verdict
    if v is not None:
        lines.append(f"  memory: {v.baseline_bytes / MIB:.1f} MiB after run 1 -> {v.final_bytes / MIB:.1f} MiB after "
                     f"run {len(report.runs)} ({v.growth_bytes / MIB:+.1f} MiB; tolerance "
                     f"{v.tolerance_bytes / MIB:.1f} MiB): {'back to baseline' if v.ok else 'GREW'}")
    if report.in_process:
        engine, served = report.in_process[-1], run_numbers(report.runs[-1]) if report.runs else None
        lines.append(f"  in-process engine (same prompts, last run): {engine.tokens} tokens in {engine.wall_s:.2f} s = "
                     f"{engine.tokens_per_s:.1f} tokens/s, TTFT p50 {_s(engine.ttft_p50_s)}, "
                     f"time per output token p50 {_ms(engine.tpot_p50_s)}")
        if served:
            lines.append(f"  served / in-process: {served['tokens_per_s']:.1f} / {engine.tokens_per_s:.1f} tokens/s = "
                         f"{_ratio(report):.2f}; TTFT p50 {_s(served['ttft_p50_s'])} vs {_s(engine.ttft_p50_s)}; "
                         f"time per output token p50 {_ms(served['tpot_p50_s'])} vs {_ms(engine.tpot_p50_s)}")
    lines.append("PASS" if report.ok else "FAIL:\n  " + "\n  ".join(report.failures))
    return "\n".join(lines)
