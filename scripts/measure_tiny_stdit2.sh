#!/usr/bin/env bash
# The tiny STDiT2 measurement on a CPU: data, 2000 training steps, then the scores the README's tiny STDiT2
# paragraph asks for. From the repository root: bash scripts/measure_tiny_stdit2.sh [OUT]  (default outputs/tiny-stdit2)
# 1. colour / motion / direction counts over 36 draws (scripts/score_tiny.py --seeds 1 11 21 31 41 51)
# 2. image-to-video: PSNR of each sample's first frame against its reference image (6 images the run never saw)
# 3. a 2-loop extension (2 frames carried over): the change across the seam against the change within the clips
set -euo pipefail
OUT=${1:-outputs/tiny-stdit2}
mkdir -p "$OUT"
VOCABULARY=(--colors red,green,blue --shapes square --motions "moving left,moving right" --shape-size 0.2)
SAMPLE=configs/tiny/stdit2/sample.py

if [ ! -f data/tiny2/data.csv ]; then
    python -m sora.data.synthetic data/tiny2 --num-videos 256 --frames 17 --size 192 "${VOCABULARY[@]}"
    python -m sora.data.synthetic data/tiny2 --num-videos 128 --frames 17 --size 256 --seed 1 --append \
        "${VOCABULARY[@]}"
    python -m sora.data.synthetic data/tiny2 --num-videos 128 --frames 1 --size 192 --seed 2 --append \
        "${VOCABULARY[@]}"
fi
[ -f data/tiny2-ref/data.csv ] || python -m sora.data.synthetic data/tiny2-ref --num-videos 6 --frames 1 \
    --size 192 --seed 100 "${VOCABULARY[@]}"

python -m sora.train configs/tiny/stdit2/train.py --outputs "$OUT/runs"
CKPT=$(ls -d "$OUT"/runs/*/*-global_step2000 | tail -n 1)
echo "checkpoint: $CKPT"

python scripts/score_tiny.py "$CKPT" --config "$SAMPLE" --seeds 1 11 21 31 41 51 | tee "$OUT/score_tiny.txt"

tail -n +2 data/tiny2-ref/data.csv | while IFS=, read -r file caption _; do
    name=${file%.mp4}
    python -m sora.sample "$SAMPLE" --ckpt-path "$CKPT" --save-dir "$OUT/i2v/$name" --prompt "$caption" \
        --reference-path "data/tiny2-ref/$file" --mask-strategy 0 > /dev/null
    python -m sora.sample "$SAMPLE" --ckpt-path "$CKPT" --save-dir "$OUT/loop/$name" --prompt "$caption" \
        --loop 2 --condition-frame-length 2 > /dev/null
    echo "$file ($caption)"
    python scripts/score_i2v.py "$OUT/i2v/$name/sample_0000.mp4" --reference "data/tiny2-ref/$file" --vae-factor 16
    python scripts/score_i2v.py "$OUT/loop/$name/sample_0000.mp4" --seam-at 8
done | tee "$OUT/score_i2v.txt"
