"""Hugging Face models as traceable modules: the same submodules, a forward torch.fx can follow.

``torch.fx.symbolic_trace`` cannot follow transformers' forwards (shape unpacking, keyword-only
plumbing, attention dispatch). :func:`capture` turns a supported model into an equivalent module whose
forward is plain torch on the *same* submodule objects, under the same attribute paths, so layer
names stay the user's (``bert.encoder.layer.0.attention.self.query``) and its logits equal the
original's (tests check 1e-5). The captured module takes the token ids alone and returns the logits:
the attention mask is derived from the padding (``input_ids != pad_token_id``), which is exactly
the mask Hugging Face tokenizers produce with right or left padding.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from hessq._errors import ModelError
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


class CapturedBertForSequenceClassification(CapturedModel):
    """BERT encoder + CLS pooler + classifier, as in ``transformers.BertForSequenceClassification``."""

    input_key = "input_ids"

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        config = model.config
        if getattr(config, "problem_type", None) not in (None, "single_label_classification"):
            raise ModelError(f"hessq captures single-label classification BERTs; this one is {config.problem_type!r}")
        if config.hidden_act not in ("gelu", "relu", "gelu_new", "gelu_pytorch_tanh"):
            raise ModelError(f"hidden_act={config.hidden_act!r} is not one hessq captures (gelu, relu)")
        if model.bert.pooler is None:
            raise ModelError("this BertForSequenceClassification has no pooler (add_pooling_layer=False)")
        self.source = type(model).__name__
        self.bert = model.bert
        self.dropout = model.dropout
        self.classifier = model.classifier
        self.config = config
        self.pad_token_id = int(config.pad_token_id if config.pad_token_id is not None else 0)
        self.max_length = int(config.max_position_embeddings)
        self.num_heads = int(config.num_attention_heads)
        self.head_size = int(config.hidden_size // config.num_attention_heads)
        # the wrapper's own flag as the model's (its children are the model's): a pass that restores the mode it
        # found must not put the user's eval-mode model's dropout back in training
        self.training = model.training

    def _attention(self, layer: nn.Module, h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        attn = layer.attention.self
        b, t = h.size(0), h.size(1)

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(b, t, self.num_heads, self.head_size).transpose(1, 2)

        q, k, v = heads(attn.query(h)), heads(attn.key(h)), heads(attn.value(h))
        scores = torch.matmul(q, k.transpose(-1, -2)) * (self.head_size ** -0.5)
        probs = attn.dropout(masked_softmax(scores, keep))
        context = torch.matmul(probs, v).transpose(1, 2).reshape(b, t, self.num_heads * self.head_size)
        out = layer.attention.output
        return out.LayerNorm(out.dropout(out.dense(context)) + h)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        emb = self.bert.embeddings
        # BERT's own position and token-type ids (its buffers hold arange and zeros): constants per length
        positions = torch.arange(input_ids.size(1), device=input_ids.device).unsqueeze(0)
        h = (emb.word_embeddings(input_ids)
             + emb.token_type_embeddings(torch.zeros_like(positions))
             + emb.position_embeddings(positions))
        h = emb.dropout(emb.LayerNorm(h))
        keep = (input_ids != self.pad_token_id).unsqueeze(1).unsqueeze(2)  # [B, 1, 1, T]: keys that are not padding
        for layer in self.bert.encoder.layer:
            h = self._attention(layer, h, keep)
            inner = layer.intermediate.intermediate_act_fn(layer.intermediate.dense(h))
            h = layer.output.LayerNorm(layer.output.dropout(layer.output.dense(inner)) + h)
        pooler = self.bert.pooler
        pooled = pooler.activation(pooler.dense(h[:, 0]))
        return self.classifier(self.dropout(pooled))


@register_capture("BertForSequenceClassification")
def _bert_for_sequence_classification(model: nn.Module) -> nn.Module:
    return CapturedBertForSequenceClassification(model)
