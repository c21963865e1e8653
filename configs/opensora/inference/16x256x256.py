# Open-Sora v1 STDiT-XL/2, 16 frames at 256x256. Weights: hpcai-tech/Open-Sora on the Hugging Face hub
# (OpenSora-v1-HQ-16x256x256.pth), put in ./pretrained_models/ or passed with --ckpt-path.
num_frames = 16
fps = 24 // 3  # the training clips' frame rate: 24 fps sampled every 3 frames
image_size = (256, 256)

model = dict(
    type="STDiT-XL/2",
    space_scale=0.5,
    time_scale=1.0,
    enable_flashattn=True,
    enable_layernorm_kernel=True,
    from_pretrained="./pretrained_models/OpenSora-v1-HQ-16x256x256.pth",
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
    type="iddpm",
    num_sampling_steps=100,
    cfg_scale=7.0,
    cfg_channel=3,
)
dtype = "fp16"

batch_size = 2
seed = 42
prompt_path = "./assets/texts/t2v_samples.txt"
save_dir = "./outputs/samples/"
