# CPU-sized sampling: runs in seconds with nothing downloaded.
# A tiny STDiT (random weights unless --ckpt-path, e.g. a checkpoint of configs/tiny/train.py), a tiny T5
# built in code with the file-less ByT5 tokenizer, and a weight-free stand-in for the VAE that pools frames by
# 8 (a random AutoencoderKL would decode anything the model learned into noise; see sora.models.vae.PixelVAE).
from sora.models.text_encoder import TINY_T5_CONFIG

num_frames = 8
fps = 4
image_size = (64, 64)

model = dict(
    type="STDiT",
    depth=4,
    hidden_size=256,
    num_heads=8,
    patch_size=(1, 2, 2),
    enable_layernorm_kernel=True,
    from_pretrained=None,
)
vae = dict(type="PixelVAE", factor=8)
text_encoder = dict(type="t5", config=TINY_T5_CONFIG, model_max_length=32)
scheduler = dict(type="iddpm", num_sampling_steps=50, cfg_scale=4.0)
dtype = "fp32"

batch_size = 2
seed = 42
prompt = ["a red square moving left", "a blue circle moving up"]
save_dir = "./samples/tiny"
