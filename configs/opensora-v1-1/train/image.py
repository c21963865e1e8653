# Open-Sora v1.1 STDiT2-XL/2 training, image-only fine-tuning (no masks).
# Open-Sora's configs/opensora-v1-1/train/image.py values (their d599fd7), in sora's keys.
# Data: a CSV with path,text and, to skip probing every file, num_frames,height,width columns; every sample goes
# into the buckets it fits (bucket_config: {resolution: {num_frames: (keep probability, batch size)}}).
# Launch: torchrun --standalone --nproc_per_node 8 -m sora.train \
#     configs/opensora-v1-1/train/image.py --data-path YOUR.csv
# or pre-encoded: python -m sora.preprocess THIS_CONFIG --data-path YOUR.csv --save-dir DIR, then --data-path DIR.
# The model gets each batch's height, width, ar, fps and num_frames from the data, as Open-Sora v1.1 passes them
# (ar = width / height there; their sampling passes height / width).
# num_frames and image_size are the size the model is built for (STDiT2 takes any size; the buckets decide what
# trains); batch_size is per bucket.
num_frames = 16
frame_interval = 3
image_size = (240, 426)

root = None
data_path = "./data/train.csv"
num_workers = 4
bucket_config = {  # Open-Sora's timing: 6s/it
    "256": {1: (1.0, 256)},
    "512": {1: (1.0, 80)},
    "480p": {1: (1.0, 52)},
    "1024": {1: (1.0, 20)},
    "1080p": {1: (1.0, 8)},
}

dtype = "bf16"
grad_checkpoint = True
plugin = "zero2"
sp_size = 1

model = dict(
    type="STDiT2-XL/2",
    from_pretrained=None,
    input_sq_size=512,  # the pretrained model was trained at 512x512
    qk_norm=True,
    enable_flashattn=True,  # Open-Sora v1.1 ignored this old name (their #369); sora takes it
    enable_layernorm_kernel=True,
)
vae = dict(
    type="VideoAutoencoderKL",
    from_pretrained="stabilityai/sd-vae-ft-ema",
    micro_batch_size=4,
)
text_encoder = dict(
    type="t5",
    from_pretrained="DeepFloyd/t5-v1_1-xxl",
    model_max_length=200,
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
ckpt_every = 500
load = None

batch_size = 10  # only for logging in Open-Sora; unused with bucket_config
lr = 2e-5
grad_clip = 1.0
