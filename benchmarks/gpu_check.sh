#!/usr/bin/env bash
# Throughput checks in one run, sized to fit 8 minutes on a GPU machine; writes logs to $OUT (or ./gpu_out).
#
#   bash benchmarks/gpu_check.sh               # on a GPU machine: the realistic case at full size
#   REDUCED=1 bash benchmarks/gpu_check.sh     # anywhere (the default without a GPU): the same checks, small
#   FULL=1 bash benchmarks/gpu_check.sh        # also the tiny default's extract, a 192-wide teacher, `run distill`
#
# The realistic case is the paper's shape: cait_s24_224 (random weights: speed does not depend on them)
# at 224 px with the 8 recipe layers, over an imagefolder of JPEGs at ImageNet-like sizes
# (benchmarks/make_jpegs.py), the DeiT train policy replayed (RandAugment, erasing, mixup/cutmix) and
# int8 spectra; then a DeiT-Tiny student at 224 from that cache against student-only steps; then the
# read path (benchmarks/read_path.py): each encoding's rows/s per core on the CPU and decoded on the
# GPU.  Each benchmark prints its ratio with the machine's description.  Targets on a GPU: extract >= 0.90 of the
# bare forward; cached SpectralKD <= 1.15 of a student-only step.
set -u
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD
if command -v nvidia-smi >/dev/null && [ "${REDUCED:-0}" != 1 ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
  IMAGES=2048 BATCH=128 RPS=512 WORKERS=14 REPEAT=3 STEPS_BATCH=128 T_EXTRACT=200 T_DISTILL=170 READ_ROWS=1024 T_READ=150
else
  echo "reduced form: no GPU, or REDUCED=1" | tee "$OUT/gpu.txt"
  IMAGES=48 BATCH=8 RPS=16 WORKERS=1 REPEAT=2 STEPS_BATCH=8 T_EXTRACT=400 T_DISTILL=600 READ_ROWS=128 T_READ=300
fi
python3 -c "import torch, timm, zarr, webdataset; print('torch', torch.__version__, 'timm', timm.__version__, 'zarr', zarr.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$OUT/gpu.txt"

# the realistic case
JPEG=${JPEG:-/tmp/gpu_check_jpegs_$IMAGES}
[ -d "$JPEG" ] || python3 benchmarks/make_jpegs.py "$JPEG" --images "$IMAGES" | tee -a "$OUT/gpu.txt"
STUDENT='[{name: deit-spectral, model: deit_tiny_patch16_224, pairs: [[0, 0], [1, 1], [6, 18], [7, 19], [8, 20], [9, 21], [10, 22], [11, 23]], loss: {kind: spectral}}]'
REAL=(--set data.source=imagefolder --set "data.root=$JPEG" --set data.image_size=224 --set data.val_fraction=0.1
  --set data.samples_per_shard=256 --set 'data.mean=[0.485, 0.456, 0.406]' --set 'data.std=[0.229, 0.224, 0.225]'
  --set 'data.augment={scale: [0.08, 1.0], hflip: 0.5, interpolation: bicubic, auto_augment: rand-m9-mstd0.5-inc1, re_prob: 0.25, re_mode: pixel, mixup: 0.8, cutmix: 1.0}'
  --set 'data.eval={crop_pct: 0.875, interpolation: bicubic}'
  --set teacher.model=cait_s24_224 --set 'teacher.kwargs={}'
  --set 'extract.layers=[0, 1, 18, 19, 20, 21, 22, 23]' --set extract.views=1
  --set 'extract.compress={packed: true, quantize: int8, pool: null}'
  --set extract.batch_size=$BATCH --set extract.rows_per_shard=$RPS --set extract.num_workers=$WORKERS
  --set extract.writers=4 --set "distill.students=$STUDENT")
timeout "$T_EXTRACT" python3 benchmarks/extract.py --repeat "$REPEAT" --workdir /tmp/gpu_check_real "${REAL[@]}" 2>&1 \
  | grep -v " INFO " | tee "$OUT/extract_realistic.txt"
timeout "$T_DISTILL" python3 benchmarks/distill.py --repeat "$REPEAT" --epochs-per-round 1 --workdir /tmp/gpu_check_real "${REAL[@]}" \
  --set distill.defaults.batch_size=$STEPS_BATCH \
  --set distill.defaults.num_workers=$WORKERS 2>&1 | grep -v " INFO " | tee "$OUT/distill_realistic.txt"

# the read path at the paper's shape: rows/s per core read (+ decoded) on the CPU, and decoded on the GPU
# from the encoded bytes (each encoding's CUDA decode checked bit for bit against numpy's)
timeout "$T_READ" python3 benchmarks/read_path.py --rows "$READ_ROWS" --repeat "$REPEAT" --workdir /tmp/gpu_check_read \
  2>&1 | tee "$OUT/read_path.txt"

[ "${FULL:-0}" = 1 ] || exit 0
# the tiny default's extract, a 64 px / 192-wide teacher where the forward matters, and `run distill`
timeout 120 python3 benchmarks/extract.py --repeat 3 --workdir /tmp/be1 --set extract.num_workers=8 --set extract.writers=4 2>&1 \
  | grep -v " INFO " | tee "$OUT/extract_default.txt"
timeout 150 python3 benchmarks/extract.py --repeat 3 --workdir /tmp/be2 --set data.image_size=64 \
  --set 'teacher.kwargs={img_size: 64, patch_size: 4, embed_dim: 192, depth: 8, num_heads: 4, depth_token_only: 1}' \
  --set extract.num_workers=8 --set extract.writers=8 --set extract.batch_size=256 --set extract.rows_per_shard=512 2>&1 \
  | grep -v " INFO " | tee "$OUT/extract_wide.txt"
timeout 90 python3 benchmarks/distill.py --repeat 3 --workdir /tmp/be1 2>&1 | grep -v " INFO " | tee "$OUT/distill.txt"
timeout 170 python3 -m pipeline run distill --workdir /tmp/wgpu --set distill.defaults.num_workers=4 2>&1 \
  | grep -E "teacher:|extract:|epoch 40/40|\||finished|error" | tee "$OUT/run_distill.txt"
