"""Models: a Flax BERT encoder, a GPT-2-style decoder and a Llama-family decoder (Llama, Mistral, Qwen2, Qwen3)
with a key/value cache, Hugging Face weight interop both ways, LoRA adapters in peft's format, and the adapter that
lets a Flax NNX module train through jfast's steps."""

from jfast.models.bert import BertConfig, BertForSequenceClassification, BertModel, extend_position_embeddings
from jfast.models.bert_io import init_classifier, load_hf_bert, pad_to_uniform, save_hf_bert
from jfast.models.generation import filter_logits, generate_with_cache
from jfast.models.gpt import GPT, GPTConfig, generate, init_gpt
from jfast.models.gpt_io import load_hf_gpt2, save_hf_gpt2
from jfast.models.llama import PROJECTIONS, Llama, LlamaConfig, init_llama
from jfast.models.llama_io import load_hf_llama, save_hf_llama
from jfast.models.nnx import nnx_split
from jfast.models.peft_io import load_peft, save_peft

__all__ = [
  "GPT",
  "PROJECTIONS",
  "BertConfig",
  "BertForSequenceClassification",
  "BertModel",
  "GPTConfig",
  "Llama",
  "LlamaConfig",
  "extend_position_embeddings",
  "filter_logits",
  "generate",
  "generate_with_cache",
  "init_classifier",
  "init_gpt",
  "init_llama",
  "load_hf_bert",
  "load_hf_gpt2",
  "load_hf_llama",
  "load_peft",
  "nnx_split",
  "pad_to_uniform",
  "save_hf_bert",
  "save_hf_gpt2",
  "save_hf_llama",
  "save_peft",
]
