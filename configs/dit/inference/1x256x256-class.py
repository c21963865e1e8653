# DiT-XL/2 class-conditional ImageNet images (one frame) at 256x256, facebookresearch's released model:
# DiT-XL-2-256x256.pt from https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt, put in
# ./pretrained_models/ or passed with --ckpt-path. Prompts are ImageNet class ids, one per line.
num_frames = 1
fps = 1
image_size = (256, 256)

model = dict(
    type="DiT-XL/2",
    no_temporal_pos_emb=True,
    condition="label_1000",
    enable_flashattn=True,
    enable_layernorm_kernel=True,
    from_pretrained="./pretrained_models/DiT-XL-2-256x256.pt",
)
vae = dict(
    type="VideoAutoencoderKL",
    from_pretrained="stabilityai/sd-vae-ft-ema",
    micro_batch_size=128,
)
text_encoder = dict(
    type="classes",
    num_classes=1000,
)
scheduler = dict(
    type="dpm-solver",
    num_sampling_steps=20,
    cfg_scale=4.0,
)
dtype = "fp16"

batch_size = 2
seed = 42
prompt_path = "./assets/texts/imagenet_id.txt"
save_dir = "./outputs/samples/"
