"""The language side of the brain-language model: conversation formats, tokenization with labels,
padded batches, and the Llama-3 tokenizer rebuilt offline (docs/language.md)."""

from nvl_jax.language.conversation import (IGNORE_INDEX, IMAGE_TOKEN_INDEX, TokenizedConversation,
                                           check_segmentation, collate, tokenize_conversation)
from nvl_jax.language.formats import (CHAT_TEMPLATE, FORMATS, IMAGE_PLACEHOLDER, LLAMA3, PAPER, VICUNA_V1,
                                      ChatTemplateFormat, Segment, TemplateFormat, check_conversation, get_format)

__all__ = ["CHAT_TEMPLATE", "FORMATS", "IGNORE_INDEX", "IMAGE_PLACEHOLDER", "IMAGE_TOKEN_INDEX", "LLAMA3", "PAPER",
           "VICUNA_V1", "ChatTemplateFormat", "Segment", "TemplateFormat", "TokenizedConversation",
           "check_conversation", "check_segmentation", "collate", "get_format", "tokenize_conversation"]
