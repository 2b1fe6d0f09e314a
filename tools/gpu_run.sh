#!/usr/bin/env bash
# Run tests and notebooks on a lent GPU machine, which has torch and CUDA but may lack Jupyter
# packages or carry other versions of transformers / accelerate. Wheels for Python 3.12, downloaded
# on the dev machine into .gpu-wheels/ (git-ignored), are installed first when present:
#   pip download --python-version 3.12 --only-binary=:all: -d .gpu-wheels transformers==5.24.0 ...
# Usage: tools/gpu_run.sh [pytest args...]. When $OUT is set, the executed notebooks among the arguments and a
# run.json (GPUs, versions, date, result) are packed into $OUT/executed-$RUN_LABEL.tar.gz (one file: the device tool
# returns few files); unpack it into data/executed/ and `make site` renders it. RUN_LABEL defaults to the GPU count.
# GPU_WHEELS names another wheel folder (a subset, when the transfer limit is tight), installed with --no-deps.
set -uo pipefail
cd "$(dirname "$0")/.."
wheels="${GPU_WHEELS:-.gpu-wheels}"
if [ -n "${GPU_WHEELS:-}" ]; then
  # A curated subset, installed as it is, without pip's resolver: it may leave out optional dependencies that the
  # transfer limit has no room for (debugpy and jedi: ipykernel and IPython run without them).
  python3 -m pip install -q --no-index --no-deps "$wheels"/*.whl 2>&1 | tail -3
elif [ -d "$wheels" ]; then
  python3 -m pip install -q --no-index --find-links "$wheels" \
    transformers==5.24.0 huggingface_hub==2.4.0 accelerate==1.15.0 safetensors ipykernel ipywidgets \
    nbclient nbformat nbmake pytest psutil tqdm matplotlib 2>&1 | tail -3
  # Notebook 12's quantisation libraries, when their wheels travel (bitsandbytes' wheel is 43 MB with a library for
  # every CUDA and ROCm version; tools/slim_bitsandbytes.sh keeps the CPU and CUDA 13.0 ones, 3.6 MB).
  for pin in bitsandbytes==0.50.2 torchao==0.18.0; do
    if ls "$wheels/${pin%%==*}-"*.whl >/dev/null 2>&1; then
      python3 -m pip install -q --no-index --no-deps --find-links "$wheels" "$pin" 2>&1 | tail -1
    fi
  done
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -1
python3 -m ipykernel install --sys-prefix --name python3 >/dev/null 2>&1 || true
python3 - <<'PY'
import torch, transformers, accelerate
print(f"torch {torch.__version__}, transformers {transformers.__version__}, accelerate {accelerate.__version__}")
print("GPU:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
from importlib.metadata import PackageNotFoundError, version
for name in ("huggingface_hub", "tokenizers", "bitsandbytes", "torchao", "ipykernel", "nbmake"):
    try:
        print(f"{name} {version(name)}", end="; ")
    except PackageNotFoundError:
        print(f"{name} not installed", end="; ")
print()
PY
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -m pytest -p no:cacheprovider --nbmake --nbmake-timeout=600 --overwrite "$@"
status=$?
if [ -n "${OUT:-}" ]; then
  label="${RUN_LABEL:-$(python3 -c 'import torch; print(f"{torch.cuda.device_count()}-gpu")')}"
  stage="$(mktemp -d)/$label"
  mkdir -p "$stage"
  for arg in "$@"; do
    case "$arg" in notebooks/*.ipynb) cp "$arg" "$stage/" ;; esac
  done
  STATUS=$status python3 - "$stage/run.json" <<'PY'
import datetime, json, os, sys
import accelerate, torch, transformers
gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
json.dump({"machine": f"{len(gpus)} x {gpus[0]}" if gpus else "no GPU", "gpus": gpus,
           "torch": torch.__version__, "transformers": transformers.__version__,
           "accelerate": accelerate.__version__, "date": datetime.date.today().isoformat(),
           "pytest exit status": int(os.environ["STATUS"])}, open(sys.argv[1], "w"), indent=2)
PY
  tar -czf "$OUT/executed-$label.tar.gz" -C "$(dirname "$stage")" "$label"
fi
exit $status
