#!/usr/bin/env bash
# Installs nnU-Net v2 (patchblend's [nnunet] extra) into the current Python environment without touching its torch:
# the torch already installed is pinned by a constraints file, nnunetv2 and dynamic-network-architectures go in with
# --no-deps, and their runtime requirements come from .ci/nnunet-requirements.txt (see the comment there for why).
# Fails if torch's version changed. Usage: bash .ci/install_nnunet.sh   (after torch and patchblend are installed)
set -euo pipefail
cd "$(dirname "$0")/.."

NNUNETV2="nnunetv2==2.8.1"
DNA="dynamic-network-architectures>=0.4.4,<0.5"

before=$(python -c "import torch; print(torch.__version__)")
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "torch==${before}" > "$constraints"

pip install -c "$constraints" -r .ci/nnunet-requirements.txt
pip install -c "$constraints" --no-deps "$NNUNETV2" "$DNA"

after=$(python -c "import torch; print(torch.__version__)")
if [ "$before" != "$after" ]; then
    echo "install_nnunet.sh: torch changed from $before to $after" >&2
    exit 1
fi
python -c "
import importlib.metadata, torch
import nnunetv2.inference.predict_from_raw_data as p
from dynamic_network_architectures.architectures.unet import PlainConvUNet
print('nnU-Net', importlib.metadata.version('nnunetv2'), 'with torch', torch.__version__)
"
echo "install_nnunet.sh: torch $after unchanged"
