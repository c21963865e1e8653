# CPU-sized Open-Sora v1.1 sampling: the tiny STDiT2 of configs/tiny/stdit2/train.py (random weights unless
# --ckpt-path), the tiny T5 and the VAE stand-in pooling by 16, at the 144p bucket's 192x192 and 8 frames.
# Image-to-video: --reference-path IMAGE_OR_VIDEO --mask-strategy 0 (its first frame becomes frame 0);
# extension: --loop 2 --condition-frame-length 2 (each clip starts with the last 2 frames of the one before).
from sora.models.text_encoder import TINY_T5_CONFIG

num_frames = 8
fps = 8  # the synthetic files' fps, which training passes to the model
image_size = (192, 192)
multi_resolution = "STDiT2"  # the model gets height, width, ar, num_frames and fps, as in training

model = dict(
    type="STDiT2",
    depth=4,
    hidden_size=240,  # STDiT2 needs a multiple of 12 (size embedders); 256 is not
    num_heads=8,
    patch_size=(1, 2, 2),
    input_sq_size=256,
    qk_norm=True,
    enable_layernorm_kernel=True,
    from_pretrained=None,
)
vae = dict(type="PixelVAE", factor=16)
text_encoder = dict(type="t5", config=TINY_T5_CONFIG, model_max_length=32)
# predict_xstart: the tiny model predicts the clean clip (configs/tiny/stdit2/train.py says why); with it,
# hold_condition_frames keeps reference frames (edit ratio 0) the reference to the end, where Open-Sora's schedule
# would put the model's output for them, which its masked loss never trains (README.md, "Masked sampling").
scheduler = dict(type="iddpm", num_sampling_steps=50, cfg_scale=4.0, predict_xstart=True, hold_condition_frames=True)
dtype = "fp32"

batch_size = 2
seed = 42
prompt = ["a red square moving left", "a blue square moving right"]
save_dir = "./samples/tiny-stdit2"
