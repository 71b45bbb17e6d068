"""`DualTokenMLLM`: any Hugging Face causal LM extended to read and write DualToken image codes.

The model owns the multimodal embedding of image cells (frozen code embeddings + 2-layer MLPs), the two
depth-transformer heads (pixel, semantic) and the training loss. Prompt formatting lives in `mllm.processor`,
decoding loops in `mllm.generation`; the configuration contract is documented in `mllm.configuration`.

Forward inputs: ``input_ids`` (B,T), ``attention_mask``, optional ``position_ids`` (computed from the mask when
absent), ``pixel_codes`` / ``semantic_codes`` (N,h,w,D) for the N images whose cells fill the ``<img>`` runs in
reading order, ``image_is_output`` (N,) and ``labels`` (B,T) with -100 on prompt and image positions. The LLM
state at position t-1 predicts both code stacks of an output-image cell at t (teacher forced over depth).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.utils import ModelOutput

from data_recipes.atomic_io import atomic_directory_write
from mllm.cell_embedding import CodeMLP, grid_sincos, region_vectors
from mllm.configuration import DualTokenMLLMConfig
from mllm.depth_head import DepthHead
from mllm.sequence import IGNORE_INDEX, positions_from_mask

# Causal-LM configs whose head post-processes logits beyond the output embedding (not reproduced here).
_UNSUPPORTED_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling")
# Size of the coarse-region vectors added to the start of the input-cell position embedding
# (`image_position_regions`): rms 0.5 against the 0.05 of its sine-cosine part and the 1 of a normalised cell.
REGION_RMS = 0.5


@dataclass
class DualTokenMLLMOutput(ModelOutput):
    """Forward result. Loss terms are set when `labels` are given; the head logits cover output-image cells."""

    loss: torch.Tensor | None = None
    loss_text: torch.Tensor | None = None
    loss_pixel: torch.Tensor | None = None
    loss_semantic: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    past_key_values: Cache | None = None
    pixel_logits: torch.Tensor | None = None
    semantic_logits: torch.Tensor | None = None


class DualTokenMLLM(PreTrainedModel):
    """Unified understanding + generation model over DualToken pixel and semantic codes."""

    config_class = DualTokenMLLMConfig
    config: DualTokenMLLMConfig
    base_model_prefix = ""
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    _skip_keys_device_placement = ["past_key_values"]
    # No tied weights of its own; a dict (not None) lets peft find the wrapped LLM's lm_head <- embed_tokens
    # tie below it, so LoRA's trainable token rows stay tied to the output embedding.
    _tied_weights_keys: dict[str, str] = {}
    # The loss is a mean per term; the HF Trainer must scale it for gradient accumulation itself.
    accepts_loss_kwargs = False

    def __init__(self, config: DualTokenMLLMConfig, language_model: PreTrainedModel | None = None):
        super().__init__(config)
        text_config = config.text_config
        for name in _UNSUPPORTED_LOGIT_POSTPROCESSING:
            if getattr(text_config, name, None) not in (None, 1.0):
                raise ValueError(
                    f"DualTokenMLLM: text_config.{name}={getattr(text_config, name)!r} post-processes logits, "
                    "which this wrapper does not reproduce; use an LLM without it"
                )
        if language_model is None:
            language_model = AutoModelForCausalLM.from_config(text_config)
        self.language_model = language_model
        # One config object for the LLM and the wrapper, so resizing and attention settings stay in sync.
        self.config.text_config = language_model.config
        if language_model.config._attn_implementation is None:
            language_model.config._attn_implementation = self.config._attn_implementation or "sdpa"
        hidden = config.hidden_size
        pixel_width = hidden // 2
        self.pixel_projector = CodeMLP(config.code_dim, pixel_width, config.projector_act)
        self.semantic_projector = CodeMLP(config.code_dim, hidden - pixel_width, config.projector_act)
        self.understanding_projector = (
            CodeMLP(config.code_dim, hidden, config.projector_act)
            if config.understanding_tokens == "semantic"
            else None
        )
        head_kwargs = {
            "llm_hidden": hidden,
            "code_dim": config.code_dim,
            "codebook_size": config.codebook_size,
            "depth": config.rq_depth,
            "width": config.head_width,
            "layers": config.depth_head_layers,
            "heads": config.head_heads,
            "mlp_ratio": config.depth_head_mlp_ratio,
            "dropout": config.depth_head_dropout,
        }
        self.pixel_head = DepthHead(**head_kwargs)
        self.semantic_head = DepthHead(**head_kwargs) if config.use_semantic_head else None
        # Input cells are centred on their image's mean cell and layer-normalised (see the config field).
        self.input_cell_norm = nn.LayerNorm(hidden) if config.input_cell_norm else None
        self.image_cell_position = (
            nn.Parameter(torch.zeros(config.grid_size * config.grid_size, hidden))
            if config.image_position_embedding
            else None
        )
        self.output_cell_position = (
            nn.Parameter(torch.zeros(config.grid_size * config.grid_size, hidden))
            if config.output_position_embedding
            else None
        )
        code_shape = (config.codebook_size, config.code_dim)
        self.register_buffer("pixel_code_embedding", torch.zeros(code_shape))
        self.register_buffer("semantic_code_embedding", torch.zeros(code_shape))
        self.register_buffer("code_embeddings_set", torch.zeros((), dtype=torch.bool))
        self.post_init()

    # ------------------------------------------------------------------ construction helpers

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = getattr(self.config.text_config, "initializer_range", 0.02)
        if module is self:
            grid, hidden = self.config.grid_size, self.config.hidden_size
            for table in (self.image_cell_position, self.output_cell_position):
                if table is not None:
                    table.copy_(grid_sincos(grid, hidden))
            if self.image_cell_position is not None and self.config.image_position_regions:
                regions = self.config.image_position_regions
                self.image_cell_position.add_(region_vectors(grid, regions, hidden, REGION_RMS))
        if isinstance(module, DepthHead):
            init.normal_(module.depth_position, mean=0.0, std=std)
            init.normal_(module.classifier_weight, mean=0.0, std=std)
            init.zeros_(module.classifier_bias)
        else:
            super()._init_weights(module)

    @classmethod
    def from_tokenizer(
        cls,
        config: DualTokenMLLMConfig,
        tokenizer_model: Any,
        language_model: PreTrainedModel | None = None,
    ) -> DualTokenMLLM:
        """Build a model whose code geometry and frozen code embeddings come from a DualToken tokenizer."""
        tok_cfg = tokenizer_model.config
        config.codebook_size = int(tok_cfg.codebook_size)
        config.code_dim = int(tok_cfg.code_dim)
        config.rq_depth = int(tok_cfg.rq_depth)
        config.grid_size = int(tokenizer_model.grid_size)
        config.image_size = int(tok_cfg.image_size)
        model = cls(config, language_model=language_model)
        model.set_code_embeddings(tokenizer_model.codebook("pixel"), tokenizer_model.codebook("semantic"))
        return model

    @classmethod
    def from_llm(
        cls,
        llm_dir_or_config: str | os.PathLike | PretrainedConfig | dict,
        processor: Any,
        *,
        attn_implementation: str | None = None,
        dtype: torch.dtype | None = None,
        **config_kwargs: Any,
    ) -> DualTokenMLLM:
        """Wrap a causal LM: a local HF directory (pretrained weights) or a config (random init), for a
        `DualTokenProcessor` built first (its text tokenizer already holds the special tokens).

        The LLM embeddings are resized to hold the processor's vocabulary, the special ids are recorded, and the
        code embeddings are copied from the processor's image tokenizer (when it has one; otherwise call
        `set_code_embeddings`). `config_kwargs` are `DualTokenMLLMConfig` fields.
        """
        attn = attn_implementation or default_attn_implementation()
        if isinstance(llm_dir_or_config, (str, os.PathLike)):
            path = Path(llm_dir_or_config)
            if not (path / "config.json").is_file():
                raise FileNotFoundError(f"DualTokenMLLM.from_llm: no config.json in LLM directory {path}")
            llm = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn, dtype=dtype)
        else:
            llm_config = llm_dir_or_config
            if isinstance(llm_config, dict):
                llm_config = dict(llm_config)
                if "model_type" not in llm_config:
                    raise ValueError("DualTokenMLLM.from_llm: an LLM config dict needs a 'model_type'")
                llm_config = AutoConfig.for_model(llm_config.pop("model_type"), **llm_config)
            llm = AutoModelForCausalLM.from_config(llm_config, attn_implementation=attn, dtype=dtype)
        config = DualTokenMLLMConfig(text_config=llm.config, attn_implementation=attn, **config_kwargs)
        if processor.image_tokenizer is not None:
            model = cls.from_tokenizer(config, processor.image_tokenizer, language_model=llm)
        else:
            model = cls(config, language_model=llm)
        fresh_llm = not isinstance(llm_dir_or_config, (str, os.PathLike))
        if fresh_llm and config.llm_query_key_init_std is not None:
            draw_query_key(model.language_model, config.llm_query_key_init_std)
        model.set_special_tokens(processor)
        if dtype is not None:
            model.to(dtype)
        return model

    def set_special_tokens(self, processor: Any) -> None:
        """Record the processor's multimodal special ids and grow the LLM embeddings to its vocabulary when needed."""
        vocabulary = len(processor.tokenizer)
        rows = self.get_input_embeddings().num_embeddings
        if vocabulary > rows:
            self.resize_token_embeddings(vocabulary)
            rows = vocabulary
        for name, value in processor.ids.items():
            setattr(self.config, name, value)
        self.config.visual_token_offset = rows

    @torch.no_grad()
    def set_code_embeddings(self, pixel: torch.Tensor, semantic: torch.Tensor) -> None:
        """Copy the frozen (K, code_dim) code embedding tables of both branches."""
        expected = tuple(self.pixel_code_embedding.shape)
        for name, table in (("pixel", pixel), ("semantic", semantic)):
            if tuple(table.shape) != expected:
                raise ValueError(
                    f"set_code_embeddings: the {name} codebook has shape {tuple(table.shape)}, "
                    f"expected (codebook_size, code_dim) = {expected}"
                )
        self.pixel_code_embedding.copy_(pixel.detach())
        self.semantic_code_embedding.copy_(semantic.detach())
        self.code_embeddings_set.fill_(True)

    def set_code_priors(
        self, pixel_counts: torch.Tensor, semantic_counts: torch.Tensor | None = None
    ) -> None:
        """Start the depth heads' classifiers at the training codes' frequencies ((D, K) counts per head; see
        `DepthHead.set_code_prior`). The training entry calls it on a freshly built model."""
        self.pixel_head.set_code_prior(pixel_counts)
        if self.semantic_head is not None and semantic_counts is not None:
            self.semantic_head.set_code_prior(semantic_counts)

    def save_pretrained(
        self, save_directory: str | os.PathLike, processor: Any | None = None, **kwargs: Any
    ) -> None:
        """Write config + safetensors weights (LLM, projectors, heads, code embeddings) atomically; with a
        `DualTokenProcessor`, also its text tokenizer, processor_config.json and the DualToken tokenizer (copied
        into the `image_tokenizer/` subfolder, which `config.image_tokenizer_path` then names)."""
        if processor is not None and getattr(processor, "image_tokenizer", None) is not None:
            self.config.image_tokenizer_path = processor.image_tokenizer_dirname

        def write(tmp: Path) -> None:
            PreTrainedModel.save_pretrained(self, tmp, **kwargs)
            if processor is not None:
                processor.save_pretrained(tmp)

        atomic_directory_write(save_directory, write)

    # ------------------------------------------------------------------ LLM plumbing

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def resize_token_embeddings(self, new_num_tokens: int | None = None, **kwargs: Any) -> nn.Embedding:
        embeddings = self.language_model.resize_token_embeddings(new_num_tokens, **kwargs)
        self.config.text_config = self.language_model.config
        return embeddings

    def text_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LLM hidden states (..., H) -> text logits (..., V)."""
        return self.get_output_embeddings()(hidden)

    # ------------------------------------------------------------------ image embeddings

    def _check_codes(self, name: str, codes: torch.Tensor) -> None:
        if not bool(self.code_embeddings_set):
            raise ValueError(
                "DualTokenMLLM: code embeddings are unset; build with from_tokenizer/from_llm or call "
                "set_code_embeddings(pixel, semantic)"
            )
        if codes.shape[-1] != self.config.rq_depth:
            raise ValueError(
                f"DualTokenMLLM: {name} must end with depth {self.config.rq_depth}, got {codes.shape}"
            )
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.config.codebook_size):
            raise ValueError(f"DualTokenMLLM: {name} must lie in [0, {self.config.codebook_size})")

    def _code_sum(self, table: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        return table[codes.long()].sum(dim=-2)

    def output_cell_embedding(
        self,
        pixel_codes: torch.Tensor,
        semantic_codes: torch.Tensor | None,
        cell_index: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """Embedding of output-image cells: (..., D) codes -> (..., H) = [MLP_pix(sum E_pix) ; MLP_sem(sum E_sem)].

        Without a semantic head the semantic half is zeros (`semantic_codes` is ignored). With
        `config.output_position_embedding`, `cell_index` (the raster index of each cell in its grid: an int or a
        tensor broadcasting against the codes' leading shape) selects the cell's position embedding to add.
        """
        dtype = self.pixel_projector.fc1.weight.dtype
        pixel = self.pixel_projector(self._code_sum(self.pixel_code_embedding, pixel_codes).to(dtype))
        if self.semantic_head is None:
            semantic = pixel.new_zeros(*pixel.shape[:-1], self.config.hidden_size - pixel.shape[-1])
        else:
            if semantic_codes is None:
                raise ValueError("DualTokenMLLM: output images need semantic codes (use_semantic_head=True)")
            semantic = self.semantic_projector(
                self._code_sum(self.semantic_code_embedding, semantic_codes).to(dtype)
            )
            drop = self.config.output_semantic_dropout
            if drop >= 1.0:
                semantic = torch.zeros_like(semantic)
            elif drop > 0.0 and self.training and semantic.dim() == 3:
                # One draw per output image: its whole semantic half is kept or zeroed.
                keep = torch.rand(semantic.shape[0], 1, 1, device=semantic.device) >= drop
                semantic = semantic * keep.to(semantic.dtype)
        out = torch.cat([pixel, semantic], dim=-1)
        if self.output_cell_position is None:
            return out
        if cell_index is None:
            raise ValueError("DualTokenMLLM: output_position_embedding needs the cells' cell_index")
        index = torch.as_tensor(cell_index, device=out.device, dtype=torch.long)
        return out + self.output_cell_position[index].to(out.dtype)

    def understanding_cell_embedding(
        self, pixel_codes: torch.Tensor | None, semantic_codes: torch.Tensor
    ) -> torch.Tensor:
        """Embedding of input-image cells according to `config.understanding_tokens`."""
        if self.understanding_projector is None:
            if pixel_codes is None:
                raise ValueError("DualTokenMLLM: understanding_tokens='semantic+pixel' needs pixel codes")
            dtype = self.pixel_projector.fc1.weight.dtype
            pixel = self.pixel_projector(self._code_sum(self.pixel_code_embedding, pixel_codes).to(dtype))
            semantic = self.semantic_projector(
                self._code_sum(self.semantic_code_embedding, semantic_codes).to(dtype)
            )
            return torch.cat([pixel, semantic], dim=-1)
        dtype = self.understanding_projector.fc1.weight.dtype
        return self.understanding_projector(
            self._code_sum(self.semantic_code_embedding, semantic_codes).to(dtype)
        )

    def image_embeddings(
        self,
        pixel_codes: torch.Tensor | None,
        semantic_codes: torch.Tensor | None,
        image_is_output: torch.Tensor | None,
    ) -> torch.Tensor:
        """(N,h,w,D) code grids -> (N, h*w, H) cell embeddings (output or understanding per image)."""
        reference = semantic_codes if semantic_codes is not None else pixel_codes
        if reference is None:
            raise ValueError("DualTokenMLLM: images need pixel_codes and/or semantic_codes")
        count = reference.shape[0]
        if image_is_output is None:
            image_is_output = torch.zeros(count, dtype=torch.bool, device=reference.device)
        image_is_output = image_is_output.to(device=reference.device, dtype=torch.bool)
        if image_is_output.shape != (count,):
            raise ValueError(
                f"DualTokenMLLM: image_is_output must be ({count},), got {tuple(image_is_output.shape)}"
            )
        for name, codes in (("pixel_codes", pixel_codes), ("semantic_codes", semantic_codes)):
            if codes is not None:
                if codes.dim() != 4 or codes.shape[0] != count:
                    raise ValueError(
                        f"DualTokenMLLM: {name} must be (N,h,w,D) with N={count}, got {codes.shape}"
                    )
                self._check_codes(name, codes)
        cells = reference.shape[1] * reference.shape[2]

        def flat(codes: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor | None:
            return None if codes is None else codes[rows].reshape(-1, cells, self.config.rq_depth)

        out = torch.zeros(
            count,
            cells,
            self.config.hidden_size,
            device=reference.device,
            dtype=self.pixel_projector.fc1.weight.dtype,
        )
        outputs, inputs = image_is_output.nonzero().flatten(), (~image_is_output).nonzero().flatten()
        # Both branches run whenever their codes are given, on empty selections too: every batch then calls the
        # same modules in the same order, which ZeRO-2 gradient buckets and ZeRO-3 parameter gathering need to
        # match across data-parallel ranks (a rank whose batch lacks output or input images would otherwise
        # skip a projector).
        if outputs.numel() and pixel_codes is None:
            raise ValueError("DualTokenMLLM: output images need pixel_codes")
        if inputs.numel() and semantic_codes is None:
            raise ValueError("DualTokenMLLM: understanding images need semantic_codes")
        if pixel_codes is not None and (semantic_codes is not None or self.semantic_head is None):
            index = torch.arange(cells, device=reference.device)
            out = out.index_put(
                (outputs,),
                self.output_cell_embedding(
                    flat(pixel_codes, outputs), flat(semantic_codes, outputs), index
                ).to(out.dtype),
            )
        if semantic_codes is not None and (
            pixel_codes is not None or self.understanding_projector is not None
        ):
            cell_embeds = self.understanding_cell_embedding(
                flat(pixel_codes, inputs), flat(semantic_codes, inputs)
            )
            if self.input_cell_norm is not None:
                cell_embeds = self.input_cell_norm(cell_embeds - cell_embeds.mean(dim=-2, keepdim=True))
            if self.image_cell_position is not None:
                cell_embeds = cell_embeds + self.image_cell_position.to(cell_embeds.dtype)
            out = out.index_put((inputs,), cell_embeds.to(out.dtype))
        return out

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        pixel_codes: torch.Tensor | None = None,
        semantic_codes: torch.Tensor | None = None,
        image_is_output: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with every `<img>` position replaced by its image cell embedding, (B,T,H)."""
        embeds = self.get_input_embeddings()(input_ids)
        if self.config.img_token_id is None:
            return embeds
        is_cell = input_ids == self.config.img_token_id
        cells = int(is_cell.sum())
        given = semantic_codes if semantic_codes is not None else pixel_codes
        if cells == 0:
            if given is not None and given.numel():
                raise ValueError(
                    "DualTokenMLLM: image codes were given but input_ids hold no <img> positions"
                )
            if not self.training:
                return embeds
            # Training on a batch without images: run the projectors on an empty grid so that this rank calls
            # the same modules as ranks whose batches hold images (see `image_embeddings`).
            grid, depth = self.config.grid_size, self.config.rq_depth
            pixel_codes = semantic_codes = input_ids.new_zeros(0, grid, grid, depth)
            image_is_output = torch.zeros(0, dtype=torch.bool, device=input_ids.device)
            given = semantic_codes
        if given is None:
            raise ValueError(
                f"DualTokenMLLM: input_ids hold {cells} <img> positions but no image codes were given"
            )
        per_image = given.shape[1] * given.shape[2] if given.dim() == 4 else -1
        if per_image <= 0 or cells != given.shape[0] * per_image:
            raise ValueError(
                f"DualTokenMLLM: input_ids hold {cells} <img> positions but the codes {tuple(given.shape)} "
                "give a different number of cells (expected N*h*w)"
            )
        cell_embeds = self.image_embeddings(pixel_codes, semantic_codes, image_is_output).to(embeds.dtype)
        return embeds.masked_scatter(is_cell.unsqueeze(-1), cell_embeds.reshape(-1, embeds.shape[-1]))

    # ------------------------------------------------------------------ forward and loss

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        pixel_codes: torch.LongTensor | None = None,
        semantic_codes: torch.LongTensor | None = None,
        image_is_output: torch.BoolTensor | None = None,
        labels: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | None = None,
        **kwargs: Any,
    ) -> DualTokenMLLMOutput:
        """Run the LLM over text + image cells; with `labels`, also the three loss terms.

        `logits_to_keep`: None keeps all text logits without labels and none with labels (the text loss is
        computed from the answer positions only); 0 keeps all, n > 0 keeps the last n positions.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("DualTokenMLLM.forward: give exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_inputs(input_ids, pixel_codes, semantic_codes, image_is_output)
        if use_cache is None and labels is not None:
            use_cache = False  # training: no KV cache (also keeps gradient checkpointing quiet)
        if position_ids is None and attention_mask is not None:
            position_ids = positions_from_mask(attention_mask, inputs_embeds.shape[1])
        decoder_out = self.language_model.get_decoder()(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            **kwargs,
        )
        hidden = decoder_out.last_hidden_state
        if logits_to_keep is None:
            logits_to_keep = 0 if labels is None else -1
        logits = None
        if logits_to_keep >= 0:
            kept = hidden if logits_to_keep == 0 else hidden[:, -logits_to_keep:]
            logits = self.text_logits(kept)
        out = DualTokenMLLMOutput(
            logits=logits, last_hidden_state=hidden, past_key_values=decoder_out.past_key_values
        )
        if labels is not None:
            if input_ids is None:
                raise ValueError(
                    "DualTokenMLLM.forward: labels need input_ids (image positions are read from them)"
                )
            self._compute_losses(out, hidden, input_ids, labels, pixel_codes, semantic_codes, image_is_output)
        return out

    def _compute_losses(
        self,
        out: DualTokenMLLMOutput,
        hidden: torch.Tensor,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        pixel_codes: torch.Tensor | None,
        semantic_codes: torch.Tensor | None,
        image_is_output: torch.Tensor | None,
    ) -> None:
        if labels.shape != input_ids.shape:
            raise ValueError(
                f"DualTokenMLLM: labels {tuple(labels.shape)} must match input_ids {tuple(input_ids.shape)}"
            )
        img_id = self.config.img_token_id
        if img_id is not None:
            labels = labels.masked_fill(input_ids == img_id, IGNORE_INDEX)
        targets = labels[:, 1:]
        answer = targets != IGNORE_INDEX
        text_logits = self.text_logits(hidden[:, :-1][answer]).float()
        out.loss_text = _mean_ce(text_logits, targets[answer])

        prev = self.output_cell_predictors(input_ids, pixel_codes, image_is_output)
        states = hidden[prev[:, 0], prev[:, 1]]
        pixel_targets = _output_cell_codes(pixel_codes, image_is_output, self.config.rq_depth, states.device)
        out.pixel_logits = self.pixel_head(states, pixel_targets, self.pixel_code_embedding)
        out.loss_pixel = _mean_ce(out.pixel_logits.float().flatten(0, 1), pixel_targets.flatten())
        loss = out.loss_text + self.config.pixel_loss_weight * out.loss_pixel
        if self.semantic_head is not None:
            semantic_targets = _output_cell_codes(
                semantic_codes, image_is_output, self.config.rq_depth, states.device
            )
            out.semantic_logits = self.semantic_head(states, semantic_targets, self.semantic_code_embedding)
            out.loss_semantic = _mean_ce(
                out.semantic_logits.float().flatten(0, 1), semantic_targets.flatten()
            )
            loss = loss + self.config.semantic_loss_weight * out.loss_semantic
        out.loss = loss

    def output_cell_predictors(
        self, input_ids: torch.Tensor, pixel_codes: torch.Tensor | None, image_is_output: torch.Tensor | None
    ) -> torch.Tensor:
        """(b, t-1) of the state that predicts each output-image cell (b, t), cells in reading order."""
        if pixel_codes is None or image_is_output is None or not bool(image_is_output.any()):
            return torch.zeros(0, 2, dtype=torch.long, device=input_ids.device)
        per_image = pixel_codes.shape[1] * pixel_codes.shape[2]
        positions = (input_ids == self.config.img_token_id).nonzero().view(pixel_codes.shape[0], per_image, 2)
        cells = positions[image_is_output.to(positions.device).bool()].reshape(-1, 2)
        if bool((cells[:, 1] == 0).any()):
            raise ValueError(
                "DualTokenMLLM: an output image cell sits at position 0 (it needs a preceding <boi>)"
            )
        return cells - torch.tensor([0, 1], device=cells.device)


def _output_cell_codes(
    codes: torch.Tensor | None, image_is_output: torch.Tensor | None, depth: int, device: torch.device
) -> torch.Tensor:
    if codes is None or image_is_output is None or not bool(image_is_output.any()):
        return torch.zeros(0, depth, dtype=torch.long, device=device)
    return codes[image_is_output.to(codes.device).bool()].reshape(-1, depth).to(device).long()


def _mean_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy; an empty selection gives an exact zero that still reaches every parameter involved
    (so data-parallel training sees gradients, all zero, for heads unused by a batch)."""
    if targets.numel() == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits, targets)


def default_attn_implementation(device: torch.device | str | None = None) -> str:
    """Return "flash_attention_2" when flash_attn is importable and CUDA is the target, otherwise "sdpa"."""
    import importlib.util

    on_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    if on_cuda and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


@torch.no_grad()
def draw_query_key(llm: nn.Module, std: float) -> None:
    """Draw the attention query and key projection weights (`q_proj` / `k_proj`, the Llama/Qwen naming) of a
    freshly built LLM from N(0, std); their biases stay as the LLM initialised them."""
    projections = [
        module
        for name, module in llm.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in ("q_proj", "k_proj")
    ]
    if not projections:
        raise ValueError(
            "DualTokenMLLMConfig.llm_query_key_init_std is set, but the LLM has no q_proj / k_proj linear layers "
            f"({type(llm).__name__}); leave it None for this LLM"
        )
    for module in projections:
        init.normal_(module.weight, mean=0.0, std=std)
