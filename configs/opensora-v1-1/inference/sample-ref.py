# Open-Sora v1.1 STDiT2-XL/2 conditioned on images and videos, in two loops: Open-Sora's
# configs/opensora-v1-1/inference/sample-ref.py values (their d599fd7), in sora's keys. The README's v1.1 section
# explains mask_strategy with examples.
# The references are Open-Sora's, which sora does not download: put them at these paths first
# (https://cdn.openai.com/tmp/s/interp/d0.mp4, and assets/images/condition/{cliff,wave}.png of hpcaitech/Open-Sora).
_base_ = "sample.py"

prompt_path = None
prompt = [
    "A car driving on the ocean.",
    "Drone view of waves crashing against the rugged cliffs along Big Sur's garay point beach. The crashing blue "
    "waters create white-tipped waves, while the golden light of the setting sun illuminates the rocky shore. A small "
    "island with a lighthouse sits in the distance, and green shrubbery covers the cliff's edge. The steep drop from "
    "the road down to the beach is a dramatic feat, with the cliff's edges jutting out over the sea. This is a view "
    "that captures the raw beauty of the coast and the rugged landscape of the Pacific Coast Highway."
    '{"reference_path": "./assets/images/condition/cliff.png", "mask_strategy": "0"}',
    "In an ornate, historical hall, a massive tidal wave peaks and begins to crash. Two surfers, seizing the moment, "
    "skillfully navigate the face of the wave.",
]

# Each clip after the first starts with the last condition_frame_length frames of the one before.
loop = 2
condition_frame_length = 4
# Per prompt, ';'-separated groups of loop_id, ref_id, ref_start, target_start, length, edit_ratio:
# the video's first 8 frames -> frames 0-7, re-noised with edit ratio 0.3; nothing; the image -> frame 0, kept.
mask_strategy = [
    "0,0,0,0,8,0.3",
    None,
    "0",
]
reference_path = [
    "./assets/d0.mp4",
    None,
    "./assets/images/condition/wave.png",
]

save_dir = "./samples/samples-ref/"
