# PixArt-alpha text-to-image (one frame) at 512x512: PixArt-XL-2-512x512.pth from PixArt-alpha/PixArt-alpha
# on the Hugging Face hub, put in ./pretrained_models/ or passed with --ckpt-path.
num_frames = 1
fps = 1
image_size = (512, 512)

model = dict(
    type="PixArt-XL/2",
    space_scale=1.0,
    time_scale=1.0,
    no_temporal_pos_emb=True,
    enable_flashattn=True,
    enable_layernorm_kernel=True,
    from_pretrained="./pretrained_models/PixArt-XL-2-512x512.pth",
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
prompt_path = "./assets/texts/t2i_samples.txt"
save_dir = "./outputs/samples/"
