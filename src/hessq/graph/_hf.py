"""Hugging Face models as traceable modules: the same submodules, a forward torch.fx can follow.

``torch.fx.symbolic_trace`` cannot follow transformers' forwards (shape unpacking, keyword-only
plumbing, attention dispatch). :func:`capture` turns a supported model into an equivalent module whose
forward is plain torch on the *same* submodule objects, under the same attribute paths, so layer
names stay the user's (``bert.encoder.layer.0.attention.self.query``) and its logits equal the
original's (tests check 1e-5). The captured module takes the token ids alone and returns the logits:
the attention mask is derived from the padding (``input_ids != pad_token_id``), which is exactly
the mask Hugging Face tokenizers produce with right or left padding.

The BERT family of sequence classifiers (BERT, ELECTRA, DistilBERT, RoBERTa, XLM-RoBERTa, CamemBERT, ALBERT,
MPNet) is one post-norm encoder whose parts sit under different names, with a different head: one
:class:`EncoderLayout` per family says where, and one forward (:class:`CapturedEncoderClassifier`) runs them all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hessq._errors import ConfigError, ConfigTypeError, ModelError
from hessq.ops.mask import padding_positions, relative_position_buckets
from hessq.ops.softmax import masked_softmax

_CAPTURES: dict[str, Callable[[nn.Module], nn.Module]] = {}


def register_capture(*class_names: str) -> Callable:
    """Decorator: a function turning a model of one of ``class_names`` (``type(model).__name__``) into a traceable module."""
    def wrap(fn: Callable[[nn.Module], nn.Module]) -> Callable[[nn.Module], nn.Module]:
        for name in class_names:
            _CAPTURES[name] = fn
        return fn
    return wrap


def _is_hugging_face(model: nn.Module) -> bool:
    return any(c.__module__.startswith("transformers.") for c in type(model).__mro__)


def capture(model: nn.Module) -> nn.Module:
    """``model`` in a form torch.fx traces: a captured twin for a supported Hugging Face model, else itself."""
    if isinstance(model, CapturedModel):
        return model
    fn = _CAPTURES.get(type(model).__name__)
    if fn is not None and _is_hugging_face(model):
        return fn(model)
    if _is_hugging_face(model):
        raise ModelError(
            f"hessq cannot capture the Hugging Face {type(model).__name__} yet: it captures "
            f"{sorted(_CAPTURES)} (any size: MiniLM, BERT-base, ...). Wrap your model's forward in plain "
            "torch operations (no **kwargs plumbing or shape unpacking) or register a capture with "
            "hessq.graph.register_capture")
    return model


class CapturedModel(nn.Module):
    """Base of captured models: ``source`` names the class it came from; ``input_key`` the batch dict key it reads."""

    source: str = ""
    input_key: str = "input_ids"
    pad_token_id: int = 0
    max_length: int = 512  # longest input (position table)


# The heads: what each family computes from the encoder's last hidden states h [B, T, H] (its first token's row).
def _pooler_head(m: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """BERT: the pooler (dense + tanh) on the first token, dropout, the classifier."""
    pooler = m.base.pooler
    return m.classifier(m.dropout(pooler.activation(pooler.dense(h[:, 0]))))


def _dense_head(activation: Callable[[nn.Module, torch.Tensor], torch.Tensor]) -> Callable:
    """ELECTRA and RoBERTa: ``classifier.dense``, an activation and ``classifier.out_proj`` on the first token."""
    def head(m: nn.Module, h: torch.Tensor) -> torch.Tensor:
        c = m.classifier
        return c.out_proj(c.dropout(activation(c, c.dense(c.dropout(h[:, 0])))))
    return head


def _albert_head(m: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """ALBERT: its pooler Linear and tanh on the first token, dropout, the classifier."""
    return m.classifier(m.dropout(m.base.pooler_activation(m.base.pooler(h[:, 0]))))


def _albert_order(base: nn.Module, config: Any) -> list[nn.Module]:
    """ALBERT runs ``num_hidden_layers`` passes over ``num_hidden_groups`` shared groups of layers."""
    groups, passes = base.encoder.albert_layer_groups, int(config.num_hidden_layers)
    per_group = passes / int(config.num_hidden_groups)
    return [layer for i in range(passes) for layer in groups[int(i / per_group)].albert_layers]


def _pre_classifier_head(m: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """DistilBERT: ``pre_classifier``, ReLU, dropout, ``classifier`` on the first token."""
    return m.classifier(m.dropout(torch.relu(m.pre_classifier(h[:, 0]))))


@dataclass(frozen=True)
class EncoderLayout:
    """Where a BERT-family sequence classifier keeps its parts.

    ``base`` is the encoder model's attribute (``bert``); ``layers`` the path of its layer list under it. The other
    paths are under each layer: the attention's query, key and value, its probabilities' dropout, its output
    projection, dropout and LayerNorm, then the feed-forward's two Linears, activation, dropout and LayerNorm
    (a dropout path is None where the family has none there). ``positions`` is ``"arange"`` (0 … T−1) or
    ``"padding"`` (RoBERTa: numbered from pad + 1 over the tokens that are not padding, padding at pad).
    ``activation_key`` is the config field naming the feed-forward's activation. ``embeddings_project`` is the
    path under ``base`` of a Linear from the embedding width to the hidden width, where the model has one.
    ``layer_order`` gives the layers in the order they run, ``(base, config) -> [layer, ...]``, for an encoder that
    runs shared layers more than once (ALBERT); by default each layer of ``layers`` runs once. ``relative_bias`` is
    the path under ``base`` of an Embedding of (bucket, head) attention biases (MPNet's), looked up by
    :func:`~hessq.ops.mask.relative_position_buckets` and added to every layer's attention scores.
    """

    base: str
    layers: str
    query: str
    key: str
    value: str
    probs_dropout: str
    attention_out: str
    attention_dropout: str | None
    attention_norm: str
    ffn_in: str
    ffn_act: str
    ffn_out: str
    ffn_dropout: str | None
    ffn_norm: str
    head: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    positions: str = "arange"
    activation_key: str = "hidden_act"
    embeddings_project: str | None = "embeddings_project"
    layer_order: Callable[[nn.Module, Any], list[nn.Module]] | None = None
    relative_bias: str | None = None

    def __post_init__(self) -> None:
        if self.positions not in ("arange", "padding"):
            raise ConfigError(f"positions must be 'arange' or 'padding', got {self.positions!r}")
        if not callable(self.head):
            raise ConfigTypeError(f"head must be a function (captured, h) -> logits, got {type(self.head).__name__}")
        if self.layer_order is not None and not callable(self.layer_order):
            raise ConfigTypeError("layer_order must be a function (base, config) -> [layer, ...], got "
                                  f"{type(self.layer_order).__name__}")


_BERT_LAYER = dict(layers="encoder.layer", query="attention.self.query", key="attention.self.key",
                   value="attention.self.value", probs_dropout="attention.self.dropout",
                   attention_out="attention.output.dense", attention_dropout="attention.output.dropout",
                   attention_norm="attention.output.LayerNorm", ffn_in="intermediate.dense",
                   ffn_act="intermediate.intermediate_act_fn", ffn_out="output.dense", ffn_dropout="output.dropout",
                   ffn_norm="output.LayerNorm")

_BERT = EncoderLayout(base="bert", head=_pooler_head, **_BERT_LAYER)
_ELECTRA = EncoderLayout(base="electra", head=_dense_head(lambda c, x: c.activation(x)), **_BERT_LAYER)
_ROBERTA = EncoderLayout(base="roberta", head=_dense_head(lambda c, x: torch.tanh(x)), positions="padding",
                         **_BERT_LAYER)
_DISTILBERT = EncoderLayout(
    base="distilbert", layers="transformer.layer", query="attention.q_lin", key="attention.k_lin",
    value="attention.v_lin", probs_dropout="attention.dropout", attention_out="attention.out_lin",
    attention_dropout=None, attention_norm="sa_layer_norm", ffn_in="ffn.lin1", ffn_act="ffn.activation",
    ffn_out="ffn.lin2", ffn_dropout="ffn.dropout", ffn_norm="output_layer_norm", head=_pre_classifier_head,
    activation_key="activation")
_ALBERT = EncoderLayout(
    base="albert", layers="encoder.albert_layer_groups.0.albert_layers", query="attention.query",
    key="attention.key", value="attention.value", probs_dropout="attention.attention_dropout",
    attention_out="attention.dense", attention_dropout="attention.output_dropout", attention_norm="attention.LayerNorm",
    ffn_in="ffn", ffn_act="activation", ffn_out="ffn_output", ffn_dropout=None, ffn_norm="full_layer_layer_norm",
    head=_albert_head, embeddings_project="encoder.embedding_hidden_mapping_in", layer_order=_albert_order)
_MPNET = EncoderLayout(
    base="mpnet", layers="encoder.layer", query="attention.attn.q", key="attention.attn.k", value="attention.attn.v",
    probs_dropout="attention.attn.dropout", attention_out="attention.attn.o", attention_dropout="attention.dropout",
    attention_norm="attention.LayerNorm", ffn_in="intermediate.dense", ffn_act="intermediate.intermediate_act_fn",
    ffn_out="output.dense", ffn_dropout="output.dropout", ffn_norm="output.LayerNorm",
    head=_dense_head(lambda c, x: torch.tanh(x)), positions="padding", relative_bias="encoder.relative_attention_bias")
#: The layout of each captured class name (:func:`register_encoder` adds to it).
_LAYOUTS: dict[str, EncoderLayout] = {}
_ACTIVATIONS = ("gelu", "relu", "gelu_new", "gelu_pytorch_tanh")


def _has_submodule(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def _encoder_of(model: nn.Module, layout: EncoderLayout, name: str) -> nn.Module:
    """``model``'s encoder model, after checking that every module the layout names exists in it (in its first
    layer, and the embeddings' parts): a wrong path is named now, not mid-trace."""
    try:
        base = model.get_submodule(layout.base)
        layer = base.get_submodule(layout.layers)[0]
        paths = [layout.query, layout.key, layout.value, layout.probs_dropout, layout.attention_out,
                 layout.attention_dropout, layout.attention_norm, layout.ffn_in, layout.ffn_act, layout.ffn_out,
                 layout.ffn_dropout, layout.ffn_norm]
        for path in filter(None, paths):
            layer.get_submodule(path)
        for path in ("word_embeddings", "position_embeddings", "LayerNorm", "dropout"):
            base.get_submodule(f"embeddings.{path}")
        if layout.relative_bias is not None:
            base.get_submodule(layout.relative_bias)
    except (AttributeError, IndexError, TypeError) as exc:
        raise ModelError(f"{name} does not have the parts its encoder layout names ({exc}); give it a layout of its "
                         "own (hessq.graph.register_encoder)") from None
    return base


class CapturedEncoderClassifier(CapturedModel):
    """A BERT-family encoder + its classification head (see :class:`EncoderLayout`), as its transformers class.

    The model's own children stay its attributes (``self.bert``, ``self.classifier``, ...), so every layer keeps
    its module path; ``base`` is another name for the encoder model (not a second copy).
    """

    def __init__(self, model: nn.Module, layout: EncoderLayout) -> None:
        super().__init__()
        config = model.config
        name = type(model).__name__
        if getattr(config, "problem_type", None) not in (None, "single_label_classification"):
            raise ModelError(f"hessq captures single-label sequence classifiers; this {name} is {config.problem_type!r}")
        activation = getattr(config, layout.activation_key, None)
        if activation not in _ACTIVATIONS:
            raise ModelError(f"{layout.activation_key}={activation!r} is not one hessq captures {_ACTIVATIONS}")
        base = _encoder_of(model, layout, name)
        self.tanh_gelu = activation in ("gelu_new", "gelu_pytorch_tanh")
        for child, module in model.named_children():
            setattr(self, child, module)
        object.__setattr__(self, "base", base)  # an alias, not registered: parameters keep one path
        # ELECTRA's and ALBERT's embedding width → hidden width (ELECTRA has it only where the two differ); looked
        # up by path at each call, as the layers are, so that a pass that swaps a module is seen
        self.has_project = layout.embeddings_project is not None and _has_submodule(base, layout.embeddings_project)
        if layout.head is _pooler_head and base.pooler is None:
            raise ModelError(f"this {name} has no pooler (add_pooling_layer=False)")
        self.layout = layout
        self.source = name
        self.config = config
        self.pad_token_id = int(config.pad_token_id if config.pad_token_id is not None else 0)
        # RoBERTa numbers positions from pad + 1: its table holds pad + 1 rows more than its longest input
        offset = self.pad_token_id + 1 if layout.positions == "padding" else 0
        numbered_from = getattr(base.embeddings, "padding_idx", self.pad_token_id)
        if layout.positions == "padding" and numbered_from != self.pad_token_id:
            # MPNet numbers positions from its embeddings' padding_idx (1), whatever the config's pad_token_id
            raise ModelError(f"this {name} numbers positions from padding id {numbered_from} but pads with "
                             f"pad_token_id={self.pad_token_id}; set config.pad_token_id = {numbered_from}")
        self.max_length = int(config.max_position_embeddings) - offset
        self.num_heads = int(config.num_attention_heads)  # (DistilBERT's config maps its n_heads and dim to these)
        self.head_size = int(config.hidden_size // self.num_heads)
        # the wrapper's own flag as the model's (its children are the model's): a pass that restores the mode it
        # found must not put the user's eval-mode model's dropout back in training
        self.training = model.training

    def _attention(self, layer: nn.Module, h: torch.Tensor, keep: torch.Tensor,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
        at, b, t = self.layout, h.size(0), h.size(1)

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(b, t, self.num_heads, self.head_size).transpose(1, 2)

        sub = layer.get_submodule
        q, k, v = heads(sub(at.query)(h)), heads(sub(at.key)(h)), heads(sub(at.value)(h))
        scores = torch.matmul(q, k.transpose(-1, -2)) * (self.head_size ** -0.5)
        if bias is not None:
            scores = scores + bias
        probs = sub(at.probs_dropout)(masked_softmax(scores, keep))
        context = torch.matmul(probs, v).transpose(1, 2).reshape(b, t, self.num_heads * self.head_size)
        out = sub(at.attention_out)(context)
        if at.attention_dropout is not None:
            out = sub(at.attention_dropout)(out)
        return sub(at.attention_norm)(out + h)

    def _feed_forward(self, layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
        at, sub = self.layout, layer.get_submodule
        x = sub(at.ffn_in)(h)
        # the tanh GELUs as the one op hessq quantizes (transformers' gelu_new spells the formula out in pow and tanh;
        # the two agree to float rounding)
        x = F.gelu(x, approximate="tanh") if self.tanh_gelu else sub(at.ffn_act)(x)
        out = sub(at.ffn_out)(x)
        if at.ffn_dropout is not None:
            out = sub(at.ffn_dropout)(out)
        return sub(at.ffn_norm)(out + h)

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        emb = self.base.embeddings
        positions = torch.arange(input_ids.size(1), device=input_ids.device).unsqueeze(0)  # a constant per length
        h = emb.word_embeddings(input_ids)
        types = getattr(emb, "token_type_embeddings", None)
        if types is not None:  # single texts: every token of type 0 (the model's own default)
            h = h + types(torch.zeros_like(positions))
        if self.layout.positions == "padding":  # RoBERTa's numbering, from the padding
            h = h + emb.position_embeddings(padding_positions(input_ids, self.pad_token_id))
        else:
            h = h + emb.position_embeddings(positions)
        h = emb.dropout(emb.LayerNorm(h))
        return self.base.get_submodule(self.layout.embeddings_project)(h) if self.has_project else h

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self._embed(input_ids)
        mask = (input_ids != self.pad_token_id).unsqueeze(1).unsqueeze(2)  # [B, 1, 1, T]: keys that are not padding
        bias = None
        if self.layout.relative_bias is not None:  # [1, heads, T, T]: one bias per head and relative position
            table = self.base.get_submodule(self.layout.relative_bias)
            bias = table(relative_position_buckets(input_ids.size(1), device=input_ids.device)).permute(0, 3, 1, 2)
        order = self.layout.layer_order
        for layer in order(self.base, self.config) if order is not None else self.base.get_submodule(self.layout.layers):
            h = self._feed_forward(layer, self._attention(layer, h, mask, bias))
        return self.layout.head(self, h)


def _capture_encoder(model: nn.Module) -> nn.Module:
    return CapturedEncoderClassifier(model, _LAYOUTS[type(model).__name__])


def register_encoder(layout: EncoderLayout, *class_names: str) -> None:
    """Capture Hugging Face sequence classifiers of ``class_names`` (``type(model).__name__``) by ``layout``: a
    post-norm BERT-like encoder whose parts sit where the layout says, under the head ``layout.head``
    (``head(captured, h) -> logits``, with the model's children as ``captured``'s attributes and ``captured.base``
    its encoder model)."""
    if not isinstance(layout, EncoderLayout):
        raise ConfigTypeError(f"layout must be an EncoderLayout, got {type(layout).__name__}")
    if not class_names or not all(isinstance(n, str) and n for n in class_names):
        raise ConfigTypeError(f"register_encoder needs one or more class names (type(model).__name__), got {class_names!r}")
    for name in class_names:
        _LAYOUTS[name] = layout
    register_capture(*class_names)(_capture_encoder)


def encoder_layout(class_name: str) -> EncoderLayout:
    """The layout hessq captures ``class_name`` by: a start for a layout of your own (``dataclasses.replace(
    encoder_layout("BertForSequenceClassification"), head=my_head)``, then :func:`register_encoder`)."""
    if class_name not in _LAYOUTS:
        raise ModelError(f"no encoder layout for {class_name!r}; hessq has layouts for {sorted(_LAYOUTS)}")
    return _LAYOUTS[class_name]


register_encoder(_BERT, "BertForSequenceClassification")
register_encoder(_ELECTRA, "ElectraForSequenceClassification")
register_encoder(_DISTILBERT, "DistilBertForSequenceClassification")
register_encoder(_ALBERT, "AlbertForSequenceClassification")
register_encoder(_MPNET, "MPNetForSequenceClassification")
# XLM-R and CamemBERT are RoBERTa under other names
register_encoder(_ROBERTA, "RobertaForSequenceClassification", "XLMRobertaForSequenceClassification",
                 "CamembertForSequenceClassification")
