"""The paper preset's structure, built from a random SigLIP tower with the paper's depth (27 layers) and geometry
(384 px, patch 14 -> 27x27) but a tiny width (64, 2 heads, MLP 128), saved to a temp dir by the test.

Everything is the paper's (taps 6/4(x0.6)/26, depth 8, K 16,384, dim 32, latent 27 -> 24, x16 decoder with
ch 128 and mult 1,1,4,4,8). Nothing is shrunk except the tower width. The full decoder (about 178M parameters,
~0.4 TMAC per 384 px image) is far too slow for a CPU test, so its output shape is checked by running the
same model class on PyTorch's meta device (shapes only); encoding, the taps and the semantic tail run for real.
"""

from __future__ import annotations

import pytest
import torch
from transformers import SiglipVisionConfig, SiglipVisionModel

from tokenizer.modeling import DualTokenModel
from tokenizer.presets import build_tokenizer

TOWER = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 27,
    "num_attention_heads": 2,
    "image_size": 384,
    "patch_size": 14,
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: these models are small, and on a shared 2-core machine OpenMP threads that spin-wait
    for each other make every op 10x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def paper(tmp_path_factory):
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("siglip_27_layers")
    tower = SiglipVisionModel(SiglipVisionConfig(**TOWER))
    tower.save_pretrained(directory)
    model = build_tokenizer("paper", backbone_dir=directory).eval()
    return model, tower.eval()


def test_paper_configuration_and_backbone_copy(paper):
    model, tower = paper
    cfg = model.config
    assert (cfg.image_size, cfg.patch_size, model.grid_size) == (384, 14, 27)
    assert (cfg.pixel_layer, cfg.shortcut_layer, cfg.shortcut_weight, cfg.semantic_layer) == (6, 4, 0.6, 26)
    assert (cfg.codebook_size, cfg.code_dim, cfg.rq_depth, cfg.shared_codebook) == (16384, 32, 8, True)
    assert (cfg.decoder_latent_size, cfg.decoder_channels, cfg.decoder_channel_mult) == (
        24,
        128,
        [1, 1, 4, 4, 8],
    )
    assert (cfg.decoder_in_channels, cfg.decoder_res_blocks, cfg.decoder_attn_resolutions) == (1024, 2, [24])
    assert (cfg.semantic_token_weight, cfg.semantic_pool_weight, cfg.commitment_weight) == (5.0, 1.0, 5.0)
    assert (cfg.recon_l2_weight, cfg.lpips_weight, cfg.gan_weight) == (5.0, 1.0, 0.75)
    reference = tower.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in model.backbone.state_dict().items())
    for branch in ("pixel", "semantic"):
        assert model.codebook(branch).shape == (16384, 32)
    # projections: 64 / 32 = 2 heads of width 32; pixel and semantic post-quant projections are causal
    assert model.prequant_pixel.attn.num_heads == 2 and model.prequant_pixel.attn.head_dim == 32
    assert model.postquant_pixel.attn.causal and model.postquant_semantic.attn.causal
    assert not model.prequant_semantic.attn.causal


def test_paper_encode_taps_and_semantic_tail(paper):
    model, tower = paper
    x = torch.rand(1, 3, 384, 384, generator=torch.Generator().manual_seed(1)) * 2 - 1
    taps: dict[str, torch.Tensor] = {}
    layer_outputs: list[torch.Tensor] = []
    hooks = [
        layer.register_forward_hook(lambda m, a, out: layer_outputs.append(out))
        for layer in model.backbone.encoder.layers
    ]
    for name in ("prequant_pixel", "prequant_shortcut", "prequant_semantic"):
        module = getattr(model, name)
        hooks.append(module.register_forward_hook(lambda m, a, out, name=name: taps.__setitem__(name, a[0])))
    try:
        codes = model.encode(x)
    finally:
        for hook in hooks:
            hook.remove()
    for grid in (codes.pixel, codes.semantic):
        assert grid.shape == (1, 27, 27, 8) and grid.dtype == torch.long
        assert 0 <= int(grid.min()) and int(grid.max()) < 16384
    assert len(layer_outputs) == 26  # encode stops at the semantic tap: layer 27 never runs
    assert torch.equal(taps["prequant_shortcut"], layer_outputs[3])  # output of layer 4 (1-based)
    assert torch.equal(taps["prequant_pixel"], layer_outputs[5])  # layer 6
    assert torch.equal(taps["prequant_semantic"], layer_outputs[25])  # layer 26
    with torch.no_grad():
        expected = tower(x, output_hidden_states=True).hidden_states
    assert torch.allclose(layer_outputs[25], expected[26], atol=1e-5)

    # the rest of the tower after the semantic quantizer = layer 27 -> post-LN -> MAP head
    tail = model.backbone.encoder.layers[model.config.semantic_layer :]
    assert len(tail) == 1 and tail[0] is model.backbone.encoder.layers[26]
    with torch.no_grad():
        latent = model.embed_codes(codes.semantic, "semantic").reshape(1, 729, 32)
        manual = model.backbone.head(
            model.backbone.post_layernorm(tail[0](model.postquant_semantic(latent), None))
        )
        assert manual.shape == (1, 64)
        assert torch.allclose(model.embedding_from_codes(codes.semantic, normalize=False), manual, atol=1e-5)


def test_paper_decoder_maps_27x27x8_codes_to_384px_through_a_24x24_latent(paper):
    model, _ = paper
    with torch.device("meta"):
        shell = DualTokenModel(model.config).eval()  # same class and config, shapes only
    seen: dict[str, tuple] = {}
    shell.decoder.post_quant.register_forward_hook(
        lambda m, a, out: seen.__setitem__("latent", tuple(a[0].shape))
    )
    shell.decoder.conv_in.register_forward_hook(
        lambda m, a, out: seen.__setitem__("conv_in", tuple(a[0].shape))
    )
    images = shell.decode(torch.zeros(2, 27, 27, 8, dtype=torch.long, device="meta"))
    assert images.shape == (2, 3, 384, 384)
    assert seen == {"latent": (2, 64, 24, 24), "conv_in": (2, 1024, 24, 24)}
    decoder = model.decoder
    assert decoder.output_size == 384 and decoder.latent_size == 24
    assert sum(level.upsample is not None for level in decoder.up) == 4
    widths = [level.block[-1].conv2.out_channels for level in decoder.up]
    assert widths == [128, 128, 512, 512, 1024]
    assert [len(level.attn) for level in decoder.up] == [0, 0, 0, 0, 3]  # attention only at 24x24 (+ mid)
    assert [len(level.block) for level in decoder.up] == [3] * 5
