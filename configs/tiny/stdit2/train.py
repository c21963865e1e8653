# CPU-sized Open-Sora v1.1 training on synthetic data: STDiT2 at configs/tiny/train.py's width and depth, with
# buckets (images and clips, two resolutions) and Open-Sora v1.1's mask_ratios; nothing downloaded. The
# smallest named bucket resolutions are 144p (192x192 at 1:1) and 256 (256x256), so the data is drawn at those
# sizes and the VAE stand-in pools by 16 (12x12 and 16x16 latents, 6x6 and 8x8 patches per frame). First the data:
#   python -m sora.data.synthetic data/tiny2 --num-videos 256 --frames 17 --size 192 --colors red,green,blue \
#       --shapes square --motions "moving left,moving right" --shape-size 0.2
#   python -m sora.data.synthetic data/tiny2 --num-videos 128 --frames 17 --size 256 --seed 1 --append \
#       --colors red,green,blue --shapes square --motions "moving left,moving right" --shape-size 0.2
#   python -m sora.data.synthetic data/tiny2 --num-videos 128 --frames 1 --size 192 --seed 2 --append \
#       --colors red,green,blue --shapes square --motions "moving left,moving right" --shape-size 0.2
# then: python -m sora.train configs/tiny/stdit2/train.py   (and sample with configs/tiny/stdit2/sample.py)
# Clips have 17 frames: a clip fits the 8-frame buckets only when it has more than 8 x frame_interval frames.
# The model, text encoder and VAE stand-in are configs/tiny/stdit2/sample.py's, so its checkpoints sample there.
from sora.models.text_encoder import TINY_T5_CONFIG

num_frames = 8
frame_interval = 2
image_size = (192, 192)

root = None
data_path = "./data/tiny2/data.csv"
num_workers = 2
bucket_config = {
    "144p": {1: (1.0, 16), 8: (1.0, 16)},
    "256": {8: (1.0, 8)},
}
# Open-Sora v1.1's (all three stages): 25% of the samples are conditioned on some of their frames (sora.masks).
mask_ratios = {
    "mask_no": 0.75,
    "mask_quarter_random": 0.025,
    "mask_quarter_head": 0.025,
    "mask_quarter_tail": 0.025,
    "mask_quarter_head_tail": 0.05,
    "mask_image_random": 0.025,
    "mask_image_head": 0.025,
    "mask_image_tail": 0.025,
    "mask_image_head_tail": 0.05,
}

dtype = "fp32"
grad_checkpoint = False
plugin = "zero2"
sp_size = 1

model = dict(
    type="STDiT2",
    depth=4,
    hidden_size=240,  # STDiT2 needs a multiple of 12 (size embedders); 256 is not
    num_heads=8,
    patch_size=(1, 2, 2),
    input_sq_size=256,
    qk_norm=True,
    enable_layernorm_kernel=True,
    from_pretrained=None,
)
vae = dict(type="PixelVAE", factor=16)
text_encoder = dict(type="t5", config=TINY_T5_CONFIG, model_max_length=32)
# The model predicts the clean clip (x0), not the noise as Open-Sora's: trained on eps, this tiny STDiT2 does not
# learn left from right (17/36 draws, chance; x0: 36/36). README.md, "Training", has the measurements and why.
scheduler = dict(type="iddpm", timestep_respacing="", predict_xstart=True)

seed = 42
outputs = "outputs"
wandb = False

epochs = 1000
max_steps = 2000
log_every = 10
ckpt_every = 500
load = None

batch_size = None  # per bucket
lr = 5e-4
grad_clip = 1.0
ema_decay = 0.99
