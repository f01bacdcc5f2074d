"""The brain's language models: one streaming protocol, several providers, a router, clauses.

- :mod:`.base`: :class:`LlmProvider`, :class:`LlmRequest` and the events a reply streams as
  (:class:`TextDelta`, :class:`ToolCall`, :class:`Done`; the router adds :class:`Filler` and
  :class:`ProviderSwitched`), and :class:`LlmError`.
- :mod:`.anthropic_llm`: Claude through the anthropic SDK (tools, prompt caching).
- :mod:`.openai_compat`: any OpenAI-compatible ``/chat/completions`` endpoint over aiohttp.
- :mod:`.local_responder`: the offline default, knowledge-grounded and deterministic, with the
  intent rules of :mod:`.intents` (:func:`classify_intent` also serves warm-up on partials).
- :mod:`.router`: per-turn provider choice, fallback before the first token, filler, breakers.
- :mod:`.clauses`: :class:`ClauseSplitter`, which cuts streamed text into speakable clauses.
- :mod:`.keypad`: how a caller's key presses read in the conversation (``[keypad] 1234#``).

Provider modules are imported on use (``from parley.brain.llm.anthropic_llm import …``) so that
importing the package does not load vendor SDKs.
"""

from .base import (
    AssistantMessage,
    Done,
    Filler,
    LlmError,
    LlmEvent,
    LlmProvider,
    LlmRequest,
    Message,
    ProviderSwitched,
    SystemPrompt,
    TextDelta,
    ToolCall,
    ToolResult,
    ToolSpec,
    ToolUse,
    Usage,
    UsageReported,
    UserMessage,
)
from .clauses import ClauseSplitter, split_sentences
from .intents import Intent, classify_intent
from .local_responder import LocalResponder, Retrieve, RetrievedChunk
from .router import LlmRouter, RouterEvent

__all__ = [
    "AssistantMessage", "ClauseSplitter", "Done", "Filler", "Intent", "LlmError", "LlmEvent",
    "LlmProvider", "LlmRequest", "LlmRouter", "LocalResponder", "Message", "ProviderSwitched",
    "Retrieve", "RetrievedChunk", "RouterEvent", "SystemPrompt", "TextDelta", "ToolCall",
    "ToolResult", "ToolSpec", "ToolUse", "Usage", "UsageReported", "UserMessage",
    "classify_intent", "split_sentences",
]
