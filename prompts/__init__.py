"""Prompt templates of the build stages, shipped as package data (``hierarcaps.prompts``)."""
