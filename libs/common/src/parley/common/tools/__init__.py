"""Agent tools as configuration: definitions, built-in specs, and their Postgres repository.

Shared because two services read them: the tools service runs tools, the brain offers their
specs to the model (``agent_tool_specs``).
"""

from .builtin_specs import BUILTIN_SPECS
from .definitions import HttpTool, RetryPolicy, ToolDefinitionError, ToolSpec, parse_http_tool
from .repository import agent_tool_specs

__all__ = ["BUILTIN_SPECS", "HttpTool", "RetryPolicy", "ToolDefinitionError", "ToolSpec",
           "agent_tool_specs", "parse_http_tool"]
