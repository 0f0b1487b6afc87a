"""Generate a report from MLflow: `python -m reports.make --sweep NAME` or `--experiment NAME`.

Writes `<runs directory>/reports/<name>/report.md` (beside the MLflow store: `runs/reports/` by default) with
the paper-style tables (scoring rule × task like iLLaDA Table 4, block length × task like LLaDA Table 7,
remasking like LLaDA Table 9, SFT epochs × task), `sft_epochs.png`,
`training_loss.png` (plateau LR switch marked), and the commit and config of every run it cites; every accuracy
with n and ± standard error, and "best" only beyond the noise. It then logs the directory as the `report/` artifact
of the sweep's parent run (an experiment report: of a run in the separate `reports` experiment, never of the
training experiment). Regenerating gives the same Markdown.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reports.make", description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--experiment", help="MLflow experiment name")
    which.add_argument("--sweep", help="sweep name (the `name:` of its YAML)")
    parser.add_argument("--tracking-uri", default="sqlite:///runs/mlflow.db",
                        help="MLflow store (default: the training runs' store sqlite:///runs/mlflow.db)")
    parser.add_argument("--out-root", default=None,
                        help="reports go to <out-root>/<name>/ (default: reports/ beside the store, e.g. runs/reports)")
    parser.add_argument("--no-log", action="store_true", help="do not log the report as an MLflow artifact")
    args = parser.parse_args(argv)
    from illada_lightning.logs import configure_logging
    from illada_lightning.reporting import ReportError, build_report  # MLflow loads only after parsing

    configure_logging()
    try:
        report = build_report(args.tracking_uri, experiment=args.experiment, sweep=args.sweep,
                              out_root=args.out_root, log_artifact=not args.no_log)
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"report: {report.path} ({len(report.cited)} runs cited, plots: {', '.join(p.name for p in report.plots)})")
    if report.logged_to:
        print(f"logged as artifact 'report/' of run(s) {', '.join(report.logged_to)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
