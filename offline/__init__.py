"""Offline modules: harvest cases into training data, train, evaluate. Never imports server/."""
