"""``guardrail cycle``: harvest -> correct -> train -> evaluate, each stage cached."""
