"""The denoiser stack, grown right to left, built from stock Hugging Face EuroBERT modules.

    token embedding -> blocks first..L (bidirectional, pre-norm) -> final RMSNorm -> shared LM head

Each block *is* a ``transformers`` ``EuroBertDecoderLayer`` (RMSNorm, RoPE, grouped-query
attention, SwiGLU). The design card's stability kit is attached as torch parametrizations on
the block's linear weights rather than as extra code in the forward:

    W_eff = gamma * W / sigma(W)     (gamma only on the branch outputs Wo and W2)

Scaling Wo and W2 by gamma is the same as the residual gain h + gamma * f(h), because each
branch ends in that linear. When a block is frozen its parametrizations are folded into
plain weights and the block is a stock EuroBERT layer again -- which is why an export is a
rename of keys and reproduces the logits exactly.

Block ids are 1-based and fixed: block k always belongs to noise level r_k and is stored as
``model.layers.{k-1}`` (EuroBERT's own key names), whichever blocks exist yet.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _SpectralNorm, spectral_norm
from transformers import EuroBertConfig
from transformers.models.eurobert.modeling_eurobert import (
    EuroBertDecoderLayer,
    EuroBertRMSNorm,
    EuroBertRotaryEmbedding,
)

from grow.config import ModelConfig, StabilityConfig

# The design card's Wq, Wk, Wv, Wo, W1, W2 -- plus the SwiGLU gate.
BLOCK_LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
# The last linear of each residual branch carries the residual gain.
BRANCH_OUTPUTS = ("self_attn.o_proj", "mlp.down_proj")


def hf_config(cfg: ModelConfig, vocab_size: int, special_ids: dict[str, int | None]) -> EuroBertConfig:
    """The EuroBERT config of a grown model: the same object the export writes."""
    return EuroBertConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_blocks,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        initializer_range=cfg.init_std,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta, **(cfg.rope_scaling or {})},
        tie_word_embeddings=False,
        attention_bias=cfg.attention_bias,
        mlp_bias=False,
        pad_token_id=special_ids.get("pad"),
        bos_token_id=special_ids.get("bos"),
        eos_token_id=special_ids.get("eos"),
        mask_token_id=special_ids["mask"],
        attn_implementation="sdpa",
    )


class ResidualGain(nn.Module):
    """Parametrization W -> gamma * W: the residual gain of the branch this linear ends."""

    def __init__(self, gamma: float) -> None:
        super().__init__()
        self.register_buffer("gamma", torch.tensor(float(gamma)))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.gamma.to(weight.dtype)


def add_stability(block: nn.Module, cfg: StabilityConfig) -> None:
    """Attach spectral norm (every linear) and the residual gain (branch outputs) to a block."""
    for name in BLOCK_LINEARS:
        linear = block.get_submodule(name)
        if cfg.spectral_norm:
            spectral_norm(linear, n_power_iterations=cfg.power_iterations)
        if name in BRANCH_OUTPUTS and cfg.gamma != 1.0:
            parametrize.register_parametrization(linear, "weight", ResidualGain(cfg.gamma))


@torch.no_grad()
def fold(block: nn.Module) -> None:
    """Fold all parametrizations into plain weights; the block becomes a stock EuroBERT layer.

    Folding happens in eval mode so the spectral norm uses its current power-iteration
    vectors instead of taking one more step.
    """
    was_training = block.training
    block.eval()
    for name in BLOCK_LINEARS:
        linear = block.get_submodule(name)
        if parametrize.is_parametrized(linear, "weight"):
            parametrize.remove_parametrizations(linear, "weight", leave_parametrized=True)
    block.train(was_training)


@contextlib.contextmanager
def power_iteration(model: nn.Module, enabled: bool):
    """Run spectral norm's power iteration in this forward or not.

    In training mode torch's spectral norm takes one power-iteration step per forward. With
    gradient accumulation that would be one step per micro-batch; grow takes it once per
    optimizer step (on the first micro-batch), so accumulating over micro-batches computes
    what data parallelism over ranks computes.
    """
    modules = [m for m in model.modules() if isinstance(m, _SpectralNorm) and m.training] if not enabled else []
    for m in modules:
        m.train(False)
    try:
        yield
    finally:
        for m in modules:
            m.train(True)


def is_folded(block: nn.Module) -> bool:
    return not any(parametrize.is_parametrized(block.get_submodule(n)) for n in BLOCK_LINEARS)


class NotGrown(nn.Module):
    """Placeholder for a block that does not exist yet (growth has not reached it)."""

    def forward(self, *args, **kwargs):
        raise RuntimeError("this block has not been grown yet")


TIME_FEATURES = 64


class TimeEmbedding(nn.Module):
    """A block's view of the noise level t (curriculum.conditioning: embedding).

    Fixed sinusoidal features of t followed by one linear map into the residual stream,
    added to the block's input. The linear starts at zero, so a block gains time
    conditioning without changing its function at step 0. Each block owns its own: it trains
    and freezes with its block, which keeps growth stages independent of each other.
    """

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.proj = nn.Linear(TIME_FEATURES, hidden_size, bias=False)
        nn.init.zeros_(self.proj.weight)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = TIME_FEATURES // 2
        freqs = torch.exp(-math.log(1000.0) * torch.arange(half, device=t.device) / half)
        angles = 1000.0 * t.float().unsqueeze(-1) * freqs
        return self.proj(torch.cat([angles.sin(), angles.cos()], dim=-1).to(self.proj.weight.dtype))


class GrowModel(nn.Module):
    """The design card's ``DenoiserStack``, grown one block at a time in either direction.

    ``blocks[k - 1]`` is block k, always: module names (and so peft adapter keys and
    checkpoint keys) do not shift when a block is prepended or appended. Blocks outside
    ``first_block..last_block`` are ``NotGrown`` placeholders.
    """

    def __init__(self, config: EuroBertConfig, *, time_embedding: bool = False) -> None:
        super().__init__()
        self.config = config
        self.num_blocks = config.num_hidden_layers
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList([NotGrown() for _ in range(self.num_blocks)])
        self.norm = EuroBertRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary_emb = EuroBertRotaryEmbedding(config=config)
        # One per block slot when the network is given the noise level (time as input).
        self.time_embed = (nn.ModuleList([TimeEmbedding(config.hidden_size) for _ in range(self.num_blocks)])
                           if time_embedding else None)
        # Blocks in checkpoint_blocks recompute their activations in backward (the frozen ones).
        self.checkpoint_blocks: frozenset[int] = frozenset()
        # Set by a corruption that puts something other than the [MASK] embedding at masked
        # positions (grow.corruption.GaussianInputs): hook(ids, embeddings, table) -> embeddings.
        self.input_hook = None

    # ------------------------------------------------------------------ growth

    def _grown(self) -> list[int]:
        return [i + 1 for i, b in enumerate(self.blocks) if not isinstance(b, NotGrown)]

    @property
    def first_block(self) -> int:
        """Id of the leftmost existing block (num_blocks + 1 when there is none yet)."""
        grown = self._grown()
        return grown[0] if grown else self.num_blocks + 1

    @property
    def last_block(self) -> int:
        """Id of the rightmost existing block (0 when there is none yet)."""
        grown = self._grown()
        return grown[-1] if grown else 0

    def new_block(self, block_id: int) -> EuroBertDecoderLayer:
        """A freshly initialised block for position ``block_id`` (not yet attached)."""
        block = EuroBertDecoderLayer(self.config, layer_idx=block_id - 1)
        std = self.config.initializer_range
        for name in BLOCK_LINEARS:
            linear = block.get_submodule(name)
            nn.init.normal_(linear.weight, std=std)
            if linear.bias is not None:  # model.attention_bias (a converted Qwen2's shape)
                nn.init.zeros_(linear.bias)
        return block.to(self.embed_tokens.weight.device)

    def set_block(self, block_id: int, block: nn.Module) -> None:
        """Put ``block`` in slot ``block_id``; the grown blocks must stay contiguous."""
        grown = self._grown()
        if grown and not grown[0] - 1 <= block_id <= grown[-1] + 1:
            raise ValueError(f"block {block_id} would leave a gap next to blocks {grown[0]}..{grown[-1]}")
        self.blocks[block_id - 1] = block

    def prepend_block(self, block: nn.Module) -> None:
        """Right-to-left growth (card 4.1): ``block`` becomes block ``first_block - 1``."""
        if self.first_block <= 1:
            raise ValueError("all blocks already exist")
        self.set_block(self.first_block - 1, block)

    def block(self, block_id: int) -> nn.Module:
        if not self.first_block <= block_id <= self.last_block:
            raise IndexError(f"block {block_id} does not exist (blocks {self.first_block}..{self.last_block})")
        return self.blocks[block_id - 1]

    def block_modules(self, block_id: int) -> list[nn.Module]:
        """Everything that belongs to block ``block_id``: the layer and its time embedding."""
        own = [self.block(block_id)]
        if self.time_embed is not None:
            own.append(self.time_embed[block_id - 1])
        return own

    def freeze_ends(self, frozen: bool = True) -> None:
        """Freeze (or unfreeze) the embedding, final norm and LM head: the fixed semantic anchor."""
        for module in (self.embed_tokens, self.norm, self.lm_head):
            module.requires_grad_(not frozen)

    def init_ends(self) -> None:
        std = self.config.initializer_range
        nn.init.normal_(self.embed_tokens.weight, std=std)
        nn.init.normal_(self.lm_head.weight, std=std)

    # ------------------------------------------------------------------ forward

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        # The frozen embedding may be stored in 16-bit (quant.ends_dtype); blocks run in the
        # dtype of the final norm, which always matches the training precision.
        hidden = self.embed_tokens(input_ids).to(self.norm.weight.dtype)
        if self.input_hook is not None:
            hidden = self.input_hook(input_ids, hidden, self.embed_tokens.weight)
        return hidden

    def forward_from(
        self, hidden: torch.Tensor, start: int | None = None, end: int | None = None, t: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Run blocks ``start..end`` (inclusive, 1-based ids) on hidden states.

        ``t`` (one noise level per row) is required by a model with time embeddings and
        ignored by one without: a time-free network reads the level off the mask pattern.
        """
        start = self.first_block if start is None else start
        end = self.last_block if end is None else end
        if self.time_embed is not None and t is None:
            raise ValueError("this model is conditioned on the noise level: pass t (one level per row)")
        positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        rope = self.rotary_emb(hidden, position_ids=positions)
        for block_id in range(start, end + 1):
            block = self.block(block_id)
            if self.time_embed is not None:
                hidden = hidden + self.time_embed[block_id - 1](t.to(hidden.device)).unsqueeze(1).to(hidden.dtype)
            if block_id in self.checkpoint_blocks and torch.is_grad_enabled():
                hidden = torch.utils.checkpoint.checkpoint(
                    block, hidden, None, positions, None, False, rope, use_reentrant=False
                )
            else:
                hidden = block(hidden, position_embeddings=rope, position_ids=positions)
        return hidden

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """The shared LM head, tappable after any block."""
        return self.lm_head(self.norm(hidden).to(self.lm_head.weight.dtype))

    def forward(self, input_ids: torch.Tensor, start: int | None = None, end: int | None = None,
                t: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of blocks ``start..end`` (default: every existing block)."""
        return self.head(self.forward_from(self.embed(input_ids), start, end, t))

    # ------------------------------------------------------------------ weights

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.parameters() if p.requires_grad)

    def ends_state_dict(self) -> dict[str, torch.Tensor]:
        """Embedding, final norm and head under EuroBertForMaskedLM's key names."""
        return {
            "model.embed_tokens.weight": self.embed_tokens.weight,
            "model.norm.weight": self.norm.weight,
            "lm_head.weight": self.lm_head.weight,
        }

    def block_state_dict(self, block_id: int) -> dict[str, torch.Tensor]:
        """A folded block's weights under EuroBertForMaskedLM's key names."""
        block = self.block(block_id)
        if not is_folded(block):
            raise ValueError(f"block {block_id} must be folded before it is stored")
        return {f"model.layers.{block_id - 1}.{k}": v for k, v in block.state_dict().items()}

    def load_ends(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.embed_tokens.weight.copy_(state["model.embed_tokens.weight"])
            self.norm.weight.copy_(state["model.norm.weight"])
            self.lm_head.weight.copy_(state["lm_head.weight"])

    def load_block(self, block_id: int, state: dict[str, torch.Tensor]) -> EuroBertDecoderLayer:
        """A folded block rebuilt from its stored weights (not yet attached)."""
        prefix = f"model.layers.{block_id - 1}."
        block = EuroBertDecoderLayer(self.config, layer_idx=block_id - 1)
        own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        block.load_state_dict(own, strict=True)
        return block.to(self.embed_tokens.weight.device)
