# DiT-XL/2 text-to-image training (one frame) at 256x256, conditioned on CLIP's pooled text embedding, from
# scratch (Open-Sora's settings). Every row of the CSV is used as an image (a video by its first frame).
# Data: a CSV with columns path,text (paths relative to root, or to the CSV's folder when root is None).
# Launch: torchrun --standalone --nproc_per_node 8 -m sora.train configs/dit/train/1x256x256.py --data-path YOUR.csv
num_frames = 1
frame_interval = 1
image_size = (256, 256)

root = None
data_path = "./data/train.csv"
use_image_transform = True
num_workers = 4

dtype = "bf16"
grad_checkpoint = False
plugin = "zero2"
sp_size = 1

model = dict(
    type="DiT-XL/2",
    no_temporal_pos_emb=True,
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

batch_size = 128
lr = 1e-4  # DiT's own learning rate
grad_clip = 1.0
ema_decay = 0.9999
