"""Evidence for docs/results.md "Latent geometry": train Multi-VAE, Multi-VAE + PIA and β sweep points on one data
set (same seed, same split as `recsys experiment` seed 0, a fixed epoch budget, no early stopping so the anchors
and the weights are from the same epoch), then run model.diagnostics on the validation users.

    .venv/bin/python -m bench.diagnostics_evidence --dataset ml-1m-implicit-ge4 --epochs 20 [--stage train|diagnose|all]

Fits are saved under OUT/<dataset>/<model>.pt and reused; the diagnostics go to OUT/<dataset>/diagnostics.json
(headline metrics, fit and validation figures), summary.json and the plots of `recsys diagnose`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import machine
from model.evaluate import evaluate
from model.pia import ItemAnchors, PIAConfig
from model.train import TrainConfig, Trainer
from model.vae import MultiVAE, VAEConfig
from pipeline.research.experiment import Experiment, ExperimentJob, load_experiment_data

# name -> (VAE config, PIA config)
VARIANTS: dict[str, tuple[VAEConfig, PIAConfig]] = {
    "multivae": (VAEConfig(), PIAConfig()),
    "multivae-pia": (VAEConfig(), PIAConfig(weight=1.0)),
    "multivae-beta0.2": (VAEConfig(anneal_steps=0, beta_max=0.2), PIAConfig()),
    "multivae-beta1": (VAEConfig(anneal_steps=0, beta_max=1.0), PIAConfig()),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="ml-1m-implicit-ge4")
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--models", default=",".join(VARIANTS))
    ap.add_argument("--stage", default="all", choices=["train", "diagnose", "all"])
    ap.add_argument("--users", type=int, default=600)
    ap.add_argument("--views", type=int, default=8)
    ap.add_argument("--out", default="out/diagnostics")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast of the training step (pays on a CPU with native bf16)")
    ap.add_argument("--diag-seed", type=int, default=None, help="seed of the user sample and masks (default --seed); "
                                                                "another value writes diagnostics-seedN.json, no plots")
    a = ap.parse_args()
    torch.set_num_threads(2)
    out = Path(a.out) / a.dataset
    out.mkdir(parents=True, exist_ok=True)
    job = ExperimentJob(dataset=a.dataset, data_dir=Path(a.data_dir), out=out, device="cpu", seeds=1)
    data = load_experiment_data(job)
    split = Experiment(job).split(data, a.seed)
    names = a.models.split(",")
    n_items = split.train.shape[1]
    summary: dict[str, Any] = {"dataset": a.dataset, "epochs": a.epochs, "seed": a.seed, "machine": machine(torch.device("cpu")),
                               "users": a.users, "views": a.views, "bf16": a.bf16, "models": {}}
    summaries: dict[str, dict[str, Any]] = {}
    diag_seed = a.seed if a.diag_seed is None else a.diag_seed
    for name in names:
        vae, pia = VARIANTS[name]
        path = out / f"{name}.pt"
        torch.manual_seed(a.seed)
        module = MultiVAE(n_items, vae)
        anchors: ItemAnchors | None = None
        if path.exists():
            saved = torch.load(path, weights_only=True)
            module.load_state_dict(saved["model"])
            if saved.get("anchors") is not None:
                anchors = ItemAnchors(n_items, vae.latent_dim, pia)
                anchors.load_state_dict(saved["anchors"])
            fit_s = float(saved["fit_seconds"])
        elif a.stage in ("train", "all"):
            t0 = time.perf_counter()
            cfg = TrainConfig(epochs=a.epochs, seed=a.seed, device="cpu", progress=False, bf16=a.bf16)
            tr = Trainer(module, split.train, cfg, pia)
            tr.fit()
            fit_s = time.perf_counter() - t0
            anchors = tr.anchors
            torch.save({"model": module.state_dict(), "anchors": None if anchors is None else anchors.state_dict(),
                        "fit_seconds": fit_s}, path)
            print(f"trained {name} in {fit_s:.0f}s", flush=True)
        else:
            raise SystemExit(f"{path} missing: run --stage train first")
        if a.stage == "train":
            continue
        from pipeline.training.diagnose import diagnose_module

        module.eval()
        val = evaluate(module.score, split.valid.fold_in, split.valid.targets, device="cpu").mean()
        history = (split.valid.fold_in + split.valid.targets).tocsr()  # the users' whole histories
        t0 = time.perf_counter()
        res = diagnose_module(module, history, a.users, a.views, 10, diag_seed,
                              anchors=None if anchors is None else anchors.weight.detach())  # by activity group
        summaries[name] = res.to_summary()
        summary["models"][name] = {"fit_seconds": fit_s, "diagnose_seconds": time.perf_counter() - t0,
                                   "val_ndcg@100": val["ndcg@100"], "metrics": res.to_metrics()}
        print(name, json.dumps({k: round(v, 4) for k, v in res.to_metrics().items()}), flush=True)
    if a.stage != "train":
        from pipeline.training.diagnose import write_outputs

        if diag_seed != a.seed:
            (out / f"diagnostics-seed{diag_seed}.json").write_text(json.dumps(summary | {"diag_seed": diag_seed}, indent=1))
            return
        (out / "diagnostics.json").write_text(json.dumps(summary, indent=1))
        write_outputs(summaries, names[0], out)  # summary.json (distributions) and the plots, as a run gets them


if __name__ == "__main__":
    main()
