"""`recsys experiment`: the research harness's sub-command (heavy imports inside)."""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path
from typing import Any


def _models(value: str) -> tuple[str, ...]:
    return tuple(m.strip() for m in value.split(",") if m.strip())


def _floats(value: str) -> tuple[float, ...]:
    return tuple(float(v) for v in value.split(",") if v.strip())


def _pairs(value: str) -> tuple[tuple[float, float], ...]:
    """'l2:p,l2:p' -> ((l2, p), ...): EDLAE's grid."""
    out = []
    for v in (v.strip() for v in value.split(",") if v.strip()):
        l2, sep, p = v.partition(":")
        if not sep:
            raise argparse.ArgumentTypeError(f"{v!r} is not l2:dropout (e.g. 100:0.5)")
        out.append((float(l2), float(p)))
    return tuple(out)


def _settings(value: str) -> tuple[dict[str, Any], ...]:
    """'hidden_dim=1200,dropout=0.3;latent_dim=400' -> ({...}, {...}): sets split by ';', settings by ',', each value
    JSON (numbers, lists such as hidden_dims=[600,200], true/false) or else a string."""
    out = []
    for part in (p.strip() for p in value.split(";") if p.strip()):
        settings: dict[str, Any] = {}
        for item in re.split(r",(?=\s*[A-Za-z_]\w*\s*=)", part):
            key, sep, raw = item.partition("=")
            if not sep or not key.strip():
                raise argparse.ArgumentTypeError(f"{item!r} is not key=value (e.g. dropout=0.3)")
            try:
                settings[key.strip()] = json.loads(raw)
            except json.JSONDecodeError:
                settings[key.strip()] = raw.strip()
        out.append(settings)
    return tuple(out)


def register(sub: Any) -> None:
    e = sub.add_parser("experiment", help="strong-generalization evaluation of several models over seeds")
    e.add_argument("--dataset", required=True, help="a name under the data folder, a Parquet path, or 'synthetic'")
    e.add_argument("--models", type=_models, default=("popularity", "ease", "multivae", "multivae-pia"),
                   help="comma-separated: popularity, ease, edlae, multidae, multivae, multivae-pia, recvae, recvae-pia")
    e.add_argument("--seeds", type=int, default=5, help="seeds to run; each is its own user split and initialization")
    e.add_argument("--first-seed", type=int, default=0, help="seed of the first run (to add seeds to a finished run)")
    e.add_argument("--out", type=Path, required=True, help="folder for results.json and results.md")
    e.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA when present")
    e.add_argument("--data-dir", type=Path, default=Path(os.environ.get("RECSYS_DATA_DIR", "../shared/data")),
                   help="where data set names resolve (env RECSYS_DATA_DIR)")
    e.add_argument("--epochs", type=int, default=200, help="max epochs of the autoencoders")
    e.add_argument("--recvae-epochs", type=int, default=None, help="max epochs of RecVAE (default: --epochs)")
    e.add_argument("--patience", type=int, default=20,
                   help="early stop after this many epochs without a better validation NDCG@100")
    e.add_argument("--bf16", action="store_true", help="bf16 autocast of the training step (CUDA, or a CPU with native bf16)")
    e.add_argument("--cuda-graph", action="store_true", help="Multi-VAE/DAE steps as CUDA graphs (CUDA only)")
    e.add_argument("--min-rating", type=float, default=None,
                   help="binarize: rating >= this (default 4 when a rating column exists)")
    e.add_argument("--n-valid", type=float, default=0.1, help="validation users: a fraction (<1) or a count")
    e.add_argument("--n-test", type=float, default=0.1, help="test users: a fraction (<1) or a count")
    e.add_argument("--pia-grid", type=_floats, default=(0.01, 0.1, 1.0),
                   help="λ_A values tried for the PIA models, chosen on validation users")
    e.add_argument("--ease-grid", type=_floats, default=(100.0, 250.0, 500.0, 1000.0),
                   help="EASE l2 values tried, chosen on validation users")
    e.add_argument("--edlae-grid", type=_pairs, default=None,
                   help="EDLAE (l2, dropout) pairs tried as l2:p,l2:p (default: ExperimentJob's), chosen on validation users")
    e.add_argument("--arch-grid", type=_settings, default=(),
                   help="autoencoder settings searched on validation users: sets split by ';', settings by ',' "
                        "(e.g. 'hidden_dim=1200,latent_dim=400;dropout=0.3'): fields of the model's config "
                        "(VAEConfig, RecVAEConfig) and the trainer's lr, batch_size, weight_decay, lr_decay, "
                        "lr_decay_patience, ema_halflife; PIA's own pia_schedule, pia_warmup_steps, pia_init, "
                        "pia_init_std, pia_estimator (-pia models only); crossed with --pia-grid for the -pia models")
    e.add_argument("--tune-only", action="store_true",
                   help="search on the first seed's validation users and stop: no test user scored (score the "
                        "chosen values later with the same options, without it, and --resume)")
    e.add_argument("--keep-fits", action="store_true",
                   help="pickle each search's winning autoencoder to OUT/fits/: the --resume run that scores it "
                        "loads it instead of fitting it again")
    e.add_argument("--max-ease-items", type=int, default=50_000, help="skip EASE (I x I dense) above this catalog size")
    e.add_argument("--synthetic-users", type=int, default=3000, help="size of the 'synthetic' data set")
    e.add_argument("--synthetic-items", type=int, default=1000, help="catalog of the 'synthetic' data set")
    e.add_argument("--no-progress", action="store_true", help="no progress bars (logs and CI)")
    e.add_argument("--protocol", choices=["strong-generalization", "cold-start"], default="strong-generalization",
                   help="cold-start: 20%% of items held out as cold, MARec-EASE vs metadata baselines "
                        "(pipeline/research/cold_start.py; --models, --epochs and the autoencoder options do not apply)")
    e.add_argument("--cold-fraction", type=float, default=0.2, help="cold-start: share of items held out as cold")
    e.add_argument("--min-item-users", type=int, default=1, help="cold-start: keep items with at least this many users")
    e.add_argument("--blocks", type=_models, default=None,
                   help="cold-start: comma-separated item columns used as feature blocks (and 'year'); default: "
                        "the set's genres/tags, people, type, plot/description and year")
    e.add_argument("--delta-grid", type=_floats, default=(1.0, 10.0, 50.0, 200.0, 1000.0),
                   help="cold-start: MARec's δ values")
    e.add_argument("--l2-grid", type=_floats, default=(1.0, 10.0, 100.0, 500.0), help="cold-start: MARec's λ1 values")
    e.add_argument("--ab-grid", type=_floats, default=(0.0, 0.03, 0.1, 0.2, 0.5, 1.0, 3.0, 10.0, 100.0),
                   help="cold-start: αβ values tried for the whole-catalogue ranking")
    e.add_argument("--first-order", action="store_true", help="cold-start: no pairwise (Hadamard) block terms")
    e.add_argument("--vae-epochs", type=int, default=0,
                   help="cold-start: also train Multi-VAE with and without MARec's alignment target for this many epochs")
    e.add_argument("--align-grid", type=_floats, default=(0.01, 0.1, 1.0, 10.0),
                   help="cold-start: MARec-VAE's αβ values, chosen on the validation items")
    e.add_argument("--text-encoder", choices=["tfidf", "wordllama"], default="tfidf",
                   help="cold-start: free text as TF-IDF or as sentence embeddings (a model inside the wordllama wheel)")
    e.add_argument("--feature-cache", type=Path, default=None,
                   help="cold-start: folder caching the items' feature blocks by content hash")
    e.add_argument("--partial-every-s", type=float, default=300.0,
                   help="save an autoencoder fit's trainer state to OUT/partial/ at most this often (seconds; 0: every "
                        "epoch), for --resume to continue a stopped fit")
    e.add_argument("--resume", action="store_true",
                   help="continue a stopped run in --out: the fits in its checkpoint.json are reused, an "
                        "autoencoder fit it was in continues from its last epoch (OUT/partial/), the rest run "
                        "(same options; --seeds and --models may grow)")
    e.set_defaults(func=cmd_experiment)


def cmd_experiment(args: argparse.Namespace) -> int:
    from pipeline.io.lake import resolve
    from pipeline.research.experiment import ExperimentJob
    from pipeline.research.report import render

    resolve(args.out).check_writable()  # before hours of fits: --out a file or read-only fails now, in one line
    if args.protocol == "cold-start":
        return cmd_cold_start(args)

    job = ExperimentJob(
        dataset=args.dataset, data_dir=args.data_dir, models=args.models, seeds=args.seeds,
        first_seed=args.first_seed, out=args.out, device=args.device, epochs=args.epochs,
        recvae_epochs=args.recvae_epochs, patience=args.patience, bf16=args.bf16, cuda_graph=args.cuda_graph,
        min_rating=args.min_rating,
        n_valid=args.n_valid, n_test=args.n_test,
        pia_grid=args.pia_grid, ease_grid=args.ease_grid, max_ease_items=args.max_ease_items,
        arch_grid=args.arch_grid, tune_only=args.tune_only, keep_fits=args.keep_fits,
        **({"edlae_grid": args.edlae_grid} if args.edlae_grid is not None else {}),
        synthetic_users=args.synthetic_users, synthetic_items=args.synthetic_items, progress=not args.no_progress,
        resume=args.resume, partial_every_s=args.partial_every_s,
    )
    r = job.run()
    print(render(r.results))
    print(f"wrote {r.results_json} and {r.results_md}")
    return 0


def cmd_cold_start(args: argparse.Namespace) -> int:
    from pipeline.research.cold_start import ColdStartJob

    job = ColdStartJob(
        dataset=args.dataset, data_dir=args.data_dir, out=args.out, seeds=args.seeds, first_seed=args.first_seed,
        cold_fraction=args.cold_fraction, min_rating=args.min_rating, min_item_users=args.min_item_users,
        blocks=args.blocks, delta_grid=args.delta_grid, l2_grid=args.l2_grid, ab_grid=args.ab_grid,
        second_order=not args.first_order, feature_cache=args.feature_cache,
        vae_epochs=args.vae_epochs, align_grid=args.align_grid, device=args.device, text_encoder=args.text_encoder,
    )
    r = job.run()
    print(Path(r.results_md).read_text(encoding="utf-8"))
    print(f"wrote {r.results_json} and {r.results_md}")
    return 0
