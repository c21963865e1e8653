# Latte-XL/2 text-to-video training, 16 frames at 256x256, conditioned on CLIP's pooled text embedding, from
# scratch (Open-Sora's settings).
# Data: a CSV with columns path,text (paths relative to root, or to the CSV's folder when root is None).
# Launch: torchrun --standalone --nproc_per_node 8 -m sora.train configs/latte/train/16x256x256.py --data-path YOUR.csv
num_frames = 16
frame_interval = 3
image_size = (256, 256)

root = None
data_path = "./data/train.csv"
use_image_transform = False
num_workers = 4

dtype = "bf16"
grad_checkpoint = True
plugin = "zero2"
sp_size = 1

model = dict(
    type="Latte-XL/2",
    enable_flashattn=True,
    enable_layernorm_kernel=True,
)
vae = dict(
    type="VideoAutoencoderKL",
    from_pretrained="stabilityai/sd-vae-ft-ema",
    micro_batch_size=128,
)
text_encoder = dict(
    type="clip",
    from_pretrained="openai/clip-vit-base-patch32",
    model_max_length=77,
)
scheduler = dict(
    type="iddpm",
    timestep_respacing="",
)

seed = 42
outputs = "outputs"
wandb = False

epochs = 1000
log_every = 10
ckpt_every = 1000
load = None

batch_size = 8
lr = 2e-5
grad_clip = 1.0
ema_decay = 0.9999
