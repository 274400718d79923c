"""Models: a Flax BERT encoder and a GPT-2-style decoder, with Hugging Face weight interop both ways, and the adapter
that lets a Flax NNX module train through jfast's steps."""

from jfast.models.bert import BertConfig, BertForSequenceClassification, BertModel, extend_position_embeddings
from jfast.models.bert_io import init_classifier, load_hf_bert, pad_to_uniform, save_hf_bert
from jfast.models.gpt import GPT, GPTConfig, generate, init_gpt
from jfast.models.gpt_io import load_hf_gpt2, save_hf_gpt2
from jfast.models.nnx import nnx_split

__all__ = [
  "GPT",
  "BertConfig",
  "BertForSequenceClassification",
  "BertModel",
  "GPTConfig",
  "extend_position_embeddings",
  "generate",
  "init_classifier",
  "init_gpt",
  "load_hf_bert",
  "load_hf_gpt2",
  "nnx_split",
  "pad_to_uniform",
  "save_hf_bert",
  "save_hf_gpt2",
]
