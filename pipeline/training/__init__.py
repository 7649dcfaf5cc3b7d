"""Training jobs: fit and register a candidate (train_job), gate it against the champion and promote it (gate),
promote or roll back by hand (promotion).

Modules, one job each:

- train_job    TrainJob → TrainResult: fit on a snapshot, log to MLflow, register a `challenger` version
- evaluation   metrics, activity groups and summary rows (shared with the research harness)
- gates        the gate's rules: GateConfig, one GateCheck per gate, check/passed (pure), GateResult
- gate         GateJob → GateResult: re-score, check, record, promote
- gate_report  the gate's markdown report and its best-effort MLflow record (with the HTML report)
- gate_html    the gate's HTML report: verdict, gates, models side by side, training curves, latent diagnostics
- rescore      scoring a registered bundle on a snapshot's test users
- aliases      moving `champion`/`previous` with an intent record, and repairing an interrupted move
- ledger       the append-only promotion ledger
- promotion    PromoteJob / RollbackJob → AliasMoveResult: manual overrides, recorded
- plots        PNG figures

Registered-model aliases: `challenger` = newest trained version (set by training); `champion` = what inference
serves (moved only by gate, promote and rollback); `previous` = the champion before it (the rollback target).
"""

DEFAULT_REGISTERED_NAME = "recsys-multivae-pia"
"""The registered model name every training command defaults to."""
