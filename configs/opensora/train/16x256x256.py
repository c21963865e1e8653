# Open-Sora v1 STDiT-XL/2 training, 16 frames at 256x256 (Open-Sora's own settings).
# Data: a CSV with columns path,text (paths relative to root, or to the CSV's folder when root is None).
# Launch: torchrun --standalone --nproc_per_node 8 -m sora.train configs/opensora/train/16x256x256.py --data-path YOUR.csv
# Starts from PixArt-alpha's 512x512 weights (PixArt-alpha/PixArt-alpha on the Hugging Face hub), as Open-Sora did.
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
    type="STDiT-XL/2",
    space_scale=0.5,
    time_scale=1.0,
    from_pretrained="./pretrained_models/PixArt-XL-2-512x512.pth",
    enable_flashattn=True,
    enable_layernorm_kernel=True,
)
vae = dict(
    type="VideoAutoencoderKL",
    from_pretrained="stabilityai/sd-vae-ft-ema",
    micro_batch_size=128,
)
text_encoder = dict(
    type="t5",
    from_pretrained="DeepFloyd/t5-v1_1-xxl",
    model_max_length=120,
    shardformer=True,
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
