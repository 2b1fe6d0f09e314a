"""Helpers for the big-model inference notebooks: one module per concept.

Importing this package changes no global state (no seeds, no plotting style, no environment). It imports one
library early, quietly: torchao (pinned for notebook 12), see `_import_torchao_quietly`.
Modules:
    memory       bytes per dtype, GB vs GiB, model / KV-cache / activation estimates
    models       real Llama-2 configs from data/configs, meta-device models, exact parameter counts
    devices      what this machine has: GPUs, RAM, free disk
    measure      host (anonymous vs file-backed) and CUDA memory over time, as a timeline
    child        run a function in a fresh child process, measured, optionally under a memory cap
    oom          predicting where memory runs out (load and prefill), to compare with where it does
    checkpoints  a deterministic, cached factory of sharded safetensors checkpoints
    loading      the ways to load a checkpoint (normal path, meta + assign, mmap, safetensors, dispatch)
    sizes        total and largest-layer sizes, cross-checked with accelerate
    device_maps  plan device maps as accelerate does, summarise and draw them, read offload folders
    tracing      records accelerate's hook calls at inference: which module, where its weights are, when, memory
    offload      a minimal offloader on PyTorch forward hooks
    streaming    a prefetching streamer: pinned host buffers, a side CUDA stream, read-ahead from disk;
                 int8 layers sent with their scales and dequantised on the device
    speed_plots  the figures of notebook 08 (seconds per token against the bound)
    multi_gpu    a layer-wise split over several GPUs traced block by block; pipeline utilisation
    tensor_parallel  transformers' tensor-parallel plan under torchrun: what each rank runs, the launcher
    hub          a local Hugging Face cache (real layout) and offline mode, so hub ids load offline
    plots        the matplotlib figures the notebooks show
    widgets      the ipywidgets apps the notebooks show
    source       show a helper's source in a notebook, so no magic hides the lesson
    paths        where committed data and the git-ignored cache live
    layout       where a model's blocks, embedding and head are, read from the model (any family)
    own_model    BIGMODEL_CHECKPOINT: your own checkpoint in notebooks 05, 07 and 09, or a clear stop
    quantization what int8 / NF4 / torchao int8 store, predicted and measured; quality and speed of each
"""

import importlib.util
import logging


def _import_torchao_quietly() -> None:
    """Import torchao now, with its import-time log lines held back, if it is installed.

    transformers imports torchao whenever it builds a model (`transformers/quantizers/quantizer_torchao.py` runs
    `from torchao... import ...` when torchao is installed), so every notebook would import it. torchao 0.18 ships
    CUDA extensions; with a CPU build of torch, `torchao/__init__.py` logs "Failed to load ..._C_mxfp8....so" and
    "..._C_cutlass_90a.abi3.so" (its logger `torchao`), and torch logs two deprecation notes about torchao's Enum
    pytree nodes (`torch.utils._pytree`). None of it matters to these notebooks (notebook 12 says what does), so
    the two loggers are raised to ERROR for the import and put back as they were. Nothing else is changed.
    """
    if importlib.util.find_spec("torchao") is None:
        return
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        import torchao  # noqa: F401
        import torchao.prototype.safetensors.safetensors_support  # noqa: F401  (what transformers imports)
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


_import_torchao_quietly()
