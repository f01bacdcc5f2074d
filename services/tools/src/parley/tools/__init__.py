"""Parley tools: run the model's tool calls against customer APIs and the live call.

The brain offers the model :func:`parley.common.tools.agent_tool_specs` and reads back one
terminal event per ``tool_call_id``: ``tool.completed``, ``tool.failed`` or ``tool.denied``.
"""
