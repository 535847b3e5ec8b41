"""`epserve-eval`: for each routing policy, held-out perplexity, load balance and fidelity.

    epserve-eval --out docs/eval                       # the embedded tiny model, default policies
    epserve-eval --policies natural greedy_balanced 'skewed:target=3' --ep-size 8
    python -m server.eval.cli --model-path /ckpt/folder --heldout-permille 50

Policies are registered names, optionally with parameters: `name:key=value,key=value`.
The held-out text is the held-out split of the standard-library corpus (server/eval/
corpus.py), with the split the model was trained with (read from its training.json when
there is one). Runs on CPU in a few minutes at the defaults.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch

from ..config import ModelConfig
from ..model.loader import load_model, model_folder, read_model_spec
from ..moe.routing import PolicyConfigError, UnknownPolicyError, build_policy
from .corpus import heldout_windows, load_corpus
from .probe import PolicyProbe
from .report import markdown_table, write_json, write_markdown, write_png
from .tradeoff import write_tradeoff_png
from .teacher_forcing import heldout_nll

DEFAULT_POLICIES = ["natural", "greedy_balanced", "round_robin_balanced", "uniform_random", "skewed", "optimal_balanced",
                    "rank_balanced", "rank_balanced:tolerance=0.05", "rank_balanced:tolerance=0.1",
                    "rank_balanced:tolerance=0.25", "rank_balanced:tolerance=0.5", "rank_balanced:keep_bonus=1",
                    "rank_balanced:expert_cap=2", "rank_balanced:expert_cap=1.5", "rank_balanced:expert_cap=1.25"]
log = logging.getLogger("epserve.eval")


def parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "null": None}.get(text.lower(), text)


def parse_policy(spec: str) -> tuple[str, dict]:
    """'skewed:target=3,mode=zipf' -> ('skewed', {'target': 3, 'mode': 'zipf'})."""
    name, _, rest = spec.partition(":")
    params = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise SystemExit(f"--policies: {spec!r}: parameters are key=value, separated by commas")
        params[key.strip()] = parse_value(value.strip())
    return name.strip(), params


def scipy_available() -> bool:
    try:
        import scipy.optimize  # noqa: F401
    except ImportError:
        return False
    return True


def training_meta(folder: Path | None) -> dict:
    path = folder / "training.json" if folder else None
    return json.loads(path.read_text()) if path and path.is_file() else {}


def evaluate(args: argparse.Namespace) -> tuple[list[dict], dict, list[list[int]] | None]:
    model_cfg = ModelConfig(path=args.model_path) if args.model_path else ModelConfig()
    spec = read_model_spec(model_cfg)
    if spec.num_experts % args.ep_size:
        raise SystemExit(f"--ep-size {args.ep_size} does not divide the model's {spec.num_experts} experts")
    if args.num_seqs % (args.ep_size * args.seqs_per_rank):
        raise SystemExit(f"--num-seqs {args.num_seqs} must be a multiple of --ep-size x --seqs-per-rank "
                         f"= {args.ep_size * args.seqs_per_rank} (every step runs every simulated rank)")
    meta = training_meta(model_folder(model_cfg))
    permille = args.heldout_permille or meta.get("config", {}).get("heldout_permille", 50)
    corpus = load_corpus(permille)
    trained_on = meta.get("corpus", {}).get("fingerprint")
    if trained_on and trained_on != corpus.fingerprint:
        log.warning("the corpus read here (Python %s, fingerprint %s) is not the one in training.json (Python %s, %s): "
                    "held-out text may differ from the training run's", corpus.python, corpus.fingerprint[:12],
                    meta["corpus"].get("python"), trained_on[:12])
    windows = heldout_windows(corpus.heldout, args.seq_len, args.num_seqs)  # [S, L+1]
    specs = [parse_policy(p) for p in args.policies]
    policies = []
    for name, params in specs:  # build every policy first: a typo fails before minutes of work
        try:
            policy = build_policy(name, **params)
            if hasattr(policy, "mismatches"):  # replay: also checks the number of MoE layers
                policy.validate(spec.num_experts, spec.top_k, args.ep_size, num_layers=spec.num_moe_layers)
            else:
                policy.validate(spec.num_experts, spec.top_k, args.ep_size)
        except (UnknownPolicyError, PolicyConfigError, TypeError) as exc:
            raise SystemExit(f"--policies {name}: {exc}") from None
        if policy.name == "record" and args.ep_size > 1:
            raise SystemExit("--policies record: use --ep-size 1 (one process simulates every rank here, so a "
                             "per-rank trace cannot be told apart)")
        policies.append((name if not params else f"{name}({', '.join(f'{k}={v}' for k, v in params.items())})", policy))
    model = load_model(model_cfg, policy=policies[0][1], dtype=torch.float32)
    rows, natural_loads, natural_ppl = [], None, None
    for label, policy in policies:
        t0 = time.perf_counter()
        probe = PolicyProbe(policy, num_layers=spec.num_moe_layers, num_experts=spec.num_experts, top_k=spec.top_k,
                            ep_size=args.ep_size, exact=args.exact)
        nll, count = heldout_nll(model, probe, windows, args.ep_size, args.seqs_per_rank)
        if hasattr(policy, "close"):  # record: finish the trace now, so a later replay can read it
            policy.close()
        snap = probe.loads.snapshot()
        fidelity, fidelity_layers = probe.fidelity()
        summary = snap.summary()
        row = {
            "policy": label, "perplexity": math.exp(nll / count), "nll_nats_per_byte": nll / count,
            "fidelity": fidelity, "balanced_fidelity_ceiling": probe.balanced_fidelity_ceiling(),
            "walk_fidelity_ceiling": probe.walk_fidelity_ceiling(),
            "expert_max_over_mean": summary["expert_max_over_mean"],
            "step_expert_max_over_mean": probe.step_expert_max_over_mean(),
            "rank_max_over_mean": summary["rank_max_over_mean"], "mean_ranks_per_token": summary["mean_ranks_per_token"],
            "per_layer": {"expert_max_over_mean": snap.expert_max_over_mean(), "rank_max_over_mean": snap.rank_max_over_mean(),
                          "mean_ranks_per_token": snap.mean_ranks_per_token(), "fidelity": fidelity_layers},
            "expert_tokens": snap.expert_tokens, "seconds": round(time.perf_counter() - t0, 1),
        }
        if hasattr(policy, "fallback_calls"):  # optimal_balanced, rank_balanced: calls that took the closed form
            row["fallback_calls"] = policy.fallback_calls()
        if probe.optimum_summary() is not None:
            row.update(probe.optimum_summary())
        if policy.name == "natural" and natural_loads is None:
            natural_loads, natural_ppl = snap.expert_tokens, row["perplexity"]
        rows.append(row)
        print(f"{label}: perplexity {row['perplexity']:.3f}, fidelity {fidelity:.3f}, expert max/mean "
              f"{row['expert_max_over_mean']:.3f} ({row['seconds']} s)", file=sys.stderr, flush=True)
    if natural_ppl is None:  # natural was not asked for: the reference comes from the router's own loads
        natural_ppl = float("nan")
    for row in rows:
        row["perplexity_vs_natural"] = row["perplexity"] / natural_ppl - 1
    setup = {
        "model": str(args.model_path or "tiny (embedded)"), "ep_size": args.ep_size, "seq_len": args.seq_len,
        "num_seqs": args.num_seqs, "seqs_per_rank": args.seqs_per_rank, "scored_tokens": args.num_seqs * args.seq_len,
        "tokens_per_rank_call": args.seqs_per_rank * args.seq_len, "heldout_permille": permille,
        "corpus": corpus.describe(), "num_experts": spec.num_experts, "top_k": spec.top_k,
        "moe_layers": spec.num_moe_layers, "torch_threads": torch.get_num_threads(),
    }
    return rows, setup, natural_loads


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="epserve-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", default=None, help="Hugging Face folder (default: the embedded tiny model)")
    p.add_argument("--policies", nargs="+", default=DEFAULT_POLICIES, help="name or name:key=value,... (default: %(default)s)")
    p.add_argument("--ep-size", type=int, default=4, help="simulated EP group size for per-rank figures")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--num-seqs", type=int, default=64, help="held-out windows (a multiple of ep_size x seqs_per_rank)")
    p.add_argument("--seqs-per-rank", type=int, default=4, help="sequences per simulated rank per step")
    p.add_argument("--heldout-permille", type=int, default=0, help="held-out split (default: the model's training.json, else 50)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--exact", action=argparse.BooleanOptionalAction, default=scipy_available(),
                   help="solve each call of optimal_balanced / rank_balanced exactly too (scipy LP) and report the "
                        "optimum beside the policy (default: on when scipy is installed)")
    p.add_argument("--out", type=Path, default=Path("eval_out"), help="folder for policies.md, policies.json, policies.png")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.ep_size < 1 or args.seq_len < 1 or args.num_seqs < 1 or args.seqs_per_rank < 1:
        raise SystemExit("--ep-size, --seq-len, --num-seqs and --seqs-per-rank must be positive")
    t0 = time.perf_counter()
    rows, setup, natural_loads = evaluate(args)
    setup["seconds"] = round(time.perf_counter() - t0, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    write_markdown(args.out / "policies.md", rows, setup)
    write_json(args.out / "policies.json", rows, setup)
    title = (f"{setup['model']}: E={setup['num_experts']}, top-{setup['top_k']}, {setup['moe_layers']} MoE layers, "
             f"ep_size {setup['ep_size']}, {setup['scored_tokens']} held-out bytes")
    write_png(args.out / "policies.png", rows, natural_loads, title)
    write_tradeoff_png(args.out / "tradeoff.png", rows, title)
    print(markdown_table(rows))
    print(f"wrote {args.out}/policies.md, policies.json, policies.png, tradeoff.png in {setup['seconds']} s")


if __name__ == "__main__":
    main()
