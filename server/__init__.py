"""The FastAPI proxy: OpenAI wire types, auth, SSE, errors, metrics and admin routes."""
