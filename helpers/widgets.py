"""The ipywidgets apps the notebooks show, and small display helpers; the computing lives in pure functions."""

from __future__ import annotations

import html

import ipywidgets as widgets
from IPython.display import Markdown
from transformers import PretrainedConfig

from .memory import BYTES_PER_PARAM, COMMON_GPUS, GPU, FitReport, fit_report, gpu_by_name
from .models import count_parameters, load_config, meta_model

#: The three Llama-2 sizes, by display name and committed config name.
LLAMA2 = {"Llama-2-7B": "llama-2-7b", "Llama-2-13B": "llama-2-13b", "Llama-2-70B": "llama-2-70b"}
CUSTOM = "custom"

#: The `description` of every control of the memory calculator: stable, so a browser test can find them.
DESCRIPTIONS = {"model": "Model", "custom_params": "Params (billions)", "dtype": "Dtype", "gpu": "GPU",
                "seq_len": "Context (tokens)", "batch_size": "Batch size", "result": "Result"}
RESULT_CLASS = "memory-calculator-result"
APP_CLASS = "memory-calculator"


def llama2_models() -> dict[str, tuple[int, PretrainedConfig]]:
    """Llama-2 7B/13B/70B: (exact parameter count on the meta device, config), by display name."""
    models = {}
    for display, name in LLAMA2.items():
        config = load_config(name)
        models[display] = (count_parameters(meta_model(config)), config)
    return models


def markdown_table(headers: list[str], rows: list[list]) -> Markdown:
    """A Markdown table (pandas-free; numeric columns right-aligned): renders in Jupyter, reads as text headless."""
    def numeric(cell: object) -> bool:
        return str(cell).replace(",", "").replace(".", "", 1).lstrip("-").isdigit()

    aligns = ["---:" if rows and all(numeric(row[k]) for row in rows) else ":---" for k in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(aligns) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return Markdown("\n".join(lines))


def report_html(report: FitReport) -> str:
    """The calculator's result as HTML: the verdict in colour over the report as it prints."""
    colour = "#1a7f37" if report.fits else "#cf222e"
    return (f'<b style="color:{colour}">{html.escape(report.verdict)}</b>'
            f"<pre>{html.escape(repr(report))}</pre>")


class MemoryCalculator(widgets.VBox):
    """Model, dtype, GPU, context and batch in; does it fit, and by how much (GB and GiB), out."""

    def __init__(self, models: dict[str, tuple[int, PretrainedConfig]] | None = None,
                 gpus: tuple[GPU, ...] = COMMON_GPUS) -> None:
        self.models = models if models is not None else llama2_models()
        self.gpus = gpus
        style = {"description_width": "130px"}
        layout = widgets.Layout(width="480px")
        self.model = widgets.Dropdown(options=[*self.models, CUSTOM], value=list(self.models)[-1],
                                      description=DESCRIPTIONS["model"], style=style, layout=layout)
        self.custom_params = widgets.FloatText(value=7.0, description=DESCRIPTIONS["custom_params"],
                                               disabled=True, style=style, layout=layout)
        self.dtype = widgets.Dropdown(options=list(BYTES_PER_PARAM), value="float16",
                                      description=DESCRIPTIONS["dtype"], style=style, layout=layout)
        names = [g.name for g in gpus]
        self.gpu = widgets.Dropdown(options=names, value="A100 80 GB" if "A100 80 GB" in names else names[-1],
                                    description=DESCRIPTIONS["gpu"], style=style, layout=layout)
        self.seq_len = widgets.IntSlider(value=4096, min=0, max=32768, step=256,
                                         description=DESCRIPTIONS["seq_len"], style=style, layout=layout)
        self.batch_size = widgets.IntSlider(value=1, min=1, max=64, description=DESCRIPTIONS["batch_size"],
                                            style=style, layout=layout)
        self.result = widgets.HTML(description=DESCRIPTIONS["result"], style=style)
        self.result.add_class(RESULT_CLASS)
        self.report: FitReport | None = None
        controls = [self.model, self.custom_params, self.dtype, self.gpu, self.seq_len, self.batch_size]
        for control in controls:
            control.observe(self._update, names="value")
        super().__init__(children=[*controls, self.result])
        self.add_class(APP_CLASS)
        self._update()

    def _update(self, change: dict | None = None) -> None:
        """Recompute the report from the controls (called on every change)."""
        custom = self.model.value == CUSTOM
        self.custom_params.disabled = not custom
        n_params, config = (int(self.custom_params.value * 1e9), None) if custom else self.models[self.model.value]
        self.report = fit_report(n_params, self.dtype.value, gpu_by_name(self.gpu.value, self.gpus), config=config,
                                 batch_size=self.batch_size.value, seq_len=self.seq_len.value,
                                 model=self.model.value)
        self.result.value = report_html(self.report)


def memory_calculator(models: dict[str, tuple[int, PretrainedConfig]] | None = None,
                      gpus: tuple[GPU, ...] = COMMON_GPUS) -> MemoryCalculator:
    """The memory calculator app; `models` maps a name to (n_params, config), Llama-2 7B/13B/70B by default."""
    return MemoryCalculator(models, gpus)
