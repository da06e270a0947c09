"""Helpers of the MUSBO example: report (returns, uncertainty metrics, BREMEN comparison)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from torchrl_depeff.algorithms import MUSBOConfig
from torchrl_depeff.metrics import METRIC_NAMES
from torchrl_depeff.metrics_plots import (
    BREMEN_COLUMNS,
    markdown_table,
    MUSBO_COLUMNS,
    plot_comparison,
    plot_metrics,
    plot_returns,
)

log = logging.getLogger(__name__)


def load_history(output_dir: str | Path) -> list[dict[str, float]]:
    """``metrics.json`` of a BREMEN or MUSBO example run."""
    path = Path(output_dir) / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.json in {output_dir} (compare_with must be a run's output_dir)")
    return json.loads(path.read_text())


def write_report(history: list[dict[str, float]], config: MUSBOConfig, run_dir: Path, title: str,
                 compare_with: str | None, csv_logs: bool) -> str:
    """``returns.png``, ``metrics.png`` (CSV logs), ``comparison.png`` and ``summary.md``."""
    plot_returns(history, config.deployment.size, run_dir / "returns.png", title)
    if csv_logs and config.analysis.enabled:
        try:
            plot_metrics({"MUSBO": run_dir / "logs" / "musbo"}, run_dir / "metrics.png", list(METRIC_NAMES.values()),
                         xlabel="real transitions")
        except FileNotFoundError as err:
            log.warning("no metrics plot: %s", err)
    if compare_with is not None:
        runs = {"BREMEN": load_history(compare_with), "MUSBO": history}
        plot_comparison(runs, run_dir / "comparison.png", f"BREMEN vs MUSBO on {config.task}")
    text = (f"# {title}\n\n{markdown_table(history, BREMEN_COLUMNS)}\n\n## Uncertainty and analysis metrics\n\n"
            f"{markdown_table(history, MUSBO_COLUMNS)}\n")
    (run_dir / "summary.md").write_text(text)
    return text
