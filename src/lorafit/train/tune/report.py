"""`lorafit tune`'s products: `best.yaml` (the best trial's config, which `lorafit train` runs
as is), the best config rerun with fresh seeds, and `report.md` (the trial table and Optuna's
plots)."""

from __future__ import annotations

import copy
import json
import statistics
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorafit import atomic
from lorafit.train.config import RunConfig
from lorafit.train.tune.space import apply, show
from lorafit.train.tune.trial import RESULT_FILE, SPEC_FILE, import_optuna, run_trial


@dataclass
class TuneResult:
    study_dir: Path
    best_value: float
    best_trial: int
    best_config: Path
    report: Path
    trials: int
    spent_s: float
    seeds: list[float] = field(default_factory=list)


def clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def best_config(study, raw: dict, cfg: RunConfig) -> dict[str, Any]:
    """The config of the best trial, with the original output_dir: `lorafit train` runs it."""
    best = study.best_trial
    out = apply(raw, best.params, cfg)
    out["train"]["output_dir"] = cfg.train.output_dir
    return out


def _write_yaml(path: Path, data: dict, header: str) -> None:
    import yaml

    text = header + yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
    atomic.write_text(path, text)


def run_seeds(
    best: dict, cfg: RunConfig, study_dir: Path, k: int, source: str, log
) -> list[dict[str, Any]]:
    """The best config rerun with seeds train.seed + 1 .. + k (fresh seeds: the search picked
    its config on train.seed, so that run's number is biased upward). Finished runs of the same
    config are reused."""
    out = []
    for i in range(1, k + 1):
        seed = cfg.train.seed + i
        run_raw = copy.deepcopy(best)
        folder = study_dir / "seeds" / f"seed-{seed}"
        run_raw["train"]["seed"] = seed
        run_raw["train"]["output_dir"] = str(folder / "run")
        result_file = folder / RESULT_FILE
        if result_file.is_file():
            spec = json.loads((folder / SPEC_FILE).read_text(encoding="utf-8"))
            result = json.loads(result_file.read_text(encoding="utf-8"))
            if spec.get("config") == run_raw and "error" not in result:
                out.append({"seed": seed, **result, "dir": str(folder)})
                log(f"seed {seed}: reused {folder}")
                continue
        if folder.exists():
            atomic.remove_dir(folder)
        log(f"seed {seed}: training the best config ({i}/{k})")
        spec = {"config": run_raw, "source": f"{source} (seed {seed})", "metric": cfg.tune.metric}
        result, _ = run_trial(spec, folder, None)
        if "error" in result:
            raise RuntimeError(f"seed {seed} failed: {result['error']} (log: {folder}/train.log)")
        out.append({"seed": seed, **result, "dir": str(folder)})
        log(f"  val_{cfg.tune.metric} {result['value']:.4f}")
    return out


def finish(study, study_dir, raw, cfg, params, seeds, log, source) -> TuneResult:
    best = study.best_trial
    config = best_config(study, raw, cfg)
    header = (
        f"# lorafit tune: the best of {len(study.trials)} trials in {study_dir} (trial "
        f"{best.number + 1}, val_{cfg.tune.metric} {best.value:.4f}).\n"
        f"# Run it with: lorafit train {study_dir / 'best.yaml'}\n"
    )
    config.pop("tune", None)
    _write_yaml(study_dir / "best.yaml", config, header)
    seed_runs = run_seeds(config, cfg, study_dir, seeds, source, log) if seeds else []
    report = write_report(study, study_dir, cfg, params, seed_runs)
    log(f"best: trial {best.number + 1}, val_{cfg.tune.metric} {best.value:.4f}")
    log(f"config: {study_dir / 'best.yaml'}  report: {report}")
    values = [r["value"] for r in seed_runs]
    if values:
        log(f"seeds {[r['seed'] for r in seed_runs]}: {_mean_std(values)}")
    return TuneResult(
        study_dir,
        best.value,
        best.number,
        study_dir / "best.yaml",
        report,
        len(study.trials),
        float(study.user_attrs.get("spent_s", 0.0)),
        values,
    )


def _mean_std(values: list[float]) -> str:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.4f} +- {std:.4f} (mean +- std of {len(values)})"


PLOTS = {
    "history.png": ("plot_optimization_history", "optimization history"),
    "importances.png": ("plot_param_importances", "parameter importances (PED-ANOVA)"),
    "parallel.png": ("plot_parallel_coordinate", "parallel coordinates"),
}


def _plots(study, study_dir: Path) -> dict[str, str]:
    """Optuna's matplotlib plots as PNGs; {file: "" when drawn, else why not}."""
    optuna = import_optuna()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as vis

    out = {}
    for name, (function, _) in PLOTS.items():
        kwargs = {}
        if function == "plot_param_importances":
            kwargs["evaluator"] = optuna.importance.PedAnovaImportanceEvaluator()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = getattr(vis, function)(study, **kwargs)
                fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
                fig.set_size_inches(9, 5)
                fig.tight_layout()
                atomic.write_file(study_dir / name, lambda p, f=fig: f.savefig(p, format="png"))
                plt.close(fig)
            out[name] = ""
        except Exception as exc:  # too few trials, one value only...: the report says so
            out[name] = f"not drawn: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
            plt.close("all")
    return out


def write_report(study, study_dir: Path, cfg: RunConfig, params, seed_runs) -> Path:
    optuna = import_optuna()
    metric = f"val_{cfg.tune.metric}"
    plots = _plots(study, study_dir)
    best = study.best_trial
    spent = float(study.user_attrs.get("spent_s", 0.0))
    budget = study.user_attrs.get("budget_s")
    states = [t.state for t in study.trials]
    counts = ", ".join(
        f"{states.count(s)} {s.name.lower()}" for s in optuna.trial.TrialState if s in states
    )
    lines = [
        f"# lorafit tune: {cfg.model.name} {cfg.model.task}, train.method {cfg.train.method}",
        "",
        f"Objective: {metric} ({study.direction.name.lower()}), on the validation split only. "
        f"Sampler TPE ({cfg.tune.startup_trials} random startup trials), pruner "
        f"{cfg.tune.pruner}. Search time: {clock(spent)}"
        + (f" of a {clock(budget)} budget" if budget else "")
        + f"; {len(study.trials)} trials ({counts}).",
        "",
        "Space: " + "; ".join(f"`{p.key}` {p.describe()}" for p in params),
        "",
        f"**Best: trial {best.number + 1}, {metric} {best.value:.4f}** — "
        + ", ".join(f"`{k}`={show(v)}" for k, v in best.params.items())
        + ". Config: `best.yaml`.",
        "",
    ]
    if seed_runs:
        values = [r["value"] for r in seed_runs]
        lines += [
            f"Best config rerun with fresh seeds {', '.join(str(r['seed']) for r in seed_runs)}: "
            f"{metric} {_mean_std(values)}; per seed "
            + ", ".join(f"{v:.4f}" for v in values)
            + f" (runs in `seeds/`; {clock(sum(r.get('seconds', 0) for r in seed_runs))}, "
            "outside the search budget).",
            "",
        ]
    keys = [p.key for p in params]
    lines += [
        "| trial | state | " + metric + " | steps | time | " + " | ".join(keys) + " | note |",
        "|---:|---|---:|---:|---:|" + "---|" * len(keys) + "---|",
    ]
    for t in study.trials:
        value = t.value
        if value is None and t.intermediate_values:
            value = t.intermediate_values[max(t.intermediate_values)]
        note = t.user_attrs.get("error") or t.user_attrs.get("stopped") or ""
        row = [
            str(t.number + 1),
            t.state.name.lower(),
            f"{value:.4f}" if value is not None else "",
            str(t.user_attrs.get("steps", "")),
            clock(t.user_attrs.get("seconds", 0.0)),
            *[show(t.params[k]) if k in t.params else "" for k in keys],
            note.replace("|", "/").replace("\n", " ")[:120],
        ]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    for name, (_, title) in PLOTS.items():
        why = plots[name]
        lines.append(f"![{title}]({name})" if not why else f"{title}: {why}")
        lines.append("")
    path = study_dir / "report.md"
    atomic.write_text(path, "\n".join(lines))
    if seed_runs:
        atomic.write_json(study_dir / "seeds.json", seed_runs)
    return path
