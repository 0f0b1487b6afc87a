"""Reports from a fabricated MLflow store (runs created here through MLflow's API): table values, plots,
commit/config citations, idempotent regeneration and the artifact on the parent run."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric

from illada_lightning.reporting import ReportError, build_report
from illada_lightning.reporting.tables import mean_se
from reports.make import main as make_main

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _run(client, exp, name, tags=None, params=None, metrics=None, status="FINISHED"):
    run = client.create_run(exp, run_name=name, tags={"git_commit": COMMIT, **(tags or {})})
    for k, v in (params or {}).items():
        client.log_param(run.info.run_id, k, v)
    for k, v in (metrics or {}).items():
        client.log_metric(run.info.run_id, k, v)
    client.set_terminated(run.info.run_id, status)
    return run.info.run_id


def _history(client, run_id, key, points):
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(key, v, now, step) for step, v in points])


def _parent(client, exp, sweep, space, objective):
    return _run(client, exp, f"sweep-{sweep}", {"sweep.role": "parent", "sweep.name": sweep, "sweep.study": sweep,
                                                "sweep.space": json.dumps(space), "sweep.objective": objective,
                                                "sweep.direction": "maximize", "sweep.mode": "eval_only",
                                                "sweep.sampler": "grid"}, status="RUNNING")


def with_stderr(metrics, n=500):
    """What `experiments.evaluate` logs beside each accuracy: the binomial standard error and n."""
    out = dict(metrics)
    for key, p in metrics.items():
        task = key.split("/")[1]
        out[f"{key}_stderr"] = (p * (1 - p) / (n - 1)) ** 0.5
        out[f"eval/{task}/n"] = n
    return out


def _trial(client, exp, parent, number, params, metrics, status="FINISHED", error=None):
    tags = {"mlflow.parentRunId": parent, "sweep.role": "trial", "sweep.name": "x", "sweep.trial_number": str(number),
            **{f"sweep.param.{k}": str(v) for k, v in params.items()}}
    if error:
        tags["sweep.error"] = error
    return _run(client, exp, f"trial-{number}", tags, params, metrics, status)


# Scoring rule x seed, the layout of iLLaDA Table 4: accuracies per (rule, seed).
SCORING = {
    ("likelihood", 0): {"piqa": 0.772, "arc_challenge": 0.602, "hellaswag": 0.743},
    ("likelihood", 1): {"piqa": 0.772, "arc_challenge": 0.600, "hellaswag": 0.741},
    ("confidence", 0): {"piqa": 0.790, "arc_challenge": 0.608, "hellaswag": 0.766},
    ("confidence", 1): {"piqa": 0.780, "arc_challenge": 0.608, "hellaswag": 0.770},
}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("abl", artifact_location=(root / "artifacts").as_uri())
    ids = {}
    ids["scoring"] = parent = _parent(client, exp, "scoring", ["eval.scoring_rule", "seed"], "eval/piqa/acc")
    for number, ((rule, seed), accs) in enumerate(SCORING.items()):
        _trial(client, exp, parent, number, {"eval.scoring_rule": rule, "seed": seed, "model.n_layers": 2},
               with_stderr({f"eval/{task}/{'acc_norm' if task == 'hellaswag' else 'acc'}": v
                            for task, v in accs.items()}))
    _trial(client, exp, parent, 4, {"eval.scoring_rule": "broken", "seed": 0}, {}, status="FAILED",
           error="RuntimeError: out of memory\ntraceback ...")
    # SFT-epoch sweep with a training run (loss curve + plateau switch as a metric) under its base run.
    ids["epochs"] = eparent = _parent(client, exp, "epochs", ["sft.epochs"], "eval/gsm8k/exact_match")
    for number, (epochs, em) in enumerate([(1, 0.10), (2, 0.25), (4, 0.40)]):
        _trial(client, exp, eparent, number, {"sft.epochs": epochs}, with_stderr({"eval/gsm8k/exact_match": em}, 200))
    base = _run(client, exp, "epochs-base", {"mlflow.parentRunId": eparent, "sweep.role": "base"},
                {"optim.lr": "0.0002"}, {"lr_switch_step": 6.0})
    _history(client, base, "train/loss", [(s, 5.0 - 0.3 * s) for s in range(10)])
    # A plain experiment run whose switch is a tag, with per-epoch callback metrics.
    plain = _run(client, exp, "plain-sft", {"plateau_switch_step": "4"}, {"sft.epochs": "3"})
    _history(client, plain, "train/loss", [(s, 4.0 - 0.1 * s) for s in range(8)])
    _history(client, plain, "eval/toy/acc", [(1, 0.30), (2, 0.45), (3, 0.50)])
    _history(client, plain, "eval/toy/acc_stderr", [(1, 0.046), (2, 0.05), (3, 0.05)])
    _history(client, plain, "eval/toy/n", [(1, 100), (2, 100), (3, 100)])
    return uri, client, ids


def test_mean_and_standard_error():
    mean, se, n = mean_se([0.790, 0.780])
    assert (round(mean, 6), round(se, 6), n) == (0.785, 0.005, 2)
    assert mean_se([0.5]) == (0.5, None, 1)


def test_sweep_report_has_paper_layout_values_plots_and_citations(store, tmp_path):
    uri, client, ids = store
    report = build_report(uri, sweep="scoring", out_root=tmp_path)
    md = report.path.read_text()
    assert "Scoring rule × task (layout of iLLaDA Table 4)" in md
    assert "What the paper found: iLLaDA Table 4 (8B base): confidence scoring beats likelihood" in md
    assert "| eval.scoring_rule | arc_challenge (acc) | hellaswag (acc_norm) | piqa (acc) | runs |" in md
    # mean ± s.e. over the two seeds, in %: likelihood first (the order the trials ran in)
    # mean over the two seeds ± the larger of their spread and the pooled binomial error (n=500 each), in %;
    # likelihood first (the order the trials ran in)
    assert "| likelihood | 60.1 ± 1.6 (n=500, 2 runs) | 74.2 ± 1.4 (n=500, 2 runs) | 77.2 ± 1.3 (n=500, 2 runs) | 2 |" in md
    assert "| confidence | 60.8 ± 1.5 (n=500, 2 runs) | 76.8 ± 1.3 (n=500, 2 runs) | 78.5 ± 1.3 (n=500, 2 runs) | 2 |" in md
    assert md.index("| likelihood |") < md.index("| confidence |")
    assert "± standard error" in md and "over seed" in md
    assert "| 4 | eval.scoring_rule=broken, seed=0 | RuntimeError: out of memory |" in md
    # 78.5 vs 77.2 on PIQA: 1.3 points with a standard error of the difference of 1.8 -> no winner is named
    assert "No best setting: tie within noise." in md and "Best setting:" not in md
    assert "eval.scoring_rule=confidence (78.5 ± 1.3 %, n=500, 2 runs)" in md
    # every cited run with its commit and its params
    assert md.count(f"`{COMMIT[:12]}`") == 6  # parent + 4 trials + the failed one
    assert "model.n_layers = 2" in md and f"commit <code>{COMMIT}</code>" in md
    # idempotent: regenerating gives the same bytes
    again = build_report(uri, sweep="scoring", out_root=tmp_path)
    assert again.path.read_text() == md
    # logged as an artifact of the parent run
    assert report.logged_to == [ids["scoring"]]
    names = {a.path for a in client.list_artifacts(ids["scoring"], "report")}
    assert "report/report.md" in names


def test_epoch_sweep_report_plots_the_curve_and_marks_the_plateau_switch(store, tmp_path):
    uri, _, _ = store
    report = build_report(uri, sweep="epochs", out_root=tmp_path, log_artifact=False)
    md = report.path.read_text()
    assert "SFT epochs × task (the numbers behind iLLaDA Fig. 1)" in md
    for row in ("| 1 | 10.0 ± 2.1 (n=200) | 1 |", "| 2 | 25.0 ± 3.1 (n=200) | 1 |", "| 4 | 40.0 ± 3.5 (n=200) | 1 |"):
        assert row in md
    assert md.index("| 1 | 10.0") < md.index("| 2 | 25.0") < md.index("| 4 | 40.0")
    # 40.0 vs 25.0: 15 points, far beyond twice the standard error of the difference (9.3): named, in %
    assert ("Best setting: sft.epochs=4, `eval/gsm8k/exact_match` = 40.0 ± 3.5 %, n=200; ahead of the next "
            "(sft.epochs=2: 25.0 ± 3.1 %, n=200) by 15.0 points") in md
    assert "plateau LR switch at step 6" in md
    for name in ("sft_epochs.png", "training_loss.png"):
        png = (tmp_path / "epochs" / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
        assert f"]({name})" in md


def test_experiment_report_reads_per_epoch_histories_and_switch_tags(store, tmp_path):
    uri, _, _ = store
    report = build_report(uri, experiment="abl", out_root=tmp_path, log_artifact=False)
    md = report.path.read_text()
    assert md.count("## Sweep `") == 2
    assert "`plain-sft`" in md and "plateau LR switch at step 4" in md
    assert (tmp_path / "abl" / "sft_epochs.png").exists()
    assert "| plain-sft | 2 | 45.0 ± 5.0 (n=100) |" in md  # per-epoch cells carry their stderr and n


def test_cli_and_bad_names(store, tmp_path, capsys):
    uri, _, _ = store
    assert make_main(["--sweep", "epochs", "--tracking-uri", uri, "--out-root", str(tmp_path), "--no-log"]) == 0
    assert (tmp_path / "epochs" / "report.md").exists()
    assert make_main(["--sweep", "nope", "--tracking-uri", uri, "--out-root", str(tmp_path)]) == 2
    assert "no sweep named 'nope'" in capsys.readouterr().err
    with pytest.raises(ReportError, match="experiment 'missing' not found"):
        build_report(uri, experiment="missing", out_root=tmp_path)


def test_reports_go_under_the_runs_directory_and_never_into_the_training_experiment(tmp_path, monkeypatch):
    from illada_lightning.reporting.report import REPORTS_EXPERIMENT, default_out_root
    from illada_lightning.runs import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG

    runs = tmp_path / "runs"
    runs.mkdir()
    uri = f"sqlite:///{runs / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("train", artifact_location=(runs / "artifacts").as_uri())
    for name in ("job-a", "job-b"):  # two unrelated training jobs: no single root to attach the report to
        _run(client, exp, name, metrics=with_stderr({"eval/cloze/acc": 0.5}))
    monkeypatch.chdir(tmp_path)
    assert make_main(["--experiment", "train", "--tracking-uri", uri]) == 0
    assert (runs / "reports" / "train" / "report.md").is_file()  # not reports/ of the repository
    assert default_out_root("postgresql://host/db") == Path("runs") / "reports"
    assert sorted(r.info.run_name for r in client.search_runs([exp])) == ["job-a", "job-b"]
    holder = client.get_experiment_by_name(REPORTS_EXPERIMENT)
    assert holder.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    assert [r.info.run_name for r in client.search_runs([holder.experiment_id])] == ["report-train"]
    assert make_main(["--experiment", "train", "--tracking-uri", uri]) == 0  # regenerating reuses that run
    assert len(client.search_runs([holder.experiment_id])) == 1


def test_loss_plot_names_a_switch_only_when_one_happened_and_keeps_identical_curves_apart(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from illada_lightning.reporting import plots

    titles, lines = [], []
    monkeypatch.setattr(plots, "_save", lambda fig, path: (titles.append(fig.axes[0].get_title()),
                                                           lines.append(fig.axes[0].get_lines()), plt.close(fig)))
    same = [(s, 5.0 - 0.1 * s) for s in range(20)]
    plots.plot_training_loss({"a": same, "b": list(same)}, {}, tmp_path / "x.png")
    plots.plot_training_loss({"a": same}, {"a": 7}, tmp_path / "y.png")
    assert titles[0] == "Training loss" and "switch" in titles[1]
    a, b = lines[0][:2]
    assert (a.get_linestyle(), a.get_marker()) != (b.get_linestyle(), b.get_marker())


def test_sft_epoch_plot_draws_error_bars(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from illada_lightning.reporting import plots

    seen = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: (seen.append(fig.axes[0].containers), plt.close(fig)))
    plots.plot_epoch_curve({"toy (acc)": [(1, 30.0, 4.6), (2, 45.0, 5.0)]}, tmp_path / "e.png")
    (container,) = seen[0]
    assert container.has_yerr


def _loss_sweep(client, exp, name, losses):
    """A `--multirun` over the learning rate on `val/loss` (minimize): {(lr, seed): val/loss}."""
    space = ["pretrain.optim.lr", *(["seed"] if any(seed is not None for _, seed in losses) else [])]
    parent = _run(client, exp, f"sweep-{name}", {
        "sweep.role": "parent", "sweep.name": name, "sweep.study": name, "sweep.space": json.dumps(space),
        "sweep.objective": "val/loss", "sweep.direction": "minimize", "sweep.mode": "train",
        "sweep.sampler": "grid"})
    for number, ((lr, seed), loss) in enumerate(losses.items()):
        params = {"pretrain.optim.lr": lr, **({"seed": seed} if seed is not None else {})}
        _trial(client, exp, parent, number, params, {"val/loss": loss, "train/loss": loss + 0.1})
    return parent


def test_a_loss_only_sweep_reads_as_one_and_prints_the_reports_verdict(tmp_path):
    """A search on `val/loss` said "(n unknown)" in every cell, was headed "× task" and carried the accuracy
    footnote; and `--multirun` printed `best: 6.33912` while the report said "tie within noise"."""
    from illada_lightning.reporting.tables import LOSS_NOTE, NOTE
    from illada_lightning.reporting.verdict import sweep_verdict

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("illada-lightning", artifact_location=(tmp_path / "art").as_uri())
    once = _loss_sweep(client, exp, "multirun-once", {(0.001, None): 6.8123, (0.003, None): 6.3391})
    seeds = _loss_sweep(client, exp, "multirun-seeds", {
        (0.001, 0): 6.81, (0.001, 1): 6.83, (0.001, 2): 6.80, (0.003, 0): 6.34, (0.003, 1): 6.31, (0.003, 2): 6.35})
    md = build_report(uri, sweep="multirun-once", out_root=tmp_path, log_artifact=False).path.read_text()
    assert "### `val/loss` by pretrain.optim.lr" in md and "× task" not in md
    assert "| pretrain.optim.lr | val/loss | runs |" in md and "| 0.003 | 6.3391 | 1 |" in md
    assert "n unknown" not in md and LOSS_NOTE in md and NOTE not in md
    verdict = sweep_verdict(uri, once)
    assert verdict.startswith("No best setting named: the noise is unknown") and "`val/loss`" in verdict
    assert "pretrain.optim.lr=0.003 (6.3391)" in verdict and "seed=0,1,2" in verdict
    assert verdict in md  # the terminal and the report say the same

    md = build_report(uri, sweep="multirun-seeds", out_root=tmp_path, log_artifact=False).path.read_text()
    verdict = sweep_verdict(uri, seeds)
    # three seeds a setting: 6.3333 ± 0.0120 vs 6.8133 ± 0.0088, far beyond the noise: the lower loss is named
    assert verdict.startswith("Best setting: pretrain.optim.lr=0.003, `val/loss` = 6.3333 ± 0.0120") and verdict in md
    assert "| 0.003 | 6.3333 ± 0.0120 | 3 |" in md and "over seed" in md
    # the experiment report holds both sweeps, and is not attached to either sweep's parent run
    report = build_report(uri, experiment="illada-lightning", out_root=tmp_path)
    assert report.path.read_text().count("## Sweep `") == 2 and not set(report.logged_to) & {once, seeds}
