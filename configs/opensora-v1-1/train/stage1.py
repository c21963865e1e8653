# Open-Sora v1.1 STDiT2-XL/2 training, stage 1 (report_02: from PixArt-alpha, mostly 144p/240p, 25% masked).
# Open-Sora's configs/opensora-v1-1/train/stage1.py values (their d599fd7), in sora's keys.
# Data: a CSV with path,text and, to skip probing every file, num_frames,height,width columns; every sample goes
# into the buckets it fits (bucket_config: {resolution: {num_frames: (keep probability, batch size)}}).
# Launch: torchrun --standalone --nproc_per_node 8 -m sora.train \
#     configs/opensora-v1-1/train/stage1.py --data-path YOUR.csv
# or pre-encoded: python -m sora.preprocess THIS_CONFIG --data-path YOUR.csv --save-dir DIR, then --data-path DIR.
# The model gets each batch's height, width, ar, fps and num_frames from the data, as Open-Sora v1.1 passes them
# (ar = width / height there; their sampling passes height / width).
# num_frames and image_size are the size the model is built for (STDiT2 takes any size; the buckets decide what
# trains); batch_size is per bucket (None here, as Open-Sora).
num_frames = 16
frame_interval = 3
image_size = (240, 426)

root = None
data_path = "./data/train.csv"
num_workers = 8
bucket_config = {  # Open-Sora's timing: 1s/it
    "144p": {1: (0.5, 48), 16: (1.0, 6), 32: (1.0, 3), 96: (1.0, 1)},
    "256": {1: (0.5, 24), 16: (0.5, 3), 48: (0.5, 1), 64: (0.0, None)},
    "240p": {16: (0.3, 2), 32: (0.3, 1), 64: (0.0, None)},
    "512": {1: (0.4, 12)},
    "1024": {1: (0.3, 3)},
}
# The frames a sample is conditioned on (sora.masks): 25% of the samples have some.
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

dtype = "bf16"
grad_checkpoint = False
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

batch_size = None
lr = 2e-5
grad_clip = 1.0
