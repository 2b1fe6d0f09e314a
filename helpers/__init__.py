"""Helpers for the big-model inference notebooks: one module per concept.

Importing this package changes no global state (no seeds, no plotting style, no environment).
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
    streaming    a prefetching streamer: pinned host buffers, a side CUDA stream, read-ahead from disk
    speed_plots  the figures of notebook 08 (seconds per token against the bound)
    multi_gpu    a layer-wise split over several GPUs traced block by block; pipeline utilisation
    tensor_parallel  transformers' tensor-parallel plan under torchrun: what each rank runs, the launcher
    hub          a local Hugging Face cache (real layout) and offline mode, so hub ids load offline
    plots        the matplotlib figures the notebooks show
    widgets      the ipywidgets apps the notebooks show
    source       show a helper's source in a notebook, so no magic hides the lesson
    paths        where committed data and the git-ignored cache live
"""
