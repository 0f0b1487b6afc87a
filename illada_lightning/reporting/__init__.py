"""Reports from MLflow: paper-style ablation tables, the SFT-epoch curve and the training-loss curve."""

from .collect import ReportError, RunRecord
from .report import Report, build_report
from .tables import Table, ablation_table, mean_se

__all__ = ["Report", "ReportError", "RunRecord", "Table", "ablation_table", "build_report", "mean_se"]
