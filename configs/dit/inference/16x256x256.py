# DiT-XL/2 text-to-video, 16 frames at 256x256, full attention over all frames, conditioned on CLIP's pooled
# text embedding. No such weights were released: pass those of a DiT-XL/2 you trained with
# configs/dit/train/16x256x256.py with --ckpt-path.
num_frames = 16
fps = 8
image_size = (256, 256)

model = dict(
    type="DiT-XL/2",
    condition="text",
    enable_flashattn=True,
    enable_layernorm_kernel=True,
    from_pretrained="./pretrained_models/DiT-XL-2-16x256x256-clip.pth",
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
    type="dpm-solver",
    num_sampling_steps=20,
    cfg_scale=4.0,
)
dtype = "fp16"

batch_size = 2
seed = 42
prompt_path = "./assets/texts/t2v_samples.txt"
save_dir = "./outputs/samples/"
