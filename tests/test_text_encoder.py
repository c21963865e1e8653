import json
import string

import pytest
import torch
from transformers import ByT5Tokenizer, CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel

from sora.models.text_encoder import (
    TINY_T5_CONFIG,
    ClassEncoder,
    ClipEncoder,
    T5Encoder,
    build_text_encoder,
)

PROMPTS = ["a cat", "hi", "a very long prompt that does not fit in sixteen bytes"]


def tiny_t5():
    torch.manual_seed(1)
    return T5EncoderModel(T5Config(vocab_size=len(ByT5Tokenizer()), **TINY_T5_CONFIG)).eval()


@pytest.fixture(scope="module")
def t5_folder(tmp_path_factory):
    """A T5 checkpoint in Open-Sora v1's layout: <folder>/t5-v1_1-xxl/{config.json, weights, tokenizer}."""
    folder = tmp_path_factory.mktemp("t5_ckpts")
    tiny_t5().save_pretrained(folder / "t5-v1_1-xxl")
    ByT5Tokenizer().save_pretrained(folder / "t5-v1_1-xxl")
    return folder


def test_t5_from_folder_matches_model(t5_folder):
    encoder = T5Encoder(from_pretrained=str(t5_folder / "t5-v1_1-xxl"), model_max_length=16)
    out = encoder.encode(PROMPTS)
    tokenizer = ByT5Tokenizer()
    # ByT5: one token per byte (byte + 3) plus </s> (1), padded (0) or truncated to model_max_length.
    truncated_ids = torch.tensor([[b + 3 for b in PROMPTS[2].encode()[:15]] + [1]])
    expected_mask = torch.tensor([[1] * 6 + [0] * 10, [1] * 3 + [0] * 13, [1] * 16])
    assert out["y"].shape == (3, 1, 16, 32) and out["y"].dtype == torch.float32
    assert torch.equal(out["mask"], expected_mask)
    assert encoder.output_dim == 32 and encoder.model_max_length == 16
    with torch.no_grad():
        model = tiny_t5()
        short = tokenizer(PROMPTS[:2], padding="max_length", max_length=16, return_tensors="pt")
        reference = model(input_ids=short.input_ids, attention_mask=short.attention_mask).last_hidden_state
        truncated = model(input_ids=truncated_ids).last_hidden_state
    torch.testing.assert_close(out["y"][:2, 0], reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["y"][2, 0], truncated[0], rtol=1e-5, atol=1e-6)


def test_t5_open_sora_layout_and_dtype(t5_folder):
    # Open-Sora v1 configs name the parent folder (./pretrained_models/t5_ckpts).
    encoder = build_text_encoder(
        dict(type="t5", from_pretrained=str(t5_folder), model_max_length=8, shardformer=True), "cpu", torch.bfloat16
    )
    y = encoder.encode(["a cat"])["y"]
    assert y.dtype == torch.bfloat16 and y.shape == (1, 1, 8, 32)
    with torch.no_grad():
        ids = torch.tensor([[b + 3 for b in b"a cat"] + [1]])
        reference = tiny_t5()(input_ids=ids).last_hidden_state
    torch.testing.assert_close(y[0, 0, :6].float(), reference[0, :6], rtol=2e-2, atol=2e-2)


def test_t5_tiny_config_is_seeded():
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    encoder = T5Encoder(config=TINY_T5_CONFIG, model_max_length=12)
    assert torch.equal(torch.rand(3), expected_draw)  # the global RNG is left alone
    with torch.random.fork_rng():
        torch.manual_seed(0)
        reference = T5EncoderModel(T5Config(vocab_size=384, **TINY_T5_CONFIG))
    for name, tensor in reference.state_dict().items():
        assert torch.equal(encoder.model.state_dict()[name], tensor), name
    again = T5Encoder(config=TINY_T5_CONFIG, model_max_length=12)
    assert torch.equal(encoder.encode(PROMPTS)["y"], again.encode(PROMPTS)["y"])


def test_null_condition_comes_from_the_model_embedders():
    """Guidance's unconditional input is the model's: its null caption, or its null class."""
    from sora.models.layers import CaptionEmbedder, LabelEmbedder

    captions = CaptionEmbedder(in_channels=32, hidden_size=8, uncond_prob=0.1, token_num=12)
    null = captions.null(3)
    assert null.shape == (3, 1, 12, 32)
    assert all(torch.equal(null[i, 0], captions.y_embedding) for i in range(3))
    # what training puts in place of a dropped caption
    dropped = captions(torch.randn(3, 1, 12, 32), train=False, force_drop_ids=torch.ones(3))
    torch.testing.assert_close(dropped, captions.y_proj(null))
    labels = LabelEmbedder(num_classes=10, hidden_size=8, dropout_prob=0.1)
    assert torch.equal(labels.null(2), torch.tensor([10, 10]))
    with pytest.raises(ValueError, match="guidance needs the null class, but this model has none"):
        LabelEmbedder(num_classes=10, hidden_size=8, dropout_prob=0.0).null(2)


def test_t5_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"T5 encoder not found: .*missing/t5 is not a folder with config\.json and weights"):
        T5Encoder(from_pretrained=str(tmp_path / "missing/t5"))
    with pytest.raises(ValueError, match=r"T5 encoder folder .* holds no model: expected config\.json and weights"):
        T5Encoder(from_pretrained=str(tmp_path))
    # a hub id cannot be fetched offline (tests/conftest.py sets HF_HUB_OFFLINE=1)
    offline = r"offline \(HF_HUB_OFFLINE is set\) and not in the Hugging Face cache"
    with pytest.raises(FileNotFoundError, match=f"could not load T5 encoder 'no-such-org/no-such-t5': {offline}"):
        T5Encoder(from_pretrained="no-such-org/no-such-t5")
    with pytest.raises(ValueError, match="set exactly one of from_pretrained"):
        T5Encoder()
    with pytest.raises(ValueError, match="set exactly one of from_pretrained"):
        T5Encoder(from_pretrained=str(tmp_path), config=TINY_T5_CONFIG)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """A tiny CLIP text model and a character-level BPE tokenizer with two merges ("cat")."""
    letters = string.ascii_lowercase
    vocab = {c: i for i, c in enumerate(letters)}
    vocab.update({c + "</w>": len(letters) + i for i, c in enumerate(letters)})
    for token in ["ca", "cat</w>", "<|startoftext|>", "<|endoftext|>"]:
        vocab[token] = len(vocab)
    folder = tmp_path_factory.mktemp("clip")
    # Written as files, which every transformers from the declared floor (4.56) on reads the same way.
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\nc a\nca t</w>\n")
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    tokenizer.save_pretrained(folder)
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=24,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(2)
    CLIPTextModel(config).save_pretrained(folder)
    return folder


def test_clip_pooled_output(clip_folder):
    encoder = build_text_encoder(dict(type="clip", from_pretrained=str(clip_folder), model_max_length=16))
    out = encoder.encode(["a cat", "dog"])
    assert out["y"].shape == (2, 1, 1, 32) and out["mask"] is None
    assert encoder.output_dim == 32 and encoder.model_max_length == 16
    model = CLIPTextModel.from_pretrained(clip_folder).eval()
    tokenizer = CLIPTokenizer.from_pretrained(clip_folder)
    assert tokenizer("a cat").input_ids == [54, 26, 53, 55]  # bos, a</w>, cat</w>, eos
    with torch.no_grad():
        for i, prompt in enumerate(["a cat", "dog"]):
            # unpadded: the pooled output is the last (end-token) state
            states = model(input_ids=torch.tensor([tokenizer(prompt).input_ids])).last_hidden_state
            torch.testing.assert_close(out["y"][i, 0, 0], states[0, -1], rtol=1e-5, atol=1e-6)


def test_clip_errors(clip_folder, tmp_path):
    with pytest.raises(ValueError, match="model_max_length 77 exceeds the model's 24 positions"):
        ClipEncoder(from_pretrained=str(clip_folder))
    with pytest.raises(FileNotFoundError, match="CLIP text model not found"):
        ClipEncoder(from_pretrained=str(tmp_path / "nope"), model_max_length=16)


def test_classes():
    encoder = build_text_encoder(dict(type="classes", num_classes=10))
    out = encoder.encode(["0", " 7 ", "9\n"])
    assert torch.equal(out["y"], torch.tensor([0, 7, 9])) and out["y"].dtype == torch.long and out["mask"] is None
    assert encoder.output_dim is None and encoder.model_max_length is None
    for bad in ["cat", "10", "-1", "1.5"]:
        with pytest.raises(ValueError, match=rf"prompt '{bad}' is not a class id: expected an integer in \[0, 10\)"):
            encoder.encode(["1", bad])
    assert isinstance(encoder, ClassEncoder)


def test_build_errors():
    with pytest.raises(ValueError, match="unknown text_encoder type 't3'; valid types: t5, clip, classes"):
        build_text_encoder(dict(type="t3"))
    with pytest.raises(ValueError, match=r"unknown argument\(s\) max_length for text_encoder 't5'; valid: from_pretrained, model_max_length"):
        build_text_encoder(dict(type="t5", config=TINY_T5_CONFIG, max_length=8))


def test_tiny_config_file(tmp_path):
    """The form configs/tiny/*.py use: the constant imported into the config file."""
    from sora.config import load_config

    path = tmp_path / "tiny.py"
    path.write_text(
        "from sora.models.text_encoder import TINY_T5_CONFIG\n"
        "text_encoder = dict(type='t5', config=TINY_T5_CONFIG, model_max_length=12)\n"
    )
    cfg = load_config(path)
    assert list(cfg) == ["text_encoder"]
    encoder = build_text_encoder(cfg.text_encoder)
    reference = T5Encoder(config=TINY_T5_CONFIG, model_max_length=12)
    assert torch.equal(encoder.encode(PROMPTS)["y"], reference.encode(PROMPTS)["y"])
