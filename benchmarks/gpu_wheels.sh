#!/usr/bin/env bash
# Prepare .whl/: DeepSpeed and the other packages benchmarks/gpu_check.py needs that the GPU machine
# lacks, as wheels for CPython 3.12 on manylinux x86_64 (that machine has Python 3.12 and torch 2.11
# with CUDA, and no network: the wheels travel with the working tree, 64 MiB at most together).
#
#   bash benchmarks/gpu_wheels.sh          # writes .whl/ (ignored by git: /.whl/ in .gitignore)
#
# Then, on the GPU machine (the device tool's run, with carry [".whl"]):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site && python3 benchmarks/gpu_check.py --out $OUT
#
# Versions are the ones constraints.txt pins (the versions the test suite passed with). The list is
# what the GPU image (Python 3.12, torch 2.11, CUDA 13) does not have:
#   deepspeed                  and, of its Requires-Dist, hjson and pydantic (with pydantic_core,
#                              annotated_types, typing_inspection and a typing_extensions new enough
#                              for them); einops, msgpack, ninja, numpy, packaging, psutil,
#                              py-cpuinfo, torch, tqdm and nvidia-ml-py are there
#   braceexpand                data_pipeline/sources.py imports it at module level
#   open_clip_torch            the text priors' text encoder (model_zoo/text_encoders.py), with ftfy
#                              and wcwidth (its regex, timm, huggingface_hub, safetensors and
#                              torchvision are there)
# Not carried: fsspec (there), s3fs (only for s3:// URLs), webdataset and submitit (not imported by
# a run), transformers/tensorboard/scikit-learn/scikit-image/pillow/scipy (there).
# DeepSpeed publishes an sdist only on some releases: then a wheel is built from it here (its ops are
# JIT-built at run time, so the wheel is pure Python: py3-none-any).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.whl
PKGS=(deepspeed hjson pydantic pydantic_core annotated_types typing_inspection typing_extensions
      braceexpand open_clip_torch ftfy wcwidth)

PY=${PYTHON:-python3}
"$PY" -m pip --version >/dev/null 2>&1 || PY=.venv/bin/python

pin() {   # the version constraints.txt pins for $1 (names compared as pip does: - _ . alike, any case)
    local want
    want=$(echo "$1" | tr 'A-Z_.' 'a-z--')
    while IFS= read -r line; do
        local name=${line%%==*}
        if [ "$(echo "$name" | tr 'A-Z_.' 'a-z--')" = "$want" ]; then
            echo "${line#*==}"
            return 0
        fi
    done < <(grep '==' constraints.txt)
    return 1
}

rm -rf "$DEST"
mkdir -p "$DEST"
for pkg in "${PKGS[@]}"; do
    version=$(pin "$pkg") || { echo "gpu_wheels: $pkg has no pin in constraints.txt" >&2; exit 1; }
    if ! "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d "$DEST" "$pkg==$version"; then
        if [ "$pkg" != deepspeed ]; then
            echo "gpu_wheels: no cp312 manylinux wheel of $pkg==$version" >&2
            exit 1
        fi
        echo "gpu_wheels: deepspeed==$version has no wheel; building one from its sdist"
        .venv/bin/pip wheel -q --no-deps "deepspeed==$version" -w "$DEST" \
            || .venv/bin/pip wheel -q --no-deps --no-build-isolation "deepspeed==$version" -w "$DEST"
    fi
done

echo
echo "DeepSpeed's requirements (Requires-Dist), and which of them travel here:"
unzip -p "$DEST"/deepspeed-*.whl '*/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' | while IFS= read -r req; do
    name=$(echo "${req#Requires-Dist: }" | sed 's/[ ;<>=!~(\[].*//' | tr 'A-Z_.' 'a-z--')
    carried="on the GPU image"
    for pkg in "${PKGS[@]}"; do
        [ "$(echo "$pkg" | tr 'A-Z_.' 'a-z--')" = "$name" ] && carried="carried"
    done
    printf '  %-40s %s\n' "${req#Requires-Dist: }" "$carried"
done
echo
ls -l "$DEST" | awk 'NR > 1 {printf "  %-70s %8.2f MiB\n", $9, $5 / 1048576}'
du -sb "$DEST" | awk '{printf "total: %.2f MiB in %s\n", $1 / 1048576, $2}'
count=$(ls "$DEST" | wc -l)
[ "$count" -eq "${#PKGS[@]}" ] || { echo "gpu_wheels: expected ${#PKGS[@]} wheels, got $count" >&2; exit 1; }
