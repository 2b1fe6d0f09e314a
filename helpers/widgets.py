"""The ipywidgets apps the notebooks show, and small display helpers; the computing lives in pure functions."""

from __future__ import annotations

import html

import ipywidgets as widgets
import torch
from IPython.display import Markdown
from transformers import PretrainedConfig

from .memory import BYTES_PER_PARAM, COMMON_GPUS, GPU, FitReport, fit_report, format_bytes, gpu_by_name
from .models import count_parameters, load_config, meta_model
from .quantization import Footprint, predict_footprint, quantized_fit_report, stored_skeleton

#: The three Llama-2 sizes, by display name and committed config name.
LLAMA2 = {"Llama-2-7B": "llama-2-7b", "Llama-2-13B": "llama-2-13b", "Llama-2-70B": "llama-2-70b"}
CUSTOM = "custom"
#: The other committed architectures (helpers.models.OTHER_ARCHITECTURES, every one: a test holds it), by the
#: names their publishers use.
ARCHITECTURES = {"Llama-3.2-1B": "llama-3.2-1b", "Llama-3-8B": "llama-3-8b", "Qwen2.5-0.5B": "qwen2.5-0.5b",
                 "Qwen2.5-1.5B": "qwen2.5-1.5b", "Mistral-7B": "mistral-7b", "Phi-3-mini": "phi-3-mini",
                 "Gemma-2-2B": "gemma-2-2b", "GPT-2": "gpt2"}

#: The `description` of every control of the memory calculator: stable, so a browser test can find them.
DESCRIPTIONS = {"model": "Model", "custom_params": "Params (billions)", "dtype": "Dtype", "gpu": "GPU",
                "seq_len": "Context (tokens)", "batch_size": "Batch size", "result": "Result"}
RESULT_CLASS = "memory-calculator-result"
APP_CLASS = "memory-calculator"
#: The formats as bitsandbytes stores them (helpers.quantization), offered beside 01's bytes per parameter by the
#: calculator and the planner: label -> helpers.quantization format.
STORED_FORMATS = {"int8 (bitsandbytes LLM.int8)": "int8", "NF4 (bitsandbytes)": "nf4",
                  "NF4 + double quantisation": "nf4-dq"}
#: 01's one-number entry each stored format is compared with (bytes per parameter), and back.
_NAIVE = {"int8": "int8", "nf4": "int4", "nf4-dq": "int4"}
_STORED = {"int8": "int8", "int4": "nf4"}


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


def report_html(report: FitReport, note: str = "") -> str:
    """The calculator's result as HTML: the verdict in colour over the report as it prints (and a note under it)."""
    colour = "#1a7f37" if report.fits else "#cf222e"
    return (f'<b style="color:{colour}">{html.escape(report.verdict)}</b>'
            f"<pre>{html.escape(repr(report))}</pre>" + (f"<small>{html.escape(note)}</small>" if note else ""))


def stored_note(footprint: Footprint, n_params: int) -> str:
    """How the bytes bitsandbytes stores differ from 01's arithmetic (every parameter at 1 or 0.5 byte)."""
    naive = _NAIVE[footprint.format]
    plain = n_params * BYTES_PER_PARAM[naive]
    label = next(name for name, fmt in STORED_FORMATS.items() if fmt == footprint.format)
    return (f"{label}, as stored: {format_bytes(footprint.total, 'GB')}, {footprint.total / plain - 1:+.1%} over "
            f"01's {BYTES_PER_PARAM[naive]:g} byte per parameter ({format_bytes(plain, 'GB')}): quantised weights "
            f"{format_bytes(footprint.quantized_weights, 'GB')} + scales {format_bytes(footprint.scales, 'GB')} + "
            f"{format_bytes(footprint.unquantized, 'GB')} left in float16 (embeddings, lm_head, norms), as "
            "transformers leaves them (helpers.quantization.predict_footprint)")


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
        self.dtype = widgets.Dropdown(options=[*BYTES_PER_PARAM, *STORED_FORMATS], value="float16",
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
        self.footprint: Footprint | None = None  # the bytes bitsandbytes stores, for a stored format or int8/int4
        self._skeletons: dict = {}
        controls = [self.model, self.custom_params, self.dtype, self.gpu, self.seq_len, self.batch_size]
        for control in controls:
            control.observe(self._update, names="value")
        super().__init__(children=[*controls, self.result])
        self.add_class(APP_CLASS)
        self._update()

    def _skeleton(self, name: str, config: PretrainedConfig):
        """The float16 meta skeleton of a model (its shapes, for predict_footprint); one kept at a time."""
        if name not in self._skeletons:
            self._skeletons = {name: meta_model(config, torch.float16)}
        return self._skeletons[name]

    def _update(self, change: dict | None = None) -> None:
        """Recompute the report from the controls (called on every change)."""
        custom = self.model.value == CUSTOM
        self.custom_params.disabled = not custom
        n_params, config = (int(self.custom_params.value * 1e9), None) if custom else self.models[self.model.value]
        gpu, fmt = gpu_by_name(self.gpu.value, self.gpus), STORED_FORMATS.get(self.dtype.value)
        self.footprint, note = None, ""
        if fmt is not None and config is None:
            self.report = None
            self.result.value = (f'<b style="color:#cf222e">{html.escape(self.dtype.value)} needs the model\'s '
                                 "shapes (which layers are quantised, their widths): pick a named model, or int8 / "
                                 "int4 for a parameter count alone</b>")
            return
        if fmt is not None:  # the weights as bitsandbytes stores them; KV cache and activations in float16
            skeleton = self._skeleton(self.model.value, config)
            self.report = quantized_fit_report(skeleton, config, fmt, gpu, batch_size=self.batch_size.value,
                                               seq_len=self.seq_len.value, name=self.model.value)
            self.footprint = predict_footprint(skeleton, fmt)
            note = stored_note(self.footprint, n_params)
        else:
            self.report = fit_report(n_params, self.dtype.value, gpu, config=config, batch_size=self.batch_size.value,
                                     seq_len=self.seq_len.value, model=self.model.value)
            if self.dtype.value in _STORED and config is not None:  # 01's arithmetic: say what the library stores
                self.footprint = predict_footprint(self._skeleton(self.model.value, config),
                                                   _STORED[self.dtype.value])
                note = (f"01's arithmetic: every parameter at {BYTES_PER_PARAM[self.dtype.value]:g} byte. "
                        + stored_note(self.footprint, n_params))
        self.result.value = report_html(self.report, note)


def memory_calculator(models: dict[str, tuple[int, PretrainedConfig]] | None = None,
                      gpus: tuple[GPU, ...] = COMMON_GPUS) -> MemoryCalculator:
    """The memory calculator app; `models` maps a name to (n_params, config), Llama-2 7B/13B/70B by default."""
    return MemoryCalculator(models, gpus)


# --- the device-map explorer (notebook 05) ----------------------------------------------------------

import io  # noqa: E402 - the explorer's imports, kept with it

import matplotlib.pyplot as plt  # noqa: E402

from .device_maps import DeviceMapSummary, device_map_for_budgets, draw_device_map, summarize_device_map  # noqa: E402

#: The `description` of every control of the device-map explorer ("{unit}" is the sliders' unit).
DEVICE_MAP_DESCRIPTIONS = {"gpu": "GPU 0 budget ({unit})", "cpu": "CPU budget ({unit})", "plan": "Plan"}
DEVICE_MAP_APP_CLASS = "device-map-explorer"
DEVICE_MAP_PLAN_CLASS = "device-map-explorer-plan"
DEVICE_MAP_STRIP_CLASS = "device-map-explorer-strip"
_UNITS = {"MiB": 2**20, "GiB": 2**30, "MB": 10**6, "GB": 10**9}


def device_map_plan_html(summary: DeviceMapSummary, gpu_bytes: int, cpu_bytes: int) -> str:
    """The explorer's verdict line (what runs where) over the summary as it prints."""
    on_gpu, on_cpu, on_disk = (summary.layers_on(d) for d in (0, "cpu", "disk"))
    verdict = (f"{on_gpu} of {summary.num_layers} decoder layers on GPU 0, {on_cpu} in CPU RAM, {on_disk} on disk"
               + (f"; layers {', '.join(map(str, summary.split_layers))} split" if summary.split_layers else ""))
    budgets = f"budgets: GPU 0 {format_bytes(gpu_bytes)}, CPU {format_bytes(cpu_bytes)}, disk unlimited"
    return (f"<b>{html.escape(verdict)}</b><br><small>{html.escape(budgets)}</small>"
            f"<pre>{html.escape(repr(summary))}</pre>")


class DeviceMapExplorer(widgets.VBox):
    """GPU and CPU budgets in; the device map `device_map="auto"` would compute, drawn and summarised, out."""

    def __init__(self, model, *, gpu_budget: int, cpu_budget: int, unit: str = "GiB", max_budget: int | None = None,
                 step: int = 1, no_split_module_classes: list[str] | None = None, dtype=None, title: str = "") -> None:
        self.model, self.dtype, self.title = model, dtype, title
        self.no_split_module_classes = (list(no_split_module_classes) if no_split_module_classes is not None
                                        else list(getattr(model, "_no_split_modules", None) or []))
        self.unit, self.unit_bytes = unit, _UNITS[unit]
        total = sum(p.numel() for p in model.parameters()) * 4  # float32 bytes: room enough on the sliders
        top = max(max_budget or total, gpu_budget, cpu_budget) // self.unit_bytes
        style = {"description_width": "150px"}
        layout = widgets.Layout(width="560px")
        self.gpu = widgets.IntSlider(value=gpu_budget // self.unit_bytes, min=0, max=top, step=step,
                                     continuous_update=False, style=style, layout=layout,
                                     description=DEVICE_MAP_DESCRIPTIONS["gpu"].format(unit=unit))
        self.cpu = widgets.IntSlider(value=cpu_budget // self.unit_bytes, min=0, max=top, step=step,
                                     continuous_update=False, style=style, layout=layout,
                                     description=DEVICE_MAP_DESCRIPTIONS["cpu"].format(unit=unit))
        self.strip = widgets.Image(format="png", layout=widgets.Layout(width="900px"))
        self.strip.add_class(DEVICE_MAP_STRIP_CLASS)
        self.plan = widgets.HTML(description=DEVICE_MAP_DESCRIPTIONS["plan"], style={"description_width": "40px"})
        self.plan.add_class(DEVICE_MAP_PLAN_CLASS)
        self.device_map: dict = {}
        self.summary: DeviceMapSummary | None = None
        for control in (self.gpu, self.cpu):
            control.observe(self._update, names="value")
        super().__init__(children=[self.gpu, self.cpu, self.strip, self.plan])
        self.add_class(DEVICE_MAP_APP_CLASS)
        self._update()

    def _update(self, change: dict | None = None) -> None:
        """Recompute the map from the sliders, redraw the strip and the summary (called on every change)."""
        gpu_bytes, cpu_bytes = self.gpu.value * self.unit_bytes, self.cpu.value * self.unit_bytes
        self.device_map = device_map_for_budgets(self.model, gpu_bytes, cpu_bytes, self.no_split_module_classes,
                                                 self.dtype)
        self.summary = summarize_device_map(self.device_map, self.model, self.dtype)
        fig = draw_device_map(self.device_map, self.model, dtype=self.dtype, title=self.title)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=90)
        plt.close(fig)  # never shown by the notebook's inline backend: the Image widget shows it
        self.strip.value = buffer.getvalue()
        self.plan.value = device_map_plan_html(self.summary, gpu_bytes, cpu_bytes)


def device_map_explorer(config_or_model, *, gpu_budget: int, cpu_budget: int, unit: str = "GiB",
                        dtype=None, **kwargs) -> DeviceMapExplorer:
    """The device-map explorer for a config (its skeleton is built on the meta device) or an existing skeleton."""
    model = config_or_model
    if isinstance(config_or_model, PretrainedConfig):
        model = meta_model(config_or_model, dtype=dtype)
    return DeviceMapExplorer(model, gpu_budget=gpu_budget, cpu_budget=cpu_budget, unit=unit, dtype=dtype, **kwargs)


# --- the inference planner (notebook 09) ------------------------------------------------------------

import json  # noqa: E402 - the planner's imports, kept with it

from transformers import AutoConfig  # noqa: E402

from .planner import PCIE_GB_PER_S, InferencePlan, Links, plan_inference  # noqa: E402

#: The `description` of every control of the planner: stable, so a browser test can find them.
PLANNER_DESCRIPTIONS = {"model": "Model", "config": "config.json", "gpu": "GPU", "dtype": "Dtype",
                        "ram": "CPU RAM (GB)", "pcie": "PCIe generation", "prompt": "Prompt (tokens)",
                        "result": "Plan"}
PLANNER_APP_CLASS = "inference-planner"
PLANNER_RESULT_CLASS = "inference-planner-result"
PASTED = "config.json (pasted below)"
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def config_from_json(text: str) -> PretrainedConfig:
    """A transformers config from the text of a hub-style config.json (needs `model_type`)."""
    try:
        values = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"config.json is not valid JSON: {error}") from None
    if not isinstance(values, dict) or "model_type" not in values:
        raise ValueError("config.json needs a \"model_type\" (e.g. \"llama\") to know which architecture to plan")
    values = dict(values)
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    config._name_or_path = values.get("_name_or_path", "pasted config")
    return config


def plan_html(plan: InferencePlan) -> str:
    """The planner's verdict in bold over the plan as it prints."""
    return f"<b>{html.escape(plan.verdict)}</b><pre>{html.escape(repr(plan))}</pre>"


class InferencePlanner(widgets.VBox):
    """Model (Llama-2, another committed architecture, or a pasted config.json), GPU, dtype, RAM, PCIe and prompt
    in; the device map and speed out."""

    def __init__(self, links: Links, *, base_pcie: int, gpus: tuple[GPU, ...] = COMMON_GPUS,
                 device_memory: dict[str, float] | None = None, config_text: str | None = None) -> None:
        """`config_text`: the config.json the form offers to paste-plan (default: Llama-2-13B's, as an example)."""
        self.links, self.base_pcie, self.gpus = links, base_pcie, gpus
        self.device_memory = device_memory or {}
        self._skeletons: dict = {}
        style = {"description_width": "130px"}
        layout = widgets.Layout(width="480px")
        names = [g.name for g in gpus]
        self.model = widgets.Dropdown(options=[*LLAMA2, *ARCHITECTURES, PASTED], value="Llama-2-70B",
                                      description=PLANNER_DESCRIPTIONS["model"], style=style, layout=layout)
        self.config = widgets.Textarea(value=config_text or load_config("llama-2-13b").to_json_string(), disabled=True,
                                       description=PLANNER_DESCRIPTIONS["config"], style=style,
                                       layout=widgets.Layout(width="480px", height="90px"))
        self.gpu = widgets.Dropdown(options=names, value="A100 80 GB" if "A100 80 GB" in names else names[-1],
                                    description=PLANNER_DESCRIPTIONS["gpu"], style=style, layout=layout)
        self.dtype = widgets.Dropdown(options=[*_DTYPES, *STORED_FORMATS], value="float16",
                                      description=PLANNER_DESCRIPTIONS["dtype"], style=style, layout=layout)
        self.ram = widgets.IntSlider(value=128, min=16, max=1024, step=16, continuous_update=False,
                                     description=PLANNER_DESCRIPTIONS["ram"], style=style, layout=layout)
        self.pcie = widgets.Dropdown(options=sorted(PCIE_GB_PER_S), value=4,
                                     description=PLANNER_DESCRIPTIONS["pcie"], style=style, layout=layout)
        self.prompt = widgets.IntSlider(value=4096, min=128, max=32768, step=128, continuous_update=False,
                                        description=PLANNER_DESCRIPTIONS["prompt"], style=style, layout=layout)
        self.result = widgets.HTML(description=PLANNER_DESCRIPTIONS["result"], style={"description_width": "40px"})
        self.result.add_class(PLANNER_RESULT_CLASS)
        self.plan: InferencePlan | None = None
        controls = [self.model, self.config, self.gpu, self.dtype, self.ram, self.pcie, self.prompt]
        for control in controls:
            control.observe(self._update, names="value")
        super().__init__(children=[*controls, self.result])
        self.add_class(PLANNER_APP_CLASS)
        self._update()

    def _skeleton(self, config, dtype, quantization: str | None = None):
        """The meta skeleton in `dtype`; for a stored format, its copy sized as bitsandbytes stores it."""
        key = (config.to_json_string(), dtype, quantization)
        if key not in self._skeletons:
            model = meta_model(config, dtype)
            # keep one: a 70B skeleton is cheap, not free
            self._skeletons = {key: stored_skeleton(model, quantization) if quantization else model}
        return self._skeletons[key]

    def _update(self, change: dict | None = None) -> None:
        """Re-plan from the controls (called on every change); a bad config.json shows its error instead."""
        pasted = self.model.value == PASTED
        self.config.disabled = not pasted
        gpu = gpu_by_name(self.gpu.value, self.gpus)
        links = self.links.with_pcie(PCIE_GB_PER_S[self.pcie.value] / PCIE_GB_PER_S[self.base_pcie],
                                     self.device_memory.get(gpu.name, self.links.device_memory),
                                     f"{self.links.source}, PCIe scaled to generation {self.pcie.value}")
        try:
            config = (config_from_json(self.config.value) if pasted
                      else load_config({**LLAMA2, **ARCHITECTURES}[self.model.value]))
            quantization = STORED_FORMATS.get(self.dtype.value)  # bitsandbytes: its stored bytes, the rest float16
            dtype = torch.float16 if quantization else _DTYPES[self.dtype.value]
            self.plan = plan_inference(config, gpu, self.ram.value * 10**9, links, dtype=dtype,
                                       prompt_tokens=self.prompt.value, quantization=quantization,
                                       model=self._skeleton(config, dtype, quantization))
            self.result.value = plan_html(self.plan)
        except (ValueError, TypeError, KeyError) as error:
            self.plan = None
            self.result.value = f'<b style="color:#cf222e">{html.escape(str(error))}</b>'
