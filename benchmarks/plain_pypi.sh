#!/usr/bin/env bash
# The README's quick start against plain PyPI (issue 24, finding 1), simulated: a fresh clone whose pip
# reads no configuration and no index but WHEELS, a folder of what PyPI itself serves for these pins
# (`pip download` of the extras and requirements; no local-version builds such as torch==2.13.0+cpu,
# which only PyTorch's own index has). Prints the install's time and size and whether torch came along.
#
#   mkdir wheels && pip download -d wheels '.[packager,onnx-tflite,agent,text,dev]' transformers safetensors \
#       pip setuptools wheel && pip download --no-deps -d wheels -r requirements-onnx2tf.txt \
#       -r tests/corpus-requirements.txt
#   bash benchmarks/plain_pypi.sh wheels [WORKDIR] [--test]
set -euo pipefail
WHEELS=$(cd "${1:?usage: plain_pypi.sh WHEELS_DIR [WORKDIR] [--test]}" && pwd)
WORK=${2:-$(mktemp -d)}
REPO=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
rm -rf "$WORK/edgepack"
git clone -q "$REPO" "$WORK/edgepack"
cd "$WORK/edgepack"
# pip: no config file (no extra index, no find-links, no constraints), no index, only WHEELS
export PIP_CONFIG_FILE=/dev/null PIP_NO_INDEX=1 PIP_FIND_LINKS="$WHEELS" PIP_CONSTRAINT="" PIP_DISABLE_PIP_VERSION_CHECK=1
unset PIP_EXTRA_INDEX_URL PIP_INDEX_URL || true
torch() { .venv/bin/python -c 'import importlib.util as u; print("yes" if u.find_spec("torch") else "no")'; }
t0=$SECONDS
make .venv/.demo-installed > "$WORK/install-demo.log" 2>&1
t1=$SECONDS
echo "make demo's install: $((t1 - t0)) s, venv $(du -sh .venv | cut -f1), torch: $(torch)," \
     "setuptools warnings: $(grep -c 'Warning' "$WORK/install-demo.log" || true)"
make demo > "$WORK/demo.log" 2>&1
echo "make demo: $((SECONDS - t1)) s after the install; $(grep -c 'committed' "$WORK/demo.log") 'committed' line(s)"
if [ "${3:-}" = "--test" ]; then
  t2=$SECONDS
  make install corpus > "$WORK/install-test.log" 2>&1
  echo "make test's install: $((SECONDS - t2)) s more, venv $(du -sh .venv | cut -f1), torch: $(torch);" \
       "$(grep -c 'note: no CPU build of torch' "$WORK/install-test.log" || true) note(s) that the HF tests skip"
  t3=$SECONDS
  make test > "$WORK/test.log" 2>&1 && echo "make test: passed in $((SECONDS - t3)) s" \
    || { echo "make test: FAILED after $((SECONDS - t3)) s (log: $WORK/test.log)"; exit 1; }
  tail -1 "$WORK/test.log"
fi
