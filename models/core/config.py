"""The one frozen config every family converts into.

Families differ only through these typed fields; the forward never branches on an
architecture name: variants are typed flags here, never `if arch == ...` in the forward.

Axis vocabulary used in annotations and einsum strings throughout `models/` and `lens/`:
  seq (positions of one sequence), d_model, heads (query heads), kv_heads, d_head,
  d_mlp, vocab, layers, K (a sweep of interventions).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

NormKind = Literal["rms", "layer"]
Activation = Literal["silu", "gelu_new", "gelu", "gelu_pytorch_tanh", "relu"]


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling, as in `transformers.modeling_rope_utils`.

    kind "linear": inv_freq / factor.  kind "llama3": the Llama-3 band-wise rescaling.
    """

    kind: Literal["linear", "llama3"]
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything the pure forward needs to know, for every supported family."""

    architecture: str  # informational: the family that produced this config
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int
    max_seq_len: int
    norm_kind: NormKind
    norm_eps: float
    activation: Activation
    gated_mlp: bool  # SwiGLU/GeGLU (gate * up) vs a plain two-layer MLP
    positional: Literal["rope", "learned"]
    rope_theta: float = 10000.0
    rotary_dim: int | None = None  # partial rotary (NeoX), as transformers' `dim`; None = whole head
    rope_scaling: RopeScaling | None = None
    # Sliding-window attention: layer l with `local_layers[l]` True sees only keys with
    # query_pos - key_pos < sliding_window (Gemma 2/3 alternate local and global layers;
    # Mistral, Phi-3 and Qwen3 may make every layer local).  None = every layer is global.
    # Gemma 3's local layers also use their own rope theta (None = the global tables).
    rope_local_theta: float | None = None
    sliding_window: int | None = None
    local_layers: tuple[bool, ...] | None = None
    parallel_residual: bool = False  # NeoX: x + attn(ln1 x) + mlp(ln2 x)
    qk_norm: bool = False  # Gemma 3: RMSNorm on each query/key head
    # "head": one RMSNorm per head over d_head (Gemma 3); "all": over the whole q / k
    # projection [heads * d_head] before the split into heads (OLMo 2, OLMoE)
    qk_norm_over: Literal["head", "all"] = "head"
    sandwich_norms: bool = False  # Gemma 3: extra norms on each sub-block's output
    # False: no norm BEFORE attention / the MLP (ln1 / ln2 absent); with sandwich_norms the
    # norms sit only on the sub-layer outputs (OLMo 2's post-norms)
    pre_norms: bool = True
    embed_scale: float = 1.0  # Gemma: embeddings times sqrt(d_model)
    query_scale: float | None = None  # softmax scale; None = d_head ** -0.5
    attn_bias: bool = False  # biases on q/k/v
    attn_out_bias: bool = False
    mlp_bias: bool = False
    norm_bias: bool = False  # LayerNorm beta
    tie_embeddings: bool = False
    unembed_bias: bool = False  # a per-token logit bias (also what folding a final LayerNorm bias creates)
    final_logit_softcap: float | None = None
    # Gemma 2: attention scores (after the query scale, before the mask) become
    # cap * tanh(score / cap).  None = no capping.
    attn_logit_softcap: float | None = None
    # TransformerLens's attn_only models: blocks without MLP (and without ln2); d_mlp unused.
    attn_only: bool = False
    # Mixture of experts (Mixtral, OLMoE): n_experts > 0 replaces the MLP by n_experts
    # gated MLPs of width d_mlp and a router choosing experts_per_token of them per token
    # (models/core/moe.py); norm_topk_prob renormalises the chosen softmax probabilities.
    n_experts: int = 0
    experts_per_token: int = 0
    norm_topk_prob: bool = True
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.n_experts:
            if not 1 <= self.experts_per_token <= self.n_experts:
                raise ValueError(f"experts_per_token={self.experts_per_token} must be in "
                                 f"[1, n_experts={self.n_experts}]")
            if not self.gated_mlp or self.attn_only:
                raise ValueError("a mixture of experts needs gated_mlp=True and an MLP")
        elif self.experts_per_token:
            raise ValueError(f"experts_per_token={self.experts_per_token} without n_experts")
        if self.qk_norm_over not in ("head", "all"):
            raise ValueError(f"qk_norm_over must be 'head' or 'all'; got {self.qk_norm_over!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}"
            )
        if self.local_layers is not None and len(self.local_layers) != self.n_layers:
            raise ValueError(
                f"local_layers has {len(self.local_layers)} entries for {self.n_layers} layers"
            )
        if self.has_local_layers and not (self.sliding_window or 0) > 0:
            raise ValueError(f"local (sliding-window) layers need sliding_window >= 1; got "
                             f"{self.sliding_window!r}")
        for name in ("attn_logit_softcap", "final_logit_softcap"):
            cap = getattr(self, name)
            if cap is not None and not cap > 0:
                raise ValueError(f"{name} must be > 0 or None; got {cap!r}")
        if self.rotary_dim is not None and not 0 <= self.rotated_channels <= self.d_head:
            raise ValueError(
                f"rotary_dim={self.rotary_dim} rotates {self.rotated_channels} channels, more than "
                f"d_head={self.d_head}")

    @property
    def rotated_channels(self) -> int:
        """How many channels of each head RoPE turns.  transformers takes the frequencies
        `arange(0, rotary_dim, 2) / rotary_dim`, ceil(rotary_dim / 2) of them, and rotates
        twice that many channels: an odd rotary_dim (NeoX d_head 12 x rotary_pct 0.25 = 3)
        rotates rotary_dim + 1 channels, with exponents over rotary_dim, not rotary_dim + 1."""
        dim = self.d_head if self.rotary_dim is None else self.rotary_dim
        return 2 * ((dim + 1) // 2)

    @property
    def scale(self) -> float:
        return self.query_scale if self.query_scale is not None else self.d_head**-0.5

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    @property
    def has_local_layers(self) -> bool:
        return self.local_layers is not None and any(self.local_layers)


def refuse_unknown(hf_config: dict, understood: set[str], family: str) -> None:
    """Raise if an HF config carries a field this converter does not handle.

    A silently different model is the worst bug an interpretability tool can have, so an
    unrecognised field is an error naming the field, not a warning.
    """
    unknown = sorted(set(hf_config) - understood)
    if unknown:
        raise ValueError(
            f"{family} converter does not understand config field(s) {unknown}; refusing to "
            "load a possibly different model. Remove the field(s) if they are irrelevant, or "
            "extend models/" + family + ".py."
        )


# Fields of every transformers config that do not change the forward of a decoder-only
# model in inference (dropout, training-only, bookkeeping).  Each family adds its own.
GENERIC_HF_FIELDS = {
    "transformers_version", "architectures", "output_hidden_states", "return_dict",
    "dtype", "torch_dtype", "chunk_size_feed_forward", "is_encoder_decoder", "id2label",
    "label2id", "problem_type", "initializer_range", "use_cache", "_name_or_path",
    "output_attentions", "attention_dropout", "pad_token_id", "bos_token_id",
    "eos_token_id", "tie_word_embeddings", "model_type", "is_decoder",
    "add_cross_attention", "tokenizer_class", "prefix", "sep_token_id",
    "decoder_start_token_id", "task_specific_params", "finetuning_task",
    "tf_legacy_loss", "use_bfloat16", "pruned_heads", "cross_attention_hidden_size",
    "_attn_implementation_autoset", "_attn_implementation", "quantization_config",
    "unk_token_id", "_model_name_or_path",
}


def eos_ids(hf_config: dict) -> tuple[int, ...]:
    """The config's eos_token_id (an int or a list) as a tuple; () when absent."""
    eos = hf_config.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)


def rope_from_hf(hf_config: dict, family: str) -> tuple[float, RopeScaling | None, float | None]:
    """(theta, scaling, partial_rotary_factor) from either config style.

    transformers >= 5 writes `rope_parameters`; older configs have `rope_theta` and
    `rope_scaling`.  Unknown rope types are refused.
    """
    params = dict(hf_config.get("rope_parameters") or {})
    if not params:
        params = dict(hf_config.get("rope_scaling") or {})
        if "rope_theta" in hf_config:
            params["rope_theta"] = hf_config["rope_theta"]
        if "partial_rotary_factor" in hf_config:
            params["partial_rotary_factor"] = hf_config["partial_rotary_factor"]
        if "rotary_pct" in hf_config:
            params["partial_rotary_factor"] = hf_config["rotary_pct"]
        if "rotary_emb_base" in hf_config:
            params["rope_theta"] = hf_config["rotary_emb_base"]
    theta = float(params.pop("rope_theta", 10000.0))
    partial = params.pop("partial_rotary_factor", None)
    kind = params.pop("rope_type", params.pop("type", "default"))
    if kind == "default":
        scaling = None
    elif kind == "linear":
        scaling = RopeScaling("linear", float(params.pop("factor")))
    elif kind == "llama3":
        scaling = RopeScaling(
            "llama3",
            float(params.pop("factor")),
            float(params.pop("low_freq_factor")),
            float(params.pop("high_freq_factor")),
            int(params.pop("original_max_position_embeddings")),
        )
    else:
        raise ValueError(f"{family}: rope type {kind!r} is not supported")
    if params:
        raise ValueError(f"{family}: rope parameter(s) {sorted(params)} are not understood")
    return theta, scaling, partial
