"""The DualToken tokenizer (tiny preset): shapes, quantizer behaviour, causality, losses, save/load, backbone init."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import SiglipConfig, SiglipModel, SiglipVisionConfig, SiglipVisionModel

from tokenizer.configuration import DualTokenConfig
from tokenizer.discriminator import PatchDiscriminator
from tokenizer.image_processing import preprocess, to_pil
from tokenizer.losses import (
    LPIPS,
    discriminator_loss,
    generator_adversarial_loss,
    load_perceptual,
    teacher_targets,
)
from tokenizer.modeling import DualTokenModel
from tokenizer.presets import TINY_VISION, build_tokenizer
from tokenizer.quantizer import ResidualQuantizer


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: these models are small, and on a shared 2-core machine OpenMP threads that spin-wait
    for each other make every op 10x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny(seed: int = 0, **overrides) -> DualTokenModel:
    torch.manual_seed(seed)
    return build_tokenizer("tiny", **overrides)


def images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def model():
    return tiny().eval()


@pytest.fixture(scope="module")
def trainable():
    """A tiny model with non-default loss weights, in training mode (tests zero its gradients first)."""
    return tiny(seed=4, semantic_token_weight=2.0, commitment_weight=3.0, recon_l2_weight=4.0).train()


# ---------------------------------------------------------------------------------------------------- shapes / API


def test_encode_decode_shapes_codes_in_range_and_inference_never_updates(model):
    x = images(2)
    codes = model.encode(x)
    assert model.grid_size == 8
    for grid in (codes.pixel, codes.semantic):
        assert grid.shape == (2, 8, 8, 4) and grid.dtype == torch.long
        assert 0 <= int(grid.min()) and int(grid.max()) < model.config.codebook_size
    recon = model.decode(codes.pixel)
    assert recon.shape == (2, 3, 64, 64) and torch.isfinite(recon).all()
    assert model.codebook("pixel").shape == (1024, 32) and model.codebook("semantic").shape == (1024, 32)
    latent = model.embed_codes(codes.semantic, "semantic")
    assert torch.allclose(latent, model.codebook("semantic")[codes.semantic].sum(-2))
    embedding = model.image_embedding(x)
    assert embedding.shape == (2, 192) and torch.allclose(embedding.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.allclose(embedding, model.embedding_from_codes(codes.semantic), atol=1e-5)
    with pytest.raises(ValueError, match="image_size=64"):
        model.encode(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\[0, 1024\)"):
        model.decode(torch.full((1, 8, 8, 4), 1024))
    # encode/decode are inference: even in training mode the EMA codebooks stay put.
    before = model.codebook("pixel")
    model.train()
    try:
        model.encode(x)
    finally:
        model.eval()
    assert torch.equal(before, model.codebook("pixel"))


def test_straight_through_gradient_reaches_the_encoder(trainable):
    quantizer = ResidualQuantizer(16, 4, depth=3)
    x = torch.randn(5, 4, requires_grad=True)
    out = quantizer(x, update=False)
    (out.quantized * torch.arange(4.0)).sum().backward()
    assert torch.equal(x.grad, torch.arange(4.0).expand(5, 4))  # identity gradient through the quantizer

    def reached(module) -> bool:
        grads = [p.grad for p in module.parameters()]
        return all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0

    net = trainable  # the tiny preset: the pixel branch taps the patch embedding
    net.zero_grad(set_to_none=True)
    out = net(images(2))
    out.losses["recon_l2"].backward()  # reconstruction only: reaches the tower through the STE alone
    assert reached(net.prequant_pixel) and reached(net.backbone.embeddings)
    assert all(
        p.grad is None for p in net.backbone.encoder.parameters()
    )  # no encoder layer feeds the pixel codes
    assert net.quantizer_pixel.codebook.grad is None and not net.quantizer_pixel.codebook.requires_grad
    assert net.prequant_semantic.attn.qkv.weight.grad is None  # the semantic branch plays no part in recon

    layered = tiny(seed=5, pixel_layer=2, shortcut_layer=1, pixel_projection_attention=True).train()
    layered(images(2)).losses["recon_l2"].backward()
    for module in (layered.prequant_pixel, layered.prequant_shortcut, layered.backbone.encoder.layers[0]):
        assert reached(module)


# ---------------------------------------------------------------------------------------------------- quantizer


def test_commitment_on_cumulative_sums_equals_a_hand_computation():
    quantizer = ResidualQuantizer(3, 2, depth=2)
    quantizer.codebook.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.25, 0.0]]))
    x = torch.tensor([[1.2, 0.1]])
    out = quantizer(x, update=False)
    # depth 1 picks (1, 0) -> residual (0.2, 0.1); depth 2 picks (0.25, 0) -> q_2 = (1.25, 0).
    assert out.codes.tolist() == [[0, 2]]
    assert torch.allclose(out.cumulative[1], torch.tensor([[1.25, 0.0]]))
    hand = ((0.2**2 + 0.1**2) / 2 + (0.05**2 + 0.1**2) / 2) / 2  # mean over depths of MSE(x, q_d)
    assert out.commitment_loss.item() == pytest.approx(hand, rel=1e-6)
    assert torch.allclose(out.quantized, torch.tensor([[1.25, 0.0]]))


def test_ema_update_moves_codes_toward_their_assigned_vectors():
    torch.manual_seed(0)
    quantizer = ResidualQuantizer(8, 4, depth=1, decay=0.99, update_mode="per_depth").train()
    quantizer.cluster_size_ema.fill_(5.0)  # every code alive: no restarts in this step
    quantizer.embed_ema.copy_(5.0 * quantizer.codebook)  # a consistent EMA state: codebook = sums / counts
    old_codebook = quantizer.codebook.clone()
    old_sums, old_counts = quantizer.embed_ema.clone(), quantizer.cluster_size_ema.clone()
    x = old_codebook[3] + 0.3 * torch.randn(20, 4)
    assigned = quantizer.nearest(x)
    quantizer(x)
    # hand EMA: counts / sums decay, then Laplace-smoothed division
    counts = torch.bincount(assigned, minlength=8).float()
    sums = torch.zeros(8, 4).index_add_(0, assigned, x)
    n_ema = 0.99 * old_counts + 0.01 * counts
    s_ema = 0.99 * old_sums + 0.01 * sums
    total = n_ema.sum()
    expected = s_ema / (total * (n_ema + 1e-5) / (total + 8 * 1e-5))[:, None]
    assert torch.allclose(quantizer.codebook, expected, atol=1e-6)
    for code in assigned.unique():
        mean = x[assigned == code].mean(0)
        assert (quantizer.codebook[code] - mean).norm() < (old_codebook[code] - mean).norm()
    unused = torch.ones(8, dtype=torch.bool)
    unused[assigned.unique()] = False
    assert torch.allclose(quantizer.codebook[unused], old_codebook[unused], atol=1e-4)


def test_dead_codes_are_restarted_from_batch_vectors():
    torch.manual_seed(0)
    quantizer = ResidualQuantizer(16, 4, depth=1, update_mode="per_depth").train()
    alive = torch.arange(16) < 4
    quantizer.cluster_size_ema.copy_(alive.float() * 50.0)
    quantizer.embed_ema.copy_(quantizer.codebook * quantizer.cluster_size_ema[:, None].clamp(min=1))
    x = torch.randn(64, 4)  # >= K vectors: candidates are exact batch vectors (no noise tiling)
    quantizer(x)
    assert torch.all(quantizer.cluster_size_ema[~alive] == 1.0)
    assert torch.all(quantizer.cluster_size_ema[alive] > 1.0)
    scale = quantizer.cluster_size_ema.sum()
    smoothed = scale * (1.0 + 1e-5) / (scale + 16 * 1e-5)
    distances = torch.cdist(quantizer.codebook[~alive] * smoothed, x)
    assert torch.all(distances.min(dim=1).values < 1e-3)  # every restarted code is a batch vector
    assert len({int(i) for i in distances.argmin(dim=1)}) == int((~alive).sum())  # distinct vectors


def test_ema_statistics_are_summed_across_ranks(monkeypatch):
    """Rank 0's update with a (faked) second rank equals one update on both ranks' batches together."""
    import tokenizer.quantizer as quantizer_module

    torch.manual_seed(0)
    local = ResidualQuantizer(8, 4, depth=1, restart_dead_codes=False).train()
    together = copy.deepcopy(local)
    x_local, x_remote = torch.randn(6, 4), torch.randn(9, 4)
    remote_idx = local.nearest(x_remote)
    remote_counts = torch.bincount(remote_idx, minlength=8).float()
    remote_sums = torch.zeros(8, 4).index_add_(0, remote_idx, x_remote)
    reduced = []

    def fake_all_reduce(tensor, op=None):
        tensor.add_(remote_counts if tensor.ndim == 1 else remote_sums)
        reduced.append(tuple(tensor.shape))

    monkeypatch.setattr(quantizer_module, "_distributed", lambda: True)
    monkeypatch.setattr(quantizer_module.dist, "all_reduce", fake_all_reduce)
    local(x_local)
    monkeypatch.undo()
    assert sorted(reduced) == [(8,), (8, 4)]
    together.ema_update(torch.cat([x_local, x_remote]), torch.cat([together.nearest(x_local), remote_idx]))
    assert torch.allclose(local.codebook, together.codebook, atol=1e-6)
    assert torch.allclose(local.cluster_size_ema, together.cluster_size_ema)


def test_after_depths_mode_does_one_update_with_every_depth_residual():
    torch.manual_seed(0)
    quantizer = ResidualQuantizer(32, 4, depth=3, update_mode="after_depths").train()
    reference = copy.deepcopy(quantizer)
    x = torch.randn(10, 4)
    state = torch.random.get_rng_state()
    out = quantizer(x)
    residuals, residual = [], x.clone()
    for d in range(3):
        residuals.append(residual)
        residual = residual - reference.codebook[out.codes[:, d]]
    torch.random.set_rng_state(state)
    reference.ema_update(torch.cat(residuals), out.codes.t().reshape(-1))
    assert torch.allclose(quantizer.codebook, reference.codebook)
    assert torch.allclose(quantizer.cluster_size_ema, reference.cluster_size_ema)


# ---------------------------------------------------------------------------------------------------- projections


def test_post_quant_projections_are_causal_and_the_semantic_pre_quant_one_is_not(model):
    torch.manual_seed(0)
    z = torch.randn(1, 64, 32)
    changed = z.clone()
    changed[:, 40] = torch.randn(
        32
    )  # a new value at grid cell 40 (a constant shift would vanish in LayerNorm)
    with torch.no_grad():
        for projection in (model.postquant_pixel, model.postquant_semantic):
            a, b = projection(z), projection(changed)
            assert torch.equal(a[:, :40], b[:, :40])
            assert (a[:, 40] - b[:, 40]).abs().max() > 1e-3 and (a[:, 41:] - b[:, 41:]).abs().max() > 1e-4
        h = torch.randn(1, 64, 192)
        h2 = h.clone()
        h2[:, 40] = torch.randn(192)
        assert (model.prequant_semantic(h)[:, :40] - model.prequant_semantic(h2)[:, :40]).abs().max() > 1e-4
        # the tiny preset's pixel pre-quant projection maps each token on its own
        a, b = model.prequant_pixel(h), model.prequant_pixel(h2)
        assert torch.equal(a[:, :40], b[:, :40]) and torch.equal(a[:, 41:], b[:, 41:])


def test_patch_local_pixel_codes_depend_on_their_own_patch_only():
    """The tiny preset (pixel_layer 0, no shortcut, no pre-quant attention): repainting one 8x8 patch changes that
    patch's pixel latent and no other; a layer tap (layer 2, shortcut 1, attention) spreads it over the grid."""
    x = images(1, seed=3)
    repainted = x.clone()
    repainted[:, :, 40:48, 16:24] = 0.25  # patch (row 5, col 2) = token 42
    local = tiny(seed=2).eval()
    assert local.prequant_pixel.attn is None
    with torch.no_grad():
        changed = (local._tower_to_semantic_layer(x)[0] - local._tower_to_semantic_layer(repainted)[0]).abs()
        layered = tiny(seed=2, pixel_layer=2, shortcut_layer=1, pixel_projection_attention=True).eval()
        spread = (
            layered._tower_to_semantic_layer(x)[0] - layered._tower_to_semantic_layer(repainted)[0]
        ).abs()
    moved = changed.amax(-1)[0] > 1e-6
    assert moved.nonzero().flatten().tolist() == [42]
    assert (spread.amax(-1)[0] > 1e-6).sum() == 64
    with pytest.raises(ValueError, match="pixel_layer"):
        tiny(pixel_layer=-1)
    with pytest.raises(ValueError, match="pixel_projection_attention"):
        tiny(pixel_projection_attention="no")


# ---------------------------------------------------------------------------------------------------- losses


def test_forward_reports_every_term_with_the_configured_weights(trainable):
    net = trainable
    net.zero_grad(set_to_none=True)
    teacher = copy.deepcopy(net.backbone).eval().requires_grad_(False)
    x = images(2)
    out = net(x, teacher=teacher)
    terms = out.losses
    tokens, pooled = teacher_targets(teacher, x, net.config.semantic_layer)
    assert torch.allclose(terms["sem_token_mse"], torch.nn.functional.mse_loss(out.semantic_tokens, tokens))
    semantic = 2.0 * (terms["sem_token_mse"] - terms["sem_token_cos"]) + (
        terms["sem_pool_mse"] - terms["sem_pool_cos"]
    )
    assert torch.allclose(terms["semantic"], semantic)
    assert torch.allclose(terms["commitment"], 3.0 * (terms["commit_pixel"] + terms["commit_semantic"]))
    assert torch.allclose(terms["reconstruction"], 4.0 * terms["recon_l2"])
    assert torch.allclose(terms["nll"], terms["recon_l2"])
    assert torch.allclose(out.loss, terms["semantic"] + terms["commitment"] + terms["reconstruction"])
    assert out.last_layer is net.decoder.conv_out.weight
    assert out.codes.pixel.shape == (2, 8, 8, 4) and out.pooled.shape == (2, 192)

    discriminator = PatchDiscriminator.from_config(net.config)
    assert discriminator(x).shape == (2, 1, 8, 8)
    before = generator_adversarial_loss(net.config, out, discriminator, step=net.config.gan_start_step - 1)
    assert float(before["gan"]) == 0.0
    after = generator_adversarial_loss(net.config, out, discriminator, step=net.config.gan_start_step)
    weight = float(after["gan_adaptive_weight"])
    assert 0.3 <= weight <= 10.0
    assert torch.allclose(after["gan"], weight * 0.75 * after["gen_loss"])
    (out.loss + after["gan"]).backward()
    d_loss = discriminator_loss(net.config, discriminator, x, out.reconstruction)
    assert torch.isfinite(d_loss) and d_loss.item() > 0


def test_lpips_loads_from_a_local_file_and_is_off_without_one(tmp_path):
    torch.manual_seed(0)
    reference = LPIPS()
    for k in range(5):
        getattr(reference, f"lin{k}").weight.data.uniform_(0, 1)
    path = tmp_path / "lpips.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    lpips = LPIPS.from_file(path)
    x, y = images(1, seed=2), images(1, seed=3)
    assert lpips(x, x).item() == pytest.approx(0.0, abs=1e-7)
    assert lpips(x, y).item() > 0
    config = DualTokenConfig(vision_config=dict(TINY_VISION), **_tiny_geometry())
    assert load_perceptual(config) is None
    config.lpips_path = str(path)
    assert isinstance(load_perceptual(config), LPIPS)
    config.lpips_path = str(tmp_path / "missing.safetensors")
    with pytest.raises(FileNotFoundError, match="lpips_path"):
        load_perceptual(config)
    bad = tmp_path / "bad.safetensors"
    save_file({"lin0.weight": torch.zeros(1, 64, 1, 1)}, str(bad))
    with pytest.raises(ValueError, match="missing keys"):
        LPIPS.from_file(bad)


def _tiny_geometry() -> dict:
    return {
        "pixel_layer": 2,
        "shortcut_layer": 1,
        "semantic_layer": 5,
        "codebook_size": 64,
        "rq_depth": 2,
        "decoder_channels": 32,
        "decoder_channel_mult": [1, 1, 1, 1],
        "decoder_res_blocks": 1,
        "decoder_attn_resolutions": [],
        "decoder_in_channels": 32,
        "decoder_latent_size": None,
        "disc_channels": 32,
    }


# ---------------------------------------------------------------------------------------------------- persistence


def _fields(config: dict) -> dict:
    """A config dict without the load-time bookkeeping (`_name_or_path`, `dtype`), recursively."""
    return {
        k: _fields(v) if isinstance(v, dict) else v
        for k, v in config.items()
        if k not in ("_name_or_path", "dtype")
    }


def test_save_pretrained_round_trip_gives_identical_codes_and_reconstructions(tmp_path, trainable):
    net = copy.deepcopy(trainable).train()
    with torch.no_grad():
        net(images(4, seed=5))  # one more EMA step so the buffers are not at their initial values
    net.eval()
    net.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert not list(tmp_path.glob("*.bin"))
    loaded = DualTokenModel.from_pretrained(tmp_path).eval()
    assert _fields(loaded.config.to_dict()) == _fields(net.config.to_dict())
    x = images(3, seed=6)
    a, b = net.encode(x), loaded.encode(x)
    assert torch.equal(a.pixel, b.pixel) and torch.equal(a.semantic, b.semantic)
    assert torch.equal(net.decode(a.pixel), loaded.decode(b.pixel))
    for name, buffer in net.quantizer_semantic.named_buffers():
        assert torch.equal(buffer, dict(loaded.quantizer_semantic.named_buffers())[name])


def test_backbone_is_initialised_from_a_local_siglip_directory(tmp_path):
    small = {**TINY_VISION, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2}
    torch.manual_seed(7)
    vision = SiglipVisionModel(SiglipVisionConfig(**small))
    vision.save_pretrained(tmp_path / "vision")
    net = build_tokenizer("tiny", backbone_dir=tmp_path / "vision")
    reference = vision.state_dict()
    assert set(net.backbone.state_dict()) == set(reference)
    assert all(torch.equal(v, reference[k]) for k, v in net.backbone.state_dict().items())
    assert net.config.semantic_layer == TINY_VISION["num_hidden_layers"] - 1
    assert net.encode(images(1)).pixel.shape == (1, 8, 8, 4)

    # The tiny teacher is saved as a SiglipModel (vision + text): its vision tower is what gets copied.
    small["num_hidden_layers"] = 3
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    torch.manual_seed(8)
    both = SiglipModel(SiglipConfig(vision_config=small, text_config=text))
    both.save_pretrained(tmp_path / "teacher")
    net = build_tokenizer("tiny", backbone_dir=tmp_path / "teacher")
    reference = both.vision_model.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in net.backbone.state_dict().items())
    assert (net.config.num_layers, net.config.semantic_layer) == (3, 2)


# ---------------------------------------------------------------------------------------------------- images


def test_preprocess_and_to_pil_round_trip_and_convert_modes():
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    pixels = preprocess([rgb])
    assert pixels.shape == (1, 3, 64, 64) and pixels.min() >= -1 and pixels.max() <= 1
    assert np.array_equal(np.asarray(to_pil(pixels)[0]), np.asarray(rgb))
    transparent = Image.new("RGBA", (30, 20), (255, 0, 0, 0))
    gray = Image.new("L", (100, 100), 0)
    batch = preprocess([transparent, gray, rgb.convert("P")], image_size=64)
    assert batch.shape == (3, 3, 64, 64)
    assert torch.allclose(batch[0], torch.ones(3, 64, 64))  # fully transparent -> white
    assert torch.allclose(batch[1], -torch.ones(3, 64, 64))
    with pytest.raises(ValueError, match="image_size"):
        preprocess([rgb, gray])
