"""Figures people can look at: a static HTML report of a run directory, and the same figures
for W&B.

    from onerec.report import metrics_table, training_figures, write_report
    write_report(run_dir)                               # RUN_DIR/report.html + RUN_DIR/report/*.png
    run_logger.log_figures(training_figures(run_dir))   # expert load + codebook plots to W&B
    run_logger.log_table("metrics", *metrics_table(metrics))   # metrics.json's table to W&B

Modules: run_files (read the stages' outputs), figures (one matplotlib Figure per plot),
tables (rows for the page and for wandb.Table), html (the page), build (puts them together).
matplotlib is imported only when a figure is drawn.
"""

from onerec.report.build import training_figures, write_report
from onerec.report.tables import metrics_table

__all__ = ["metrics_table", "training_figures", "write_report"]
