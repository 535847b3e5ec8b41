"""Compare lm-eval's per-document log-likelihoods: epserve (local-completions) against hf.

lm-eval's own summary (perplexity, acc) hides small disagreements; the per-document values of
--log_samples do not. Each run is a folder lm-eval wrote with --output_path; the table has,
per routing policy, the mean log-likelihood of both backends and the bits per byte of the
continuations it gives (the tiny model's tokens are bytes), the largest per-document
difference, and how many documents' "greedy" verdicts (lm-eval's acc) agree. Runs named in
--equal must match hf within --tolerance (the natural router serves the model's own routing);
the others (a balancing policy reroutes tokens) are reported, not judged.

    python scripts/lmeval/compare.py --hf OUT/hf --run natural=OUT/natural --run greedy_balanced=OUT/gb \
        --equal natural --tolerance 1e-4
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def samples(folder: Path) -> dict[int, tuple[float, bool, int]]:
    """doc_id -> (log-likelihood, is_greedy, continuation bytes) from the samples file lm-eval
    wrote under `folder`."""
    files = sorted(folder.rglob("samples_*.jsonl"))
    if not files:
        raise SystemExit(f"no samples_*.jsonl under {folder}: did lm-eval run with --log_samples?")
    out = {}
    for line in files[-1].read_text().splitlines():
        doc = json.loads(line)
        ll, greedy = doc["resps"][0][0]
        out[doc["doc_id"]] = (float(ll), str(greedy) == "True", len(doc["doc"]["continuation"].encode()))
    return out


def _mean_ll(docs: dict) -> float:
    return sum(v[0] for v in docs.values()) / len(docs)


def _bits_per_byte(docs: dict) -> float:
    return -sum(v[0] for v in docs.values()) / sum(v[2] for v in docs.values()) / math.log(2)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hf", type=Path, required=True)
    p.add_argument("--run", action="append", default=[], help="POLICY=FOLDER of an epserve run")
    p.add_argument("--equal", action="append", default=[], help="a POLICY that must match hf")
    p.add_argument("--tolerance", type=float, default=1e-4)
    p.add_argument("--json", type=Path, help="also write the table here")
    args = p.parse_args()
    ref = samples(args.hf)
    rows, failed = [], []
    for spec in args.run:
        policy, _, folder = spec.partition("=")
        got = samples(Path(folder))
        if set(got) != set(ref):
            raise SystemExit(f"{policy}: documents {sorted(set(got) ^ set(ref))} are in one run only")
        diffs = [abs(got[d][0] - ref[d][0]) for d in ref]
        rows.append({"policy": policy, "docs": len(ref), "mean_ll_epserve": _mean_ll(got), "mean_ll_hf": _mean_ll(ref),
                     "bits_per_byte_epserve": _bits_per_byte(got), "bits_per_byte_hf": _bits_per_byte(ref),
                     "max_abs_diff": max(diffs), "greedy_agree": sum(got[d][1] == ref[d][1] for d in ref)})
        if policy in args.equal and max(diffs) > args.tolerance:
            failed.append(policy)
    print("| routing | docs | mean loglikelihood, epserve | mean loglikelihood, hf | bits/byte, epserve | "
          "bits/byte, hf | max abs diff | greedy verdicts equal |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['policy']} | {r['docs']} | {r['mean_ll_epserve']:.6f} | {r['mean_ll_hf']:.6f} | "
              f"{r['bits_per_byte_epserve']:.4f} | {r['bits_per_byte_hf']:.4f} | {r['max_abs_diff']:.2e} | "
              f"{r['greedy_agree']}/{r['docs']} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if failed:
        print(f"FAIL: {', '.join(failed)} differ from hf by more than {args.tolerance}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
