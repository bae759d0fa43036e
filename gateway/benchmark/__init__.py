"""benchmark-serving: drive an OpenAI-compatible server with a dataset's prompts and measure it.

The package stands alone (it imports nothing else from `gateway`) so that it can measure any server, the
gateway or the vLLM behind it, from any machine that has aiohttp and orjson.
"""
