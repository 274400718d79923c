"""Models: a Flax BERT encoder and a GPT-2-style decoder, with Hugging Face weight interop."""

from jfast.models.attention import ATTENTION_KINDS, AttentionConfig, dense_attention, segment_mask
from jfast.models.bert import BertConfig, BertForSequenceClassification, BertModel
from jfast.models.fused import fused_projections
from jfast.models.gpt import GPT, GPTConfig, generate, init_gpt
from jfast.models.gpt_io import load_hf_gpt2, save_hf_gpt2
from jfast.models.hf_io import init_classifier, load_hf_bert, save_hf_bert

__all__ = [
  "ATTENTION_KINDS",
  "GPT",
  "AttentionConfig",
  "BertConfig",
  "BertForSequenceClassification",
  "BertModel",
  "GPTConfig",
  "dense_attention",
  "fused_projections",
  "generate",
  "init_classifier",
  "init_gpt",
  "load_hf_bert",
  "load_hf_gpt2",
  "save_hf_bert",
  "save_hf_gpt2",
  "segment_mask",
]
