# Open-Sora v1 STDiT-XL/2 training, 64 frames at 512x512 (Open-Sora's own settings).
# Sequence parallelism: each group of 2 GPUs splits the 64 frames (spatial and cross-attention stay local).
# Data: a CSV with columns path,text (paths relative to root, or to the CSV's folder when root is None).
# Launch: torchrun --standalone --nproc_per_node 8 -m sora.train configs/opensora/train/64x512x512-sp.py --data-path YOUR.csv
num_frames = 64
frame_interval = 2
image_size = (512, 512)

root = None
data_path = "./data/train.csv"
use_image_transform = False
num_workers = 4

dtype = "bf16"
grad_checkpoint = True
plugin = "zero2-seq"
sp_size = 2

model = dict(
    type="STDiT-XL/2",
    space_scale=1.0,
    time_scale=2 / 3,
    from_pretrained=None,
    enable_flashattn=True,
    enable_layernorm_kernel=True,
)
vae = dict(
    type="VideoAutoencoderKL",
    from_pretrained="stabilityai/sd-vae-ft-ema",
    micro_batch_size=64,
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

batch_size = 1
lr = 2e-5
grad_clip = 1.0
ema_decay = 0.9999
