"""Daily output monitoring: every publish of `recsys infer` measures what it is about to commit, compares it with
the previous published date and the served version's recorded numbers, applies thresholds that warn or block, and
records it all (the manifest's `monitoring` section, an HTML report next to the manifest, an MLflow run in
`recsys-daily` when a tracking server is configured).

    config.py    MonitorConfig (InferJob.monitor) and its YAML file: rules per metric, block or warn
    metrics.py   the metrics, pure numpy/Arrow, and the streaming accumulator over a date's parts
    rules.py     the rules applied: findings, and the DataError of a blocking one
    previous.py  the previous published date: manifest, item exposure, sampled users' lists
    report.py    the HTML report (score histogram, exposure Lorenz curve, metrics with warn/block marks)
    tracking.py  MLflow: the version's recorded coverage, the daily run
    monitor.py   check_output (before the commit) and record (after), called by pipeline.serving.job

Plain numpy rather than Evidently: Evidently 0.7 installs with our pins but brings 21 packages (a web server,
nltk, statsmodels, plotly, telemetry) and wants pandas frames of one row per (user, item), i.e. 100M rows for a
1M-user top-100 date, where these metrics are a few bincounts over one streaming pass in memory bounded by the
catalog.
"""

from pipeline.serving.monitoring.config import METRICS, MonitorConfig, Rule, Threshold, load_monitor_config
from pipeline.serving.monitoring.monitor import Monitored, check_output, record

__all__ = ["METRICS", "MonitorConfig", "Monitored", "Rule", "Threshold", "check_output", "load_monitor_config", "record"]
