"""`lorafit tune`: a budgeted search over rank and hyperparameters with Optuna.

    config (tune: section) -> space -> [ask -> one `lorafit train` process -> tell]* -> report

Each trial is a real training run in its own process (`trial.py`), with the config the sampler
(TPE) picked; it reports the validation metric at every evaluation, and the pruner (Hyperband or
median) stops weak trials early. The wall-clock budget is the study's: a trial still running when
it ends is stopped (its process is killed) and recorded as pruned at its last report. The study
lives in SQLite (`<study>/study.db`), so an interrupted tune continues where it stopped, with the
budget it had left; a trial that crashes is recorded as failed with its error and the search goes
on. Products: `best.yaml` (a config `lorafit train` runs as is), `report.md` with the trial
table and Optuna's plots, and with `seeds` the best config rerun with fresh seeds (mean +- std).

The objective is a validation metric only: trials never see a test split.
"""

from lorafit.train.tune.report import TuneResult
from lorafit.train.tune.search import parse_duration, tune

__all__ = ["TuneResult", "parse_duration", "tune"]
