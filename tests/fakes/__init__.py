"""Test fakes: a fault-injecting OpenAI-compatible server and tiny models. Not part of the package."""
