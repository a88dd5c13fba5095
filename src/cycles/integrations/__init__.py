"""Cycles integrations: the LLM SDKs, agent frameworks and web frameworks people use, guarded and priced.

Each lives in its own module and imports its library only when imported itself:
`cycles.integrations.openai`, `.anthropic`, `.langchain`, `.openai_agents`, `.pydantic_ai`, `.llamaindex`,
`.crewai`, `.autogen`, `.asgi`, `.django`, `.flask`. Install the library with its extra, e.g.
`pip install 'cycles[openai]'`, or `'cycles[integrations]'` for all. See docs/integrations.md.
"""

from ._common import LLMRequest, Options

__all__ = ["Options", "LLMRequest"]
