# CPU-sized training on synthetic clips: about 20 minutes on 2 CPU cores, nothing downloaded. First the data:
#   python -m sora.data.synthetic data/tiny --num-videos 256 --colors red,green,blue --shapes square \
#       --motions "moving left,moving right" --shape-size 0.2
# then: python -m sora.train configs/tiny/train.py   (and sample from its checkpoint with configs/tiny/sample.py)
# The model, text encoder and VAE stand-in are configs/tiny/sample.py's, so its checkpoints sample there.
from sora.models.text_encoder import TINY_T5_CONFIG

num_frames = 8
frame_interval = 2
image_size = (64, 64)

root = None
data_path = "./data/tiny/data.csv"
use_image_transform = False
num_workers = 2

dtype = "fp32"
grad_checkpoint = False
plugin = "zero2"
sp_size = 1

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
scheduler = dict(type="iddpm", timestep_respacing="")

seed = 42
outputs = "outputs"
wandb = False

epochs = 1000
max_steps = 2000
log_every = 10  # and the first step: the loss shows learning from the start
ckpt_every = 500
load = None

batch_size = 16
lr = 5e-4
grad_clip = 1.0
ema_decay = 0.99
