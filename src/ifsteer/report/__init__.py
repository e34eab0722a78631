"""Everything a run looks like: the HTML page, its figures, and the CLI's tables.

- `page`: `render_report(run_dir)`, one self-contained HTML page;
- `figures`: the PNGs (four settings, per instruction, layer sweeps);
- `tables`: the text tables the CLI prints.

Torch-free: a finished run is reported without loading a model stack.
"""

from ifsteer.report.figures import draw_sweep, plot_sweep
from ifsteer.report.page import ReportError, render_report

__all__ = ["ReportError", "draw_sweep", "plot_sweep", "render_report"]
