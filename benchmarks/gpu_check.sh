#!/usr/bin/env bash
# GPU checks (AMP, throughput) in one run: extract and distill benchmarks with CUDA + bf16 autocast,
# and the default pipeline up to distill on the GPU.  Writes its logs to $OUT (or ./gpu_out).
set -u
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, timm, zarr, webdataset; print('torch', torch.__version__, 'timm', timm.__version__, 'zarr', zarr.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$OUT/gpu.txt"
# 1. extract/forward ratio: the default (tiny) teacher, then a 64 px / 192-wide teacher where the forward matters
timeout 120 python3 benchmarks/extract.py --repeat 3 --workdir /tmp/be1 --set extract.num_workers=8 --set extract.writers=4 2>&1 \
  | grep -v " INFO " | tee "$OUT/extract_default.txt"
timeout 150 python3 benchmarks/extract.py --repeat 3 --workdir /tmp/be2 --set data.image_size=64 \
  --set 'teacher.kwargs={img_size: 64, patch_size: 4, embed_dim: 192, depth: 8, num_heads: 4, depth_token_only: 1}' \
  --set extract.num_workers=8 --set extract.writers=8 --set extract.batch_size=256 --set extract.rows_per_shard=512 2>&1 \
  | grep -v " INFO " | tee "$OUT/extract_wide.txt"
# 2. distill step-time ratios on the GPU (bf16 autocast)
timeout 90 python3 benchmarks/distill.py --workdir /tmp/be1 2>&1 | grep -v " INFO " | tee "$OUT/distill.txt"
[ "${SKIP_RUN:-0}" = 1 ] && exit 0
# 3. the default pipeline to distill on the GPU: teacher fit, extract, three students (AMP bf16)
timeout 170 python3 -m pipeline run distill --workdir /tmp/wgpu --set distill.defaults.num_workers=4 2>&1 \
  | grep -E "teacher:|extract:|epoch 40/40|\||finished|error" | tee "$OUT/run_distill.txt"
