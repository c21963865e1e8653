# Open-Sora v1.1 STDiT2-XL/2 text-to-video, 16 frames at 240x426: Open-Sora's
# configs/opensora-v1-1/inference/sample.py values (their d599fd7), in sora's keys.
# Any size and length: --image-size 480 854 --num-frames 32 (the weights were trained mostly at 240x426: other
# sizes are worse, Open-Sora #434). fps is what the model is conditioned on; videos are saved at
# fps // frame_interval = 8 fps. Image-to-video, extension and loops: sample-ref.py and the README.
num_frames = 16
frame_interval = 3
fps = 24
image_size = (240, 426)
multi_resolution = "STDiT2"  # the model gets height, width, ar = height / width, num_frames and fps

model = dict(
    type="STDiT2-XL/2",
    from_pretrained="hf://hpcai-tech/OpenSora-STDiT-v2-stage3",  # Open-Sora writes it without hf://
    input_sq_size=512,
    qk_norm=True,
    enable_flash_attn=True,
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
)
scheduler = dict(
    type="iddpm",
    num_sampling_steps=100,
    cfg_scale=7.0,
    cfg_channel=3,
)
dtype = "bf16"

batch_size = 1
seed = 42
prompt_path = "./assets/texts/t2v_samples.txt"
save_dir = "./samples/samples/"
