"""Models: a Flax BERT encoder with Hugging Face weight interop."""

from jfast.models.attention import ATTENTION_KINDS, AttentionConfig, dense_attention, segment_mask
from jfast.models.bert import BertConfig, BertForSequenceClassification, BertModel
from jfast.models.hf_io import init_classifier, load_hf_bert, save_hf_bert

__all__ = [
  "ATTENTION_KINDS",
  "AttentionConfig",
  "BertConfig",
  "BertForSequenceClassification",
  "BertModel",
  "dense_attention",
  "init_classifier",
  "load_hf_bert",
  "save_hf_bert",
  "segment_mask",
]
