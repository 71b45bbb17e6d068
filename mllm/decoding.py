"""The prefill / decode steps both decoding loops of `mllm.generation` share: `prefill` runs the left-padded prompt
batch once over an HF `DynamicCache` (or keeps every input when `use_cache` is off), `decode_step` feeds one
embedding per row, `stacked_heads` and `sample_cell` sample one image cell's residual codes through the depth
heads (with CFG), and `check_compatible` checks a model and processor fit together."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import DynamicCache

from mllm.depth_head import StackedDepthHeads
from mllm.modeling import DualTokenMLLM
from mllm.processor import DualTokenProcessor
from mllm.sampling import RowGenerators
from mllm.sequence import positions_from_mask


@dataclass
class DecodeState:
    """KV cache plus, per row, the attention mask so far and the position id of the next input.

    Without a cache (`cache` None) it keeps every input embedding (B, T, H) and position id (B, T) instead, and
    each decode step recomputes the whole sequence.
    """

    cache: DynamicCache | None
    attention_mask: torch.Tensor
    next_position: torch.Tensor
    inputs_embeds: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None


def check_compatible(model: DualTokenMLLM, processor: DualTokenProcessor) -> None:
    """Raise when the processor's special ids or image geometry differ from the model's configuration."""
    config = model.config
    config.require_special_ids()
    for name, value in processor.ids.items():
        if getattr(config, name) != value:
            raise ValueError(
                f"model and processor disagree on {name}: {getattr(config, name)} vs {value}; build both from "
                "the same text tokenizer"
            )
    settings = processor.settings
    for name in ("grid_size", "rq_depth"):
        value = getattr(settings, name)
        if value is not None and value != getattr(config, name):
            raise ValueError(f"model and processor disagree on {name}: {getattr(config, name)} vs {value}")


def prefill(
    model: DualTokenMLLM,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pixel_codes: torch.Tensor | None = None,
    semantic_codes: torch.Tensor | None = None,
    image_is_output: torch.Tensor | None = None,
    use_cache: bool = True,
) -> tuple[torch.Tensor, DecodeState]:
    """Run a (left-padded) prompt batch; returns the last hidden state per row (B, H) and the decode state."""
    position_ids = positions_from_mask(attention_mask)
    embeds = model.embed_inputs(input_ids, pixel_codes, semantic_codes, image_is_output)
    cache = DynamicCache(config=model.language_model.config) if use_cache else None
    out = model(
        inputs_embeds=embeds,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=cache,
        use_cache=use_cache,
        logits_to_keep=-1,
    )
    next_position = position_ids[:, -1] + 1
    if use_cache:
        state = DecodeState(out.past_key_values, attention_mask, next_position)
    else:
        state = DecodeState(None, attention_mask, next_position, embeds, position_ids)
    return out.last_hidden_state[:, -1], state


def decode_step(model: DualTokenMLLM, state: DecodeState, embeds: torch.Tensor) -> torch.Tensor:
    """Feed one input embedding per row (B, H); returns the new last hidden state (B, H)."""
    ones = state.attention_mask.new_ones(state.attention_mask.shape[0], 1)
    state.attention_mask = torch.cat([state.attention_mask, ones], dim=1)
    embeds = embeds.unsqueeze(1).to(model.get_input_embeddings().weight.dtype)
    position_ids = state.next_position.unsqueeze(1)
    if state.cache is None:  # no KV cache: run the model over every input so far
        state.inputs_embeds = torch.cat([state.inputs_embeds, embeds], dim=1)
        state.position_ids = torch.cat([state.position_ids, position_ids], dim=1)
        embeds, position_ids = state.inputs_embeds, state.position_ids
    out = model(
        inputs_embeds=embeds,
        attention_mask=state.attention_mask,
        position_ids=position_ids,
        past_key_values=state.cache,
        use_cache=state.cache is not None,
        logits_to_keep=-1,
    )
    state.next_position = state.next_position + 1
    return out.last_hidden_state[:, -1]


def stacked_heads(model: DualTokenMLLM) -> StackedDepthHeads:
    """The model's depth heads (pixel, then semantic when present) stacked for sampling.

    The stacked copy is kept on the model and reused while every tensor it was built from is unchanged: the same
    object, storage, dtype and version counter (in-place updates such as optimizer steps or `load_state_dict` bump
    it), so generating during training or after `.to()` never samples from stale weights.
    """
    heads, tables = [model.pixel_head], [model.pixel_code_embedding]
    if model.semantic_head is not None:
        heads.append(model.semantic_head)
        tables.append(model.semantic_code_embedding)
    sources = [p for head in heads for p in head.parameters()] + tables
    key = [(t, t._version, t.data_ptr(), t.dtype, t.device) for t in sources]
    kept = getattr(model, "_stacked_heads", None)
    if (
        kept is not None
        and len(kept[0]) == len(key)
        and all(old[0] is new[0] and old[1:] == new[1:] for old, new in zip(kept[0], key))
    ):
        return kept[1]
    stacked = StackedDepthHeads(heads, tables)
    model._stacked_heads = (key, stacked)
    return stacked


def sample_cell(
    heads: StackedDepthHeads,
    hidden: torch.Tensor,
    settings: Any,  # mllm.generation.GenerationSettings (its image sampling fields and use_cache)
    generator: RowGenerators | None,
    cfg_scale: float | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pixel codes (B, D) and semantic codes (B, D) (None without a semantic head) of one cell per row from the
    LLM states; both heads run in one batched pass per depth. Each row draws one uniform per depth per head,
    pixel depths before semantic depths."""
    codes = heads.sample(
        hidden,
        cfg_scale=cfg_scale,
        temperature=settings.image_temperature,
        top_k=settings.image_top_k,
        top_p=settings.image_top_p,
        generator=generator,
        use_cache=settings.use_cache,
        cfg_plausibility=settings.cfg_plausibility,
    )
    return codes[0], (codes[1] if len(codes) > 1 else None)


def _to(tensor: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(device)
