# PixArt-XL/2 over 16 frames at 256x256, full attention over all frames (Open-Sora's "DiT" baseline). No
# such weights were released: pass those of a PixArt-XL/2 you trained on 16-frame clips with --ckpt-path.
num_frames = 16
fps = 8
image_size = (256, 256)

model = dict(
    type="PixArt-XL/2",
    space_scale=0.5,
    time_scale=1.0,
    enable_flashattn=True,
    enable_layernorm_kernel=True,
    from_pretrained="./pretrained_models/PixArt-XL-2-16x256x256.pth",
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
)
scheduler = dict(
    type="dpm-solver",
    num_sampling_steps=20,
    cfg_scale=7.0,
)
dtype = "fp16"

batch_size = 2
seed = 42
prompt_path = "./assets/texts/t2v_samples.txt"
save_dir = "./outputs/samples/"
