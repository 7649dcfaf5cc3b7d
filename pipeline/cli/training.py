"""`recsys train | gate | promote | rollback | diagnose` (registered by pipeline.cli.main; mlflow/torch load inside
the commands)."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.training import DEFAULT_REGISTERED_NAME

TRACKING_HELP = "MLflow tracking and registry URI (default: MLFLOW_TRACKING_URI, else SQLite under RECSYS_HOME)"


def register(sub: argparse._SubParsersAction) -> None:
    """Add `train`, `train-candidates`, `gate`, `promote`, `rollback` and `diagnose` to the `recsys` sub-commands."""
    t = sub.add_parser("train", help="train on a snapshot, log to MLflow, register a `challenger` version")
    t.add_argument("--snapshot", required=True, help="snapshot URI (local path or s3://)")
    t.add_argument("--config", type=Path, default=None, help="YAML file of TrainJob keys (CLI flags win)")
    t.add_argument("--search", type=Path, default=None, metavar="CONFIG.yaml",
                   help="YAML file of SearchConfig keys: search hyperparameters on validation users first "
                        "(see configs/search.yaml; default: the config's `search:`, else no search)")
    # the TrainJob field is `model`; the flag is --architecture because --model names a registered model or a URI
    t.add_argument("--architecture", dest="model", default=None, metavar="ARCH",
                   help="what to train: multivae-pia, multivae, multidae, recvae-pia, recvae "
                        "(default: the config's, else multivae-pia)")
    t.add_argument("--epochs", type=int, default=None, help="max epochs (default: the config's)")
    t.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"],
                   help="auto: CUDA when present (default: the config's, else auto)")
    t.add_argument("--bf16", action="store_true", default=None,
                   help="bf16 autocast of the training step (default: the config's, else auto: on a CPU with native bf16)")
    t.add_argument("--cuda-graph", action="store_true", default=None,
                   help="Multi-VAE/DAE on CUDA: replay each training step as one CUDA graph (default: the config's)")
    t.add_argument("--compare-base", action=argparse.BooleanOptionalAction, default=None,
                   help="also train the architecture without PIA (default: the config's, else on)")
    t.add_argument("--registered-name", default=None,
                   help=f"MLflow registered model name (default: the config's, else {DEFAULT_REGISTERED_NAME})")
    t.add_argument("--tracking-uri", default=None, help=TRACKING_HELP)
    t.set_defaults(func=cmd_train)

    c = sub.add_parser("train-candidates", help="train several candidates on one snapshot, gate them on the same "
                       "users, promote the best that passes (champion/challenger)")
    c.add_argument("--config", type=Path, required=True, help="YAML file of CandidatesJob keys (configs/candidates.yaml)")
    c.add_argument("--snapshot", default=None, help="snapshot URI (default: the config's)")
    c.add_argument("--mode", default=None, choices=["enabled", "dry-run"], help="gate mode (default: the config's, else enabled)")
    c.add_argument("--gate-config", type=Path, default=None, help="YAML file of GateConfig keys (over the config's gates)")
    c.add_argument("--registered-name", default=None, help="MLflow registered model name (default: the config's)")
    c.add_argument("--ledger", default=None, help="promotion ledger URI (default: RECSYS_LEDGER, else under RECSYS_HOME)")
    c.add_argument("--tracking-uri", default=None, help=TRACKING_HELP)
    c.set_defaults(func=cmd_train_candidates)

    g = sub.add_parser("gate", help="offline metric gates; promote the version to `champion` when it passes")
    _model_args(g, version=True)
    g.add_argument("--mode", default="enabled", choices=["enabled", "dry-run"],
                   help="dry-run tags the version and logs the report, but promotes nothing and skips the ledger")
    g.add_argument("--config", type=Path, default=None, help="YAML file of GateConfig keys")
    g.set_defaults(func=cmd_gate)

    p = sub.add_parser("promote", help="manual override: make a version `champion` without gates (recorded)")
    _model_args(p, version=True)
    p.add_argument("--reason", required=True, help="why (recorded in the promotion ledger and the version's tags)")
    p.set_defaults(func=cmd_promote)

    r = sub.add_parser("rollback", help="move `champion` back to `previous` (recorded)")
    _model_args(r, version=False)
    r.add_argument("--reason", default="", help="why (recorded in the promotion ledger)")
    r.set_defaults(func=cmd_rollback)

    d = sub.add_parser("diagnose", help="latent-geometry diagnostics of a trained version, logged to its MLflow run")
    d.add_argument("--model", required=True, help="models:/NAME/VERSION, models:/NAME@ALIAS or a bundle folder")
    d.add_argument("--snapshot", default=None, help="default: the snapshot the version was trained on")
    d.add_argument("--users", type=int, default=None, help="validation users sampled (default 1000)")
    d.add_argument("--views", type=int, default=None, help="K masked views per user (default 8)")
    d.add_argument("--neighbours", type=int, default=None, help="k nearest latent neighbours (default 10)")
    d.add_argument("--seed", type=int, default=None, help="seed of the sampled users and views (default 0)")
    d.add_argument("--no-log", dest="log_to_run", action="store_false", default=None,
                   help="do not log to the version's MLflow run")
    d.add_argument("--out", type=Path, default=None, help="also write summary.json and the plots here (default: nowhere)")
    d.add_argument("--tracking-uri", default=None, help=TRACKING_HELP)
    d.set_defaults(func=cmd_diagnose)


def _model_args(p: argparse.ArgumentParser, version: bool) -> None:
    p.add_argument("--model", default=DEFAULT_REGISTERED_NAME, help="registered model name")
    if version:
        p.add_argument("--model-version", dest="version", required=True, help="registered model version (a number)")
    p.add_argument("--ledger", default=None,
                   help="promotion ledger URI (default: RECSYS_LEDGER, else RECSYS_HOME/promotion-ledger.jsonl)")
    p.add_argument("--tracking-uri", default=None, help=TRACKING_HELP)


def cmd_train(args: argparse.Namespace) -> int:
    """Build a TrainJob (YAML file, CLI flags over it) and run it."""
    from pipeline.training.search import load_search_config
    from pipeline.training.train_job import load_config

    search = load_search_config(args.search) if args.search is not None else None
    job = load_config(args.config, {
        "snapshot": args.snapshot, "model": args.model, "epochs": args.epochs, "device": args.device,
        "bf16": args.bf16, "cuda_graph": args.cuda_graph, "compare_base": args.compare_base,
        "registered_name": args.registered_name, "tracking_uri": args.tracking_uri, "search": search})
    result = job.run()
    m = result.metrics
    print(f"test ndcg@100={m.get('test.ndcg_at_100', float('nan')):.4f} recall@20={m.get('test.recall_at_20', float('nan')):.4f}"
          f" (run {result.run_id})")
    print(f"registered {result.model_name} version {result.version}")  # for humans: programs use TrainResult
    return 0


def cmd_train_candidates(args: argparse.Namespace) -> int:
    """Run a CandidatesJob; one line per candidate; exit 1 when no candidate passed its gates."""
    from pipeline.training.candidates import load_candidates

    r = load_candidates(args.config, {"snapshot": args.snapshot, "mode": args.mode, "gates_file": args.gate_config,
                                      "registered_name": args.registered_name, "ledger_uri": args.ledger,
                                      "tracking_uri": args.tracking_uri}).run()
    for o in r.candidates:
        failed = [v.gate for v in o.verdicts if v.status == "fail"]
        print(f"v{o.version} {o.model}: {r.primary}={o.primary:.4f} " + ("PROMOTED" if o.promoted else
              f"passed, held ({o.held})" if o.passed else f"failed ({', '.join(failed)})"))
    print(f"group {r.group}: champion {r.champion or 'none'}")
    return 0 if any(o.passed for o in r.candidates) else 1  # enabled: the best passing one was promoted


def cmd_gate(args: argparse.Namespace) -> int:
    """Run a GateJob; exit 1 when the gate failed in enabled mode (a rejection is a failed task for the scheduler)."""
    from pipeline.training.gate import GateJob
    from pipeline.training.gates import load_gate_config

    o = GateJob(model_name=args.model, version=args.version, mode=args.mode, gates=load_gate_config(args.config),
                ledger_uri=args.ledger, tracking_uri=args.tracking_uri).run()
    print(o.report)
    print(f"HTML report: {o.html_report or 'not uploaded (see the warnings)'}")
    action = "promoted to champion" if o.promoted else \
        ("not promoted (dry-run)" if args.mode == "dry-run" else "stays challenger")
    print(f"gate {'passed' if o.passed else 'failed'}: {o.model_name} version {o.version} {action}")
    return 0 if o.passed or args.mode == "dry-run" else 1


def cmd_promote(args: argparse.Namespace) -> int:
    """Run a PromoteJob (manual override, recorded with its reason)."""
    from pipeline.training.promotion import PromoteJob

    r = PromoteJob(model_name=args.model, version=args.version, reason=args.reason, ledger_uri=args.ledger,
                   tracking_uri=args.tracking_uri).run()
    print(f"promoted {r.model_name} version {r.version} to champion (was {r.champion_before})")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    """Run a RollbackJob (champion back to previous, recorded)."""
    from pipeline.training.promotion import RollbackJob

    r = RollbackJob(model_name=args.model, reason=args.reason, ledger_uri=args.ledger,
                    tracking_uri=args.tracking_uri).run()
    print(f"rolled back {r.model_name}: champion {r.champion_before} -> {r.champion_after}, "
          f"previous now {r.previous_after}")
    return 0


def cmd_diagnose(args: argparse.Namespace) -> int:
    """Run a DiagnoseJob and print its headline figures."""
    from pipeline.training.diagnose import DiagnoseJob

    keys = ("model", "snapshot", "users", "views", "neighbours", "seed", "log_to_run", "out", "tracking_uri")
    r = DiagnoseJob(**{k: getattr(args, k) for k in keys if getattr(args, k) is not None}).run()
    if not r.applicable:
        print(f"{r.model}: {r.reason}")
        return 0
    m = r.metrics
    shown = ("drift", "knn_jaccard", "near_w2_median", "far_w2_median", "far_within_near_median", "kl_mean",
             "active_units", "anchor_distance")
    print(" ".join(f"{k}={m[k]:.4g}" for k in shown if k in m))
    print(f"{r.reason}; " + (f"logged to run {r.run_id} (diag.*, {', '.join(r.artifacts)})" if r.run_id else "not logged"))
    return 0
