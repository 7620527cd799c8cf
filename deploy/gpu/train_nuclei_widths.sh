#!/bin/bash
# Three nuclear U-Nets (widths 32, 48, 16) trained side by side on one GPU, each with the
# nuclear recipe, 256 px crops, 4 crop-cutting processes and a wall-clock budget; models and
# logs go to $OUT. Needs .devdata/ from deploy/gpu/prepare_carry.py. BUDGET: seconds per run;
# EXTRA: further `pipeline train` flags (a CPU dry run: EXTRA="--device cpu --steps-per-epoch 2").
# Not yet run on a GPU: the session that wrote it was lent none.
set -u
export PYTHONUNBUFFERED=1 CUBLAS_WORKSPACE_CONFIG=:4096:8 PYTHONPATH=$PWD
BUDGET=${BUDGET:-420}; EXTRA=${EXTRA:-}
python3 -c "import dask" 2>/dev/null || python3 -m pip install -q --no-index --no-deps .devdata/wheels/*.whl 2>&1 | tail -2
recipe=pipeline/convnet/recipes/nuclei_unet.yaml
mkdir -p ../shared/data 2>/dev/null; [ -e ../shared/data/segmentation ] || ln -s "$PWD/.devdata/segmentation" ../shared/data/segmentation 2>/dev/null
if [ ! -e ../shared/data/segmentation/dsb2018 ]; then
  sed "s#../shared/data/segmentation#$PWD/.devdata/segmentation#" $recipe > .devdata/nuclei_unet.yaml
  cp pipeline/convnet/recipes/dsb2018_validation.txt .devdata/; recipe=.devdata/nuclei_unet.yaml; echo "recipe rewritten"
fi
nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null; nproc
python3 -c "import torch, dask, pydantic; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
common="--config $recipe --crop 256 --batch-size 16 --lr 2e-3 --epochs 400 --patience 400 --loader-workers 4 --threads 1 --time-budget $BUDGET"
python3 -m pipeline train $common --base-channels 32 --depth 3 --seed 11 $EXTRA --out "$OUT/nuclei_b32d3" > "$OUT/a.log" 2>&1 &
python3 -m pipeline train $common --base-channels 48 --depth 3 --seed 11 $EXTRA --out "$OUT/nuclei_b48d3" > "$OUT/b.log" 2>&1 &
python3 -m pipeline train $common --base-channels 16 --depth 3 --seed 11 $EXTRA --out "$OUT/nuclei_b16d3" > "$OUT/c.log" 2>&1 &
wait
for f in a b c; do echo "== $f"; grep -v -i "warn\|^ *$" "$OUT/$f.log" | tail -60; done > "$OUT/logs.txt"
rm -f "$OUT"/?.log; cat "$OUT/logs.txt" | grep -v "^epoch" ; grep "^epoch" "$OUT/logs.txt" | awk 'NR%10==0'
