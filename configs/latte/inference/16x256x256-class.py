# Latte-XL/2 class-conditional UCF-101 videos, 16 frames at 256x256, the authors' released model: ucf101.pt
# from maxin-cn/Latte on the Hugging Face hub (https://huggingface.co/maxin-cn/Latte/resolve/main/ucf101.pt),
# saved as ./pretrained_models/Latte-XL-2-256x256-ucf101.pt or passed with --ckpt-path.
# Prompts are UCF-101 class ids, one per line.
num_frames = 16
fps = 8
image_size = (256, 256)

model = dict(
    type="Latte-XL/2",
    condition="label_101",
    enable_flashattn=True,
    enable_layernorm_kernel=True,
    from_pretrained="./pretrained_models/Latte-XL-2-256x256-ucf101.pt",
)
vae = dict(
    type="VideoAutoencoderKL",
    from_pretrained="stabilityai/sd-vae-ft-ema",
    micro_batch_size=128,
)
text_encoder = dict(
    type="classes",
    num_classes=101,
)
scheduler = dict(
    type="dpm-solver",
    num_sampling_steps=20,
    cfg_scale=4.0,
)
dtype = "fp16"

batch_size = 2
seed = 42
prompt_path = "./assets/texts/ucf101_id.txt"
save_dir = "./outputs/samples/"
